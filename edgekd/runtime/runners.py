"""One runner interface for every backend (as Polygraphy does), the ONNX Runtime and TensorRT runners, RUNNERS.

Layering: edgekd.runtime, below export, build and bench. `edgekd export` runs its ONNX models here for parity and
accuracy, `edgekd bench` times them; this module imports neither, nor PyTorch. The PyTorch reference runner needs
the model code, so it lives in edgekd.bench.torch_runner and registers itself in RUNNERS when bench imports it.

Heavy backends are imported lazily, inside the runner that needs them: bench must run on a device that has
ONNX Runtime or TensorRT and no PyTorch at all. A runner takes a float32 NCHW batch and returns logits.

There is one timed loop, `Runner.time`. A runner supplies what it times (`prepare`: one inference on a batch
already where the backend wants it) and the clock that times it (`clock`): the host's wall clock around a
synchronous call, or CUDA events around the device work. Each result says which (`timing`), because the two
are different quantities and the report never compares one with the other.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.registry import Registry
from edgekd.targets import BACKENDS, DEVICE_EVENTS, HOST_WALL

RUNNERS: Registry[type] = Registry("backend")


def require(module: str, backend: str):
    """`module` imported now (the lazy import of a backend), or the one-line error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgeKDError(f"backend {backend!r} needs {module}, which is not installed: "
                          f"{BACKENDS[backend].install}") from None


def check_model_file(path: Path) -> Path:
    """`path`, if it is a file with something in it; otherwise the one-line error that says to export again."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise EdgeKDError(f"model file {str(path)!r} is missing or empty: run `edgekd export` again for this bundle")
    return path


# -- clocks ----------------------------------------------------------------------------------------------------
class HostClock:
    """Wall time of a synchronous call: what a caller of the model waits, host overhead included."""

    kind = HOST_WALL
    calls = 1

    def measure(self, step: Callable[[], object]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start


class CudaEventClock:
    """Device time per call between two CUDA events on the runner's stream, around `calls` back-to-back enqueues.

    Around one enqueue the start event is recorded on an idle stream, so for a small model at batch 1 the
    interval is the launch latency of that one call, not the GPU's work. With `calls` enqueues queued behind each
    other the GPU stays fed, and the interval divided by `calls` is the time per inference at steady state
    (each sample is that mean; the record says how many calls a sample spans)."""

    kind = DEVICE_EVENTS
    CALLS = 10

    def __init__(self, cudart, stream, calls: int = CALLS):
        from edgekd.gpu import check

        self.cudart, self.stream, self.calls = cudart, stream, calls
        self.check = functools.partial(check, cudart)
        self.start = self.check(cudart.cudaEventCreate(), "creating a CUDA event")
        self.end = self.check(cudart.cudaEventCreate(), "creating a CUDA event")

    def measure(self, step):
        cudart = self.cudart
        self.check(cudart.cudaEventRecord(self.start, self.stream), "recording a CUDA event")
        for _ in range(self.calls):
            step()
        self.check(cudart.cudaEventRecord(self.end, self.stream), "recording a CUDA event")
        self.check(cudart.cudaEventSynchronize(self.end), "waiting for the GPU")
        elapsed = self.check(cudart.cudaEventElapsedTime(self.start, self.end), "reading a CUDA event") / 1000.0
        return elapsed / self.calls


@dataclass
class Timings:
    seconds: list[float]  # one per sample: the time per call, over `calls_per_sample` calls
    window: tuple[float, float]  # perf_counter at the first and after the last timed call: warm-up excluded
    kind: str  # HOST_WALL | DEVICE_EVENTS
    calls_per_sample: int = 1  # CUDA events time several enqueues and divide (CudaEventClock says why)


class Runner(ABC):
    """A model opened by one backend. Subclasses register in RUNNERS under their backend name (targets.BACKENDS)."""

    backend = ""
    max_batch: int | None = None  # the largest batch the opened model takes, where it has a limit (an engine's profile)

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch."""

    def prepare(self, x: np.ndarray) -> Callable[[], object]:
        """One inference on `x`, ready to call repeatedly: inputs placed where the backend reads them."""
        return functools.partial(self.infer, x)

    def clock(self):
        return HostClock()

    def time(self, x: np.ndarray, warmup: int, iters: int, duration: float | None) -> Timings:
        """The timed loop: `warmup` untimed calls, then `iters` calls or `duration` seconds of them."""
        step, clock = self.prepare(x), self.clock()
        for _ in range(warmup):
            clock.measure(step)  # the same path as the timed calls, so lazy work (engine builds) happens here
        measure, now = clock.measure, time.perf_counter
        times: list[float] = []
        start = now()
        deadline = start + duration if duration else None
        while len(times) < iters if deadline is None else now() < deadline:
            times.append(measure(step))
        return Timings(times, (start, now()), clock.kind, clock.calls)

    def close(self) -> None:  # noqa: B027 - optional hook: only runners holding device buffers free them
        """Release what the runner holds beyond Python objects (device buffers); most hold nothing."""


# -- ONNX Runtime ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _captured_output():
    """ONNX Runtime says why a provider failed to load only as log lines on the process's stderr (C++) and as
    prints on stdout (its Python fallback): keep both, so the one-line error can carry the reason."""
    captured: list[str] = []
    try:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no real stdio (some notebook hosts): nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in saved:
            os.dup2(tmp.fileno(), fd)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            captured.extend(tmp.read().decode(errors="replace").splitlines())


def _load_failure(lines: list[str]) -> str:
    """The useful part of ORT's provider-loading log: the missing library and the CUDA/cuDNN it requires."""
    reasons = []
    for line in lines:
        if "cannot open shared object file" in line:
            reasons.append(line.split("with error: ", 1)[-1].strip())
        elif "Require" in line:
            reasons.append(line[line.index("Require"):].split(". ")[0])
        elif "Please install TensorRT" in line:
            reasons.append("TensorRT libraries not found")
    reasons = list(dict.fromkeys(re.sub(r"\x1b\[[0-9;]*m", "", r).strip() for r in reasons))
    return "; ".join(reasons)[:300] or "ONNX Runtime gave no reason"


def _gpu_ort_install() -> str:
    if Path("/etc/nv_tegra_release").is_file():  # PyPI has no Jetson GPU build of ONNX Runtime
        return ("on a Jetson, pip uninstall onnxruntime, then pip install onnxruntime-gpu --index-url "
                "https://pypi.jetson-ai-lab.io/jp6/cu126 (JetPack 6)")
    return ("pip uninstall onnxruntime, then pip install 'edgekd[gpu-cu12]' or 'edgekd[gpu-cu13]' (onnxruntime-gpu "
            "for the driver's CUDA; the two packages are one module)")


def optimization_level(ort, as_written: bool):
    """ONNX Runtime's graph optimization level for a model run as written (Q/DQ in float, what TensorRT's int32
    arithmetic computes) or as an ORT deployment runs it (fused integer kernels included)."""
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL if as_written else ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@RUNNERS.register("ort")
class OrtRunner(Runner):
    backend = "ort"
    tf32: bool | None = None  # on a GPU: whether float math may run as TF32 (None on CPU)
    PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}

    def __init__(self, model: Path, device: str = "cpu", threads: int = 0, provider: str | None = None,
                 max_batch: int = 256, as_written: bool = False):
        """`as_written`: graph optimizations off, so an INT8 model's Q/DQ runs in float as the ONNX file says (what
        TensorRT's int32 arithmetic computes), not through ONNX Runtime's fused integer kernels."""
        ort = require("onnxruntime", self.backend)
        self.ort, self.device = ort, device
        wanted = self.PROVIDERS[provider or device]
        available = ort.get_available_providers()
        if wanted not in available:
            raise EdgeKDError(f"ONNX Runtime here has no {wanted} (it has {', '.join(available)}): "
                              f"{_gpu_ort_install()}, or bench with --device cpu")
        model = check_model_file(model)
        options = ort.SessionOptions()
        options.graph_optimization_level = optimization_level(ort, as_written)
        if threads:
            options.intra_op_num_threads = threads
        providers = self._providers(wanted, model, max_batch)
        with _captured_output() as log:
            try:
                self.session = ort.InferenceSession(str(model), options, providers=providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                if wanted != "CPUExecutionProvider" and "Protobuf" not in reason and "INVALID" not in reason:
                    raise EdgeKDError(f"ONNX Runtime could not start {wanted} for {model.name} ({reason}): check "
                                      "the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs") from None
                raise EdgeKDError(f"model file {str(model)!r} cannot be loaded ({reason}): it is corrupt or not "
                                  "ONNX; run `edgekd export` again") from None
        active = self.session.get_providers()
        if active[0] != wanted:
            # ORT falls back to the next provider in the list without an error: a CPU number labelled "cuda".
            raise EdgeKDError(f"ONNX Runtime could not start {wanted} and would run on {active[0]} instead "
                              f"({_load_failure(log)}): install the libraries it names (the CUDA and cuDNN this "
                              "onnxruntime-gpu is built for; TensorRT's for ort-trt) where LD_LIBRARY_PATH finds "
                              "them, or bench with --device cpu")
        self.session.disable_fallback()  # a provider failing mid-run must raise, not rerun on CPU
        self.input_meta = self.session.get_inputs()[0]
        self.input = self.input_meta.name
        self.outputs = [self.session.get_outputs()[0].name]
        self.providers = active

    def _providers(self, wanted: str, model: Path, max_batch: int) -> list:
        if wanted == "CPUExecutionProvider":
            return [wanted]
        # "fp32" means FP32: ORT's CUDA EP allows TF32 unless told (use_tf32, ORT 1.16 and later)
        cuda = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})
        if wanted == "CUDAExecutionProvider":
            self.tf32 = False
            return [cuda, "CPUExecutionProvider"]
        # TensorRT first, CUDA for what TensorRT cannot take, CPU last. The profile covers every batch size the
        # bench will use, and engines are cached beside the model, so ORT builds them once, before timing.
        probe = self.ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0]
        if not all(isinstance(d, int) for d in probe.shape[1:]):
            raise EdgeKDError(f"{model.name} has a dynamic image shape {probe.shape}: export with a fixed input size")
        dims = "x".join(str(d) for d in probe.shape[1:])
        cache = model.parent / ".ort-trt-cache"
        cache.mkdir(exist_ok=True)
        trt = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
               "trt_profile_min_shapes": f"{probe.name}:1x{dims}", "trt_profile_opt_shapes": f"{probe.name}:64x{dims}",
               "trt_profile_max_shapes": f"{probe.name}:{max_batch}x{dims}",
               # No trt_int8_enable: a Q/DQ model carries its quantization (explicit), and the flag makes ORT
               # build a weakly typed network (deprecated since TensorRT 10.12) unlike the engine `edgekd build`
               # makes. No FP16 either: each model runs in the precision its file says.
               "trt_fp16_enable": False}
        # ORT's TensorRT EP has no TF32 switch (TensorRT's builder allows TF32 by default): recorded, not hidden
        self.tf32 = True
        return [(wanted, trt), cuda, "CPUExecutionProvider"]

    def infer(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(self.outputs, {self.input: x})[0]
        except Exception as exc:
            raise EdgeKDError(f"the model cannot take input of shape {list(x.shape)} (it expects "
                              f"{self.input_meta.shape}): choose batch sizes the export allows") from exc

    def prepare(self, x):
        self.infer(x[:1])  # a wrong shape fails here with its one line, not inside the timed loop
        if self.device == "cpu":
            # The bare call: no wrapper per iteration, so the harness adds nothing to ORT's own time.
            return functools.partial(self.session.run, self.outputs, {self.input: x})
        # On the GPU the input lives there and the output stays there: the timed call copies nothing.
        binding = self.session.io_binding()
        self._resident = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)
        binding.bind_ortvalue_input(self.input, self._resident)
        binding.bind_output(self.outputs[0], "cuda", 0)
        return functools.partial(self.session.run_with_iobinding, binding)


@RUNNERS.register("ort-trt")
class OrtTensorrtRunner(OrtRunner):
    """ONNX Runtime with its TensorRT execution provider (engines built and cached by ORT itself)."""

    backend = "ort-trt"

    def __init__(self, model: Path, device: str = "cuda", threads: int = 0, max_batch: int = 256):
        super().__init__(model, device, threads, provider="tensorrt", max_batch=max_batch)


# -- OpenVINO --------------------------------------------------------------------------------------------------
@RUNNERS.register("openvino")
class OpenVinoRunner(Runner):
    """An ONNX model compiled by OpenVINO for the CPU. Its Q/DQ pairs become OpenVINO's FakeQuantize and run as
    INT8 where the CPU plugin has kernels for them."""

    backend = "openvino"

    def __init__(self, model: Path, device: str = "cpu", threads: int = 0, max_batch: int = 256):
        ov = require("openvino", self.backend)
        core = ov.Core()
        # LATENCY: one stream, what a single-stream bench measures. f32: on CPUs with BF16 (AVX-512 BF16, AMX) the
        # plugin's default inference precision is bf16, which would time "fp32" models in bfloat16.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        model = check_model_file(model)
        try:
            self.compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise EdgeKDError(f"OpenVINO cannot compile {model.name} ({reason}): export it again, or bench it with "
                              "--backend ort") from None
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.input_shape = self.compiled.input(0).get_partial_shape()
        # what it compiled with, beside every figure (the plugin may choose other values than were asked for)
        self.settings = {k: str(self.compiled.get_property(k)) for k in
                         ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT")}
        self.settings["openvino"] = ov.get_version()

    def infer(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.request.infer({0: x})[self.output].copy()  # the request reuses its output buffer
        except RuntimeError as exc:
            raise EdgeKDError(f"the model cannot take input of shape {list(x.shape)} (it expects "
                              f"{self.input_shape}): choose batch sizes the export allows") from exc

    def prepare(self, x):
        self.infer(x[:1])
        tensor = {0: np.ascontiguousarray(x)}
        return functools.partial(self.request.infer, tensor)


# -- TensorRT --------------------------------------------------------------------------------------------------
@RUNNERS.register("trt")
class TrtRunner(Runner):
    """A serialized TensorRT engine, run with the TensorRT 10/11 tensor API; timed with CUDA events."""

    backend = "trt"
    tf32 = False  # `edgekd build` clears BuilderFlag.TF32 (the manifest records it per engine)

    def __init__(self, engine: Path, device: str = "cuda", threads: int = 0):
        from edgekd.gpu import check, import_cudart
        from edgekd.runtime.tensorrt import import_tensorrt

        trt = import_tensorrt()
        cudart = import_cudart()
        self.trt, self.cudart = trt, cudart
        self.check = functools.partial(check, cudart)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(check_model_file(engine).read_bytes())
        if self.engine is None:
            raise EdgeKDError(f"engine {str(engine)!r} cannot be deserialized here: rebuild it on this device "
                              f"with `edgekd build {Path(engine).parent}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = self.check(cudart.cudaStreamCreate(), "creating a CUDA stream")
        self.buffers: dict[str, tuple[int, int]] = {}
        self.device, self.name = device, Path(engine).name
        # profile 0's (min, opt, max) input shapes: the accuracy pass batches within them
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.check(self.cudart.cudaFree(ptr), "freeing GPU memory")
            ptr = self.check(self.cudart.cudaMalloc(nbytes), f"allocating {nbytes} bytes of GPU memory")
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _upload(self, x: np.ndarray) -> np.ndarray:
        """Copy the batch to the GPU, set shapes and addresses; returns the host array the output lands in."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.context.set_input_shape(self.input, x.shape):
            profile = self.engine.get_tensor_profile_shape(self.input, 0)
            raise EdgeKDError(f"the engine cannot take input of shape {list(x.shape)} (its profile allows "
                              f"{[list(s) for s in profile]}): rebuild with `edgekd build --batch-range`")
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=np.float32)
        for name, nbytes in ((self.input, x.nbytes), (self.output, out.nbytes)):
            if not self.context.set_tensor_address(name, self._buffer(name, nbytes)):  # False, not an exception
                raise EdgeKDError(f"TensorRT refused the GPU address of tensor {name!r} of {self.name}: the engine "
                                  f"and this TensorRT disagree; rebuild it here with `edgekd build`")
        self.check(self.cudart.cudaMemcpy(self.buffers[self.input][0], x.ctypes.data, x.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "copying to the GPU")
        return out

    def _enqueue(self) -> None:
        # execute_async_v3 reports failure by returning False: unchecked, the output stays the uninitialised
        # np.empty and a latency of ~0 ms is recorded as valid
        if not self.context.execute_async_v3(int(self.stream)):
            raise EdgeKDError(f"TensorRT could not enqueue {self.name} (execute_async_v3 returned False; its log "
                              "above says why): rebuild the engine on this device with `edgekd build`")

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self._upload(x)
        self._enqueue()
        self.check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[self.output][0], out.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                   "copying from the GPU")
        self.check(self.cudart.cudaStreamSynchronize(self.stream), "waiting for the GPU")
        return out

    def prepare(self, x):
        self._upload(x)  # input stays on the GPU: the timed call is the engine alone
        return self._enqueue

    def clock(self):
        return CudaEventClock(self.cudart, self.stream)

    def close(self):
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()
