"""One runner interface for every backend (as Polygraphy does): ONNX Runtime, TensorRT engines, PyTorch eager.

Heavy backends are imported lazily, inside the runner that needs them: bench must run on a device that has
ONNX Runtime or TensorRT and no PyTorch at all. A runner takes a float32 NCHW batch and returns logits; `time`
returns per-iteration seconds, synchronised with the device where the backend is asynchronous.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.registry import Registry

RUNNERS: Registry[type] = Registry("backend")


def require(module: str, backend: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgeKDError(f"backend {backend!r} needs {module}, which is not installed: {install}") from None


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise EdgeKDError(f"model file {str(path)!r} is missing or empty: run `edgekd export` again for this bundle")
    return path


class Runner(ABC):
    backend = ""

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch."""

    def time(self, x: np.ndarray, warmup: int, iters: int, duration: float | None) -> list[float]:
        """Seconds per call of `infer` on the same batch; stops after `iters` calls or `duration` seconds."""
        for _ in range(warmup):
            self.infer(x)
        times, deadline = [], time.perf_counter() + duration if duration else None
        clock = time.perf_counter
        while len(times) < iters if deadline is None else clock() < deadline:
            start = clock()
            self.infer(x)
            times.append(clock() - start)
        return times

    def close(self) -> None:  # noqa: B027 - optional hook: only runners holding device buffers free them
        """Release what the runner holds beyond Python objects (device buffers); most hold nothing."""


@RUNNERS.register("ort")
class OrtRunner(Runner):
    backend = "ort"
    PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}

    def __init__(self, model: Path, device: str = "cpu", threads: int = 0, provider: str | None = None):
        ort = require("onnxruntime", "ort", "pip install onnxruntime (or onnxruntime-gpu)")
        provider = self.PROVIDERS[provider or device]
        if provider not in ort.get_available_providers():
            raise EdgeKDError(f"ONNX Runtime here has no {provider} (it has {', '.join(ort.get_available_providers())}):"
                              f" install onnxruntime-gpu for CUDA/TensorRT, or bench with --device cpu")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(_check_file(model)), options,
                                                providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise EdgeKDError(f"model file {str(model)!r} cannot be loaded ({str(exc).splitlines()[0][:160]}): "
                              "it is corrupt or not ONNX; run `edgekd export` again") from None
        self.input = self.session.get_inputs()[0].name
        self.outputs = [self.session.get_outputs()[0].name]
        self.device = device

    def infer(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(self.outputs, {self.input: x})[0]
        except Exception as exc:
            shape = self.session.get_inputs()[0].shape
            raise EdgeKDError(f"the model cannot take input of shape {list(x.shape)} (it expects {shape}): "
                              "choose batch sizes the export allows") from exc

    def time(self, x, warmup, iters, duration):
        # The bare loop: no wrapper call per iteration, so the harness adds nothing to ORT's own time.
        for _ in range(warmup):
            self.infer(x)
        run, outputs, feed, clock = self.session.run, self.outputs, {self.input: x}, time.perf_counter
        times, deadline = [], clock() + duration if duration else None
        while len(times) < iters if deadline is None else clock() < deadline:
            start = clock()
            run(outputs, feed)
            times.append(clock() - start)
        return times


@RUNNERS.register("ort-trt")
class OrtTensorrtRunner(OrtRunner):
    """ONNX Runtime with its TensorRT execution provider (engines built and cached by ORT itself)."""

    backend = "ort-trt"

    def __init__(self, model: Path, device: str = "cuda", threads: int = 0):
        super().__init__(model, device, threads, provider="tensorrt")


@RUNNERS.register("torch")
class TorchRunner(Runner):
    """PyTorch eager: the reference the exports are checked against. Needs the bundle's model.safetensors."""

    backend = "torch"

    def __init__(self, weights: Path, device: str = "cpu", threads: int = 0, model_info: dict | None = None):
        torch = require("torch", "torch", "pip install edgekd (the full install) or bench with --backend ort")
        from edgekd.models import create_model, load_weights

        if threads:
            torch.set_num_threads(threads)
        info = model_info or {}
        self.torch = torch
        self.model = load_weights(create_model(info["model"], info["num_classes"], info["in_chans"],
                                               info.get("small_input", True)), _check_file(weights))
        self.model = self.model.to(device).eval()
        self.device = device

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def time(self, x, warmup, iters, duration):
        if not self.device.startswith("cuda"):
            return super().time(x, warmup, iters, duration)
        torch = self.torch
        xt = torch.from_numpy(x).to(self.device)
        with torch.inference_mode():
            for _ in range(warmup):
                self.model(xt)
            torch.cuda.synchronize()
            times, deadline = [], time.perf_counter() + duration if duration else None
            while len(times) < iters if deadline is None else time.perf_counter() < deadline:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.model(xt)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
        return times


@RUNNERS.register("trt")
class TrtRunner(Runner):
    """A serialized TensorRT engine, run with the TensorRT 10/11 tensor API and CUDA events for timing."""

    backend = "trt"

    def __init__(self, engine: Path, device: str = "cuda", threads: int = 0, max_batch: int = 256):
        from edgekd.export.tensorrt_build import import_tensorrt

        trt = import_tensorrt()
        cudart = require("cuda.bindings.runtime", "trt", "pip install cuda-python")
        self.trt, self.cudart = trt, cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(_check_file(engine).read_bytes())
        if self.engine is None:
            raise EdgeKDError(f"engine {str(engine)!r} cannot be deserialized here: rebuild it on this device "
                              "with `edgekd export --target trt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = self._check(cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}
        self.device = device

    def _check(self, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise EdgeKDError(f"CUDA call failed ({err}): check the GPU and driver with nvidia-smi")
        return values[0] if len(values) == 1 else values

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self.cudart.cudaFree(ptr))
            ptr = self._check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.context.set_input_shape(self.input, x.shape):
            profile = self.engine.get_tensor_profile_shape(self.input, 0)
            raise EdgeKDError(f"the engine cannot take input of shape {list(x.shape)} (its profile allows "
                              f"{[list(s) for s in profile]}): rebuild with a wider batch range")
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        out = np.empty(out_shape, dtype=np.float32)
        self.context.set_tensor_address(self.input, self._buffer(self.input, x.nbytes))
        self.context.set_tensor_address(self.output, self._buffer(self.output, out.nbytes))
        kind = self.cudart.cudaMemcpyKind
        self._check(self.cudart.cudaMemcpy(self.buffers[self.input][0], x.ctypes.data, x.nbytes,
                                           kind.cudaMemcpyHostToDevice))
        return out

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self._prepare(x)
        self.context.execute_async_v3(int(self.stream))
        self._check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[self.output][0], out.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        self._check(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def time(self, x, warmup, iters, duration):
        """Device time of the engine alone (input already on the GPU), from CUDA events."""
        self._prepare(x)
        cudart = self.cudart
        for _ in range(warmup):
            self.context.execute_async_v3(int(self.stream))
        self._check(cudart.cudaStreamSynchronize(self.stream))
        start, end = self._check(cudart.cudaEventCreate()), self._check(cudart.cudaEventCreate())
        times, deadline = [], time.perf_counter() + duration if duration else None
        while len(times) < iters if deadline is None else time.perf_counter() < deadline:
            self._check(cudart.cudaEventRecord(start, self.stream))
            self.context.execute_async_v3(int(self.stream))
            self._check(cudart.cudaEventRecord(end, self.stream))
            self._check(cudart.cudaEventSynchronize(end))
            times.append(self._check(cudart.cudaEventElapsedTime(start, end)) / 1000.0)
        return times

    def close(self):
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()
