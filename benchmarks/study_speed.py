"""Where a study's wall time goes: one fresh `edgekd study` process, then its records read back.

    python benchmarks/study_speed.py [--profile profiles/quickstart.toml] [--out DIR] [--set key=value ...]
                                     [--executor auto|local|processes|ray --jobs N] [--machine-cache]
                                     [--name study_speed-quickstart]

Prints and saves (benchmarks/results/NAME-cpu.json):
- the wall time of the process (imports, planning, the execution choice, every job, the report);
- per job kind (train, cache, bundle, bench, explain, ...): jobs run, their summed wall time (plan.json);
- training proper: the summed `train_s` of the runs (the training loop, no set-up), and the overhead ratio
  wall / summed training time (issue 24's goal: at most 1.3 on CPU, 2 on a GPU);
- what is outside every job (start-up, planning, the execution choice, waiting, the report): wall - summed jobs,
  meaningful for executors that run one job at a time (local);
- per bundle: export_s and its phases (manifest export_phases_s), summed and per bundle;
- the plan's execution choices (precision, layout, trainings at once and their threads, torch.compile) and their
  timings.

A fresh --out each time unless --out names one (then finished jobs are reused, and only what ran is counted). The
execution choices are measured afresh, as on a new machine (their time is in the wall time), unless
--machine-cache reuses this machine's earlier ones (~/.cache/edgekd/execution.json), as a user's next study does.
With several trainings at once (the default executor, where measured faster) the summed training time counts each
training's own time beside the others: the overhead ratio can fall below 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

from edgekd.config import read_profile_data  # noqa: E402
from edgekd.distill.execution import CACHE_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_study(profile: str, out: Path, executor: str, sets: list[str], jobs: int = 0,
              machine_cache: bool = False) -> float:
    args = [sys.executable, "-m", "edgekd.cli", "study", profile, "--out", str(out), "--executor", executor]
    if jobs:
        args += ["--jobs", str(jobs)]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ)
    if not machine_cache:  # measured as on a fresh machine, and nothing written to this one's cache
        env[CACHE_ENV] = str(out / "execution-cache.json")
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the study failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall


def split(root: Path, wall: float) -> dict:
    """The study's recorded times: per job kind, training proper, per bundle and export phase."""
    plan = json.loads((root / "plan.json").read_text())
    kinds: dict[str, list[float]] = defaultdict(list)
    train_s, bundles, test_acc = [], [], {}
    for job in plan["jobs"]:
        if job.get("wall_s") is None:  # reused from an earlier run of this --out: not part of this wall time
            continue
        kinds[job["kind"]].append(job["wall_s"])
        record = root / job["record"] if job.get("record") else None
        if job["kind"] == "train" and record and record.is_file():
            # at most the job's own time: a training finished (or resumed) in an earlier run of --out records its
            # whole train_s, though this job only reloaded it
            metrics = json.loads(record.read_text())
            train_s.append(min(metrics.get("train_s") or 0.0, job["wall_s"]))
            test_acc[job["id"]] = metrics.get("test_acc")  # two fresh studies of one profile must agree on each
        if job["kind"] == "bundle" and record and record.is_file():
            manifest = json.loads(record.read_text())
            bundles.append({"bundle": job["id"], "export_s": manifest.get("export_s"),
                            "phases": manifest.get("export_phases_s", {})})
    jobs_s = sum(sum(v) for v in kinds.values())
    # the device the trainings ran on, from the plan's choices: the result file is named by it (-cpu, -cuda)
    devices = {(job.get("execution") or {}).get("device", "cpu") for job in plan["jobs"] if job["kind"] == "train"}
    phases: dict[str, float] = defaultdict(float)
    for b in bundles:
        for phase, s in b["phases"].items():
            phases[phase] += s
        phases["other (manifest, files, FP16 parity, TensorRT checks)"] += (b["export_s"] or 0) - sum(b["phases"].values())
    export_s = sum(b["export_s"] or 0 for b in bundles)
    return {"device": "cuda" if any(d.startswith("cuda") for d in devices) else "cpu",
            "wall_s": round(wall, 1), "jobs_s": round(jobs_s, 1), "outside_jobs_s": round(wall - jobs_s, 1),
            "kinds": {k: {"jobs": len(v), "wall_s": round(sum(v), 1)} for k, v in sorted(kinds.items())},
            "train_s": round(sum(train_s), 1), "trainings": len(train_s),
            "overhead_ratio": round(wall / sum(train_s), 2) if sum(train_s) else None,
            "export_s": round(export_s, 1), "bundles": len(bundles),
            "export_s_per_bundle": round(statistics.fmean(b["export_s"] or 0 for b in bundles), 2) if bundles else None,
            "export_share_of_jobs": round(export_s / jobs_s, 3) if jobs_s else None,
            "export_phases_s": {p: round(s, 2) for p, s in sorted(phases.items(), key=lambda kv: -kv[1])},
            "per_bundle": bundles, "execution": plan.get("execution"), "test_acc": test_acc}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="profiles/quickstart.toml")
    parser.add_argument("--out", help="the study's --out (default: a fresh temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--executor", default="auto", help="auto (edgekd's default), local, processes, ray")
    parser.add_argument("--jobs", type=int, default=0, help="with --executor processes: this many processes "
                        "(default: as many as the plan's trainings at once)")
    parser.add_argument("--machine-cache", action="store_true",
                        help="reuse this machine's execution choices instead of measuring them afresh")
    parser.add_argument("--name", default="study_speed-quickstart")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="edgekd-speed-"))
    name = read_profile_data(ROOT / args.profile, args.set)["study"]["name"]
    wall = run_study(args.profile, out, args.executor, args.set, args.jobs, args.machine_cache)
    result = split(out / name, wall)
    show(f"edgekd study {args.profile} ({args.executor}{f', {args.jobs} jobs' if args.jobs else ''}): "
         f"{result['wall_s']} s wall, "
         f"{result['overhead_ratio']}x its summed training time",
         ["where", "jobs", "seconds", "share of wall"],
         [["training proper (train_s)", result["trainings"], result["train_s"], f"{result['train_s'] / wall:.0%}"],
          *[[f"job: {k}", v["jobs"], v["wall_s"], f"{v['wall_s'] / wall:.0%}"] for k, v in result["kinds"].items()],
          ["outside jobs (start-up, planning, execution choice, report)", "-", result["outside_jobs_s"],
           f"{result['outside_jobs_s'] / wall:.0%}"]])
    for slot, entry in (result["execution"] or {}).items():  # what the study chose, and what it timed
        kind = slot.split("|")[0] if slot.split("|")[0] in ("sharing", "compile") else ""
        what = {"sharing": ", trainings at once", "compile": ", torch.compile"}.get(kind, "")
        if kind == "compile":
            print(f"{slot.split('|')[1]}{what} ({slot.split('|')[-1]}): {entry.get('decided')} ({entry.get('source')})")
            continue
        print(f"{slot.split('|')[int(bool(kind))]}{what}: {entry.get('choice')} "
              f"from {entry.get('images_per_s')} img/s ({entry.get('source')})")
    if result["bundles"]:
        n = result["bundles"]
        show(f"export: {n} bundles, {result['export_s_per_bundle']} s each, "
             f"{result['export_share_of_jobs']:.0%} of the job time", ["phase", "seconds (all bundles)", "per bundle"],
             [[p, s, s / n] for p, s in result["export_phases_s"].items()])
    print(save(args.name, {"profile": args.profile, "sets": args.set, "executor": args.executor, "jobs": args.jobs,
                           "machine_cache": args.machine_cache, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
