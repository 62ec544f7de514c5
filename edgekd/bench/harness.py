"""`edgekd bench`: accuracy, latency percentiles, throughput and memory of a bundle's models on this device.

Reads only the bundle (manifest.json, eval.npz, the model files): no PyTorch unless --backend torch.

Layering: bench, above edgekd.runtime (runners, eval set, manifest, TensorRT engine checks) and beside export,
which it does not import: a bundle and this package are all a device needs. The PyTorch reference runner is
bench's own (edgekd.bench.torch_runner), registered in the runtime's RUNNERS by importing it here.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd import pte  # noqa: F401 - registers the "executorch" runner in RUNNERS
from edgekd.bench import torch_runner  # noqa: F401 - registers the "torch" runner in RUNNERS
from edgekd.bench.monitor import (
    Sampler,
    find_power_reader,
    gpu_info,
    gpu_memory_mib,
    integrate_power,
    jetson_info,
    rss_bytes,
)
from edgekd.envinfo import environment
from edgekd.errors import EdgeKDError
from edgekd.runio import sha256_file, write_json
from edgekd.runtime.evalset import load_eval, metric_name, normalize, predict, score
from edgekd.runtime.manifest import bundle_file, read_manifest
from edgekd.runtime.runners import RUNNERS, require
from edgekd.runtime.tensorrt import engine_note
from edgekd.targets import BACKENDS, TARGETS, Target, targets_for


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


def _entries(bundle: Path, manifest: dict, options: BenchOptions) -> list[tuple[Target, dict]]:
    """The bundle's deployed models this backend opens (the targets table says which), or those `--model` names
    (a model the export's guard did not deploy is benched only when named)."""
    present = dict(manifest["models"])
    if (bundle / TARGETS["torch-fp32"].file).is_file():  # the PyTorch reference every bundle carries
        present.setdefault("torch-fp32", {"file": TARGETS["torch-fp32"].file, "precision": "fp32"})
    opened = {t.key: t for t in targets_for(options.backend)}
    for key in options.models:
        if key in present and key not in opened:
            users = ", ".join(TARGETS[key].backends) if key in TARGETS else "none"
            raise EdgeKDError(f"--backend {options.backend} does not run {key} (it is made for {users}): "
                              f"choose one of {', '.join(k for k in present if k in opened) or 'none'}")
    found = [(opened[k], entry) for k, entry in present.items() if k in opened
             and (k in options.models if options.models else entry.get("deployed", True))]
    if not found:
        have = ", ".join(manifest["models"]) or "none"
        made_by = {t.made_by for t in opened.values()}
        fix = {"trt": "`edgekd build BUNDLE`", "pte": "`edgekd export RUN --target pte`"}.get(
            next(iter(made_by)) if len(made_by) == 1 else "", "`edgekd export --target onnx`")
        named = " named " + ",".join(options.models) if options.models else ""
        raise EdgeKDError(f"the bundle has no {options.backend} models{named} (it has: {have}): make them with {fix}")
    return found


def not_deployed(manifest: dict, benched: list[str]) -> dict[str, str]:
    """The bundle's models the export's guard (INT8, FP16, and engines built from them) did not deploy and this
    bench left out, with the reason."""
    return {k: m.get("not_deployed", "not deployed") for k, m in manifest["models"].items()
            if not m.get("deployed", True) and k not in benched}


def _open(bundle: Path, target: Target, entry: dict, manifest: dict, options: BenchOptions):
    path = bundle_file(bundle, entry["file"], f"model {target.key!r}")
    if options.backend == "torch":
        return RUNNERS.get("torch")(path, options.device, options.threads, manifest["student"])
    if options.backend == "trt":
        return RUNNERS.get("trt")(path, options.device)
    return RUNNERS.get(options.backend)(path, options.device, options.threads,
                                        max_batch=max((*options.batch_sizes, 256)))


def check_backend(backend: str, device: str) -> None:
    """Refuse a backend/device pair the targets table does not have, before any model is opened."""
    if backend not in BACKENDS:
        RUNNERS.get(backend)  # raises the one-line error with the valid names
    if device not in BACKENDS[backend].devices:
        raise EdgeKDError(f"--backend {backend} runs on an NVIDIA GPU: add --device cuda" if device == "cpu" else
                          f"--backend {backend} does not run on {device}: use --device "
                          f"{' or '.join(BACKENDS[backend].devices)}")


def bench_key(bundle: Path, options: BenchOptions, device: dict | None = None) -> dict:
    """What a bench record is a function of: the bundle's files it times (by content), the bench options, and the
    device's identity (edgekd.bench.devices.identity; None: this machine's)."""
    from edgekd.bench.devices import device_facts, identity
    from edgekd.records import make_key

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    files = sorted({entry["file"] for _, entry in _entries(bundle, manifest, options)} | {"eval.npz"})
    opts = dict(options.__dict__)
    config = {"deploy": {k: opts.pop(k) for k in ("backend", "device", "batch_sizes", "threads", "iters")},
              "bench": opts, "on": device or identity(device_facts(), options.backend)}
    # a missing file gets no hash here: opening it fails below with the one line that says what to do
    return make_key("bench", config, {}, {name: sha256_file(bundle / name) if (bundle / name).is_file() else None
                                          for name in files})


def bench_bundle(bundle: Path, options: BenchOptions, progress=None) -> dict:
    """Bench `bundle` with `options`; OMP_NUM_THREADS is --threads while it runs (for runtimes that read it when
    they load), then as it was: a study's later jobs and the processes it starts plan with the machine's threads."""
    before = os.environ.get("OMP_NUM_THREADS")
    if options.threads and before is None:
        os.environ["OMP_NUM_THREADS"] = str(options.threads)
    try:
        return _bench_bundle(bundle, options, progress)
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _bench_bundle(bundle: Path, options: BenchOptions, progress=None) -> dict:
    start = time.perf_counter()
    bundle = Path(bundle)
    check_backend(options.backend, options.device)
    manifest = read_manifest(bundle)
    images, labels = load_eval(bundle)
    from edgekd.records import fingerprint

    key = bench_key(bundle, options)  # before timing: the files as they are benched
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    power_reader = find_power_reader()
    # the runtime imported before the first model's cold start is timed: load_ms is opening a model, not importing
    # onnxruntime or ExecuTorch's libtorch (seconds, once per process)
    if options.backend in BACKENDS:
        require(BACKENDS[options.backend].module, options.backend)
    results = []
    for target, entry in _entries(bundle, manifest, options):
        engine = engine_note(entry, bundle) if options.backend == "trt" else None  # before any GPU memory
        rss_before = rss_bytes()
        with Sampler(rss_bytes, 0.02) as memory:
            # Cold start, apart from the warm figures: opening the model (session or engine deserialisation,
            # ORT-TensorRT's engine build or cache load) and the first inference (lazy allocations, kernel loads)
            opened = time.perf_counter()
            runner = _open(bundle, target, entry, manifest, options)
            try:
                loaded = time.perf_counter()
                runner.infer(normalize(images[:1], mean, std))
                cold = {"load_ms": (loaded - opened) * 1e3, "first_inference_ms": (time.perf_counter() - loaded) * 1e3}
                acc = score(predict(runner, images, mean, std), labels)  # top-1, or macro AUC (multi-label)
                latency, power, timing, calls = {}, {}, set(), set()
                for batch in options.batch_sizes:
                    if progress:
                        progress(f"{target.key} batch {batch}")
                    x = normalize(images[np.arange(batch) % len(images)], mean, std)
                    # Power is sampled through warm-up too, but only samples inside the timed window count.
                    with Sampler(power_reader.read, 0.05) if power_reader else contextlib.nullcontext() as watts:
                        timed = runner.time(x, options.warmup, options.iters, options.duration)
                    if power_reader:
                        power[str(batch)] = integrate_power(watts.samples, len(timed.seconds) * batch,
                                                            window=timed.window, rails=power_reader.rails,
                                                            method=power_reader.method)
                    latency[str(batch)] = latency_stats(timed.seconds, batch)
                    timing.add(timed.kind)
                    calls.add(timed.calls_per_sample)
                gpu_mem = gpu_memory_mib() if options.device == "cuda" else None
            finally:  # a failed torch bench gives the process its threads back too
                runner.close()
        results.append({
            "model": target.key, "backend": options.backend, "device": options.device,
            "precision": entry["precision"], "file": entry["file"],
            "file_bytes": (bundle / entry["file"]).stat().st_size, "accuracy": acc, "metric": metric_name(labels),
            # host_wall: host clock around a synchronous call; device_events: CUDA events around the GPU work.
            "timing": timing.pop() if len(timing) == 1 else sorted(timing),
            "calls_per_sample": max(calls),  # device_events: each latency sample is the mean of this many enqueues
            "meant_for_device": target.meant_for_run(options.backend, options.device),
            "computes": target.computes(options.backend, options.device),
            "tf32": getattr(runner, "tf32", None),  # GPU float math: TF32 allowed (True), IEEE FP32 (False)
            "runtime_settings": getattr(runner, "settings", None),  # e.g. OpenVINO's hints, as compiled
            "peak_rss_increase_mib": (max(v for _, v in memory.samples) - rss_before) / 2**20,
            "gpu_memory_mib": gpu_mem, "cold": cold, "latency": latency, "power": power or None,
            "providers": getattr(runner, "providers", None), "engine": engine,
        })
    env = environment(with_torch=False)
    env.update({"threads": options.threads or "runtime default", "gpu": gpu_info(), "jetson": jetson_info()})
    record = {"bundle": str(bundle), "dataset": manifest["dataset"], "variant": manifest["variant"],
              "student": manifest["student"], "distill": manifest["distill"], "eval_samples": int(len(labels)),
              "options": {k: v for k, v in options.__dict__.items()}, "environment": env,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results,
              "not_deployed": not_deployed(manifest, [r["model"] for r in results]),
              "on": {"name": "", "reach": "local", "hostname": key["config"]["on"]["hostname"]},
              "wall_s": round(time.perf_counter() - start, 2),  # this bench's own time, for the report's phases
              "schema_version": key["schema_version"], "key": key, "fingerprint": fingerprint(key)}
    return record


def save_bench(record: dict, out: Path | None = None) -> Path:
    """bench-<backend>-<device>[@<device name>].json beside the bundle, or where --out says."""
    from edgekd.bench.devices import bench_file_name

    opts = record["options"]
    name = (record.get("on") or {}).get("name", "")
    path = Path(out) if out else Path(record["bundle"]) / f"{bench_file_name(opts['backend'], opts['device'], name)}.json"
    write_json(path, record)
    return path
