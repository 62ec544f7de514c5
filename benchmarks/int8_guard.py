"""The INT8 guard on a whole study: run a profile (the README quickstart by default) for one or more seed lists and
list every INT8 model it made: the method the guard deployed it with, at each step the share of FP32's answers it
changed on validation (the guard's rule) and its validation accuracy change, whether it was deployed, and its change
against FP32 on test (the bundle's eval.npz), which played no part in the choice.

    python benchmarks/int8_guard.py --out /tmp/g                              # seeds [0, 1, 2]
    python benchmarks/int8_guard.py --out /tmp/g --seeds 0,1,2 --seeds 3,4,5 --seeds 6,7,8

    # Fashion-MNIST, both student families, both presets (Debian's dataset-fashion-mnist):
    EDGEKD_DATA=/usr/share/datasets/fashion-mnist python benchmarks/int8_guard.py \
        --profile profiles/fashion-mnist-study.toml --out /tmp/f --seeds 0,1 \
        --set 'variants={base={kind="base"}}' --name int8_guard-fashion-mnist

One --out for every seed list: the teacher and its caches are trained once and reused. Writes
benchmarks/results/<name>-cpu.json.

    # bundles already made (e.g. by export_speed.py --keep, another rules revision on the same students): read only
    python benchmarks/int8_guard.py --study DIR --seeds 0,1,2 --name int8_guard-quickstart-rules13
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, show  # noqa: E402

from edgekd.config import load_profile  # noqa: E402
from edgekd.runio import BUNDLE, MANIFEST, METRICS  # noqa: E402
from edgekd.workflows import study  # noqa: E402


def int8_models(root: Path, seeds: list[int]) -> list[dict]:
    """Every INT8 model of the study's bundles for these seeds, as the manifests record them."""
    rows = []
    for manifest_path in sorted(root.glob(f"*/*/*/seed*/{BUNDLE}/{MANIFEST}")):
        run = manifest_path.parent.parent
        metrics = json.loads((run / METRICS).read_text())
        if metrics["seed"] not in seeds:
            continue
        manifest = json.loads(manifest_path.read_text())
        for key, m in manifest["models"].items():
            if m.get("precision") != "int8" or "guard" not in m:
                continue
            rows.append({"run": str(run.relative_to(root)), "seed": metrics["seed"], "model": key,
                         "int8_rules": manifest.get("key", {}).get("config", {}).get("deploy", {}).get("int8_rules"),
                         "bundle_export_s": manifest.get("export_s"),
                         "search_candidates": len(m.get("calibration", {}).get("candidates", []))
                         + len(m.get("mixed_precision", {}).get("ranked_units", []))
                         + len(m.get("mixed_precision", {}).get("steps", []))
                         # a full sensitivity analysis: leave-one-out per group (what ranked groups up to rules 9)
                         + len(manifest.get("int8_sensitivity", {}).get(m.get("preset"), {}).get("groups", [])),
                         "method": m["method"], "deployed": m["deployed"], "reason": m.get("not_deployed"),
                         "steps": m["guard"]["steps"], "test_change_pts": round(m["accuracy_change_vs_fp32"] * 100, 2),
                         "float_groups": len(m.get("mixed_precision", {}).get("float_closure", [])),
                         "groups": m.get("mixed_precision", {}).get("groups"),
                         "float_weight_pct": round(100 * m.get("mixed_precision", {}).get("float_weight_share", 0), 1)})
    return rows


def report(runs: list[dict]) -> dict:
    """Print every INT8 model of the seed lists run so far; return the summary."""
    every = [r for run in runs for r in run["models"]]
    show("INT8 models: the guard's choice on validation, the change on test", ["run", "model",
         "steps (validation: answers changed % (upper bound), accuracy change pts (lower bound))", "groups float",
         "weights float %", "deployed", "test change (pts)"],
         [[r["run"], r["model"], " -> ".join(f"{s['method']} {s['val_flips_pts']:.1f}% (<{s['val_flips_bound_pts']:.1f}) "
                                             f"{-s['val_drop_pts']:+.2f}"
                                             + (f" (>{-s['val_drop_bound_pts']:+.2f})" if "val_drop_bound_pts" in s
                                                else "")
                                             for s in r["steps"] if "val_flips_pts" in s),
           f"{r['float_groups']} of {r['groups']}" if r["groups"] else 0, r["float_weight_pct"],
           "yes" if r["deployed"] else "NO", r["test_change_pts"]] for r in every])
    deployed = [r for r in every if r["deployed"]]
    return {"models": len(every), "deployed": len(deployed), "not_deployed": len(every) - len(deployed),
            "escalated": sum(len([s for s in r["steps"] if "val_flips_pts" in s]) > 1 for r in every),
            "deployed_within_1pt_on_test": sum(abs(r["test_change_pts"]) <= 1.0 for r in deployed),
            "worst_deployed_test_change_pts": min((r["test_change_pts"] for r in deployed), default=None),
            "not_deployed_test_change_pts": [r["test_change_pts"] for r in every if not r["deployed"]],
            "deployed_weights_float_pct": [r["float_weight_pct"] for r in deployed],
            "deployed_weights_float_median_pct": statistics.median([r["float_weight_pct"] for r in deployed])
            if deployed else None,
            "int8_rules": sorted({r["int8_rules"] for r in every if r.get("int8_rules") is not None}),
            # the whole bundle's export (ONNX, parity, INT8 with its guard), one bundle per run: speed of the search
            "bundle_export_s_mean": round(statistics.fmean(r["bundle_export_s"] for r in every), 2) if every else None,
            "search_candidates_mean": round(statistics.fmean(r["search_candidates"] for r in every), 1)
            if every else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="profiles/quickstart.toml")
    parser.add_argument("--out", help="where the study runs (trained once, reused by every seed list)")
    parser.add_argument("--study", help="instead of running one: a study directory whose bundles are read as they are")
    parser.add_argument("--seeds", action="append", help="comma-separated seeds, repeatable (default 0,1,2)")
    parser.add_argument("--name", default="int8_guard-quickstart")
    parser.add_argument("--set", action="append", default=[], help="profile override, as edgekd's --set")
    args = parser.parse_args()
    lists = [[int(s) for s in group.split(",")] for group in (args.seeds or ["0,1,2"])]
    runs = []
    if not (args.out or args.study):
        parser.error("give --out (run the study there) or --study (read a finished one)")
    for seeds in lists:
        start = time.perf_counter()
        if args.study:
            rows = int8_models(Path(args.study).absolute(), seeds)
        else:
            profile = load_profile(args.profile, [*args.set, f"study.seeds={seeds}"])
            study(profile, Path(args.out))
            rows = int8_models(Path(args.out).absolute() / profile.study.name, seeds)
        runs.append({"seeds": seeds, "wall_s": round(time.perf_counter() - start, 1), "models": rows})
        # Saved after every seed list: one takes ~45 min on 2 cores, and a run cut off keeps what it measured.
        summary = report(runs)
        print(json.dumps(summary))
        print(save(args.name, {"profile": args.profile, "study": args.study, "overrides": args.set, "seed_lists": lists,
                               "seed_lists_done": len(runs), "summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
