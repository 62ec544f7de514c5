"""ONNX Runtime vs OpenVINO vs ExecuTorch (XNNPACK), FP32 and INT8, on a study's students, on this CPU, in one run.

Runs the study of `--profile` (the README quickstart by default; its base variant only unless --all-variants) with
the ExecuTorch programs added to every bundle (`deploy.targets = ["onnx", "int8", "pte"]`) and each bundle benched
on the three backends (`[devices.here] backends = ["ort", "openvino", "executorch"]`), at `--threads` intra-op
threads for all three (1 by default: the same compute on each; on 2 shared cores more threads mostly add noise).
The study's own jobs do the work, so its report has the accuracy-latency panels of all three; this script then
reads the bench records and prints one table per (backend, model):

- parity: top-1 agreement of the FP32 models with the PyTorch student on the bundle's test images (every
  student; the minimum is shown), computed here with each backend's runner;
- accuracy on those images, mean over the students, and its change against PyTorch;
- how many of the students' models of that kind the export's guard deployed (the figures are those of the deployed
  ones: a refused INT8 model is a failed export, not a result);
- p50 latency at batch 1 and 64 (medians over the students), images/s at 64, cold start (open + first inference),
  file size.

NNCF (`--nncf`, needs `pip install nncf`): OpenVINO's own post-training INT8 (`nncf.quantize` on the FP32 ONNX
model read by OpenVINO, calibrated on the same training images as the bundle's INT8 models: the export's draw) is
measured against the bundle's ONNX Q/DQ model on OpenVINO, both timed here side by side in alternating rounds, both
scored on the test images: whether an NNCF target would be worth adding is this table's question.

    python benchmarks/edge_runtimes.py --out /tmp/edge --nncf     # needs edgekd[openvino] and edgekd[executorch]

Writes benchmarks/results/<--name>-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("ort", "openvino", "executorch")


def agreement_with_pytorch(bundle: Path, backend: str, model: str, file: str, student: dict) -> float:
    """Top-1 agreement of one model, run by `backend`, with the PyTorch student on the bundle's test images."""
    from edgekd.bench.torch_runner import TorchRunner
    from edgekd.runtime.evalset import load_eval, predict
    from edgekd.runtime.manifest import read_manifest
    from edgekd.runtime.runners import RUNNERS

    manifest = read_manifest(bundle)
    images, _ = load_eval(bundle)
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    reference = predict(TorchRunner(bundle / "model.safetensors", "cpu", 1, student), images, mean, std)
    runner = RUNNERS.get(backend)(bundle / file, "cpu", 1)
    return float((predict(runner, images, mean, std).argmax(1) == reference.argmax(1)).mean())


def nncf_model(bundle: Path, out: Path) -> Path:
    """The bundle's model.onnx quantized by NNCF for OpenVINO, from the export's own calibration draw."""
    import nncf
    import openvino as ov

    from edgekd.config import DatasetConfig
    from edgekd.data.splits import load_splits
    from edgekd.export.bundle import calibration_images
    from edgekd.runio import RUN_PROFILE, read_json

    run = bundle.parent
    manifest, profile = read_json(bundle / "manifest.json"), read_json(run / RUN_PROFILE)
    data = load_splits(manifest["dataset"], DatasetConfig(**profile["profile"]["datasets"][manifest["dataset"]]))
    images = calibration_images(data, profile["profile"]["deploy"]["calib_size"])  # the export's own draw
    model = ov.Core().read_model(str(bundle / "model.onnx"))
    quantized = nncf.quantize(model, nncf.Dataset([images[i : i + 1] for i in range(len(images))]),
                              subset_size=len(images))
    path = out / f"{run.parent.parent.name}-{run.parent.name}-{run.name}.nncf-int8.xml"
    ov.save_model(quantized, str(path))
    return path


def nncf_against_qdq(bundles: list[Path], out: Path, threads: int, iters: int) -> list[dict]:
    """Per bundle: NNCF's INT8 and the bundle's Q/DQ INT8 on OpenVINO, accuracy and p50 at batch 1 and 64, timed
    in alternating rounds (a busy moment slows both alike)."""
    from edgekd.runtime.evalset import accuracy, load_eval, normalize, predict
    from edgekd.runtime.manifest import read_manifest
    from edgekd.runtime.runners import OpenVinoRunner

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for bundle in bundles:
        manifest = read_manifest(bundle)
        images, labels = load_eval(bundle)
        mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
        models = {"onnx-int8-cpu (Q/DQ)": bundle / manifest["models"]["onnx-int8-cpu"]["file"],
                  "nncf-int8": nncf_model(bundle, out), "onnx-fp32": bundle / "model.onnx"}
        runners = {k: OpenVinoRunner(p, "cpu", threads) for k, p in models.items()}
        fp32 = predict(runners["onnx-fp32"], images, mean, std).argmax(1)
        times: dict[str, dict[int, list[float]]] = {k: {1: [], 64: []} for k in runners}
        for _ in range(2):
            for batch in (1, 64):
                x = normalize(images[[i % len(images) for i in range(batch)]], mean, std)
                for k, runner in runners.items():
                    times[k][batch] += runner.time(x, 10, iters // 2, None).seconds
        for k, runner in runners.items():
            logits = predict(runner, images, mean, std)
            rows.append({"bundle": str(bundle), "model": k, "accuracy": accuracy(logits, labels),
                         "agreement_with_fp32": float((logits.argmax(1) == fp32).mean()),
                         "deployed": manifest["models"]["onnx-int8-cpu"].get("deployed", True) if "Q/DQ" in k else None,
                         "p50_b1_ms": 1e3 * statistics.median(times[k][1]),
                         "p50_b64_ms": 1e3 * statistics.median(times[k][64]),
                         # OpenVINO's IR is two files: the graph (.xml) and its weights (.bin)
                         "file_mib": sum(p.stat().st_size for p in (models[k], models[k].with_suffix(".bin"))
                                         if p.is_file() and (p == models[k] or models[k].suffix == ".xml")) / 2**20})
    return rows


def main() -> int:
    from edgekd.config import load_profile
    from edgekd.records import select_current
    from edgekd.runtime.manifest import read_manifest
    from edgekd.targets import targets_for
    from edgekd.workflows import run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default=str(REPO / "profiles" / "quickstart.toml"))
    p.add_argument("--out", required=True, help="the runs directory (a finished study there is reused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--all-variants", action="store_true", help="every variant of the profile, not only base")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--name", default="edge_runtimes")
    p.add_argument("--nncf", action="store_true", help="also NNCF's INT8 against the Q/DQ model on OpenVINO")
    args = p.parse_args()

    overrides = ['deploy.targets=["onnx", "int8", "pte"]', f"deploy.threads={args.threads}",
                 f"deploy.iters={args.iters}", "deploy.batch_sizes=[1, 64]", "explain.images=0",
                 f'devices={{here={{backends=[{", ".join(repr(b).replace(chr(39), chr(34)) for b in BACKENDS)}]}}}}']
    if not args.all_variants:
        overrides.append('variants={base={kind="base"}}')
    profile = load_profile(args.profile, overrides + args.set)
    start = time.perf_counter()
    run(profile, Path(args.out), deploy=True)
    wall = time.perf_counter() - start
    root = Path(args.out) / profile.study.name
    benches = select_current(root).benches

    cells: dict[tuple[str, str], list[dict]] = {}
    for b in benches:
        manifest = read_manifest(b.path.parent)
        for r in b.results:
            entry = manifest["models"].get(r["model"], {})
            agree = (agreement_with_pytorch(b.path.parent, b.backend, r["model"], r["file"], manifest["student"])
                     if r["precision"] == "fp32" and r["model"] != "torch-fp32" else None)
            cells.setdefault((b.backend, r["model"]), []).append({
                "run": str(b.path.parent.parent.relative_to(root)), "accuracy": r["accuracy"],
                "pytorch_accuracy": manifest["pytorch_accuracy"], "deployed": entry.get("deployed", True),
                "agreement_with_pytorch": agree, "p50_b1_ms": r["latency"]["1"]["p50_ms"],
                "p90_b1_ms": r["latency"]["1"]["p90_ms"], "p50_b64_ms": r["latency"]["64"]["p50_ms"],
                "ips_b64": r["latency"]["64"]["throughput_ips"], "load_ms": r["cold"]["load_ms"],
                "first_inference_ms": r["cold"]["first_inference_ms"], "file_mib": r["file_bytes"] / 2**20,
                "runtime_settings": r.get("runtime_settings"), "computes": r.get("computes")})
        for model in b.not_deployed:  # the guard refused it: counted, not measured; what the export saw, kept
            if any(t.key == model for t in targets_for(b.backend)):
                entry = manifest["models"][model]
                step = entry["guard"]["steps"][-1]
                cells.setdefault((b.backend, model), []).append({
                    "run": str(b.path.parent.parent.relative_to(root)), "deployed": False,
                    "reason": entry.get("not_deployed"), "test_change_vs_fp32_pts": 100 * entry["accuracy_change_vs_fp32"],
                    "val_flips_pts": step["val_flips_pts"], "val_flips_bound_pts": step["val_flips_bound_pts"]})
    median = statistics.median
    rows, summary = [], []
    for (backend, model), every in sorted(cells.items(), key=lambda kv: (kv[0][1], BACKENDS.index(kv[0][0]))):
        rs = [r for r in every if r["deployed"]]
        if not rs:
            changes = [r["test_change_vs_fp32_pts"] for r in every]
            rows.append([backend, model, f"0/{len(every)}", "-", f"(refused: {min(changes):+.2f} to {max(changes):+.2f}"
                         " pts on test)", *["-"] * 7])
            summary.append({"backend": backend, "model": model, "students": len(every), "deployed": 0,
                            "refused_test_change_pts": [min(changes), max(changes)],
                            "refused_val_flips_pts": [min(r["val_flips_pts"] for r in every),
                                                      max(r["val_flips_pts"] for r in every)]})
            continue
        agree = [r["agreement_with_pytorch"] for r in rs if r["agreement_with_pytorch"] is not None]
        row = {"backend": backend, "model": model, "students": len(every), "deployed": len(rs),
               "min_agreement_with_pytorch": min(agree) if agree else None,
               "accuracy_mean": statistics.fmean(r["accuracy"] for r in rs),
               "change_vs_pytorch_pts_mean": 100 * statistics.fmean(r["accuracy"] - r["pytorch_accuracy"] for r in rs),
               **{k: median(r[k] for r in rs) for k in ("p50_b1_ms", "p90_b1_ms", "p50_b64_ms", "ips_b64", "load_ms",
                                                         "first_inference_ms", "file_mib")}}
        summary.append(row)
        rows.append([backend, model, f"{row['deployed']}/{row['students']}",
                     f"{100 * row['min_agreement_with_pytorch']:.2f}%" if agree else "-",
                     100 * row["accuracy_mean"], f"{row['change_vs_pytorch_pts_mean']:+.2f}", row["p50_b1_ms"],
                     row["p90_b1_ms"], row["p50_b64_ms"], f"{row['ips_b64']:,.0f}", row["load_ms"], row["file_mib"]])
    cpu = benches[0].environment.get("cpu", "?") if benches else "?"
    show(f"{profile.study.name}: ONNX Runtime vs OpenVINO vs ExecuTorch on {cpu}, {args.threads} thread(s), medians "
         "over the students (one run)",
         ["backend", "model", "deployed", "FP32 agreement w/ PyTorch (min)", "accuracy %", "vs PyTorch pts",
          "p50 b1 ms", "p90 b1 ms", "p50 b64 ms", "images/s b64", "load ms", "MiB"], rows)
    nncf_rows = []
    if args.nncf:
        bundles = sorted({b.path.parent for b in benches if b.backend == "openvino"})
        nncf_rows = nncf_against_qdq(bundles, Path(args.out) / "nncf", args.threads, args.iters)
        table = []
        for model in dict.fromkeys(r["model"] for r in nncf_rows):
            rs = [r for r in nncf_rows if r["model"] == model]
            table.append([model, len(rs), 100 * statistics.fmean(r["accuracy"] for r in rs),
                          f"{100 * min(r['agreement_with_fp32'] for r in rs):.2f}%",
                          median(r["p50_b1_ms"] for r in rs), median(r["p50_b64_ms"] for r in rs),
                          median(r["file_mib"] for r in rs)])
        show(f"OpenVINO INT8: NNCF against the bundle's Q/DQ model, {args.threads} thread(s), timed side by side",
             ["model", "students", "accuracy % (mean)", "agreement w/ FP32 (min)", "p50 b1 ms", "p50 b64 ms", "MiB"],
             table)
    path = save(args.name, {"device": "cpu", "profile": str(args.profile), "overrides": overrides + args.set,
                            "threads": args.threads, "iters": args.iters, "study_wall_s": round(wall, 1),
                            "study": str(root), "report": str(root / "report" / "report.md"),
                            "summary": summary, "nncf": nncf_rows, "per_student": {f"{b}/{m}": rs for (b, m), rs in cells.items()}})
    print(f"written {path}; report: {root / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
