"""INT8 that keeps a depthwise student's accuracy: today's post-training INT8 (`ptq`: minmax, 512 training images,
every node INT8) against `ptq-search` (calibration and float node groups chosen on the validation split), per
student and preset: test accuracy (the bundle's eval.npz, the whole test split), the choices, the sensitivity
analysis, the TensorRT rule check, and p50 latency at batch 1 and 64 (ONNX Runtime CPU, 2 threads, models
timed in alternating rounds so that a busy machine slows them alike).

    # students (reused if present): the digits quickstart (base variant, 3 seeds) and the Fashion-MNIST study's
    # base variant (MobileNet family, 2 seeds)
    edgekd distill profiles/quickstart.toml --out /tmp/q --set 'variants={base={kind="base"}}'
    edgekd distill profiles/fashion-mnist-study.toml --out /tmp/f --data-dir /usr/share/datasets/fashion-mnist \\
        --set 'variants={base={kind="base"}}' --set 'students={}'
    python benchmarks/int8_quality.py /tmp/q/quickstart/digits/base/kd/seed* --name int8_quality-digits
    python benchmarks/int8_quality.py /tmp/f/fashion-mnist-study/fashion-mnist/base/kd/seed* \\
        --name int8_quality-fashion-mnist
    # quantization-aware distillation against plain ptq (no ptq-search):
    python benchmarks/int8_quality.py /tmp/q/quickstart/digits/base/kd/seed* --qat-only --qat-epochs 2 \\
        --name int8_quality-digits-qat

Each run's bundle is exported with `--int8-method ptq-search --int8-sensitivity` (its manifest keeps the choices
and the analysis); the `ptq` model is made beside it from the same FP32 ONNX and calibration images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

from edgekd.runio import read_json  # noqa: E402
from edgekd.runtime.evalset import accuracy, load_eval, normalize, predict  # noqa: E402
from edgekd.runtime.runners import OrtRunner  # noqa: E402


def latency(models: dict[str, Path], shape: list[int], batches: list[int], threads: int, rounds: int = 30,
            per_round: int = 10) -> dict[str, dict[str, float]]:
    """p50 latency (ms) of each model per batch size, the models alternating round by round."""
    import onnxruntime as ort

    sessions = {}
    for key, path in models.items():
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
        sessions[key] = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    out: dict[str, dict[str, float]] = {key: {} for key in models}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        times: dict[str, list[float]] = {key: [] for key in models}
        for s in sessions.values():
            for _ in range(20):
                s.run(None, {s.get_inputs()[0].name: x})
        for _ in range(rounds):
            for key, s in sessions.items():
                feed = {s.get_inputs()[0].name: x}
                for _ in range(per_round):
                    start = time.perf_counter()
                    s.run(None, feed)
                    times[key].append(time.perf_counter() - start)
        for key in models:
            out[key][f"b{batch}_p50_ms"] = statistics.median(times[key]) * 1000
    return out


def qat_model(run: Path, bundle: Path, preset: str, out: Path, epochs: int, images, mean, std, log) -> dict:
    """qat-kd's INT8 model for `preset` written to `out` (not into the bundle, whose INT8 model is ptq-search's),
    with its parity against the fake-quant PyTorch graph and its TensorRT rule check; `logits`: ONNX Runtime's, as
    deployed."""
    from edgekd.config import DatasetConfig
    from edgekd.data.splits import load_splits
    from edgekd.distill.qat import qat_int8
    from edgekd.export.bundle import OPSET, _torch_model, qdq_parity
    from edgekd.export.qdq_rules import check_tensorrt_qdq

    profile, metrics = read_json(run / "profile.json"), read_json(run / "metrics.json")
    data = load_splits(metrics["dataset"], DatasetConfig(**profile["profile"]["datasets"][metrics["dataset"]]))
    model, _ = _torch_model(run, profile, data)
    x = normalize(images, mean, std)
    info, reference = qat_int8(run, model, preset, out, epochs, 0.0, x, OPSET, log)
    runner = OrtRunner(out)
    logits = np.concatenate([runner.infer(x[i : i + 512]) for i in range(0, len(x), 512)])
    return {**info, "parity": qdq_parity(out, x, reference),
            "tensorrt_qdq_ok": check_tensorrt_qdq(out).ok if preset == "trt" else None, "logits": logits}


def measure(run: Path, presets: tuple[str, ...], max_drop: float, threads: int, log, qat_epochs: int = 0,
            sensitivity: bool = True) -> list[dict]:
    from edgekd.config import DatasetConfig
    from edgekd.data.splits import SPLIT_SEED, load_splits, stratified_cap
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.export.int8 import quantize
    from edgekd.export.qdq_rules import check_tensorrt_qdq

    start = time.perf_counter()
    options = ExportOptions(targets=("onnx", "int8"), int8_presets=presets, int8_method="ptq-search",
                            int8_max_drop=max_drop, int8_sensitivity=sensitivity)
    bundle = export_run(run, options, log=log)
    export_s = time.perf_counter() - start
    manifest = read_json(bundle / "manifest.json")
    images, labels = load_eval(bundle)
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    profile, metrics = read_json(run / "profile.json"), read_json(run / "metrics.json")
    data = load_splits(metrics["dataset"], DatasetConfig(**profile["profile"]["datasets"][metrics["dataset"]]))
    calib = normalize(stratified_cap(data.train, 512, data.num_classes, SPLIT_SEED + 4).images.numpy(), mean, std)
    fp32 = manifest["models"]["onnx-fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            before = Path(tmp) / f"ptq-{preset}.onnx"
            quantize(bundle / "model.onnx", before, calib, preset, "minmax")  # today's INT8
            before_acc = accuracy(predict(OrtRunner(before), images, mean, std), labels)
            after = manifest["models"][f"onnx-int8-{preset}"]
            models = {"fp32": bundle / "model.onnx", "ptq": before, "ptq-search": bundle / after["file"]}
            qat = None
            if qat_epochs:
                models["qat-kd"] = Path(tmp) / f"qat-{preset}.onnx"
                qat = qat_model(run, bundle, preset, models["qat-kd"], qat_epochs, images, mean, std, log)
                qat["acc"] = accuracy(qat.pop("logits"), labels)
            lat = latency(models, manifest["input_shape"], [1, 64], threads)
            mp, cal = after["mixed_precision"], after["calibration"]
            sens = manifest.get("int8_sensitivity", {}).get(preset, {})
            rows.append({
                "run": str(run), "dataset": manifest["dataset"], "variant": manifest["variant"],
                "student": manifest["student"]["model"], "seed": metrics["seed"], "preset": preset,
                "test_images": int(len(labels)), "fp32_acc": fp32["accuracy"],
                "ptq_acc": before_acc, "ptq_change_pts": (before_acc - fp32["accuracy"]) * 100,
                "search_acc": after["accuracy"], "search_change_pts": after["accuracy_change_vs_fp32"] * 100,
                "within_target": abs(min(0.0, after["accuracy_change_vs_fp32"] * 100)) <= max_drop,
                "calibration": {k: cal[k] for k in ("method", "images", "placement")},
                "float_groups": mp["float_groups"], "float_closure": mp["float_closure"],
                "validation": after["validation"], "reached_val_target": mp["reached_target"],
                "tensorrt_qdq_check": (check_tensorrt_qdq(bundle / after["file"]).to_dict() if preset == "trt"
                                       else None),
                "ptq_tensorrt_qdq_ok": check_tensorrt_qdq(before).ok if preset == "trt" else None,
                "latency": lat, "sensitivity_worst": sens.get("groups", [])[:10],
                "sensitivity_calibration": sens.get("calibration"), "export_s": export_s,
                **({"qat_acc": qat["acc"], "qat_change_pts": (qat["acc"] - fp32["accuracy"]) * 100,
                    "qat": {k: v for k, v in qat.items() if k != "acc"},
                    "best_change_pts": max(after["accuracy_change_vs_fp32"] * 100,
                                           (qat["acc"] - fp32["accuracy"]) * 100)} if qat else {})})
            log(f"{run}: {preset}: FP32 {fp32['accuracy']:.4f}, ptq {before_acc:.4f}, ptq-search "
                f"{after['accuracy']:.4f} (k={mp['k']})")
    return rows


def measure_qat(run: Path, presets: tuple[str, ...], epochs: int, threads: int, log) -> list[dict]:
    """Plain ptq (the bundle's INT8) against qat-kd, per preset, without the (slow) ptq-search."""
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.export.qdq_rules import check_tensorrt_qdq

    bundle = export_run(run, ExportOptions(targets=("onnx", "int8"), int8_presets=presets), log=log)
    manifest, metrics = read_json(bundle / "manifest.json"), read_json(run / "metrics.json")
    images, labels = load_eval(bundle)
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    fp32 = manifest["models"]["onnx-fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            ptq = manifest["models"][f"onnx-int8-{preset}"]
            models = {"fp32": bundle / "model.onnx", "ptq": bundle / ptq["file"], "qat-kd": Path(tmp) / "qat.onnx"}
            qat = qat_model(run, bundle, preset, models["qat-kd"], epochs, images, mean, std, log)
            qat_acc = accuracy(qat.pop("logits"), labels)
            rows.append({
                "run": str(run), "dataset": manifest["dataset"], "variant": manifest["variant"],
                "student": manifest["student"]["model"], "seed": metrics["seed"], "preset": preset,
                "test_images": int(len(labels)), "fp32_acc": fp32["accuracy"], "ptq_acc": ptq["accuracy"],
                "ptq_change_pts": ptq["accuracy_change_vs_fp32"] * 100, "qat_acc": qat_acc,
                "qat_change_pts": (qat_acc - fp32["accuracy"]) * 100, "qat": qat,
                "ptq_tensorrt_qdq_ok": check_tensorrt_qdq(bundle / ptq["file"]).ok if preset == "trt" else None,
                "latency": latency(models, manifest["input_shape"], [1, 64], threads)})
            log(f"{run}: {preset}: FP32 {fp32['accuracy']:.4f}, ptq {ptq['accuracy']:.4f}, qat-kd {qat_acc:.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="student run directories (edgekd distill ... kd/seedN)")
    parser.add_argument("--presets", default="cpu,trt")
    parser.add_argument("--max-drop", type=float, default=1.0, help="ptq-search target, points")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="int8_quality")
    parser.add_argument("--qat-only", action="store_true", help="plain ptq against qat-kd, no ptq-search")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip the per-group sensitivity analysis (the slow part; ptq-search still runs)")
    parser.add_argument("--qat-epochs", type=int, default=0,
                        help="also qat-kd (edgekd.export.qat) with this many fine-tune epochs, beside ptq-search")
    args = parser.parse_args()
    rows = []
    if args.qat_only:
        for run in map(Path, args.runs):
            rows += measure_qat(run, tuple(args.presets.split(",")), args.qat_epochs or 2, args.threads,
                                log=lambda line: print(line, flush=True))
        show("INT8: plain ptq vs qat-kd (test accuracy %, change in points; p50 ms at batch 1 / 64)",
             ["student", "preset", "FP32", "ptq", "qat-kd", "ONNX = fake-quant %", "TRT rules", "FP32 ms", "ptq ms",
              "qat ms"],
             [[f"{r['dataset']} s{r['seed']}", r["preset"], f"{r['fp32_acc'] * 100:.2f}",
               f"{r['ptq_acc'] * 100:.2f} ({r['ptq_change_pts']:+.2f})",
               f"{r['qat_acc'] * 100:.2f} ({r['qat_change_pts']:+.2f})",
               f"{100 * r['qat']['parity']['top1_agreement']:.2f}", r["qat"]["tensorrt_qdq_ok"],
               *[f"{r['latency'][m]['b1_p50_ms']:.3f} / {r['latency'][m]['b64_p50_ms']:.2f}"
                 for m in ("fp32", "ptq", "qat-kd")]] for r in rows])
        path = save(args.name, {"device": "cpu", "threads": args.threads, "qat_epochs": args.qat_epochs or 2,
                                "note": "test accuracy on the bundle's evaluation images; qat-kd checkpoints chosen "
                                        "on validation", "rows": rows})
        print(f"written {path}")
        return
    for run in map(Path, args.runs):
        rows += measure(run, tuple(args.presets.split(",")), args.max_drop, args.threads,
                        log=lambda line: print(line, flush=True), qat_epochs=args.qat_epochs,
                        sensitivity=not args.no_sensitivity)
    show("INT8: today's ptq vs ptq-search (test accuracy %, change in points; p50 ms at batch 1 / 64)",
         ["student", "preset", "FP32", "ptq", "ptq-search", "float groups", "calibration", "FP32 ms", "ptq ms",
          "search ms", "qat-kd", "qat ms"],
         [[f"{r['dataset']} s{r['seed']}", r["preset"], f"{r['fp32_acc'] * 100:.2f}",
           f"{r['ptq_acc'] * 100:.2f} ({r['ptq_change_pts']:+.2f})",
           f"{r['search_acc'] * 100:.2f} ({r['search_change_pts']:+.2f})", len(r["float_groups"]),
           f"{r['calibration']['method']} x{r['calibration']['images']} {r['calibration']['placement']}",
           *[f"{r['latency'][m]['b1_p50_ms']:.3f} / {r['latency'][m]['b64_p50_ms']:.2f}"
             for m in ("fp32", "ptq", "ptq-search")],
           f"{r['qat_acc'] * 100:.2f} ({r['qat_change_pts']:+.2f})" if "qat_acc" in r else "-",
           f"{r['latency']['qat-kd']['b1_p50_ms']:.3f} / {r['latency']['qat-kd']['b64_p50_ms']:.2f}"
           if "qat-kd" in r["latency"] else "-"] for r in rows])
    path = save(args.name, {"device": "cpu", "threads": args.threads, "max_drop_pts": args.max_drop,
                            "note": "test accuracy on the whole test split; every INT8 choice made on validation",
                            "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
