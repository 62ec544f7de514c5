"""torch.compile against eager training steps, for a study's own trainings, and what the plan chooses for each.

    python benchmarks/compile_speed.py [--profile profiles/quickstart.toml] [--set key=value ...]
                                       [--device cpu] [--warm-cache] [--name compile_speed-quickstart]

Plans the study as `edgekd study` would (precision, layout, trainings at once and threads measured afresh, in a
throwaway execution cache), then for each training configuration (model, data, batch, precision, layout, threads)
times eager steps against each torch.compile mode (edgekd.distill.execution.measure_compile, forced to compile
even where the plan would not time it), and prints per configuration: ms per step eager and compiled, the first compile on
this machine (a fresh inductor cache unless --warm-cache) and a later training's (from the on-disk caches), and per
training length in the study the mode compile_choice picks and why. JSON into benchmarks/results/NAME-DEVICE.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="profiles/quickstart.toml")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-cache", action="store_true", help="use this machine's inductor cache as it is")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="edgekd-compile-")
    if not args.warm_cache:  # before torch reads it: the first compile is then what a fresh machine pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor")
    from edgekd.distill.execution import CACHE_ENV

    os.environ[CACHE_ENV] = str(Path(scratch) / "execution.json")  # precision and threads measured afresh

    from _common import save, show

    import edgekd.distill.stage
    from edgekd.config import load_profile
    from edgekd.distill.execution import Execution, compile_choice, measure_compile, worth_timing_compile
    from edgekd.distill.plan import train_config
    from edgekd.distill.runner import build_model, dataset_splits
    from edgekd.distill.stage import planned_steps
    from edgekd.pipeline.graph import PlanContext
    from edgekd.workflows import machine_threads, plan_jobs, prepare_jobs

    # the plan's own compile timing would warm the inductor cache before the first compile timed here
    edgekd.distill.stage.choose_compile = lambda ctx, jobs, measured: jobs
    profile = load_profile(args.profile, args.sets)
    root = Path(scratch) / "study"
    ctx = PlanContext(profile, root, device=args.device, cores=machine_threads(),
                      measure=lambda fn, *a, num_gpus=0.0, **k: fn(*a, **k))
    jobs = [j for j in prepare_jobs(ctx, plan_jobs(profile, root, device=args.device), {}) if j.kind == "train"]
    groups: dict[tuple, list] = {}
    for job in jobs:
        ex = job.params["execution"]
        groups.setdefault((job.dataset, train_config(profile, job.role).model, job.role == "teacher",
                           tuple(sorted(ex.items()))), []).append(job)
    rows, records = [], []
    for (dataset, model_name, _, ex_items), members in groups.items():
        cfg = train_config(profile, members[0].role)
        data = dataset_splits(profile, dataset).splits
        shape = (cfg.batch_size, data.channels, data.image_size, data.image_size)
        ex = Execution(**dict(ex_items))
        build = functools.partial(build_model, cfg, data)
        steps = [planned_steps(profile, j) for j in members]
        entry = measure_compile(build, ex, shape, data.num_classes, total_steps=sum(steps), always=True)
        # what the plan does: it times compiling only for enough eager training in all (COMPILE_MIN_S)
        timed_in_plan = worth_timing_compile(sum(steps), entry["eager_step_s"])
        untimed = {**entry, "modes": {}}
        decisions = {n: compile_choice(entry if timed_in_plan else untimed, n) for n in sorted(set(steps))}
        for mode, timed in entry["modes"].items():
            if "failed" in timed:
                rows.append([f"{model_name} ({ex.threads} threads)", mode, "failed", "", "", "", "", ""])
                continue
            rows.append([f"{model_name} {shape[0]}x{shape[2]}x{shape[3]} {ex.precision}"
                         f"{'-cl' if ex.channels_last else ''} ({ex.threads} threads)", mode,
                         entry["eager_step_s"] * 1e3, timed["step_s"] * 1e3, entry["eager_step_s"] / timed["step_s"],
                         timed["first_compile_s"], timed["compile_s"],
                         ", ".join(f"{n} steps: {m or 'eager'}" for n, (m, _) in decisions.items())
                         + ("" if timed_in_plan else f" (not timed: {sum(steps) * entry['eager_step_s']:.0f} s "
                                                     "of eager training in all)")])
        records.append({"model": model_name, "dataset": dataset, "shape": list(shape), "execution": dict(ex_items),
                        "trainings": len(members), "steps": steps, "timed_in_plan": timed_in_plan, "timings": entry,
                        "choices": {str(n): {"mode": m, "why": why} for n, (m, why) in decisions.items()}})
    show(f"torch.compile vs eager training steps: {args.profile} on {args.device}",
         ["training", "mode", "eager ms/step", "compiled ms/step", "speed-up", "first compile s",
          "later training s", "chosen for the study's trainings"], rows)
    name = args.name or f"compile_speed-{Path(args.profile).stem}"
    path = save(name, {"profile": args.profile, "sets": args.sets, "device": args.device,
                       "warm_cache": args.warm_cache, "configurations": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
