"""ExecuTorch programs (.pte) for Arm Linux, Android and iOS: the PyTorch student exported by `torch.export`, lowered
to the XNNPACK backend, and INT8 through XNNPACK's own quantizer (the PT2E flow: observers, calibration on
training images, per-channel symmetric weights), as ExecuTorch's documentation does it
(`to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`).

Made from the PyTorch student at export time, not from the ONNX file: ExecuTorch has no ONNX importer. Parity is
checked against PyTorch like the ONNX files (edgekd.export.bundle). Needs `edgekd[executorch]`; imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError

INSTALL = "pip install 'edgekd[executorch]'"
MAX_BATCH = 256  # the dynamic batch range the program is planned for: 1..MAX_BATCH, as the ONNX models' bench sizes
# The example input's batch at export. torch.export specialises a batch of 1 to a constant, and with 2..15 the
# convolution backend choice traced during XNNPACK lowering guards "batch < 16", which silently narrows the
# program's range to [2, 15] (batch 64 then fails at run time with set_inputs error 0x10). 16 keeps 1..256.
EXAMPLE_BATCH = 16


def _modules():
    try:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise EdgeKDError(f"export target 'pte' needs ExecuTorch, which is not installed: {INSTALL}") from None
    return torch, XnnpackPartitioner, to_edge_transform_and_lower


def write_pte(model, shape: tuple[int, ...], path: Path, calibration: np.ndarray | None = None) -> dict:
    """Lower `model` (eval mode, float32 NCHW input of `shape` per image) to an XNNPACK program at `path`: FP32, or
    INT8 when `calibration` (normalised training images) is given. Returns what the manifest records of it."""
    torch, XnnpackPartitioner, to_edge_transform_and_lower = _modules()
    from torch.export import Dim, export

    class Input(torch.nn.Module):  # the graph's input named `x`, whatever the model's forward calls it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapped = Input(model).eval()
    example = (torch.zeros((EXAMPLE_BATCH, *shape)),)
    dynamic = {"x": {0: Dim("batch", min=1, max=MAX_BATCH)}}
    info: dict = {"max_batch": MAX_BATCH, "backend": "xnnpack"}
    with torch.no_grad():
        if calibration is None:
            program = export(wrapped, example, dynamic_shapes=dynamic)
        else:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            captured = export(wrapped, example, dynamic_shapes=dynamic).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            observed = prepare_pt2e(captured, quantizer)
            for i in range(0, len(calibration), 64):
                observed(torch.from_numpy(calibration[i : i + 64]))
            program = export(convert_pt2e(observed), example, dynamic_shapes=dynamic)
            info.update(quantizer="XNNPACKQuantizer, symmetric per-channel weights, per-tensor activations (PT2E)",
                        calibration_images=len(calibration))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    # what runs outside the XNNPACK delegate, on ExecuTorch's portable kernels (reshapes, a layout copy)
    left = sorted({str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
                   for n in edge.exported_program().graph.nodes if n.op == "call_function"
                   and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)})
    Path(path).write_bytes(edge.to_executorch().buffer)
    return {**info, "not_delegated": left}
