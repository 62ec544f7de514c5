"""What the training half of a study is: its jobs and the rules that relate them.

Jobs: a teacher (per dataset, teacher variant and teacher name), a teacher cache (per variant; needs the main
teacher), a student (scratch or a KD method, per variant, family and seed; needs the main teacher, the teachers
its method names, and its variant's cache when it learns from it), grid candidates of tuned methods (first seed)
and pruned students (need the student they prune). Which method's losses a role trains with, whether it learns
from the cache, what it trains (`train_config`) and which grid candidate a tuned method chose are decided here,
once, for the keys, the plan and the training alike.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgekd.pipeline.graph import Job, NotReady
from edgekd.roles import BASE_VARIANT, CACHE, SCRATCH, TEACHER, Role, grid_role, teacher_role
from edgekd.runio import METRICS, UnreadableFile, read_json, run_dir

if TYPE_CHECKING:
    from edgekd.config import Profile, TrainConfig
    from edgekd.pipeline.graph import PlanContext


def teacher_variant(profile: Profile, variant: str) -> str:
    """Where a variant's teacher lives: its own variant, or the clean data's (`base`)."""
    return variant if profile.study.teacher_regime == "variant" else BASE_VARIANT


def loss_method(profile: Profile, base: str) -> str:
    """The method whose losses (and teachers) a student role trains with: its own, a grid candidate's method, or
    for a pruned student the fine-tune method `compress.method`."""
    role = Role(base)
    if role.pruned:
        return profile.compress.method
    return role.grid[0] if role.grid else base


def uses_cache(profile: Profile, method: str) -> bool:
    """The view-keyed cache serves methods that learn from the main teacher's logits only."""
    from edgekd.config import method_grid, method_losses
    from edgekd.distill.losses import ComposedLoss

    spec = method_grid(profile.methods[loss_method(profile, method)])[0]  # the candidates differ in numbers only
    criterion = ComposedLoss(method_losses(spec), f"methods.{method}")
    return criterion.needs_teacher and not criterion.needs_features and spec.get("teachers", ["main"]) == ["main"]


def needs_cache(profile: Profile) -> bool:
    return profile.study.teacher_cache and any(uses_cache(profile, m) for m in
                                               [*profile.methods, *map(profile.compress.role, profile.compress.sources)])


def train_config(profile: Profile, role: str) -> TrainConfig | None:
    """What a job of this role trains (`teacher@plain`: [teachers.plain]; `kd@resnet`: [students.resnet]); None for
    a teacher cache, which trains nothing."""
    r = Role.parse(role)
    if r.base == CACHE:
        return None
    if r.is_teacher:
        named = profile.teachers[r.family] if r.family else profile.teacher
        # an early-stopped teacher is [teacher]'s own run: its settings, so its model and key are that run's
        return replace(profile.teacher, stop_epoch=named.stop_epoch) if named.stop_epoch else named
    cfg = profile.student_config(r.family)
    if r.pruned:  # a short fine-tune of trained weights: a low rate from the start, no warm-up
        c = profile.compress
        return replace(cfg, epochs=c.finetune_epochs, min_steps=0, lr=c.finetune_lr or cfg.lr / 10,
                       warmup_epochs=0.0)
    return cfg


def config_name(role: str) -> str:
    """The profile table a role's training settings come from, as the key names it."""
    r = Role.parse(role)
    if r.is_teacher:
        return f"teachers.{r.family}" if r.family else "teacher"
    return f"students.{r.family}" if r.family else "student"


def trains_on_labeled_only(profile: Profile, job: Job) -> bool:
    """A training whose only loss is cross-entropy (a teacher, a scratch student) on a `labels` variant learns from
    the labeled images alone, in full batches, for as many steps as a run over every image: the supervised baseline
    a user would train on their labeled data. Masked inside batches of mostly unlabeled images, cross-entropy saw ~6
    labels per batch of 128 at 5% and diverged (fashion-mnist-labels, session 11): a broken baseline, not KD's gain."""
    from edgekd.config import VariantConfig

    return Role.parse(job.role).ce_only and profile.variants.get(job.variant, VariantConfig()).kind == "labels"


def snapshot_epochs(profile: Profile) -> tuple[int, ...]:
    """The epochs after which the main teacher's run saves its weights: those its early-stopped teachers stop at."""
    return tuple(sorted({t.stop_epoch for t in profile.teachers.values() if t.stop_epoch}))


def snapshot_path(teacher_run: Path, epoch: int) -> Path:
    return teacher_run / "snapshots" / f"epoch{epoch}.safetensors"


def teacher_dir(profile: Profile, root: Path, job: Job, name: str = "") -> Path:
    return run_dir(root, job.dataset, teacher_variant(profile, job.variant), teacher_role(name),
                   profile.study.teacher_seed)


def cache_dir(profile: Profile, root: Path, job: Job) -> Path:
    return run_dir(root, job.dataset, job.variant, CACHE, profile.study.teacher_seed)


def plan_training(ctx: PlanContext, planned: list[Job]) -> list[Job]:
    """Every training job of the profile with its dependencies, in an order that respects them: teachers, teacher
    caches, then students (a tuned method's grid candidates before it, a pruned student after the one it prunes)."""
    profile, root = ctx.profile, ctx.root
    gpus = 1.0 if ctx.device.startswith("cuda") else 0.0  # a part of it once the trainings at once are chosen
    seed0 = profile.study.teacher_seed
    cached = needs_cache(profile)
    teachers: list[Job] = []
    caches: list[Job] = []
    students: list[Job] = []
    for name in profile.datasets:
        def job(variant, role, seed, deps=(), kind="train", name=name):
            return Job(name, variant, role, seed, run_dir(root, name, variant, role, seed), kind=kind,
                       deps=tuple(deps), num_cpus=ctx.cpus_per_job or ctx.cores, num_gpus=gpus)

        for variant in profile.variants:
            tv = teacher_variant(profile, variant)
            for extra in ["", *profile.teachers]:
                stopped = extra and profile.teachers[extra].stop_epoch  # made from the main teacher's run
                teacher = job(tv, teacher_role(extra), seed0, [job(tv, TEACHER, seed0).label] if stopped else ())
                if teacher not in teachers:
                    teachers.append(teacher)
            main = job(tv, TEACHER, seed0).label
            cache = job(variant, CACHE, seed0, [main], kind="cache") if cached else None
            if cache:
                caches.append(cache)
            for family in profile.families:
                for seed in profile.study.seeds:
                    students += _students(profile, job, variant, tv, Role("", family).suffix, seed, main, cache)
    return teachers + caches + students


def _students(profile: Profile, job, variant: str, tv: str, suffix: str, seed: int, main: str,
              cache: Job | None) -> list[Job]:
    """One seed's student jobs of a variant and family: grid candidates (first seed), scratch, the methods, and
    the pruned students."""
    from edgekd.config import method_grid

    seed0 = profile.study.teacher_seed
    first = seed == profile.study.seeds[0]
    pruned = [profile.compress.role(s) for s in profile.compress.sources]
    tuned = [grid_role(m, k) for m, spec in profile.methods.items() for k in range(len(method_grid(spec)))
             if len(method_grid(spec)) > 1 and first]
    out = []
    for base in (*tuned, SCRATCH, *profile.methods, *pruned):
        role = Role(base)
        deps = [main]
        if base != SCRATCH:
            deps += [job(tv, teacher_role(t), seed0).label for t in
                     profile.methods[loss_method(profile, base)].get("teachers", ["main"]) if t != "main"]
            if cache and uses_cache(profile, base):
                deps.append(cache.label)
        if role.pruned:  # starts from the trained student it prunes
            deps.append(job(variant, role.pruned[0] + suffix, seed).label)
        tuned_by = loss_method(profile, base) if base != SCRATCH else ""
        grid = method_grid(profile.methods[tuned_by]) if tuned_by else []
        if len(grid) > 1 and not role.grid:  # waits for the choice on validation
            deps += [job(variant, grid_role(tuned_by, k) + suffix, profile.study.seeds[0]).label
                     for k in range(len(grid))]
        out.append(job(variant, base + suffix, seed, deps))
    return out


def grid_choice(profile: Profile, root: Path, dataset: str, variant: str, family: str, method: str) -> dict:
    """The candidate of `method`'s grid with the best validation accuracy on the first seed (the first of equals),
    with every candidate's: {"chosen": k, "candidates": [{"params": {loss.param: value}, "val_acc": ...}]}.
    NotReady until every candidate has trained."""
    from edgekd.config import grid_axes, method_grid

    spec = profile.methods[method]
    suffix = Role("", family).suffix
    axes = grid_axes(spec)
    candidates = []
    for k, candidate in enumerate(method_grid(spec)):
        path = run_dir(root, dataset, variant, grid_role(method, k) + suffix, profile.study.seeds[0])
        try:
            val_acc = read_json(path / METRICS)["val_acc"]
        except (UnreadableFile, KeyError, TypeError):
            raise NotReady(f"candidate {k} of {method}'s grid is not trained yet") from None
        candidates.append({"params": {f"{loss}.{key}": candidate[loss][key] for loss, key, _ in axes},
                           "val_acc": val_acc})
    chosen = max(range(len(candidates)), key=lambda k: (candidates[k]["val_acc"], -k))
    return {"chosen": chosen, "candidates": candidates, "seed": profile.study.seeds[0]}


def method_spec(profile: Profile, root: Path, job: Job) -> dict:
    """The losses a KD student trains with, numbers resolved: a grid candidate's own values, a tuned method's
    choice on validation, a pruned student's fine-tune method (tuned the same way for its variant)."""
    from edgekd.config import method_grid

    role = Role.parse(job.role)
    if role.grid:
        return method_grid(profile.methods[role.grid[0]])[role.grid[1]]
    method = loss_method(profile, role.base)
    grid = method_grid(profile.methods[method])
    if len(grid) == 1:
        return grid[0]
    return grid[grid_choice(profile, root, job.dataset, job.variant, role.family, method)["chosen"]]


def training_losses(profile: Profile, root: Path, job: Job) -> dict:
    """The losses a training job's role trains with: cross-entropy for a teacher or scratch student, its method's
    resolved spec for a KD student."""
    return {"ce": {"weight": 1.0}} if Role.parse(job.role).ce_only else method_spec(profile, root, job)


def cache_needs(profile: Profile, samples: int) -> dict:
    """The views the planned students draw: their seeds, and the most epochs any student family trains."""
    epochs = max(profile.student_config(f).epochs_for(samples) for f in profile.families)
    return {"seeds": sorted(profile.study.seeds), "epochs": epochs}
