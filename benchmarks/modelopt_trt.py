"""NVIDIA Model Optimizer's ONNX INT8 post-training quantization against edgekd's `trt` INT8 preset, on CPU.

Per student bundle, its FP32 model.onnx quantized
- by edgekd's `trt` preset (edgekd.export.int8.quantize: symmetric S8 activations and weights, per-channel weights,
  dedicated Q/DQ pairs, float biases), calibrated minmax (edgekd's plain `ptq`) and entropy with Q/DQ on every
  quantizable tensor (placement `all`), and minmax with Q/DQ on the inputs of weighted ops only (`inputs`);
- by ModelOpt (modelopt.onnx.quantization.quantize, quantize_mode="int8", calibration_eps=["cpu"]), calibrated
  "max" and "entropy" (its default) with high_precision_dtype="fp32", so that what stays float is FP32 as in
  edgekd's models; and once with ModelOpt's own defaults (entropy, float parts converted to FP16: what it ships for
  TensorRT), scored for accuracy and the rule check only (ORT's CPU kernels are no FP16 runtime to time);
all from the same calibration images: the bundle export's own draw (`--calib-size` of the training split,
stratified, SPLIT_SEED + 4, normalised with the dataset's mean and std, as edgekd.export.bundle._make_int8 does).
Each model: test accuracy on the bundle's eval.npz and its change against FP32 (a TensorRT-bound model with its
Q/DQ run as written, in float: TensorRT's int32 arithmetic; ORT CPU's saturating integer kernels' accuracy is kept
beside it as accuracy_ort_kernels; the bundle's cpu model by ORT's kernels, which it is made for), edgekd's
TensorRT Q/DQ rule check (edgekd.export.qdq_rules), where its Q/DQ nodes sit (QuantizeLinear count, the op types
fed by activation and weight DequantizeLinears, the op types left without one), and p50 latency at batch 1 and
64 (ORT CPU, `--threads`, the models timed in alternating rounds so that a busy machine slows them alike). The
bundle's own model.int8-cpu.onnx (edgekd's `cpu` preset) is scored beside them for reference.

Isolation: ModelOpt pins onnx~=1.21 and onnxruntime-gpu~=1.24 and patches ORT's quantizer (its calibrators and
QDQ registry) inside the process that calls it. So it is installed in a venv of its own and runs in this script's
process (the venv's python); the calibration draw, edgekd's quantizations and every measurement run in child
processes on the main interpreter (the venv's base python, or --edgekd-python): edgekd's own onnx and ONNX
Runtime, untouched by ModelOpt's patches, so edgekd's models are the ones edgekd makes and all models are scored
and timed by one runtime.

    python -m venv --system-site-packages /tmp/movenv
    /tmp/movenv/bin/pip install 'nvidia-modelopt[onnx]'  # 0.47.0: onnxruntime-gpu (CPU EP is enough), onnx 1.21
    /tmp/movenv/bin/python benchmarks/modelopt_trt.py /tmp/qs/after/quickstart/digits/{base,quarter}/kd/seed*/bundle

Writes benchmarks/results/<--name>-cpu.json; the quantized models stay under --work (one folder per student).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EDGEKD_RECIPES = (("minmax", "all"), ("entropy", "all"), ("minmax", "inputs"))  # (calibration, placement)
MODELOPT_METHODS = ("max", "entropy")
TIMED = ("fp32", "edgekd-minmax", "edgekd-entropy", "edgekd-minmax-inputs", "modelopt-max", "modelopt-entropy",
         "bundle-int8-cpu")
SHOWN = ("edgekd-minmax", "edgekd-entropy", "edgekd-minmax-inputs", "modelopt-max", "modelopt-entropy",
         "modelopt-default-fp16", "bundle-int8-cpu")


def edgekd_key(method: str, placement: str) -> str:
    return f"edgekd-{method}" + ("" if placement == "all" else f"-{placement}")


# ---- child process on the main interpreter: edgekd's calibration draw, quantizations and measurements ----

def prepare(spec: dict) -> dict:
    """The calibration images (saved for ModelOpt), a copy of model.onnx to quantize, edgekd's `trt` models."""
    import numpy as np

    from edgekd.config import DatasetConfig
    from edgekd.data.splits import SPLIT_SEED, load_splits, stratified_cap
    from edgekd.export.int8 import quantize
    from edgekd.runio import read_json
    from edgekd.runtime.evalset import normalize

    bundle, work = Path(spec["bundle"]), Path(spec["work"])
    run = bundle.parent
    profile, metrics = read_json(run / "profile.json"), read_json(run / "metrics.json")
    manifest = read_json(bundle / "manifest.json")
    name = metrics["dataset"]
    data = load_splits(name, DatasetConfig(**profile["profile"]["datasets"][name]))
    if list(data.mean) != manifest["normalization"]["mean"] or list(data.std) != manifest["normalization"]["std"]:
        raise SystemExit(f"{bundle}: the dataset's normalisation is not the manifest's")
    calib = stratified_cap(data.train, spec["calib_size"], data.num_classes, SPLIT_SEED + 4)
    x = normalize(calib.images.numpy(), data.mean, data.std)
    np.save(work / "calib.npy", x)
    shutil.copyfile(bundle / "model.onnx", work / "model.onnx")
    models = {}
    for method, placement in spec["recipes"]:
        out = work / f"{edgekd_key(method, placement)}.onnx"
        start = time.perf_counter()
        quantize(work / "model.onnx", out, x, "trt", method, placement=placement)
        models[edgekd_key(method, placement)] = {"path": str(out), "quantize_s": time.perf_counter() - start,
                                                 "preset": "trt", "calibration": method, "placement": placement}
    return {"run": str(run), "dataset": name, "variant": metrics["variant"], "role": metrics["role"],
            "seed": metrics["seed"], "student": metrics["model"], "train_images": len(data.train),
            "calib_images": int(len(x)), "calib_per_class": np.bincount(calib.labels.numpy()).tolist(),
            "models": models, "versions": versions()}


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"python": sys.executable, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def qdq_summary(path: Path) -> dict:
    """Where a model's Q/DQ nodes sit: the op types its activation DequantizeLinears feed, those its constant
    ones (weights; int32 biases in the `cpu` preset) feed, and the op types (node counts) with no
    DequantizeLinear input at all, i.e. left in float."""
    import onnx

    from edgekd.export.qdq_rules import graph_links

    model = onnx.load(str(path))
    g = model.graph
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producers, consumers = graph_links(g)

    def constant(dq) -> bool:
        src = producers.get(dq.input[0])
        return dq.input[0] in constants or (src is not None and src.op_type == "QuantizeLinear"
                                            and src.input[0] in constants)

    activation_into, constant_into = Counter(), Counter()
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear"):
        for c in consumers.get(dq.output[0], []):
            (constant_into if constant(dq) else activation_into)[c.op_type] += 1
    compute = [n for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")]
    fed = [n for n in compute if any(getattr(producers.get(i), "op_type", "") == "DequantizeLinear"
                                     for i in n.input)]
    fed_names = {id(n) for n in fed}
    return {"opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "bytes": path.stat().st_size,
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in g.node),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in g.node),
            "activation_dq_into": dict(activation_into), "constant_dq_into": dict(constant_into),
            "nodes_with_dq_input": dict(Counter(n.op_type for n in fed)),
            "nodes_without_dq_input": dict(Counter(n.op_type for n in compute if id(n) not in fed_names))}


def measure(spec: dict) -> dict:
    """Every model's accuracy on eval.npz, rule check and Q/DQ placement; the timed ones' p50 latency."""
    from int8_quality import latency

    from edgekd.export.qdq_rules import check_tensorrt_qdq
    from edgekd.runio import read_json
    from edgekd.runtime.evalset import accuracy, load_eval, predict
    from edgekd.runtime.runners import OrtRunner

    bundle = Path(spec["bundle"])
    manifest = read_json(bundle / "manifest.json")
    images, labels = load_eval(bundle)
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    models = {k: Path(p) for k, p in spec["models"].items()}
    out = {"test_images": int(len(labels)), "manifest_fp32_acc": manifest["models"]["onnx-fp32"]["accuracy"],
           "models": {}, "versions": versions()}
    for key, path in models.items():
        def acc(as_written: bool, path: Path = path) -> float:
            runner = OrtRunner(path, threads=spec["threads"], as_written=as_written)
            return accuracy(predict(runner, images, mean, std), labels)

        # A TensorRT-bound model's accuracy is its Q/DQ run as written (what TensorRT's int32 arithmetic
        # computes); ORT's x86 integer kernels saturate, so theirs is recorded beside it, not instead of it.
        kernels = acc(False)
        written = kernels if key in ("fp32", "bundle-int8-cpu") else acc(True)
        check = check_tensorrt_qdq(path).to_dict() if key != "fp32" else None
        out["models"][key] = {"accuracy": written, "accuracy_ort_kernels": kernels, "tensorrt_qdq_check": check,
                              "qdq": qdq_summary(path)}
    timed = {k: models[k] for k in spec["timed"] if k in models}
    lat = latency(timed, manifest["input_shape"], spec["batches"], spec["threads"], spec["rounds"], spec["per_round"])
    for key, value in lat.items():
        out["models"][key]["latency"] = value
    return out


def worker(kind: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = prepare(spec) if kind == "prepare" else measure(spec)
    Path(out_path).write_text(json.dumps(result, indent=1))


# ---- this process (the ModelOpt venv) ----

def child(python: str, kind: str, spec: dict, work: Path) -> dict:
    spec_path, out_path = work / f"{kind}-spec.json", work / f"{kind}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([python, str(Path(__file__).resolve()), "--worker", kind, str(spec_path), str(out_path)],
                   check=True, env=env)
    return json.loads(out_path.read_text())


def modelopt_int8(fp32: Path, out: Path, calib, method: str, high_precision_dtype: str) -> float:
    from modelopt.onnx.quantization import quantize

    start = time.perf_counter()
    quantize(onnx_path=str(fp32), quantize_mode="int8", calibration_data=calib, calibration_method=method,
             calibration_eps=["cpu"], high_precision_dtype=high_precision_dtype, output_path=str(out),
             log_level="WARNING")
    return time.perf_counter() - start


def modelopt_versions() -> dict:
    import importlib.metadata

    import modelopt
    import onnx
    import onnxruntime

    out = {"python": sys.executable, "modelopt": modelopt.__version__, "onnx": onnx.__version__,
           "onnxruntime (imported)": onnxruntime.__version__}
    for name in ("onnxruntime-gpu", "onnx-graphsurgeon", "polygraphy", "onnxslim", "cupy-cuda12x"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def one(bundle: Path, args, log) -> dict:
    import numpy as np

    run = bundle.resolve().parent
    tag = "-".join(run.parts[-4:])  # <dataset>-<variant>-<role>-seed<k>
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    prep = child(args.edgekd_python, "prepare", {"bundle": str(bundle.resolve()), "work": str(work),
                                                 "calib_size": args.calib_size, "recipes": EDGEKD_RECIPES}, work)
    calib = np.load(work / "calib.npy")
    models = {"fp32": str(bundle / "model.onnx"), **{k: m["path"] for k, m in prep["models"].items()}}
    info = {k: {kk: v for kk, v in m.items() if kk != "path"} for k, m in prep["models"].items()}
    runs = [(f"modelopt-{m}", m, "fp32") for m in MODELOPT_METHODS]
    if not args.no_fp16:
        runs.append(("modelopt-default-fp16", "entropy", "fp16"))
    for key, method, dtype in runs:
        out = work / f"{key}.onnx"
        seconds = modelopt_int8(work / "model.onnx", out, calib, method, dtype)
        models[key] = str(out)
        info[key] = {"quantize_s": seconds, "calibration": method, "high_precision_dtype": dtype,
                     "calibration_batch": 1}
        log(f"{tag}: ModelOpt {method} ({dtype}) in {seconds:.1f} s")
    models["bundle-int8-cpu"] = str(bundle / "model.int8-cpu.onnx")
    info["bundle-int8-cpu"] = {"preset": "cpu", "note": "the bundle's own INT8 model (edgekd export)"}
    m = child(args.edgekd_python, "measure", {"bundle": str(bundle.resolve()), "models": models, "timed": TIMED,
                                              "threads": args.threads, "batches": [1, 64], "rounds": args.rounds,
                                              "per_round": args.per_round}, work)
    fp32 = m["models"]["fp32"]["accuracy"]
    for key, row in m["models"].items():
        row["change_pts"] = (row["accuracy"] - fp32) * 100
        row.update(info.get(key, {}))
        row["file"] = models[key]
    log(f"{tag}: FP32 {fp32:.4f}; " + ", ".join(f"{k} {m['models'][k]['change_pts']:+.2f}" for k in SHOWN
                                              if k in m["models"]))
    return {"bundle": str(bundle), **{k: prep[k] for k in ("run", "dataset", "variant", "role", "seed", "student",
                                                           "train_images", "calib_images", "calib_per_class")},
            "test_images": m["test_images"], "fp32_acc": fp32, "manifest_fp32_acc": m["manifest_fp32_acc"],
            "models": m["models"], "measure_versions": m["versions"], "prepare_versions": prep["versions"]}


def summary(rows: list[dict]) -> dict:
    """Mean change per model over the students, and ModelOpt against edgekd's plain trt (minmax) per student."""
    keys = [k for k in SHOWN if all(k in r["models"] for r in rows)]
    out = {"mean_change_pts": {k: sum(r["models"][k]["change_pts"] for r in rows) / len(rows) for k in keys},
           "rule_check_ok": {k: sum(bool((r["models"][k]["tensorrt_qdq_check"] or {}).get("ok")) for r in rows)
                             for k in keys}, "students": len(rows)}
    for k in ("modelopt-max", "modelopt-entropy"):
        if k in keys:
            diff = [r["models"][k]["change_pts"] - r["models"]["edgekd-minmax"]["change_pts"] for r in rows]
            out[f"{k}_minus_edgekd-minmax_pts"] = diff
            out[f"{k}_beats_edgekd-minmax"] = sum(d > 0 for d in diff)
    return out


def cell_acc(r: dict, k: str) -> str:
    m = r["models"].get(k)
    return "-" if m is None else f"{m['accuracy'] * 100:.2f} ({m['change_pts']:+.2f})"


def cell_rules(r: dict, k: str) -> str:
    m = r["models"].get(k)
    if m is None:
        return "-"
    c = m["tensorrt_qdq_check"]
    verdict = "ok" if c["ok"] else f"{len(c['problems'])} problems"
    return f"{verdict} Q{m['qdq']['quantize_linear']} f{len(c['float_layers'])}"


def cell_ms(r: dict, k: str) -> str:
    lat = r["models"].get(k, {}).get("latency")
    return "-" if not lat else f"{lat['b1_p50_ms']:.3f} / {lat['b64_p50_ms']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="student bundles (<run>/bundle, with model.onnx and eval.npz)")
    parser.add_argument("--work", default="/tmp/mo_work", help="where the quantized models are written")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="latency: alternating rounds ...")
    parser.add_argument("--per-round", type=int, default=10, help="... of this many runs per model")
    parser.add_argument("--no-fp16", action="store_true", help="skip ModelOpt with its defaults (entropy, FP16)")
    parser.add_argument("--edgekd-python", default=getattr(sys, "_base_executable", sys.executable),
                        help="the interpreter with edgekd's own onnx/onnxruntime (default: this venv's base)")
    parser.add_argument("--name", default="modelopt_trt")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if not args.bundles:
        parser.error("give at least one bundle")

    def log(line: str) -> None:
        print(line, flush=True)

    start = time.perf_counter()
    rows = [one(Path(b), args, log) for b in args.bundles]

    def label(r: dict) -> str:
        return f"{r['variant']}/{r['role']}/s{r['seed']}"

    show("INT8 on the bundle's test images: accuracy % (change vs FP32, points)",
         ["student", "FP32", "edgekd trt minmax", "edgekd trt entropy", "edgekd trt minmax inputs", "ModelOpt max",
          "ModelOpt entropy", "ModelOpt defaults (FP16)", "bundle int8-cpu"],
         [[label(r), f"{r['fp32_acc'] * 100:.2f}", *[cell_acc(r, k) for k in SHOWN]] for r in rows])
    show("TensorRT Q/DQ rule check (ok or problems), QuantizeLinear count (Q), float weighted layers (f)",
         ["student", *SHOWN], [[label(r), *[cell_rules(r, k) for k in SHOWN]] for r in rows])
    show(f"ORT CPU p50 latency, ms at batch 1 / 64 ({args.threads} threads, alternating rounds)",
         ["student", *TIMED], [[label(r), *[cell_ms(r, k) for k in TIMED]] for r in rows])
    path = save(args.name, {
        "device": "cpu", "threads": args.threads, "calib_size": args.calib_size,
        "latency": {"batches": [1, 64], "rounds": args.rounds, "per_round": args.per_round, "warmup": 20},
        "modelopt": {"versions": modelopt_versions(),
                     "call": "modelopt.onnx.quantization.quantize(onnx_path, quantize_mode='int8', "
                             "calibration_data=<N x C x H x W float32>, calibration_method=..., "
                             "calibration_eps=['cpu'], high_precision_dtype=..., output_path=...)",
                     "calibration_batch": "1 (the model's dynamic batch dimension, which ModelOpt fills with 1)"},
        "edgekd": {"call": "edgekd.export.int8.quantize(model.onnx, out, calibration, 'trt', method, "
                           "placement=placement)", "recipes": [list(r) for r in EDGEKD_RECIPES]},
        "note": "test accuracy on each bundle's eval.npz; all models scored and timed by the main environment's "
                "ONNX Runtime (CPUExecutionProvider), TensorRT-bound Q/DQ models with graph optimizations off (their "
                "Q/DQ as written: TensorRT's int32 arithmetic; accuracy_ort_kernels: ORT's x86 integer kernels, "
                "which saturate); the same calibration images for every tool. environment.packages "
                "is the ModelOpt venv's importlib.metadata view (its onnxruntime entry is the main environment's "
                "distribution, shadowed there by onnxruntime-gpu): see modelopt.versions and rows[].measure_versions",
        "summary": summary(rows), "wall_s": time.perf_counter() - start, "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
