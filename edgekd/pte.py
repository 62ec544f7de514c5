"""ExecuTorch programs at run time: the runner `edgekd export` checks a .pte against PyTorch with and `edgekd bench
--backend executorch` times. Not in edgekd.runtime, which stays torch-free for devices without PyTorch: ExecuTorch's
Python bindings link libtorch and take torch tensors, so this module needs torch wherever it runs (imported lazily,
when a program is opened). It registers the "executorch" runner in RUNNERS; bench imports it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.runtime.runners import RUNNERS, Runner, check_model_file, require


@RUNNERS.register("executorch")
class ExecuTorchRunner(Runner):
    """An ExecuTorch program (.pte, XNNPACK-lowered) on the CPU through `executorch.runtime`, PyTorch's own runtime
    for Android, iOS and Arm Linux. Its Python bindings take and return torch tensors (they link libtorch), so this
    runner needs torch on the device, as ExecuTorch itself does; numpy arrays are wrapped without a copy."""

    backend = "executorch"

    def __init__(self, model: Path, device: str = "cpu", threads: int = 0, max_batch: int = 256):
        runtime = require("executorch.runtime", self.backend)
        import torch

        self.torch = torch
        if threads:  # XNNPACK's thread pool, shared by every program in the process (ExecuTorch's own setter)
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        model = check_model_file(model)
        try:
            self.method = runtime.Runtime.get().load_program(str(model)).load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise EdgeKDError(f"ExecuTorch cannot load {model.name} ({str(exc).strip()[:160]}): export it again "
                              "with `edgekd export --target pte`") from None
        from executorch.extension.pybindings import portable_lib

        self.settings = {"executorch": executorch_version(), "delegate": "XnnpackBackend",
                         "threads": portable_lib._threadpool_get_thread_count()}
        self.max_batch = max_batch

    def infer(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.method.execute([self.torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()
        except RuntimeError as exc:
            raise EdgeKDError(f"the ExecuTorch program cannot take input of shape {list(x.shape)} ({str(exc)[:120]}):"
                              " choose batch sizes of at most 256") from exc

    def prepare(self, x):
        tensor = [self.torch.from_numpy(np.ascontiguousarray(x))]
        self.method.execute(tensor)
        return functools.partial(self.method.execute, tensor)


def executorch_version() -> str:
    """The installed ExecuTorch's version, for the manifest and each bench result."""
    import importlib.metadata

    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
