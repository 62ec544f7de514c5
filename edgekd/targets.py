"""One table of deployment targets and one of bench backends (as ultralytics' `export_formats()` drives its
export, CLI and benchmarks): which files a bundle holds, which `edgekd export` / `edgekd build` makes them,
which backends open them on which devices, and what each backend needs installed.

Adding a backend (OpenVINO, ExecuTorch) is one `Backend` entry, its targets, and one runner in `edgekd/runtime/`.
Standard library only: the bench, `edgekd build` and the report read this table on devices without PyTorch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from edgekd.runio import WEIGHTS

# What a latency figure measures. The report never puts the two on one axis.
HOST_WALL = "host_wall"  # host clock around a synchronous call (ONNX Runtime; PyTorch on CPU)
DEVICE_EVENTS = "device_events"  # CUDA events around the device work alone (TensorRT; PyTorch on CUDA)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    module: str  # imported lazily by the runner; checked up front by `missing_for`
    install: str  # the fix when `module` is missing
    timing: dict[str, str]  # device -> HOST_WALL | DEVICE_EVENTS
    help: str


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("ort", ("cpu", "cuda"), "onnxruntime",
            "pip install 'edgekd[bench]' (CPU), or 'edgekd[gpu-cu12]' / 'edgekd[gpu-cu13]' for CUDA (never beside "
            "the CPU one: they are the same onnxruntime module)",
            # On CUDA the inputs and outputs stay on the GPU (IO binding) and run_with_iobinding returns after
            # the device finished, so the host clock measures device work plus launch overhead, no copies.
            {"cpu": HOST_WALL, "cuda": HOST_WALL}, "ONNX Runtime, CPU or CUDA execution provider"),
    Backend("ort-trt", ("cuda",), "onnxruntime",
            "pip install 'edgekd[gpu-cu12]' or 'edgekd[gpu-cu13]' (onnxruntime-gpu) and TensorRT's libraries",
            {"cuda": HOST_WALL}, "ONNX Runtime's TensorRT execution provider (engines built and cached by ORT)"),
    Backend("trt", ("cuda",), "tensorrt",
            "TensorRT 10/11 and cuda-python: JetPack's own TensorRT on a Jetson, pip install 'edgekd[trt-cu12]' "
            "or 'edgekd[trt-cu13]' on an x86 GPU server (see README: Devices)",
            {"cuda": DEVICE_EVENTS}, "TensorRT engines built on this device by `edgekd build`"),
    # Intel's runtime for its CPUs (and iGPUs, not benched here): it reads the bundle's ONNX files, Q/DQ included.
    Backend("openvino", ("cpu",), "openvino", "pip install 'edgekd[openvino]'", {"cpu": HOST_WALL},
            "OpenVINO on the CPU: the bundle's ONNX models compiled by ov.Core, latency hint, FP32 math"),
    # PyTorch's runtime for Android, iOS and Arm Linux: .pte programs lowered to XNNPACK at export (from the PyTorch
    # student; ExecuTorch reads no ONNX). Its Python bindings link libtorch, so the device needs torch too.
    Backend("executorch", ("cpu",), "executorch.runtime", "pip install 'edgekd[executorch]'", {"cpu": HOST_WALL},
            "ExecuTorch on the CPU: the bundle's .pte programs (XNNPACK delegate), made by --target pte"),
    Backend("torch", ("cpu", "cuda"), "torch", "pip install 'edgekd[train]'",
            {"cpu": HOST_WALL, "cuda": DEVICE_EVENTS}, "PyTorch eager, the reference the exports are checked against"),
)}


@dataclass(frozen=True)
class Target:
    key: str  # manifest key and the name `--model` selects
    file: str  # inside the bundle
    precision: str
    made_by: str  # `edgekd export --target X` (onnx, int8) or `edgekd build` (trt)
    backends: tuple[str, ...]  # backends that open it
    meant_for: tuple[str, ...]  # devices it is made for; elsewhere it is benched for its accuracy only
    builds_from: str | None = None  # engines: the bundle's ONNX file they are built from
    preset: str | None = None  # INT8: the quantization preset
    # "backend/device" pairs that open the file but compute in float with its Q/DQ around (no integer kernels):
    # benched there for accuracy only, never as the precision's speed
    simulated_on: tuple[str, ...] = ()

    def computes(self, backend: str, device: str) -> str:
        """What the arithmetic is on this backend and device: the precision, or float where it is simulated."""
        return f"fp32 (simulated {self.precision})" if f"{backend}/{device}" in self.simulated_on else self.precision

    def meant_for_run(self, backend: str, device: str) -> bool:
        """Made for this device and computed in its precision there: a figure that speaks for the deployment."""
        return device in self.meant_for and f"{backend}/{device}" not in self.simulated_on


TARGETS: dict[str, Target] = {t.key: t for t in (
    Target("onnx-fp32", "model.onnx", "fp32", "onnx", ("ort", "ort-trt", "openvino"), ("cpu", "cuda")),
    # Weights and compute in half, float32 at the edges: what a strongly typed TensorRT network builds FP16 from.
    Target("onnx-fp16", "model.fp16.onnx", "fp16", "onnx", ("ort", "ort-trt"), ("cuda",)),
    # U8 asymmetric activations: ORT's fast CPU kernels. Not for TensorRT, which takes symmetric INT8 only.
    Target("onnx-int8-cpu", "model.int8-cpu.onnx", "int8", "int8", ("ort", "openvino"), ("cpu",), preset="cpu"),
    # Symmetric S8 Q/DQ for TensorRT. ORT's CUDA EP runs it too, but as float convolutions with Q/DQ around them
    # (ORT fuses Q/DQ into integer kernels on CPU only): an accuracy check there, not an INT8 latency.
    Target("onnx-int8-trt", "model.int8-trt.onnx", "int8", "int8", ("ort", "ort-trt", "openvino"), ("cuda",),
           preset="trt",
           simulated_on=("ort/cuda",)),
    Target("trt-fp32", "trt-fp32.engine", "fp32", "trt", ("trt",), ("cuda",), builds_from="model.onnx"),
    Target("trt-fp16", "trt-fp16.engine", "fp16", "trt", ("trt",), ("cuda",), builds_from="model.fp16.onnx"),
    Target("trt-int8", "trt-int8.engine", "int8", "trt", ("trt",), ("cuda",), builds_from="model.int8-trt.onnx"),
    # ExecuTorch programs, made from the PyTorch student (`edgekd export --target pte`): FP32, and INT8 by XNNPACK's
    # PT2E quantizer (symmetric per-channel weights) calibrated on training images, guarded like the ONNX INT8 models
    Target("pte-fp32", "model.pte", "fp32", "pte", ("executorch",), ("cpu",)),
    Target("pte-int8", "model.int8.pte", "int8", "pte", ("executorch",), ("cpu",)),
    Target("torch-fp32", WEIGHTS, "fp32", "onnx", ("torch",), ("cpu", "cuda")),
)}

EXPORT_TARGETS = ("onnx", "int8", "trt", "pte")  # `edgekd export --target` choices
# torch's ONNX exporters: its TorchScript-based one followed by onnxscript's graph optimizer (the default: the same
# graph as dynamo's on edgekd's students, 9-20x faster, benchmarks/results/onnx_exporters-cpu.json), and its
# torch.export-based one (torch's own default; for a model TorchScript cannot trace)
ONNX_EXPORTERS = ("torchscript", "dynamo")
ENGINE_PRECISIONS = tuple(t.precision for t in TARGETS.values() if t.builds_from)  # `edgekd build` makes these


def engine_target(precision: str) -> Target:
    return next(t for t in TARGETS.values() if t.builds_from and t.precision == precision)


def targets_for(backend: str) -> list[Target]:
    return [t for t in TARGETS.values() if backend in t.backends]


def timing_kind(backend: str, device: str) -> str:
    return BACKENDS[backend].timing[device]


def missing_for(backend: str) -> str | None:
    """The install fix when the backend's runtime is not importable here, else None. Imports nothing."""
    try:
        found = importlib.util.find_spec(BACKENDS[backend].module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else BACKENDS[backend].install


def int8_target(preset: str) -> Target:
    """The ONNX Q/DQ model an INT8 preset makes (`cpu` -> onnx-int8-cpu)."""
    return next(t for t in TARGETS.values() if t.made_by == "int8" and t.preset == preset)


def exported_target(precision: str) -> Target:
    """The ONNX model `edgekd export --target onnx` makes in this precision (fp32 -> onnx-fp32)."""
    return next(t for t in TARGETS.values() if t.made_by == "onnx" and t.file.endswith(".onnx")
                and t.precision == precision)
