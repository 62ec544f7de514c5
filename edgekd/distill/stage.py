"""The training stage's job kinds: `train` (a teacher, scratch or KD student) and `cache` (a variant's teacher
outputs per view), with their keys, output checks and plan-time precision choice.

Precision and memory format are chosen at plan time, once per (model, device, input), before any job runs: fixed
by the profile, taken from the plan file's table of earlier measurements, or measured (where the jobs will run)
and recorded there; the choice travels in each training job's `params["execution"]` and is part of its key.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgekd.data.describe import data_description, data_settings
from edgekd.distill.plan import (
    cache_dir,
    cache_needs,
    config_name,
    loss_method,
    method_spec,
    plan_training,
    snapshot_epochs,
    snapshot_path,
    teacher_dir,
    train_config,
    trains_on_labeled_only,
    uses_cache,
)
from edgekd.pipeline.graph import (
    Context,
    Job,
    JobKind,
    NotReady,
    PlanContext,
    Status,
    input_fingerprint,
    register_kind,
)
from edgekd.records import fingerprint, make_key
from edgekd.roles import TEACHER, Role
from edgekd.runio import METRICS, PREDICTIONS, WEIGHTS, UnreadableFile, read_json, run_dir, tensor_shapes

EXECUTION_FIELDS = ("precision", "channels_last", "device")
SHARING = "sharing"  # the plan's measurements of trainings at once are under "sharing|<the student's slot>"
COMPILE = "compile"  # and those of torch.compile under "compile|<slot>|<precision, layout, threads>"


def _check_run_files(job: Job, record: dict, files: tuple[str, ...]) -> str | None:
    """What is wrong with a finished run's files (None: whole); cheap, headers only."""
    if "role" not in record:
        return f"{job.record} holds no run metrics"
    for name in files:
        (read_json if name.endswith(".json") else tensor_shapes)(job.run_dir / name)
    return None


class TrainKind(JobKind):
    name = "train"

    def plan(self, ctx, planned):
        return plan_training(ctx, planned)

    def record(self, job):
        return job.run_dir / METRICS

    def key(self, ctx, job):
        return train_key(ctx.profile, ctx.root, job)

    def damage(self, ctx, job, record):
        return _check_run_files(job, record, (WEIGHTS, PREDICTIONS))

    def outgrown(self, ctx, job, record):
        """A main teacher trained before an early-stopped teacher asked for its weights at some epoch trains again
        (the same run: the same weights, now with the snapshot)."""
        if job.role != TEACHER:
            return None
        missing = [k for k in snapshot_epochs(ctx.profile) if not snapshot_path(job.run_dir, k).is_file()]
        return f"has no snapshot after epoch {missing[0]}, which an early-stopped teacher needs" if missing else None

    def run(self, ctx, job, status):
        from edgekd.distill.runner import run_training

        return run_training(ctx, job, status.key)

    def prepare(self, ctx, jobs, measured):
        jobs = [choose_execution(ctx, job, measured) if job.kind == self.name else job for job in jobs]
        return choose_compile(ctx, share_device(ctx, jobs, measured), measured)


class CacheKind(JobKind):
    name = "cache"
    derived = True  # built on demand when a job that needs it runs alone: it is cheap, and a function of its teacher

    def record(self, job):
        return job.run_dir / METRICS

    def key(self, ctx, job):
        return cache_key(ctx.profile, ctx.root, job)

    def damage(self, ctx, job, record):
        from edgekd.distill.teacher import CACHE_FILES

        return _check_run_files(job, record, CACHE_FILES)

    def outgrown(self, ctx, job, record):
        covered, samples = record.get("coverage") or {}, record.get("samples", 0)
        needs = cache_needs(ctx.profile, samples)
        if set(needs["seeds"]) <= set(covered.get("seeds", [])) and needs["epochs"] <= covered.get("epochs", 0):
            return None
        return (f"extends seeds {covered.get('seeds')} x {covered.get('epochs')} epochs to {needs['seeds']} x "
                f"{needs['epochs']} (only the new views are computed)")

    def run(self, ctx: Context, job: Job, status: Status) -> dict:
        from edgekd.distill.runner import run_cache

        return run_cache(ctx, job, status.key)


register_kind(TrainKind())
register_kind(CacheKind())


# -- keys ----------------------------------------------------------------------------------------------------------
def _recorded_execution(tdir: Path) -> dict:
    try:
        return read_json(tdir / METRICS)["execution"]
    except (UnreadableFile, KeyError, TypeError):
        raise NotReady(f"the teacher in {tdir} is not finished yet") from None


def train_key(profile, root: Path, job: Job) -> dict:
    """The key of a teacher, scratch or KD student run."""
    role = Role.parse(job.role)
    cfg = train_config(profile, job.role)
    config: dict[str, Any] = {config_name(job.role): asdict(cfg), "seed": job.seed}
    inputs = {}
    if trains_on_labeled_only(profile, job):
        config["train_images"] = "labeled only, the steps of every image"
    if role.is_teacher and cfg.checkpoint:
        inputs["checkpoint"] = input_fingerprint(Path(cfg.checkpoint).expanduser(),
                                                 f"teacher checkpoint {cfg.checkpoint}")
    if role.is_teacher and cfg.stop_epoch:
        inputs["snapshot"] = input_fingerprint(snapshot_path(teacher_dir(profile, root, job), cfg.stop_epoch),
                                               f"the main teacher's weights after epoch {cfg.stop_epoch}")
    if not role.is_teacher:
        inputs["teacher"] = input_fingerprint(teacher_dir(profile, root, job) / WEIGHTS, "its teacher")
    if role.pruned:
        source, ratio = role.pruned
        config["compress"] = {"prune": ratio, "method": profile.compress.method}
        inputs["student"] = input_fingerprint(run_dir(root, job.dataset, job.variant, str(role.with_base(source)),
                                                      job.seed) / WEIGHTS, f"the {source} student it prunes")
    if not role.ce_only:
        spec = method_spec(profile, root, job)
        config[f"methods.{loss_method(profile, role.base)}"] = spec
        for name in spec.get("teachers", ["main"]):
            if name != "main":
                inputs[f"teacher@{name}"] = input_fingerprint(teacher_dir(profile, root, job, name) / WEIGHTS,
                                                              f"teacher {name}")
        if uses_cache(profile, role.base):
            config["study.teacher_cache"] = profile.study.teacher_cache
            if profile.study.teacher_cache:
                try:
                    inputs["teacher_cache"] = read_json(cache_dir(profile, root, job) / METRICS)["fingerprint"]
                except (UnreadableFile, KeyError, TypeError):
                    raise NotReady("its teacher cache is not built yet") from None
    if job.params.get("execution") is not None:
        execution = job.params["execution"]
        config["execution"] = {k: execution[k] for k in EXECUTION_FIELDS}
        for field in ("threads", "compile"):  # a CPU training's threads, a compiled model: they change its rounding
            if execution.get(field):
                config["execution"][field] = execution[field]
    return make_key("train", config, data_description(profile, job.dataset, job.variant), inputs)


def cache_key(profile, root: Path, job: Job) -> dict:
    """The key of a teacher cache: what its stored values are a function of (the teacher's weights and numerics,
    the data and its augmentation, top-k). Which (seed, epoch) views it holds is its coverage, not its key: more
    seeds or epochs extend a cache, they do not invalidate it."""
    tdir = teacher_dir(profile, root, job)
    inputs = {"teacher": input_fingerprint(tdir / WEIGHTS, "its teacher")}
    config = {"study.cache_topk": profile.study.cache_topk, "teacher_execution": _recorded_execution(tdir)}
    if job.params.get("threads"):  # the CPU threads it runs the teacher with: they change the logits it keeps
        config["threads"] = job.params["threads"]
    return make_key("cache", config, data_description(profile, job.dataset, job.variant), inputs)


# -- precision and memory format, at plan time -----------------------------------------------------------------------
def _execution_slot(profile, job: Job, device: str) -> str:
    cfg = train_config(profile, job.role)
    data = json.dumps(data_settings(profile, job.dataset), sort_keys=True)
    return (f"{cfg.model}|small_input={cfg.small_input}|{device}|{job.dataset}:{fingerprint({'d': data})}|"
            f"batch={cfg.batch_size}|{cfg.precision}|{cfg.channels_last}")


def _machine_entry(profile, dataset: str, role: str, slot: str, measure) -> dict:
    """This machine's earlier entry for `slot` (MachineCache), else `measure(cfg, data, batch shape)` ->
    (choice, images/s per candidate) timed now and kept (when more than one candidate was timed)."""
    from edgekd.distill.execution import MachineCache
    from edgekd.distill.runner import dataset_splits

    cache = MachineCache()
    earlier = cache.get(slot)
    if earlier is not None:
        return {**earlier, "source": f"this machine's earlier measurement ({cache.path})"}
    cfg = train_config(profile, role)
    data = dataset_splits(profile, dataset).splits
    shape = (cfg.batch_size, data.channels, data.image_size, data.image_size)
    choice, speeds = measure(cfg, data, shape)
    entry = {"choice": choice, "images_per_s": speeds, "shape": list(shape),
             "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    if speeds:  # a choice the profile left one candidate for was not measured: nothing to keep
        cache.put(slot, entry)
    return {**entry, "source": "measured"}


def measure_execution(profile, dataset: str, role: str, device: str, slot: str) -> dict:
    """The (precision, layout) of one training configuration on this machine's `device` (_machine_entry). Runs
    where the jobs will run (locally, or as one task on the cluster), before any job, so nothing else loads the
    machine meanwhile."""
    from edgekd.distill.execution import measure_candidates
    from edgekd.distill.runner import build_model

    def measure(cfg, data, shape):
        best, speeds = measure_candidates(lambda: build_model(cfg, data), cfg, device, shape, data.num_classes)
        return {"precision": best.precision, "channels_last": best.channels_last, "device": best.device}, speeds

    return _machine_entry(profile, dataset, role, slot, measure)


def choose_execution(ctx: PlanContext, job: Job, measured: dict) -> Job:
    """A training job with its precision and memory format: fixed by the profile, taken from the study's table of
    earlier measurements, or measured now (once per model, device and input) with the executor's `measure`."""
    from dataclasses import replace

    if job.params.get("execution") is not None:  # chosen already (a torchrun follower gets rank 0's)
        return job
    cfg = train_config(ctx.profile, job.role)
    if cfg.precision != "auto" and cfg.channels_last != "auto":
        choice = {"precision": cfg.precision, "channels_last": cfg.channels_last == "on", "device": ctx.device}
    else:
        slot = _execution_slot(ctx.profile, job, ctx.device)
        if slot not in measured:
            gpus = 1.0 if ctx.device.startswith("cuda") else 0.0
            measured[slot] = ctx.measure(measure_execution, ctx.profile, job.dataset, job.role, ctx.device, slot,
                                         num_gpus=gpus)
        choice = measured[slot]["choice"]
    execution = {"precision": choice["precision"], "channels_last": bool(choice["channels_last"]),
                 "device": choice["device"]}
    return replace(job, params={**job.params, "execution": execution})


# -- trainings at once and their threads, at plan time ---------------------------------------------------------------
def measure_sharing_entry(profile, dataset: str, role: str, execution: dict, slot: str, cores: int) -> dict:
    """How many trainings of `role` run at once on this machine's device, sharing its `cores` threads
    (_machine_entry; edgekd/distill/sharing.py). `cores` comes from the driver: a Ray task's own threads are its
    CPU ask."""
    from edgekd.distill.sharing import measure_sharing

    def measure(cfg, data, shape):
        spec = (cfg.model, data.num_classes, data.channels, cfg.small_input, shape, execution)
        best, speeds = measure_sharing(spec, cores, execution["device"])
        return {"trainings": best.trainings, "threads": best.threads}, speeds

    return _machine_entry(profile, dataset, role, slot, measure)


def _fixed_sharing(profile, cores: int, device: str) -> dict | None:
    """The trainings at once and threads the profile sets (study.threads, study.trainings_at_once), or None."""
    study = profile.study
    if not (study.threads or study.trainings_at_once):
        return None
    trainings = study.trainings_at_once or (max(1, cores // study.threads) if device == "cpu" else 1)
    return {"trainings": trainings, "threads": study.threads or max(1, cores // trainings)}


def share_device(ctx: PlanContext, jobs: list[Job], measured: dict) -> list[Job]:
    """The training and cache jobs with their threads and their part of the device: fixed by the profile, taken
    from the plan file's table (earlier measurements, --execution), or measured now on the first student's
    configuration (where the jobs will run), once per study; a teacher trains alone with every thread. A CPU
    training's threads go in its execution (and key: they change its numbers); on a GPU, each student asks for
    1/trainings of it."""
    from dataclasses import replace

    trains = [j for j in jobs if j.kind == "train" and "threads" not in j.params["execution"]]
    if not trains:  # nothing to train, or chosen already (a torchrun follower gets rank 0's)
        return jobs
    choice = _fixed_sharing(ctx.profile, ctx.cores, ctx.device)
    if choice is None:
        job = next((j for j in trains if not Role.parse(j.role).is_teacher), trains[0])
        slot = f"{SHARING}|{_execution_slot(ctx.profile, job, ctx.device)}|cores={ctx.cores}"
        if slot not in measured:
            gpus = 1.0 if ctx.device.startswith("cuda") else 0.0
            measured[slot] = ctx.measure(measure_sharing_entry, ctx.profile, job.dataset, job.role,
                                         job.params["execution"], slot, ctx.cores, num_gpus=gpus)
        choice = measured[slot]["choice"]
    trainings, threads = int(choice["trainings"]), int(choice["threads"])
    gpus = 1.0 / trainings if ctx.device.startswith("cuda") else 0.0
    cpu = ctx.device == "cpu"

    def shared(job: Job) -> Job:
        # A teacher has the device to itself, with every thread (unless study.threads says): the students of its
        # variant all wait for it.
        alone = job.kind == "train" and Role.parse(job.role).is_teacher and not ctx.profile.study.threads
        # a student asks for its share of the cores (6 of them, 4 at once: 1.5 each, trained on 1 thread), so
        # that the executors run as many side by side as were measured
        ask = {"num_cpus": ctx.cpus_per_job or (float(ctx.cores) if alone else ctx.cores / trainings),
               "num_gpus": min(1.0, gpus * trainings) if alone else gpus}
        if job.kind == "cache":
            return replace(job, **ask, params={**job.params, "threads": threads if cpu else 0})
        if job.kind != "train" or "threads" in job.params["execution"]:
            return job
        execution = {**job.params["execution"], "threads": (ctx.cores if alone else threads) if cpu else 0}
        return replace(job, **ask, params={**job.params, "execution": execution})

    return [shared(j) for j in jobs]


# -- torch.compile, at plan time -------------------------------------------------------------------------------------
def planned_steps(profile, job: Job, sizes: dict | None = None) -> int:
    """The optimizer steps a training job will take (TrainConfig.steps_for its training images). `sizes`:
    training images per (dataset, variant), filled as they are loaded (a profile's variants are many)."""
    from edgekd.distill.runner import dataset_splits

    sizes = {} if sizes is None else sizes
    if (job.dataset, job.variant) not in sizes:
        sizes[job.dataset, job.variant] = len(dataset_splits(profile, job.dataset, job.variant).splits.train)
    return train_config(profile, job.role).steps_for(sizes[job.dataset, job.variant])


def measure_compile_entry(profile, dataset: str, role: str, execution: dict, slot: str, total_steps: int) -> dict:
    """Eager against torch.compile for one training configuration, at its threads, on this machine (_machine_entry;
    edgekd.distill.execution.measure_compile): kept for later studies only when compiling was timed, not where
    `total_steps` (the slot's trainings together) were too few to time it for."""
    from edgekd.distill.execution import Execution, measure_compile
    from edgekd.distill.runner import build_model

    def measure(cfg, data, shape):
        timings = measure_compile(lambda: build_model(cfg, data), Execution(**execution), shape, data.num_classes,
                                  total_steps)
        timed = {mode: t["step_s"] for mode, t in timings["modes"].items() if "step_s" in t}
        speeds = {name: round(shape[0] / t, 1) for name, t in {"eager": timings["eager_step_s"], **timed}.items()}
        return timings, speeds if timed else {}

    return _machine_entry(profile, dataset, role, slot, measure)


def choose_compile(ctx: PlanContext, jobs: list[Job], measured: dict) -> list[Job]:
    """The training jobs with their torch.compile mode ("" = eager) in their execution: `off`/`on` as the profile
    says, `auto` by the plan's timings for the job's configuration and threads (measured now where missing, or where
    an earlier eager-only timing was for fewer steps in all) and the job's own steps (compile_choice)."""
    from dataclasses import replace

    from edgekd.distill.execution import compile_choice, worth_timing_compile
    from edgekd.distill.train import process_group_size

    todo = [j for j in jobs if j.kind == "train" and "compile" not in j.params["execution"]]
    setting = {j.label: _compile_setting(train_config(ctx.profile, j.role)) for j in todo}
    if process_group_size() > 1:  # a torchrun group: DDP under torch.compile is not measured here, so eager
        setting = dict.fromkeys(setting, "off")
    slots: dict[str, list[Job]] = {}
    for job in todo:
        if setting[job.label] == "auto":
            ex = job.params["execution"]
            slot = (f"{COMPILE}|{_execution_slot(ctx.profile, job, ctx.device)}|{ex['precision']}|"
                    f"channels_last={ex['channels_last']}|threads={ex.get('threads', 0)}")
            slots.setdefault(slot, []).append(job)
    chosen, sizes = {}, {}
    for slot, group in slots.items():
        entry = measured.get(slot)
        if entry is not None and not entry["choice"]["modes"]:  # timed eager only: can these trainings reach it?
            bounds = [_steps_at_most(ctx.profile, j) for j in group]
            if None not in bounds and not worth_timing_compile(sum(bounds), entry["choice"]["eager_step_s"]):
                continue  # not even at most: eager, and no data loaded to count the steps exactly (a re-run)
        steps = {j.label: planned_steps(ctx.profile, j, sizes) for j in group}
        total = sum(steps.values())
        shorter = entry is not None and not entry["choice"]["modes"] and entry["choice"]["for_steps"] < total
        if entry is None or (shorter and not entry.get("source", "").startswith("pinned")):
            job = group[0]
            gpus = 1.0 if ctx.device.startswith("cuda") else 0.0
            entry = ctx.measure(measure_compile_entry, ctx.profile, job.dataset, job.role, job.params["execution"],
                                slot, total, num_gpus=gpus)
        measured[slot] = entry = {**entry, "decided": {}}  # the plan says why, per training length
        for job in group:
            chosen[job.label], why = compile_choice(entry["choice"], steps[job.label])
            entry["decided"][f"{steps[job.label]} steps"] = why

    labels = {j.label for j in todo}

    def compiled(job: Job) -> Job:
        if job.label not in labels:
            return job
        mode = {"auto": chosen.get(job.label, ""), "on": "default"}.get(setting[job.label], "")
        return replace(job, params={**job.params, "execution": {**job.params["execution"], "compile": mode}})

    return [compiled(j) for j in jobs]


def _steps_at_most(profile, job: Job) -> int | None:
    """At least planned_steps, counted without loading data: from the source's training images (a variant and the
    validation split only take images away; fewer images never mean more steps than this bound), None where the
    source cannot count them before loading."""
    from edgekd.data.describe import source_sizes

    sizes = source_sizes(profile.datasets[job.dataset])
    if sizes is None:
        return None
    cfg = train_config(profile, job.role)
    per_epoch = cfg.steps_per_epoch(sizes["train"])
    # steps_for(n) is per_epoch(n) x max(epochs, ceil(min_steps / per_epoch(n))): at most min_steps + per_epoch(n)
    # where min_steps rules, which need not grow with n, hence the bound rather than steps_for(train)
    return max(cfg.epochs * per_epoch, cfg.min_steps + per_epoch)


def _compile_setting(cfg) -> str:
    """A training's compile setting, "off" for a teacher that does not train (given weights, or an early-stopped
    one: the main teacher's weights after some epoch)."""
    return "off" if cfg.checkpoint or cfg.stop_epoch else cfg.compile
