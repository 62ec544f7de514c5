"""Inference latency of exported students on this machine, in one run:
PyTorch eager vs ONNX Runtime FP32 vs INT8 (`cpu` preset) vs INT8 (`trt` preset, run by ORT on the CPU),
at batch 1 and 64, plus the bench harness's own overhead against a bare `session.run` loop.

    python benchmarks/inference.py RUN_DIR/bundle [RUN_DIR/bundle ...] [--threads 2] [--iters 300]

Bundles come from `edgekd export RUN_DIR --target onnx --target int8`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

from edgekd.bench.harness import latency_stats  # noqa: E402
from edgekd.bench.torch_runner import TorchRunner  # noqa: E402
from edgekd.runtime.evalset import accuracy, load_eval, normalize, predict  # noqa: E402
from edgekd.runtime.manifest import read_manifest  # noqa: E402
from edgekd.runtime.runners import OrtRunner  # noqa: E402

MODELS = [("torch eager fp32", "torch", "model.safetensors"), ("ORT fp32", "ort", "model.onnx"),
          ("ORT int8 cpu preset", "ort", "model.int8-cpu.onnx"), ("ORT int8 trt preset", "ort", "model.int8-trt.onnx")]


def harness_overhead(runner: OrtRunner, x: np.ndarray, iters: int, rounds: int = 7) -> dict:
    """Mean latency the harness reports vs a bare `session.run` loop timed as a whole; alternated rounds."""
    run, feed, outputs = runner.session.run, {runner.input: x}, runner.outputs
    bare, harness = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            run(outputs, feed)
        bare.append((time.perf_counter() - start) / iters)
        harness.append(statistics.fmean(runner.time(x, warmup=0, iters=iters, duration=None).seconds))
    b, h = statistics.median(bare), statistics.median(harness)
    return {"bare_ms": b * 1000, "harness_ms": h * 1000, "overhead": h / b - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch-sizes", default="1,64")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    records = []
    for bundle in map(Path, args.bundles):
        manifest = read_manifest(bundle)
        images, labels = load_eval(bundle)
        mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
        rows, result = [], {"bundle": str(bundle), "student": manifest["student"], "models": {}}
        for label, backend, file in MODELS:
            if not (bundle / file).is_file():
                continue
            runner = (TorchRunner(bundle / file, "cpu", args.threads, manifest["student"]) if backend == "torch"
                      else OrtRunner(bundle / file, "cpu", args.threads))
            acc = accuracy(predict(runner, images, mean, std), labels)
            entry = {"accuracy": acc, "latency": {}}
            for b in batches:
                x = normalize(images[np.arange(b) % len(images)], mean, std)
                entry["latency"][b] = latency_stats(runner.time(x, 20, args.iters, None).seconds, b)
            result["models"][label] = entry
        fp32 = result["models"]["ORT fp32"]
        for label, entry in result["models"].items():
            for b in batches:
                s = entry["latency"][b]
                rows.append([label, b, entry["accuracy"] * 100, (entry["accuracy"] - fp32["accuracy"]) * 100,
                             s["p50_ms"], s["p90_ms"], s["p99_ms"], s["throughput_ips"],
                             s["p50_ms"] / fp32["latency"][b]["p50_ms"]])
        show(f"{manifest['dataset']} student {manifest['student']['model']} ({manifest['student']['params']:,} "
             f"params), CPU, {args.threads} threads", ["model", "batch", "acc %", "Δacc pts vs ORT fp32", "p50 ms",
                                                        "p90 ms", "p99 ms", "images/s", "p50 vs ORT fp32"], rows)
        ort = OrtRunner(bundle / "model.onnx", "cpu", args.threads)
        result["harness_overhead"] = {}
        for b in batches:
            x = normalize(images[np.arange(b) % len(images)], mean, std)
            result["harness_overhead"][b] = o = harness_overhead(ort, x, max(20, args.iters // 3))
            print(f"harness overhead at batch {b}: {o['overhead'] * 100:+.2f}% "
                  f"(harness mean {o['harness_ms']:.4f} ms vs bare session.run loop {o['bare_ms']:.4f} ms; goal <= 3%)")
        records.append(result)
    path = save("inference", {"device": "cpu", "threads": args.threads, "iters": args.iters, "bundles": records})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
