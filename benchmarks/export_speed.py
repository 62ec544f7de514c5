"""Export alone: every bundle of a finished study made again, one after another in one process, as a study's bundle
job makes it (at its threads: a bundle job is given one), timed per phase, and each model checked against the
study's own by sha256 (the same run and options must make the same files; one made under another key, by another
INT8 rules or normalization revision, may differ, and is reported as such).

    python benchmarks/export_speed.py --study DIR [--threads 1] [--name export_speed-quickstart]
    python benchmarks/export_speed.py            # trains the quickstart first (edgekd study, ~3-4 min on 2 cores)
    PYTHONPATH=OLD_CHECKOUT python benchmarks/export_speed.py --study DIR --keep OLD  # an older edgekd's bundles,
    python benchmarks/export_speed.py --study OLD                                    # then this one's against them

Why beside study_speed.py: a study runs its bundles beside its trainings, so their wall time there is the
export's work plus its share of two busy cores; here the work alone, wall and CPU seconds, with the first bundle
(imports, first-call warm-ups: what a fresh worker pays once) apart from the rest. The study is not changed: each
run is copied without its bundle into a scratch directory and exported there with the study's own deploy options
(its plan.json's profile); --keep writes them into a copy of the study instead, to compare another version against.

Prints per bundle and per phase; writes benchmarks/results/NAME-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402
from study_speed import run_study  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", help="a finished study's directory (the one holding plan.json)")
    parser.add_argument("--out", help="without --study: where the quickstart is trained (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch's threads, as the study gives a bundle job "
                                                               "(the INT8 candidates are scored on as many)")
    parser.add_argument("--keep", help="export into a copy of the study here (its bundles: this version's), kept")
    parser.add_argument("--name", default="export_speed-quickstart")
    args = parser.parse_args()

    import torch

    from edgekd.config import saved_profile
    from edgekd.export.bundle import export_key, export_run, find_student_runs
    from edgekd.export.stage import export_options
    from edgekd.runio import BUNDLE, MANIFEST

    torch.set_num_threads(args.threads)
    if args.study:
        study = Path(args.study)
    else:  # the quickstart, trained as study_speed.py trains it
        out = Path(args.out or tempfile.mkdtemp(prefix="edgekd-"))
        run_study("profiles/quickstart.toml", out, "auto", [])
        study = out / "quickstart"
    options = export_options(saved_profile(json.loads((study / "plan.json").read_text())["profile"]))
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="edgekd-export-") as scratch:
        into = Path(args.keep or scratch)
        into.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(study / "plan.json", into / "plan.json")
        for run in find_student_runs(study):
            made = json.loads((run / BUNDLE / MANIFEST).read_text())
            comparable = made.get("key") == export_key(run, options)  # made by the same rules, from the same data
            copy = into / run.relative_to(study)
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns(BUNDLE), dirs_exist_ok=True)
            wall, cpu = time.perf_counter(), time.process_time()
            bundle = export_run(copy, options, log=lambda line: None)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            manifest = json.loads((bundle / MANIFEST).read_text())
            same = all(made["models"].get(k, {}).get("sha256") == m["sha256"] for k, m in manifest["models"].items())
            records.append({"run": str(run.relative_to(study)), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                            "export_s": manifest["export_s"], "phases": manifest["export_phases_s"],
                            "same_files": same, "same_key": comparable, "models": sorted(manifest["models"])})
            rows.append([records[-1]["run"], wall, cpu, ("yes" if same else "NO" if comparable else "no") +
                         ("" if comparable else " (made under another key)")])
    later = records[1:] or records
    phases: dict[str, float] = {}
    for r in later:
        for phase, s in r["phases"].items():
            phases[phase] = phases.get(phase, 0.0) + s / len(later)
    summary = {"threads": args.threads, "study": str(study), "bundles": len(records),
               "first_bundle_wall_s": records[0]["wall_s"],
               "wall_s_per_bundle": round(statistics.fmean(r["wall_s"] for r in later), 3),
               "cpu_s_per_bundle": round(statistics.fmean(r["cpu_s"] for r in later), 3),
               "phases_s_per_bundle": {p: round(s, 3) for p, s in sorted(phases.items(), key=lambda kv: -kv[1])},
               "same_files": sum(r["same_files"] for r in records),
               "same_key": sum(r["same_key"] for r in records),
               "differ_under_the_same_key": sum(r["same_key"] and not r["same_files"] for r in records),
               "per_bundle": records}
    show(f"Export alone at {args.threads} thread(s): {len(records)} bundles of {study}",
         ["run", "wall s", "CPU s", "same files as the study's"], rows)
    show("Per bundle after the first (seconds)", ["", "s"],
         [["wall", summary["wall_s_per_bundle"]], ["CPU", summary["cpu_s_per_bundle"]],
          ["first bundle (imports, warm-up)", summary["first_bundle_wall_s"]],
          *[[f"  {p}", s] for p, s in summary["phases_s_per_bundle"].items()]])
    print(f"wrote {save(args.name, summary)}")
    return 1 if summary["differ_under_the_same_key"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
