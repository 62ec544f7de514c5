"""The device half: targets table, one timed loop, honest GPU failures, `edgekd build`, Python 3.10 installs.

What runs for real here: ONNX Runtime sessions (CPU, and onnxruntime-gpu whose CUDA provider fails to load on
this GPU-less machine exactly as on a broken GPU host), cuda-python's runtime (no driver here), a Python 3.10
venv with the torch-free install. TensorRT cannot be installed here: `FakeTensorRT` below stands in for it
where a test checks what edgekd asks TensorRT to do; the API-surface test checks those names exist in the
real TensorRT 10 and 11 bindings.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import run_without_torch

from edgekd.bench.harness import BenchOptions, _entries, bench_bundle
from edgekd.cli import build_parser, main
from edgekd.errors import EdgeKDError
from edgekd.export import tensorrt_build
from edgekd.runtime import tensorrt as trt_runtime
from edgekd.runtime.manifest import read_manifest, write_manifest
from edgekd.runtime.runners import RUNNERS
from edgekd.targets import BACKENDS, EXPORT_TARGETS, TARGETS, timing_kind

FAST = BenchOptions(batch_sizes=(1, 4), iters=5, warmup=1, threads=1)

def _copy(bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def _run(python, *args, env=None):
    return run_without_torch(*args, python=python, env=env)


def _one_line_error(result, pattern):
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 3 and pattern in " ".join(lines), result.stderr


# -- one table --------------------------------------------------------------------------------------------------
def test_targets_table_drives_cli_runners_and_export():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    target_opt = next(a for a in sub["export"]._actions if a.dest == "target")
    assert tuple(target_opt.choices) == EXPORT_TARGETS
    assert set(RUNNERS) == set(BACKENDS)
    for t in TARGETS.values():
        assert set(t.backends) <= set(BACKENDS) and t.made_by in EXPORT_TARGETS
        assert not t.builds_from or t.builds_from in {s.file for s in TARGETS.values()}
    assert "ort-trt" not in TARGETS["onnx-int8-cpu"].backends  # U8 asymmetric: not TensorRT's


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_every_result_says_its_clock(tiny_bundle, backend):
    record = bench_bundle(tiny_bundle, BenchOptions(**{**FAST.__dict__, "backend": backend}))
    for r in record["results"]:
        assert r["timing"] == timing_kind(backend, "cpu") == "host_wall"
        assert r["meant_for_device"] == ("cpu" in TARGETS[r["model"]].meant_for)
    flags = {r["model"]: r["meant_for_device"] for r in record["results"]}
    if backend == "ort":
        assert flags == {"onnx-fp32": True, "onnx-int8-cpu": True, "onnx-int8-trt": False}


def test_ort_trt_never_runs_the_cpu_int8_preset(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    keys = [t.key for t, _ in _entries(tiny_bundle, manifest, BenchOptions(backend="ort-trt", device="cuda"))]
    assert keys == ["onnx-fp32", "onnx-int8-trt"]
    with pytest.raises(EdgeKDError, match="ort-trt does not run onnx-int8-cpu"):
        _entries(tiny_bundle, manifest, BenchOptions(backend="ort-trt", device="cuda", models=("onnx-int8-cpu",)))


def test_timed_loop_window_excludes_warmup(tiny_bundle):
    import numpy as np

    runner = RUNNERS.get("ort")(tiny_bundle / "model.onnx", "cpu", 1)
    x = np.zeros((2, *read_manifest(tiny_bundle)["input_shape"]), np.float32)
    import time

    before = time.perf_counter()
    timed = runner.time(x, warmup=50, iters=20, duration=None)
    assert len(timed.seconds) == 20 and timed.kind == "host_wall"
    assert before < timed.window[0] < timed.window[1]
    assert sum(timed.seconds) <= timed.window[1] - timed.window[0]


def test_energy_counts_only_the_timed_window(tiny_bundle, monkeypatch):
    """A board whose power reader reads 50 W during warm-up and 5 W after: only the timed window counts."""
    import time

    from edgekd.bench import harness

    switch = {}

    class Reader:
        rails, method = ["VDD_IN"], "board input rail"

        def read(self):
            return 5.0 if time.perf_counter() >= switch.get("t", float("inf")) else 50.0

    real_time = harness.RUNNERS.get("ort").time

    def timed(self, x, warmup, iters, duration):
        for _ in range(warmup):
            self.infer(x)
        time.sleep(0.3)  # warm-up at 50 W, sampled
        switch["t"] = time.perf_counter()
        return real_time(self, x, 0, iters, duration)

    monkeypatch.setattr(harness, "find_power_reader", lambda: Reader())
    monkeypatch.setattr(harness.RUNNERS.get("ort"), "time", timed)
    record = bench_bundle(tiny_bundle, BenchOptions(batch_sizes=(2,), duration=1.0, warmup=1, threads=1,
                                                    models=("onnx-fp32",)))
    power = record["results"][0]["power"]["2"]
    assert power["samples"] >= 10 and power["average_w"] == pytest.approx(5.0, rel=0.05)
    record = bench_bundle(tiny_bundle, BenchOptions(batch_sizes=(2,), iters=3, warmup=1, threads=1,
                                                    models=("onnx-fp32",)))
    assert "refused" in record["results"][0]["power"]["2"]  # a few ms of timing: too few samples for energy


# -- loud GPU failures --------------------------------------------------------------------------------------------
def test_cuda_provider_that_cannot_load_fails_loudly(tiny_bundle, tmp_path):
    """onnxruntime-gpu on a machine without a GPU lists the CUDA provider but cannot load it: a CPU number
    labelled cuda must not come out."""
    python = os.environ.get("EDGEKD_ORT_GPU_PYTHON")
    if not python:
        pytest.skip("EDGEKD_ORT_GPU_PYTHON is not set (.ci/run makes a venv with onnxruntime-gpu)")
    bundle = _copy(tiny_bundle, tmp_path)
    for backend, provider in (("ort", "CUDAExecutionProvider"), ("ort-trt", "TensorrtExecutionProvider")):
        result = _run(python, "bench", bundle, "--backend", backend, "--device", "cuda", "--iters", "3",
                      "--model", "onnx-fp32")
        _one_line_error(result, f"could not start {provider} and would run on CPUExecutionProvider")
        assert "cannot open shared object file" in result.stderr or "not found" in result.stderr
    assert not list(bundle.glob("bench-*-cuda.json"))


def test_gpu_identity_names_the_cuda_error():
    """Real cuda-python on a machine with no NVIDIA driver: the error has its CUDA name, not 'no GPU'."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from edgekd.gpu import gpu_identity

    err, version = cudart.cudaDriverGetVersion()
    if int(err) == 0 and version:  # on the GPU machine: benchmarks/gpu_smoke.py records gpu_identity() there
        pytest.skip(f"an NVIDIA driver (CUDA {version // 1000}.{version % 1000 // 10}) is here: this is the no-driver case")
    with pytest.raises(EdgeKDError, match=r"cudaErrorInsufficientDriver \(CUDA error 35; no NVIDIA driver found\)"):
        gpu_identity()


@pytest.mark.parametrize("runtime, driver, pin", [(13000, 12040, "cuda-python>=12.4,<12.5"),
                                                  (12090, 12060, "cuda-python>=12.6,<12.7")])  # 12.9 on JetPack 6
def test_driver_too_old_names_the_pin_that_matches_it(runtime, driver, pin):
    """cuda-python's answers on an older driver (fake: no GPU here). A cuda-python of the driver's CUDA major is
    not enough (12.9's runtime fails on a CUDA 12.6 driver): the fix names the driver's minor."""
    from edgekd.gpu import check

    class OldDriver:
        @staticmethod
        def cudaGetErrorName(err):
            return 0, b"cudaErrorInsufficientDriver"

        @staticmethod
        def cudaDriverGetVersion():
            return 0, driver

        @staticmethod
        def cudaRuntimeGetVersion():
            return 0, runtime

    with pytest.raises(EdgeKDError, match=rf"runtime is {runtime // 1000}\.{runtime % 1000 // 10}, the driver "
                                          rf"supports CUDA {driver // 1000}\.{driver % 1000 // 10}: pip install '{pin}'"):
        check(OldDriver, (35, None), "finding a CUDA GPU")


def test_the_jetson_extra_resolves_to_a_runtime_jetpack_6_accepts():
    """JetPack 6.1/6.2 drivers are CUDA 12.6: the jetson extra's cuda-python must not resolve past 12.6.x (measured:
    cuda-python 12.6.2.post1's cudaRuntimeGetVersion() = 12060, 12.9.x's = 12090)."""
    from pathlib import Path

    import tomllib
    from packaging.specifiers import SpecifierSet

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    spec = SpecifierSet(next(d for d in extras["jetson"] if d.startswith("cuda-python"))[len("cuda-python"):])
    released = ["12.6.0", "12.6.2.post1", "12.8.0", "12.9.0", "12.9.10", "13.0.0"]  # PyPI's, at the time of writing
    assert [v for v in released if v in spec] == ["12.6.2.post1"]  # 12.6.0 has no cuda.bindings


# -- edgekd build --------------------------------------------------------------------------------------------------
def test_build_is_torch_free_and_says_what_is_missing(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    _one_line_error(_run(sys.executable, "build", bundle), "TensorRT is not installed here")
    _one_line_error(_run(sys.executable, "build", bundle, "--fp16"), "no model.fp16.onnx to build trt-fp16 from")
    _one_line_error(_run(sys.executable, "build", bundle, "--batch-range", "64,1,256"), "min <= opt <= max")
    placeholder = tmp_path / "placeholder"  # PyPI's `tensorrt` stub imports but has no bindings
    (placeholder / "tensorrt").mkdir(parents=True)
    (placeholder / "tensorrt" / "__init__.py").write_text("__version__ = '10.0.0'\n")
    result = _run(sys.executable, "build", bundle, env={"PYTHONPATH": f"{placeholder}:{os.getcwd()}"})
    _one_line_error(result, "the installed tensorrt package has no runtime libraries")
    assert json.loads((bundle / "manifest.json").read_text()) == json.loads((tiny_bundle / "manifest.json").read_text())


def test_export_trt_checks_tensorrt_before_any_work(tiny_study, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_study / "synthetic" / "base" / "kd" / "seed0", run, ignore=shutil.ignore_patterns("bundle"))
    assert main(["export", str(run), "--target", "trt"]) == 2
    assert not (run / "bundle").exists()


def real_enum_value(version: str, member: str) -> int:
    """An enum value of the real TensorRT bindings of this major, from the dump of the binary (test_api_surface)."""
    name = {"10": "tensorrt-10.3.txt", "11": "tensorrt-11.4.txt"}[version.split(".")[0]]
    path = Path(__file__).parent / "fixtures" / "api" / name
    return next(int(line.split(" = ")[1]) for line in path.read_text().splitlines() if line.startswith(f"{member} = "))


class FakeTensorRT:
    """Records what edgekd asks of TensorRT (fake: TensorRT cannot be installed here); its enum values are the
    real bindings' of that version."""

    def __init__(self, version):
        self.__version__ = version
        self.calls = []
        calls = self.calls

        class Obj:
            def __init__(self, name):
                self.name = name

            def __getattr__(self, attr):
                def method(*args):
                    calls.append((f"{self.name}.{attr}", args))
                    if attr == "parse":
                        return True
                    if attr == "build_serialized_network":
                        return b"engine"
                    if attr == "get_input":
                        return types.SimpleNamespace(name="input")
                    return Obj(attr)

                return method

        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        self.Builder = lambda logger: Obj("builder")
        self.OnnxParser = lambda network, logger: Obj("parser")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(
            STRONGLY_TYPED=real_enum_value(version, "NetworkDefinitionCreationFlag.STRONGLY_TYPED"))  # 1 in 10.3, 0 in 11
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(TF32="tf32")


@pytest.mark.parametrize("version, network_flags", [("10.3.0", 1 << 1), ("11.4.0", 0)])
def test_build_records_engines_strongly_typed_without_tf32(tiny_bundle, tmp_path, monkeypatch, version,
                                                           network_flags):
    bundle = _copy(tiny_bundle, tmp_path)
    trt = FakeTensorRT(version)
    gpu = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "uuid": "GPU-1"}
    monkeypatch.setattr(tensorrt_build, "engine_builder", lambda: (trt, gpu))
    built = tensorrt_build.build_engines(bundle, ("fp32", "int8"), (1, 64, 256), 512, log=lambda line: None)
    assert set(built) == {"trt-fp32", "trt-int8"}
    calls = dict(trt.calls)
    assert calls["builder.create_network"] == (network_flags,)
    assert calls["create_builder_config.clear_flag"] == ("tf32",)  # "fp32" means FP32, not TF32
    assert calls["create_optimization_profile.set_shape"][1:] == ((1, 1, 12, 12), (64, 1, 12, 12), (256, 1, 12, 12))
    manifest = read_manifest(bundle)
    entry = manifest["models"]["trt-int8"]
    assert entry["source"] == "model.int8-trt.onnx" and entry["tf32"] is False and entry["tensorrt"] == version
    assert entry["gpu"] == gpu["gpu"] and entry["batch_range"] == [1, 64, 256]
    trt.calls.clear()  # same ONNX, TensorRT, GPU and options: kept, not rebuilt
    tensorrt_build.build_engines(bundle, ("fp32",), (1, 64, 256), 512, log=lambda line: None)
    assert not any(name == "builder.build_serialized_network" for name, _ in trt.calls)
    tensorrt_build.build_engines(bundle, ("fp32",), (1, 32, 256), 512, log=lambda line: None)
    assert any(name == "builder.build_serialized_network" for name, _ in trt.calls)


def test_an_engine_built_from_a_model_the_guard_refused_is_not_deployed(tiny_bundle, tmp_path, monkeypatch):
    """The guard judged model.int8-trt.onnx on validation and left it undeployed: its engine inherits that, so
    `edgekd bench` skips it too; the FP32 engine beside it deploys."""
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = read_manifest(bundle)
    manifest["models"]["onnx-int8-trt"].update(deployed=False, not_deployed="changes 7.00% of FP32's answers")
    write_manifest(bundle, manifest)
    monkeypatch.setattr(tensorrt_build, "engine_builder", lambda: (FakeTensorRT("10.3.0"), {
        "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "uuid": "GPU-1"}))
    built = tensorrt_build.build_engines(bundle, ("fp32", "int8"), (1, 64, 256), 512, log=lambda line: None)
    assert built["trt-int8"]["deployed"] is False and "onnx-int8-trt" in built["trt-int8"]["not_deployed"]
    assert "deployed" not in built["trt-fp32"] and "changes 7.00%" in built["trt-int8"]["not_deployed"]
    benched = [t.key for t, _ in _entries(bundle, read_manifest(bundle), BenchOptions(backend="trt"))]
    assert benched == ["trt-fp32"]


def test_engine_check_compares_the_gpu_model(monkeypatch):
    trt = FakeTensorRT("10.3.0")
    here = {"gpu": "NVIDIA L4", "compute_capability": "8.9", "uuid": "GPU-2"}
    monkeypatch.setattr(trt_runtime, "engine_builder", lambda: (trt, here))
    # Same compute capability (8.9), another GPU model: refused, and the fix is `edgekd build`.
    rtx = {"file": "trt-fp32.engine", "tensorrt": "10.3.0", "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    with pytest.raises(EdgeKDError, match="rebuild it here with `edgekd build b`"):
        trt_runtime.check_engine_matches(rtx, "b")
    with pytest.raises(EdgeKDError, match="TensorRT 10.1.0"):
        trt_runtime.check_engine_matches({**rtx, "gpu": "NVIDIA L4", "tensorrt": "10.1.0"}, "b")
    assert trt_runtime.check_engine_matches({**rtx, "gpu": "NVIDIA L4", "uuid": "GPU-1"}, "b") == here
    # another L4 than the one it was built on: allowed, and recorded
    assert trt_runtime.engine_note({**rtx, "gpu": "NVIDIA L4", "uuid": "GPU-1"}, "b") == {
        "built_on": "GPU-1", "running_on": "GPU-2", "same_gpu": False}


class FakeEngine:
    """A TensorRT engine and execution context that answer as the real tensor API does (fake: no TensorRT or GPU
    here): booleans from set_input_shape / set_tensor_address / execute_async_v3, profile 0 for batches 1..64."""

    INPUT, OUTPUT = "in", "out"

    def __init__(self, enqueue_ok=True, address_ok=True, max_batch=64):
        self.enqueue_ok, self.address_ok, self.max_batch = enqueue_ok, address_ok, max_batch
        self.num_io_tensors, self.shapes, self.enqueued = 2, {}, 0

    # engine
    def get_tensor_name(self, i):
        return (self.INPUT, self.OUTPUT)[i]

    def get_tensor_mode(self, name):
        return name

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 1, 12, 12), (8, 1, 12, 12), (self.max_batch, 1, 12, 12)]

    def create_execution_context(self):
        return self

    # context
    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return 1 <= shape[0] <= self.max_batch

    def get_tensor_shape(self, name):
        return (self.shapes[self.INPUT][0], 4)

    def set_tensor_address(self, name, ptr):
        return self.address_ok

    def execute_async_v3(self, stream):
        self.enqueued += 1
        return self.enqueue_ok


def _fake_trt_runner(monkeypatch, tmp_path, **engine):
    from edgekd import gpu

    fake = FakeEngine(**engine)
    trt = types.SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None}),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: fake),
        TensorIOMode=types.SimpleNamespace(INPUT=FakeEngine.INPUT, OUTPUT=FakeEngine.OUTPUT))
    ok = (0,)
    cudart = types.SimpleNamespace(
        cudaStreamCreate=lambda: (0, 7), cudaMalloc=lambda n: (0, 1000), cudaFree=lambda p: ok,
        cudaMemcpy=lambda *a: ok, cudaMemcpyAsync=lambda *a: ok, cudaStreamSynchronize=lambda s: ok,
        cudaEventCreate=lambda: (0, object()), cudaEventRecord=lambda e, s: ok, cudaEventSynchronize=lambda e: ok,
        cudaEventElapsedTime=lambda a, b: (0, 5.0),  # ms between the two events
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(gpu, "import_cudart", lambda: cudart)
    (tmp_path / "trt-fp32.engine").write_bytes(b"engine")
    return RUNNERS.get("trt")(tmp_path / "trt-fp32.engine", "cuda"), fake


def test_trt_runner_checks_tensorrts_success_flags(monkeypatch, tmp_path):
    import numpy as np

    x = np.zeros((2, 1, 12, 12), np.float32)
    runner, _ = _fake_trt_runner(monkeypatch, tmp_path, enqueue_ok=False)
    with pytest.raises(EdgeKDError, match="could not enqueue trt-fp32.engine .execute_async_v3 returned False"):
        runner.infer(x)
    with pytest.raises(EdgeKDError, match="could not enqueue"):  # the timed loop too: no ~0 ms recorded as valid
        runner.time(x, warmup=0, iters=3, duration=None)
    runner, _ = _fake_trt_runner(monkeypatch, tmp_path, address_ok=False)
    with pytest.raises(EdgeKDError, match="refused the GPU address of tensor 'in'"):
        runner.infer(x)


def test_the_accuracy_pass_batches_within_the_engines_profile(monkeypatch, tmp_path):
    """An engine built with --batch-range 1,8,64 cannot take the accuracy pass's batches of 256."""
    import numpy as np

    from edgekd.runtime.evalset import predict

    runner, fake = _fake_trt_runner(monkeypatch, tmp_path)
    logits = predict(runner, np.zeros((300, 1, 12, 12), np.uint8), [0.5], [0.5])
    assert logits.shape == (300, 4) and fake.enqueued == 5  # 64 x 4 + 44
    assert max(s[0] for s in [fake.shapes[FakeEngine.INPUT]]) <= 64


def test_device_events_time_many_enqueues_and_divide(monkeypatch, tmp_path):
    """One enqueue between two events on an idle stream times its launch; each sample spans CALLS enqueues."""
    import numpy as np

    from edgekd.runtime.runners import CudaEventClock

    runner, fake = _fake_trt_runner(monkeypatch, tmp_path)
    timed = runner.time(np.zeros((1, 1, 12, 12), np.float32), warmup=1, iters=4, duration=None)
    assert timed.kind == "device_events" and timed.calls_per_sample == CudaEventClock.CALLS
    assert fake.enqueued == CudaEventClock.CALLS * 5
    assert timed.seconds == [pytest.approx(0.005 / CudaEventClock.CALLS)] * 4


# -- Python 3.10 ---------------------------------------------------------------------------------------------------
def test_bench_and_build_on_python310_without_torch(tiny_bundle, tmp_path):
    python = os.environ.get("EDGEKD_PY310")
    if not python:
        pytest.skip("EDGEKD_PY310 is not set (.ci/run makes a Python 3.10 venv with pip install '.[bench]')")
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True).stdout
    assert version.strip() == "(3, 10)"
    bundle = _copy(tiny_bundle, tmp_path)
    result = _run(python, "bench", bundle, "--iters", "3", "--batch-sizes", "1,2", "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnx-int8-cpu" in result.stdout
    _one_line_error(_run(python, "build", bundle), "TensorRT is not installed here")
    # the device's base install has no OpenVINO: the bench says which extra brings it
    _one_line_error(_run(python, "bench", bundle, "--backend", "openvino"), "pip install 'edgekd[openvino]'")


# -- packaging and report -------------------------------------------------------------------------------------------
def test_extras_do_not_mix_onnxruntime_builds_or_replace_jetpacks_tensorrt():
    import re
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert project["requires-python"] == ">=3.10"  # JetPack 6's Python

    def names(extra):
        return {re.split(r"[<>=!;\[ ]", d)[0] for d in extras[extra]}

    for extra in extras:
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names(extra), extra
    assert "tensorrt" not in names("jetson") and not any(n.startswith("tensorrt") for n in names("jetson"))
    for extra in ("trt-cu12", "trt-cu13", "jetson"):
        cuda = next(d for d in extras[extra] if d.startswith("cuda-python"))
        assert "<" in cuda and ">=" in cuda, cuda  # 12.6.0 has no cuda.bindings; 13.x needs a CUDA 13 driver
    assert "cuda-python>=12.6.1,<13" in extras["trt-cu12"] and "cuda-python>=13,<14" in extras["trt-cu13"]
    assert any("<1.27" in d for d in extras["gpu-cu12"])  # 1.27+ on PyPI is built for CUDA 13


def test_x86_extras_install_the_tensorrt_orts_tensorrt_ep_links():
    """`edgekd[gpu-cuNN,trt-cuNN]` must give `--backend ort-trt` a TensorRT it loads: the EP of each onnxruntime-gpu
    the gpu extra admits links libnvinfer.so.M (readelf on the real wheels, tests/fixtures/api/onnxruntime-gpu-
    links.txt), so the trt extra must admit TensorRT M only, and no onnxruntime-gpu newer than the ones read."""
    import tomllib
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    links: dict[str, dict[str, set[str]]] = {}
    for line in (Path(__file__).parent / "fixtures" / "api" / "onnxruntime-gpu-links.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            version, provider, lib = line.split()
            links.setdefault(version, {}).setdefault(provider, set()).add(lib)

    def spec(extra, package):
        return SpecifierSet(next(d for d in extras[extra] if d.startswith(package + ">"))[len(package):])

    for cuda in ("12", "13"):
        ort, trt = spec(f"gpu-cu{cuda}", "onnxruntime-gpu"), spec(f"trt-cu{cuda}", f"tensorrt-cu{cuda}")
        read = [v for v in links if v in ort]
        assert read, f"no onnxruntime-gpu admitted by gpu-cu{cuda} was read: run make_snapshots.py ort-links"
        newest = max(Version(v) for v in read)
        assert f"{newest.major}.{newest.minor + 1}.0" not in ort, f"gpu-cu{cuda} admits an onnxruntime-gpu never read"
        for v in read:
            assert f"libcudart.so.{cuda}" in links[v]["tensorrt"], (v, cuda)
            majors = {int(lib.rsplit(".", 1)[1]) for lib in links[v]["tensorrt"] if lib.startswith("libnvinfer.so.")}
            assert len(majors) == 1, (v, majors)
            m = majors.pop()
            assert f"{m}.14.1" in trt and f"{m + 1}.0.0" not in trt and f"{m - 1}.99" not in trt, (cuda, str(trt))


def test_tensorrt_provider_list_builds_engines_before_timing(tiny_bundle):
    """TensorRT, then CUDA, then CPU; engine cache beside the model; a profile that covers every batch."""
    import onnxruntime

    from edgekd.runtime.runners import OrtRunner

    runner = object.__new__(OrtRunner)
    runner.ort = onnxruntime
    providers = runner._providers("TensorrtExecutionProvider", tiny_bundle / "model.int8-trt.onnx", 512)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    options = providers[0][1]
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"].endswith(".ort-trt-cache")
    assert options["trt_profile_min_shapes"] == "input:1x1x12x12"
    assert options["trt_profile_max_shapes"] == "input:512x1x12x12"
    # a Q/DQ model carries its quantization: trt_int8_enable would make ORT build a weakly typed network
    assert "trt_int8_enable" not in options and options["trt_fp16_enable"] is False
    assert providers[1] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})  # FP32 is not TF32
    assert runner.tf32 is True  # ORT's TensorRT EP has no TF32 switch: the record says so
    cuda = runner._providers("CUDAExecutionProvider", tiny_bundle / "model.onnx", 512)
    assert cuda[0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}) and runner.tf32 is False


def test_tensorrts_int8_model_on_orts_cuda_ep_is_not_an_int8_figure():
    """ORT's CUDA EP runs model.int8-trt.onnx as float convolutions with Q/DQ around them: benched there for its
    accuracy, labelled as what it computes, and kept out of the deployment figures."""
    target = TARGETS["onnx-int8-trt"]
    assert target.computes("ort", "cuda") == "fp32 (simulated int8)" and not target.meant_for_run("ort", "cuda")
    assert target.computes("ort-trt", "cuda") == "int8" and target.meant_for_run("ort-trt", "cuda")
    assert TARGETS["onnx-int8-cpu"].meant_for_run("ort", "cpu")


def test_report_never_puts_two_clocks_on_one_axis():
    from edgekd.report.plots import latency_panels

    rows = [{"variant": "base", "device": "cuda", "timing": t, "deployed": d} for t, d in
            (("device_events", "trt-fp32"), ("host_wall", "onnx-fp32"), ("device_events", "trt-int8"))]
    rows.append({"variant": "base", "device": "cpu", "timing": "host_wall", "deployed": "onnx-fp32"})
    panels = latency_panels(rows)
    assert set(panels) == {("base", "cuda", "device_events"), ("base", "cuda", "host_wall"),
                           ("base", "cpu", "host_wall")}
    assert {r["deployed"] for r in panels[("base", "cuda", "device_events")]} == {"trt-fp32", "trt-int8"}
