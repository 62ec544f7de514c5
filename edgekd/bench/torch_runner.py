"""The PyTorch eager runner: the reference every export is checked against, benched as `--backend torch`.

Layering: bench, not edgekd.runtime, because it needs the model code (edgekd.models) and PyTorch; it registers
itself in edgekd.runtime.runners.RUNNERS, and edgekd.bench.harness imports it so that `edgekd bench` has every
backend. Importing this module imports neither PyTorch nor the models: the runner does, when it is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.runtime.runners import RUNNERS, CudaEventClock, HostClock, Runner, check_model_file, require
from edgekd.targets import DEVICE_EVENTS


class TorchEventClock:
    """CUDA events recorded through PyTorch on its current stream, around `calls` back-to-back calls, divided:
    the GPU work per call at steady state, as CudaEventClock (which says why one call is not enough)."""

    kind = DEVICE_EVENTS
    calls = CudaEventClock.CALLS

    def __init__(self, torch):
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def measure(self, step):
        self.start.record()
        for _ in range(self.calls):
            step()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0 / self.calls


@RUNNERS.register("torch")
class TorchRunner(Runner):
    """PyTorch eager: the reference the exports are checked against. Needs the bundle's model.safetensors."""

    backend = "torch"

    def __init__(self, weights: Path, device: str = "cpu", threads: int = 0, model_info: dict | None = None):
        torch = require("torch", self.backend)
        from edgekd.models import create_model, load_weights

        self.threads_before = torch.get_num_threads()  # given back in close(): the process may train next
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise EdgeKDError("--backend torch --device cuda: this PyTorch sees no CUDA GPU (a CPU-only build, or "
                              "no driver): install a CUDA build of torch or bench with --device cpu")
        info = model_info or {}
        self.torch = torch
        self.model = load_weights(create_model(info["model"], info["num_classes"], info["in_chans"],
                                               info.get("small_input", True)), check_model_file(weights))
        self.model = self.model.to(device).eval()
        self.device = device
        # cuDNN convolutions may run as TF32 in PyTorch by default: recorded beside the figure, not changed (the
        # bench may share its process with training)
        self.tf32 = bool(torch.backends.cudnn.allow_tf32) if device == "cuda" else None

    def close(self) -> None:
        self.torch.set_num_threads(self.threads_before)

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def prepare(self, x):
        if self.device == "cpu":
            return super().prepare(x)
        resident = self.torch.from_numpy(x).to(self.device)
        model, torch = self.model, self.torch

        def step():
            with torch.inference_mode():
                return model(resident)

        return step

    def clock(self):
        return TorchEventClock(self.torch) if self.device == "cuda" else HostClock()
