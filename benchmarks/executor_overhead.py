"""Wall time of a whole `edgekd study` on the Ray executor (a local Ray started for the run) against the local one,
on this machine: the same profile, a fresh --out each time, executors alternated, each run a fresh process (so
Ray's start-up, its workers' imports and the storage check are counted). Also checks that both made the same runs
with test accuracies within 1 point, times a re-run of a finished study, and records the machine's load.

    python benchmarks/executor_overhead.py [--profile profiles/quickstart.toml] [--rounds 2] [--set key=value ...]
                                           [--wait-idle 600]

--wait-idle S waits up to S seconds before each run for the 1-minute load average to fall below 1 (other work on
the machine slows both executors, not by the same amount); the load at each run's start and end is recorded.
Precision and memory format are measured by the first run (timing candidates, so the machine's load can sway the
choice) and handed to every later run, as a re-run of one study would reuse them: both executors train with the
same numerics. --keep DIR keeps the study directories there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

from edgekd.config import read_profile_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def wait_idle(limit_s: float) -> float:
    """Wait (up to limit_s) for the 1-minute load average to fall below 1; returns the load at the end."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def study(profile: str, out: Path, executor: str, sets: list[str], execution: dict | None = None) -> dict:
    if execution:  # the first run's precision/layout choices, where a study keeps them
        name = read_profile_data(ROOT / profile, sets)["study"]["name"]
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "plan.json").write_text(json.dumps({"schema_version": 1, "jobs": [], "execution": execution}))
    args = [sys.executable, "-m", "edgekd.cli", "study", profile, "--out", str(out), "--executor", executor]
    for s in sets:
        args += ["--set", s]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode not in (0, 1):  # 1: some jobs failed (recorded below), the others finished
        raise SystemExit(f"{executor} study failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    name = next(p for p in out.iterdir() if p.is_dir())
    summary = json.loads((name / "summary.json").read_text())
    accs = {r["run_dir"]: r.get("test_acc") for r in summary if r["role"] != "teacher_cache"}
    plan = json.loads((name / "plan.json").read_text())
    return {"execution": plan["execution"], "failed": [j["id"] for j in plan["jobs"] if j.get("state") == "failed"],
            "executor": executor, "wall_s": round(wall, 1), "load_start": round(load, 2),
            "load_end": round(os.getloadavg()[0], 2), "runs": len(summary), "test_acc": accs,
            "report": (name / "report" / "report.html").is_file(), "root": name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="profiles/quickstart.toml")
    parser.add_argument("--rounds", type=int, default=2, help="each round runs both executors (order alternates)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S")
    parser.add_argument("--name", default="executor_overhead")
    parser.add_argument("--keep", metavar="DIR", help="keep the study directories under DIR")
    args = parser.parse_args()

    runs, rerun, execution = [], None, None
    for r in range(args.rounds):
        for executor in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
            load = wait_idle(args.wait_idle) if args.wait_idle else os.getloadavg()[0]
            out = Path(tempfile.mkdtemp(prefix=f"edgekd-{executor}-r{r}-", dir=args.keep))
            try:
                run = study(args.profile, out, executor, args.set, execution)
                execution = execution or run["execution"]
                if rerun is None and executor == "local":  # a finished study, run again
                    rerun = study(args.profile, out, "local", args.set)["wall_s"]
            finally:
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            run["root"] = str(run["root"])
            run["load_waited"] = round(load, 2)
            runs.append(run)
            print(f"round {r + 1} {executor}: {run['wall_s']} s (load {run['load_start']} -> {run['load_end']}), "
                  f"{run['runs']} runs, failed: {run['failed'] or 'none'}", flush=True)

    local = [r for r in runs if r["executor"] == "local"]
    ray = [r for r in runs if r["executor"] == "ray"]
    same_runs = all(set(r["test_acc"]) == set(local[0]["test_acc"]) for r in runs)
    diff = max(abs(a["test_acc"][k] - b["test_acc"][k]) for a in local for b in ray for k in a["test_acc"]
               if a["test_acc"][k] is not None and b["test_acc"].get(k) is not None)
    ratio = statistics.median(r["wall_s"] for r in ray) / statistics.median(r["wall_s"] for r in local)
    show(f"edgekd study {args.profile} {' '.join(args.set)}: Ray (local, {os.cpu_count()} CPUs) vs local executor",
         ["executor", "wall s (median)", "runs", "load at start (each run)", "report"],
         [[name, statistics.median(r["wall_s"] for r in rs), rs[0]["runs"],
           ", ".join(str(r["load_start"]) for r in rs), all(r["report"] for r in rs)]
          for name, rs in (("local", local), ("ray", ray))])
    failed = sorted({j for r in runs for j in r["failed"]})
    print(f"failed jobs: {failed or 'none'}")
    print(f"Ray / local wall time: {ratio:.2f}x; same runs: {same_runs}; largest test accuracy difference between "
          f"a local and a Ray run of the same job: {diff * 100:.2f} points; re-run of a finished study: {rerun} s")
    path = save(args.name, {"profile": args.profile, "sets": args.set, "rounds": args.rounds, "runs": runs,
                            "execution": execution,
                            "ray_over_local": round(ratio, 3), "same_runs": same_runs,
                            "max_test_acc_diff_points": round(diff * 100, 2), "rerun_s": rerun,
                            "cpus": os.cpu_count()})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
