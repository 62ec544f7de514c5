import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_without_torch
from onnx import TensorProto, helper, numpy_helper, save

from edgekd.bench.harness import BenchOptions, bench_bundle, latency_stats
from edgekd.bench.monitor import find_power_reader, integrate_power
from edgekd.cli import main
from edgekd.errors import EdgeKDError
from edgekd.runtime.runners import RUNNERS

FAST = BenchOptions(batch_sizes=(1, 4), iters=5, warmup=1, threads=1)


@pytest.mark.parametrize("backend", ["ort", "torch", "openvino"])
def test_bench_every_runnable_backend(tiny_bundle, backend):
    record = bench_bundle(tiny_bundle, BenchOptions(**{**FAST.__dict__, "backend": backend}))
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    expected = ["torch-fp32"] if backend == "torch" else ["onnx-fp32", "onnx-int8-cpu", "onnx-int8-trt"]
    assert [r["model"] for r in record["results"]] == expected
    for r in record["results"]:
        assert set(r["latency"]) == {"1", "4"}
        s = r["latency"]["4"]
        assert s["iterations"] == 5 and s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"]
        assert s["throughput_ips"] == pytest.approx(4000 / s["mean_ms"])
        assert r["file_bytes"] > 0 and r["peak_rss_increase_mib"] >= 0
        assert r["cold"]["load_ms"] > 0 and r["cold"]["first_inference_ms"] > 0 and r["calls_per_sample"] == 1
    student = manifest["student"]  # counted by torch at export, no hand-written counter
    assert student["macs_per_image"] * 2 == student["flops_per_image"] > 0 and student["params"] > 0
    assert "FlopCounterMode" in student["counted_by"]
    fp32 = record["results"][0]["accuracy"]
    assert fp32 == pytest.approx(manifest["models"]["onnx-fp32"]["accuracy"] if backend != "torch"
                                 else manifest["pytorch_accuracy"])
    if backend == "openvino":  # FP32 means FP32 on a CPU with bf16 too, and the record says what it compiled with
        settings = record["results"][0]["runtime_settings"]
        assert settings["INFERENCE_PRECISION_HINT"] == "<Type: 'float32'>" and settings["PERFORMANCE_HINT"] == "LATENCY"
        assert settings["INFERENCE_NUM_THREADS"] == "1"
    env = record["environment"]
    assert env["cpu"] and env["cores"] and env["packages"]["onnxruntime"] and "jetson" in env


def test_latency_stats_against_numpy():
    times = [0.001, 0.002, 0.003, 0.004, 0.010]
    s = latency_stats(times, 8)
    assert s["p50_ms"] == pytest.approx(3.0) and s["mean_ms"] == pytest.approx(4.0)
    assert s["p99_ms"] == pytest.approx(np.percentile(np.array(times) * 1000, 99))
    assert s["throughput_ips"] == pytest.approx(2000.0)


def test_cli_bench_writes_json(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(tiny_bundle), "--iters", "3", "--batch-sizes", "1,2", "--model", "onnx-fp32",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "onnx-fp32" in text and "load ms" in text and "1st ms" in text and "M MACs/image" in text
    assert [r["model"] for r in json.loads(out.read_text())["results"]] == ["onnx-fp32"]


def _copy(bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def _fixed_batch_onnx(path, shape):
    w = numpy_helper.from_array(np.ones((int(np.prod(shape[1:])), 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 4])], [w])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_bench_errors(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    opts = BenchOptions(**{**FAST.__dict__, "models": ("onnx-fp32",)})
    (bundle / "model.onnx").unlink()
    with pytest.raises(EdgeKDError, match="missing or empty: run `edgekd export` again"):
        bench_bundle(bundle, opts)
    (bundle / "model.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(EdgeKDError, match="cannot be loaded .* corrupt or not ONNX"):
        bench_bundle(bundle, opts)
    _fixed_batch_onnx(bundle / "model.onnx", (1, 1, 12, 12))
    with pytest.raises(EdgeKDError, match=r"cannot take input of shape \[40, 1, 12, 12\] \(it expects \[1, 1, 12, 12\]\)"):
        bench_bundle(bundle, opts)
    with pytest.raises(EdgeKDError, match="not a bundle"):
        bench_bundle(tmp_path, opts)
    with pytest.raises(EdgeKDError, match="unknown backend 'onnx'"):
        bench_bundle(bundle, BenchOptions(backend="onnx"))
    with pytest.raises(EdgeKDError, match="no trt models"):
        bench_bundle(bundle, BenchOptions(backend="trt", device="cuda"))
    with pytest.raises(EdgeKDError, match="runs on an NVIDIA GPU: add --device cuda"):
        bench_bundle(bundle, BenchOptions(backend="trt", device="cpu"))
    with pytest.raises(EdgeKDError, match="has no TensorrtExecutionProvider"):
        bench_bundle(bundle, BenchOptions(backend="ort-trt", device="cuda", models=("onnx-fp32",)))
    with pytest.raises(EdgeKDError, match="has no CUDAExecutionProvider"):
        bench_bundle(bundle, BenchOptions(backend="ort", device="cuda", models=("onnx-fp32",)))


def _with_manifest_file(bundle, key, name):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"][key]["file"] = name
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_every_file_a_bundle_names_stays_inside_it(tiny_bundle, tmp_path, capsys):
    """A bundle is untrusted input on the device: the manifest's names and the bundle's links are not followed out.
    Each case was benched before (the sha256 beside a name does not help: the same author writes both)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(tiny_bundle / "model.onnx", outside / "model.onnx")
    opts = BenchOptions(**{**FAST.__dict__, "models": ("onnx-fp32",)})
    for name, problem in ((str(outside / "model.onnx"), "outside the bundle"),
                          ("../elsewhere/model.onnx", "outside the bundle"),
                          ("sub/../../elsewhere/model.onnx", "outside the bundle"),
                          ("", "not a relative path")):
        bundle = _copy(tiny_bundle, tmp_path / f"case{len(list(tmp_path.iterdir()))}")
        shutil.copytree(outside, bundle.parent / "elsewhere")
        _with_manifest_file(bundle, "onnx-fp32", name)
        with pytest.raises(EdgeKDError, match=problem):
            bench_bundle(bundle, opts)
        assert main(["bench", str(bundle), "--model", "onnx-fp32", "--iters", "2"]) == 2  # one line, no traceback
        assert problem in capsys.readouterr().err
    bundle = _copy(tiny_bundle, tmp_path / "link")
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(outside / "model.onnx")
    with pytest.raises(EdgeKDError, match="is a link to .*elsewhere/model.onnx, outside the bundle"):
        bench_bundle(bundle, opts)
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").mkdir()
    with pytest.raises(EdgeKDError, match="not a regular file"):
        bench_bundle(bundle, opts)
    (bundle / "model.onnx").rmdir()
    shutil.copy(outside / "model.onnx", bundle / "model.onnx")
    (bundle / "eval.npz").rename(outside / "eval.npz")
    (bundle / "eval.npz").symlink_to(outside / "eval.npz")
    with pytest.raises(EdgeKDError, match=r"evaluation data \(eval.npz\) is a link .* outside the bundle"):
        bench_bundle(bundle, opts)
    (bundle / "eval.npz").unlink()
    shutil.copy(outside / "eval.npz", bundle / "eval.npz")
    (bundle / "inside.onnx").symlink_to("model.onnx")  # a link that stays inside is an ordinary file
    _with_manifest_file(bundle, "onnx-fp32", "inside.onnx")
    assert bench_bundle(bundle, opts)["results"][0]["file"] == "inside.onnx"


def test_a_failing_nvidia_smi_loses_no_bench(tiny_bundle, tmp_path, monkeypatch):
    """nvidia-smi on a host whose driver is gone prints one line (and exit 9); the bench read it after all timing
    and raised, losing the finished figures. Now the line is recorded."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                    "Make sure that the latest NVIDIA driver is installed and running.\"\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    record = bench_bundle(tiny_bundle, BenchOptions(**{**FAST.__dict__, "models": ("onnx-fp32",)}))
    assert record["results"][0]["latency"]["1"]["p50_ms"] > 0
    assert record["environment"]["gpu"] == {"gpu": None, "nvidia_smi": "NVIDIA-SMI has failed because it couldn't "
                                            "communicate with the NVIDIA driver. Make sure that the latest NVIDIA "
                                            "driver is installed and running."}
    from edgekd.bench.monitor import parse_gpu_query

    assert parse_gpu_query("NVIDIA H200, 570.124.06, 143771 MiB\nNVIDIA H200, 570.124.06, 143771 MiB") == {
        "gpu": "NVIDIA H200", "driver": "570.124.06", "memory": "143771 MiB", "count": 2}


def test_onnx_runtime_refuses_external_data_outside_the_models_folder(tmp_path):
    """The other way out of a bundle, an ONNX file whose weights are 'external data' at ../x, ONNX Runtime refuses
    itself (kept as a test: if a release stops refusing, the bench needs its own check)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "secret.bin").write_bytes(np.ones((4, 4), np.float32).tobytes())
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location="../secret.bin")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (tmp_path / "bundle").mkdir()
    onnx.save(model, tmp_path / "bundle" / "model.onnx")
    with pytest.raises(EdgeKDError, match="cannot be loaded .*External data path escapes model"):
        RUNNERS.get("ort")(tmp_path / "bundle" / "model.onnx", "cpu", 1)


def test_cli_bench_thread_sweep_side_by_side(tiny_bundle, tmp_path, capsys):
    bundle = _copy(tiny_bundle, tmp_path)
    assert main(["bench", str(bundle), "--iters", "3", "--batch-sizes", "1,2", "--model", "onnx-fp32",
                 "--threads", "1,2"]) == 0
    text = capsys.readouterr().out
    assert "1 threads" in text and "2 threads" in text and "by intra-op threads" in text
    for n in (1, 2):
        record = json.loads((bundle / "threads" / f"bench-ort-cpu-t{n}.json").read_text())
        assert record["options"]["threads"] == n and record["environment"]["threads"] == n
    assert not list(bundle.glob("bench-*.json"))  # the report's bench files are not touched
    assert main(["bench", str(bundle), "--threads", "1,x"]) == 2
    assert "--threads '1,x' must be integers" in capsys.readouterr().err


def test_cli_bench_bad_batch_sizes(tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_openvino_runner_without_openvino(tiny_bundle, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino fails, as where it is not installed
    with pytest.raises(EdgeKDError, match=r"backend 'openvino' needs openvino, which is not installed: pip install "
                                          r"'edgekd\[openvino\]'"):
        RUNNERS.get("openvino")(tiny_bundle / "model.onnx", "cpu", 1)


def test_trt_runner_without_tensorrt(tmp_path):
    (tmp_path / "m.engine").write_bytes(b"x")
    with pytest.raises(EdgeKDError, match="TensorRT"):
        RUNNERS.get("trt")(tmp_path / "m.engine")


def test_bench_runs_with_torch_unimportable(tiny_bundle):
    result = run_without_torch("bench", tiny_bundle, "--iters", "3", "--batch-sizes", "1,2", "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnx-int8-cpu" in result.stdout


def test_power_integration_and_rail_discovery(tmp_path):
    samples = [(0.1 * i, 5.0 if i % 2 == 0 else 7.0) for i in range(21)]  # 2 s, trapezoid average 6 W
    p = integrate_power(samples, inferences=100)
    assert p["energy_j"] == pytest.approx(12.0) and p["average_w"] == pytest.approx(6.0)
    assert p["energy_per_inference_mj"] == pytest.approx(120.0)
    assert "refused" in integrate_power(samples[:3], inferences=100)  # three samples are not an energy figure
    hwmon = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    hwmon.mkdir(parents=True)
    (hwmon / "in1_label").write_text("VDD_IN\n")
    (hwmon / "in1_input").write_text("5000\n")  # mV
    (hwmon / "curr1_input").write_text("1200\n")  # mA
    assert find_power_reader(tmp_path).read() == pytest.approx(6.0)
    assert find_power_reader(tmp_path / "none") is None
