"""Online, consistent teaching against the teacher cache: what the cache saves, and what it costs, measured.

Four studies of one profile (Fashion-MNIST's base variant and main student family by default), the same seeds,
the same teacher (trained once, in the first; the others load its weights: `teacher.checkpoint`):
- cached: the teacher's outputs per (image, view) looked up from the cache (edgekd's default);
- online: the frozen teacher run on each of the student's batches (`study.teacher_cache = false`): the same
  numbers as cached up to float rounding, at the cost of the teacher's forward pass every step;
- online-cutmix: online, with cutmix on every batch (`student.mix = "cutmix"`): augmentation the cache cannot
  hold; its scratch students mix too;
- online-cutmix-equal-time: online-cutmix with the student epochs cut so that a KD student's training time
  matches the cached one's. The ratio is measured side by side, not taken from the studies' own training times
  (anything else running on the machine meanwhile would skew those): one-epoch KD trainings of seed 0, cached and
  online-cutmix in alternation, `--timing-rounds` each, the median of each.
Per mode: the KD students' test accuracy (mean ± std over seeds), the paired KD gain over the same study's scratch
students with its 95% interval, the KD students' summed training time, and the teacher work (cache build).

    EDGEKD_DATA=/usr/share/datasets/fashion-mnist python benchmarks/online_teaching.py --out /tmp/online

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


def main() -> int:
    from edgekd.config import load_profile
    from edgekd.records import by_seed, paired_gain, select_current
    from edgekd.workflows import distill

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default=str(REPO / "profiles" / "fashion-mnist-study.toml"))
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default="online_teaching")
    p.add_argument("--timing-rounds", type=int, default=3)
    args = p.parse_args()

    common = ['variants={base={kind="base"}}', "students={}", "explain.images=0", *args.set]
    base = load_profile(args.profile, common)
    modes = {"cached": [], "online": ["study.teacher_cache=false"],
             "online-cutmix": ["study.teacher_cache=false", 'student.mix="cutmix"']}
    results, teacher = {}, None

    def study(mode: str, extra: list[str], force: bool = False) -> dict:
        nonlocal teacher
        overrides = [*common, f'study.name="{base.study.name}-{mode}"', *extra]
        if teacher is not None:
            overrides.append(f'teacher.checkpoint="{teacher}"')
        profile = load_profile(args.profile, overrides)
        start = time.perf_counter()
        distill(profile, Path(args.out), force=force)
        wall = time.perf_counter() - start
        root = Path(args.out) / profile.study.name
        runs = [r.as_dict() for r in select_current(root).runs]
        if teacher is None:
            teacher = next(root / r["run_dir"] / "model.safetensors" for r in runs if r["role"] == "teacher")
        kd = [r for r in runs if r["role"] == "kd"]
        scratch = [r for r in runs if r["role"] == "scratch"]
        cache = [r for r in runs if r["role"] == "teacher_cache"]
        return {"overrides": extra, "wall_s": round(wall, 1), "epochs": profile.student.epochs,
                "kd_acc": by_seed(kd), "scratch_acc": by_seed(scratch),
                "kd_train_s": statistics.fmean(r["train_s"] for r in kd),
                "scratch_train_s": statistics.fmean(r["train_s"] for r in scratch),
                "cache_s": sum(r.get("fill_s") or r.get("wall_s") or 0 for r in cache)}

    for mode, extra in modes.items():
        results[mode] = study(mode, extra)
    # equal wall time: the cutmix KD student gets the epochs the cached KD student's training time buys, the two
    # timed side by side (alternating one-epoch trainings of seed 0), not read from the studies above
    timed: dict[str, list[float]] = {"cached": [], "online-cutmix": []}
    for _ in range(args.timing_rounds):
        for mode in timed:
            r = study(f"timing-{mode}", [*modes[mode], "student.epochs=1", "student.min_steps=0", "study.seeds=[0]"],
                      force=True)
            timed[mode].append(r["kd_train_s"])
    ratio = statistics.median(timed["cached"]) / statistics.median(timed["online-cutmix"])
    epochs = max(1, round(base.student.epochs * ratio))
    results["online-cutmix-equal-time"] = study("online-cutmix-equal-time",
                                                [*modes["online-cutmix"], f"student.epochs={epochs}"])
    rows = []
    for mode, r in results.items():
        kd = list(r["kd_acc"].values())
        gain = paired_gain(r["kd_acc"], r["scratch_acc"])
        r["kd_gain"] = {"mean": gain.mean, "std": gain.std, "ci95": gain.ci95, "n": gain.n}
        rows.append([mode, r["epochs"], f"{100 * statistics.fmean(kd):.2f} ± {100 * statistics.pstdev(kd):.2f}",
                     f"{100 * gain.mean:+.2f} [±{100 * gain.ci95:.2f}]", r["kd_train_s"], r["scratch_train_s"],
                     r["cache_s"], r["wall_s"]])
    show(f"{base.study.name} (base variant): the teacher cache against online teaching, {len(base.study.seeds)} seeds",
         ["mode", "student epochs", "KD test acc %", "KD gain pts [95%]", "KD train s (mean)",
          "scratch train s (mean)", "cache build s", "study wall s"], rows)
    path = save(args.name, {"device": "cpu", "profile": args.profile, "common": common, "modes": results,
                            "equal_time_epochs": epochs, "time_ratio_cached_over_online_cutmix": ratio,
                            "timing_one_epoch_kd_train_s": timed})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
