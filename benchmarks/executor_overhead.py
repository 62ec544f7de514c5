"""Wall time of a whole `edgekd study` on the Ray executor (a local Ray started for the run) against the default
one (`auto`: the plan's trainings at once side by side, in processes) and the local one (one job at a time), on
this machine: the same profile, a fresh --out each time, executors alternated, each run a fresh process (so Ray's
start-up, its workers' imports and the storage check are counted). Also checks that all made the same runs with
the same test accuracies, times a re-run of a finished study, and records the machine's load.

    python benchmarks/executor_overhead.py [--profile profiles/quickstart.toml] [--rounds 2] [--set key=value ...]
                                           [--wait-idle 600] [--executors auto ray local ray:1]

The first executor named is the baseline. `ray` is `--executor ray` as it comes (each training asks Ray for its
threads, the plan's choice); `ray:N` adds `--cpus-per-job N` (what each training asks Ray for; it trains with the
plan's threads either way).

--wait-idle S waits up to S seconds before each run for the 1-minute load average to fall below 1 (other work on
the machine slows both executors, not by the same amount); the load at each run's start and end is recorded.
Precision, memory format and trainings at once are measured by the first run (timing candidates, so the
machine's load can sway the choice) and handed to every later run, as a re-run of one study would reuse them:
every executor trains with the same numerics. --keep DIR keeps the study directories there.
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
    """One fresh `edgekd study` process on `executor` (`ray:N`: Ray with --cpus-per-job N)."""
    if execution:  # the first run's execution choices, where a study keeps them
        name = read_profile_data(ROOT / profile, sets)["study"]["name"]
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "plan.json").write_text(json.dumps({"schema_version": 1, "jobs": [], "execution": execution}))
    name_, _, cpus = executor.partition(":")
    args = [sys.executable, "-m", "edgekd.cli", "study", profile, "--out", str(out), "--executor", name_,
            *(["--cpus-per-job", cpus] if cpus else [])]
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
    parser.add_argument("--executors", nargs="+", default=["auto", "ray", "local"],
                        help="auto, local, processes, ray, ray:N (N CPUs a job); the first is the baseline")
    args = parser.parse_args()

    runs, rerun, execution = [], None, None
    base = args.executors[0]
    for r in range(args.rounds):
        order = args.executors[r % len(args.executors):] + args.executors[:r % len(args.executors)]  # rotated
        for executor in order:
            load = wait_idle(args.wait_idle) if args.wait_idle else os.getloadavg()[0]
            out = Path(tempfile.mkdtemp(prefix=f"edgekd-{executor.replace(':', '')}-r{r}-", dir=args.keep))
            try:
                run = study(args.profile, out, executor, args.set, execution)
                execution = execution or run["execution"]
                if rerun is None and executor == base:  # a finished study, run again
                    rerun = study(args.profile, out, base, args.set)["wall_s"]
            finally:
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            run["root"] = str(run["root"])
            run["load_waited"] = round(load, 2)
            runs.append(run)
            print(f"round {r + 1} {executor}: {run['wall_s']} s (load {run['load_start']} -> {run['load_end']}), "
                  f"{run['runs']} runs, failed: {run['failed'] or 'none'}", flush=True)

    def group_means(run: dict) -> dict[str, float]:  # (variant, role) -> mean test accuracy over seeds
        groups: dict[str, list[float]] = {}
        for k, acc in run["test_acc"].items():
            if acc is not None:
                groups.setdefault(k.rsplit("/", 1)[0], []).append(acc)
        return {g: statistics.fmean(v) for g, v in groups.items()}

    by = {name: [r for r in runs if r["executor"] == name] for name in args.executors}
    local = by[base]
    median = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in by.items()}
    rows, compared = [], {}
    for name, rs in by.items():
        same = all(set(r["test_acc"]) == set(local[0]["test_acc"]) for r in rs)
        pairs = [(a, b) for a in local for b in rs if a is not b]  # the baseline against itself too
        diffs = [abs(a["test_acc"][k] - b["test_acc"][k]) for a, b in pairs for k in a["test_acc"]
                 if a["test_acc"][k] is not None and b["test_acc"].get(k) is not None] or [0.0]
        gdiffs = [abs(ga[g] - gb[g]) for a, b in pairs for ga, gb in [(group_means(a), group_means(b))]
                  for g in ga if g in gb] or [0.0]
        compared[name] = {"wall_s_median": median[name], "over_baseline": round(median[name] / median[base], 3),
                          "same_runs": same, "pairs": len(pairs),
                          "max_test_acc_diff_points": round(100 * max(diffs), 2),
                          "mean_test_acc_diff_points": round(100 * statistics.fmean(diffs), 2),
                          "max_seed_mean_diff_points": round(100 * max(gdiffs), 2),
                          "failed": sorted({j for r in rs for j in r["failed"]})}
        rows.append([name, median[name], f"{median[name] / median[base]:.2f}x", rs[0]["runs"], same,
                     f"{100 * max(diffs):.2f}" if pairs else "-", f"{100 * statistics.fmean(diffs):.2f}" if pairs
                     else "-", f"{100 * max(gdiffs):.2f}" if pairs else "-",
                     ", ".join(str(r["load_start"]) for r in rs), all(r["report"] for r in rs)])
    show(f"edgekd study {args.profile} {' '.join(args.set)} on {os.cpu_count()} CPUs: fresh process, fresh --out",
         ["executor", "wall s (median)", f"vs {base}", "runs", "same runs", f"max |Δ test acc| vs {base} (pts)",
          "mean |Δ| (pts)", "max |Δ seed mean| (pts)", "load at start", "report"], rows)
    print(f"re-run of a finished study ({base}): {rerun} s")
    print(json.dumps(compared, indent=1))
    path = save(args.name, {"profile": args.profile, "sets": args.set, "rounds": args.rounds, "baseline": base,
                            "runs": runs,
                            "execution": execution, "compared": compared, "rerun_s": rerun,
                            "cpus": os.cpu_count()})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
