"""`edgekd bench`: accuracy, latency percentiles, throughput and memory of a bundle's models on this device.

Reads only the bundle (manifest.json, eval.npz, the model files): no PyTorch unless --backend torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.bench.evalset import accuracy, load_eval, normalize, predict
from edgekd.bench.monitor import (
    Sampler,
    find_vdd_in,
    gpu_info,
    gpu_memory_mib,
    integrate_power,
    jetson_info,
    rss_bytes,
)
from edgekd.bench.runners import RUNNERS
from edgekd.envinfo import environment
from edgekd.errors import EdgeKDError
from edgekd.runio import read_json, write_json

FORMATS = {"ort": ".onnx", "ort-trt": ".onnx", "trt": ".engine", "torch": ".safetensors"}


@dataclass
class BenchOptions:
    backend: str = "ort"
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    threads: int = 0
    iters: int = 200
    duration: float | None = None  # seconds per batch size; overrides iters
    warmup: int = 10
    models: tuple[str, ...] = ()  # manifest keys; empty = every model of the backend's format


def latency_stats(times: list[float], batch: int) -> dict:
    t = np.asarray(times) * 1000.0
    p50, p90, p95, p99 = np.percentile(t, [50, 90, 95, 99])
    return {"iterations": len(t), "p50_ms": p50, "p90_ms": p90, "p95_ms": p95, "p99_ms": p99,
            "mean_ms": float(t.mean()), "std_ms": float(t.std()), "min_ms": float(t.min()),
            "throughput_ips": batch * 1000.0 / float(t.mean())}


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise EdgeKDError(f"{bundle} is not a bundle (no manifest.json): pass a directory made by `edgekd export`")
    return read_json(path)


def _entries(manifest: dict, options: BenchOptions) -> list[tuple[str, dict]]:
    if options.backend == "torch":
        return [("torch-fp32", {"file": "model.safetensors", "precision": "fp32"})]
    suffix = FORMATS[options.backend]
    found = [(k, m) for k, m in manifest["models"].items() if m["file"].endswith(suffix)]
    if options.models:
        found = [(k, m) for k, m in found if k in options.models]
    if not found:
        have = ", ".join(manifest["models"]) or "none"
        raise EdgeKDError(f"the bundle has no {options.backend} models{' named ' + ','.join(options.models) if options.models else ''} "
                          f"(it has: {have}): export them with `edgekd export --target "
                          f"{'trt' if options.backend == 'trt' else 'onnx'}`")
    return found


def _open(bundle: Path, key: str, entry: dict, manifest: dict, options: BenchOptions):
    path = bundle / entry["file"]
    if options.backend == "torch":
        return RUNNERS.get("torch")(path, options.device, options.threads, manifest["student"])
    if options.backend == "trt":
        from edgekd.export.tensorrt_build import check_engine_matches

        check_engine_matches(entry)
        return RUNNERS.get("trt")(path, options.device)
    return RUNNERS.get(options.backend)(path, options.device, options.threads)


def bench_bundle(bundle: Path, options: BenchOptions, progress=None) -> dict:
    bundle = Path(bundle)
    if options.backend not in RUNNERS:
        RUNNERS.get(options.backend)  # raises the one-line error with the valid names
    if options.backend in ("trt", "ort-trt") and options.device != "cuda":
        raise EdgeKDError(f"--backend {options.backend} runs on an NVIDIA GPU: add --device cuda")
    if options.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    manifest = read_manifest(bundle)
    images, labels = load_eval(bundle)
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    power_reader = find_vdd_in()
    results = []
    for key, entry in _entries(manifest, options):
        rss_before = rss_bytes()
        with Sampler(rss_bytes, 0.02) as memory:
            runner = _open(bundle, key, entry, manifest, options)
            acc = accuracy(predict(runner, images, mean, std), labels)
            latency, power = {}, {}
            for batch in options.batch_sizes:
                if progress:
                    progress(f"{key} batch {batch}")
                x = normalize(images[np.arange(batch) % len(images)], mean, std)
                if power_reader:
                    with Sampler(power_reader, 0.05) as watts:
                        times = runner.time(x, options.warmup, options.iters, options.duration)
                    power[str(batch)] = integrate_power(watts.samples, len(times) * batch)
                else:
                    times = runner.time(x, options.warmup, options.iters, options.duration)
                latency[str(batch)] = latency_stats(times, batch)
            gpu_mem = gpu_memory_mib() if options.device == "cuda" else None
            runner.close()
        results.append({
            "model": key, "backend": options.backend, "device": options.device, "precision": entry["precision"],
            "file": entry["file"], "file_bytes": (bundle / entry["file"]).stat().st_size, "accuracy": acc,
            "peak_rss_increase_mib": (max(v for _, v in memory.samples) - rss_before) / 2**20,
            "gpu_memory_mib": gpu_mem, "latency": latency, "power": power or None,
        })
    env = environment(with_torch=False)
    env.update({"threads": options.threads or "runtime default", "gpu": gpu_info(), "jetson": jetson_info()})
    record = {"bundle": str(bundle), "dataset": manifest["dataset"], "variant": manifest["variant"],
              "student": manifest["student"], "distill": manifest["distill"], "eval_samples": int(len(labels)),
              "options": {k: v for k, v in options.__dict__.items()}, "environment": env,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    return record


def save_bench(record: dict, out: Path | None = None) -> Path:
    """bench.json beside the bundle (one file per backend and device), or where --out says."""
    opts = record["options"]
    path = Path(out) if out else Path(record["bundle"]) / f"bench-{opts['backend']}-{opts['device']}.json"
    write_json(path, record)
    return path
