"""GPU smoke run: every GPU path of edgekd on one tiny student, one table, one JSON record.

A backend that is not installed is listed as skipped with the reason; a backend that is installed but fails
(a provider that cannot load, an engine for another GPU) is listed as failed with its one-line error: neither
becomes a number. Run through benchmarks/gpu_smoke.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

from edgekd.errors import EdgeKDError  # noqa: E402

PROFILE = """
[study]
name = "gpu-smoke"
seeds = [0]
device = "cuda"

[datasets.{dataset}]
{dataset_keys}

[teacher]
model = "resnet18"
epochs = 15
batch_size = 128

[student]
model = "mobilenetv3_small_050"
epochs = 20
batch_size = 128

[methods.kd]
ce = {{ weight = 0.1 }}
kd = {{ weight = 0.9, temperature = 4.0 }}
"""
DATASET_KEYS = {"digits": "image_size = 16\nhflip = false\ncrop_padding = 1",
                "synthetic": "classes = 10\nsamples_per_class = 200\nimage_size = 16"}


def gpu_facts(torch) -> tuple[dict, dict]:
    """The GPU as cuda-python sees it (edgekd.gpu, what TensorRT engines are tied to), and the cuda-python event
    clock the TensorRT runner uses checked against PyTorch's own CUDA events on the same work: both must agree."""
    from edgekd.bench.torch_runner import TorchEventClock
    from edgekd.gpu import gpu_identity, import_cudart
    from edgekd.runtime.runners import CudaEventClock

    try:
        identity = gpu_identity()
    except EdgeKDError as exc:
        identity = {"error": str(exc)}
    identity.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    torch_gpu=torch.cuda.get_device_name(0), torch_cc=".".join(map(str, torch.cuda.get_device_capability(0))))
    a = torch.randn(4096, 4096, device="cuda")

    def step():
        for _ in range(10):
            a @ a

    clocks = {}
    try:
        cuda_clock = CudaEventClock(import_cudart(), 0)  # the legacy default stream, which PyTorch uses here too
    except EdgeKDError as exc:
        return identity, {"error": str(exc)}
    torch_clock = TorchEventClock(torch)
    step(), torch.cuda.synchronize()
    pairs = [(cuda_clock.measure(step), torch_clock.measure(step)) for _ in range(5)]
    clocks["cuda_python_ms"] = [round(c * 1e3, 3) for c, _ in pairs]
    clocks["torch_events_ms"] = [round(t * 1e3, 3) for _, t in pairs]
    clocks["median_ratio"] = round(sorted(c / t for c, t in pairs)[2], 3)
    return identity, clocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="runs directory (default: a temporary one)")
    parser.add_argument("--dataset", default="digits" if importlib.util.find_spec("sklearn") else "synthetic")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of this script on a machine without a GPU (GPU backends are skipped)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: this PyTorch sees no CUDA GPU: run it on the GPU machine", file=sys.stderr)
        return 2
    from edgekd.bench.harness import BenchOptions, bench_bundle
    from edgekd.config import load_profile
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.workflows import distill as run_study

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-smoke-"))
    profile_path = out / "gpu-smoke.toml"
    out.mkdir(parents=True, exist_ok=True)
    profile_path.write_text(PROFILE.format(dataset=args.dataset, dataset_keys=DATASET_KEYS[args.dataset])
                            .replace('device = "cuda"', f'device = "{args.device}"'))
    identity, clocks = gpu_facts(torch) if args.device == "cuda" else ({}, {})
    phases = {}
    start = time.perf_counter()
    records = run_study(load_profile(profile_path), out / "runs")
    phases["distill_s"] = time.perf_counter() - start
    trained = {f"{r['role']}/{r['method'] or r['model']}/seed{r['seed']}":
               {k: r.get(k) for k in ("model", "test_acc", "val_acc", "train_s", "images_per_s")} for r in records}
    plan = json.loads((out / "runs" / "gpu-smoke" / "plan.json").read_text())
    trained["execution"] = plan.get("execution")
    run = out / "runs" / "gpu-smoke" / args.dataset / "base" / "kd" / "seed0"
    start = time.perf_counter()
    have_trt = importlib.util.find_spec("tensorrt") is not None
    targets = ("onnx", "int8", "trt") if have_trt else ("onnx", "int8")
    bundle = export_run(run, ExportOptions(targets=targets, int8_presets=("cpu", "trt"), fp16=True),
                        log=lambda line: print(f"export: {line}"))
    phases["export_s"] = time.perf_counter() - start
    plans = [("ort", "cpu"), ("torch", "cuda"), ("ort", "cuda"), ("ort-trt", "cuda"), ("trt", "cuda")]
    rows, records, outcomes = [], [], []
    for backend, device in plans:
        if backend == "trt" and not have_trt:
            outcomes.append({"backend": backend, "device": device, "status": "skipped",
                             "reason": "TensorRT is not installed on this machine"})
            continue
        if device != args.device and device != "cpu":
            outcomes.append({"backend": backend, "device": device, "status": "skipped", "reason": "dry run on CPU"})
            continue
        options = BenchOptions(backend=backend, device=device, batch_sizes=(1, 64, 256), iters=args.iters)
        try:
            record = bench_bundle(bundle, options)
        except EdgeKDError as exc:
            outcomes.append({"backend": backend, "device": device, "status": "failed", "reason": str(exc)})
            continue
        records.append(record)
        outcomes.append({"backend": backend, "device": device, "status": "ok"})
        for r in record["results"]:
            for batch, s in r["latency"].items():
                rows.append([f"{backend}/{device}", r["model"], r["timing"], batch, r["accuracy"] * 100,
                             s["p50_ms"], s["p99_ms"], s["throughput_ips"]])
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (dry run)"
    show(f"GPU smoke: {gpu}", ["backend", "model", "timing", "batch", "acc %", "p50 ms",
                                                          "p99 ms", "images/s"], rows)
    for o in outcomes:
        if o["status"] != "ok":
            print(f"{o['backend']}/{o['device']}: {o['status']}: {o['reason']}")
    for name, value in clocks.items():
        print(f"clock check: {name} = {value}")
    path = save("gpu-smoke", {"device": args.device, "gpu": gpu, "identity": identity, "clock_check": clocks,
                              "dataset": args.dataset, "phases": phases, "trained": trained, "outcomes": outcomes,
                              "benches": records})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
