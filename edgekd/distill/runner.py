"""Running one training or teacher-cache job: its data, model, teacher (live, an ensemble, or the cache), losses
and numerics, the training loop (edgekd.distill.train), and the run's record.

The stage (edgekd/distill/stage.py) calls `run_training` / `run_cache` once the driver found the job not current;
everything here reads the job's run directory and, read-only, its teacher's and cache's. A killed training
resumes from its last epoch when its key has not changed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from edgekd.config import DatasetConfig, Profile, TrainConfig, VariantConfig, method_losses
from edgekd.data.augment import ViewAugment
from edgekd.data.sampling import UNLABELED
from edgekd.data.splits import load_splits
from edgekd.data.types import DataSplits
from edgekd.data.variants import VariantData, apply_variant
from edgekd.distill.execution import Execution, cpu_threads, measure_candidates, resolve_device
from edgekd.distill.losses import ComposedLoss
from edgekd.distill.plan import (
    cache_dir,
    cache_needs,
    grid_choice,
    loss_method,
    snapshot_epochs,
    snapshot_path,
    teacher_dir,
    train_config,
    training_losses,
    trains_on_labeled_only,
)
from edgekd.distill.teacher import (
    CACHE_STEM,
    EnsembleTeacher,
    LiveTeacher,
    Normalize,
    TeacherCache,
    build_cache,
)
from edgekd.distill.train import evaluate, train
from edgekd.errors import EdgeKDError
from edgekd.models import count_parameters, create_model, load_weights
from edgekd.models.pruning import PRUNED, prune_channels
from edgekd.pipeline.events import Reporter
from edgekd.pipeline.graph import Context, Job
from edgekd.records import fingerprint
from edgekd.roles import BASE_VARIANT, TEACHER, Role, grid_role, teacher_role
from edgekd.runio import (
    CHECKPOINTS,
    METRICS,
    PREDICTIONS,
    RUN_PROFILE,
    TRAIN_LOG,
    WEIGHTS,
    UnreadableFile,
    load_tensors,
    read_json,
    run_dir,
    save_tensors,
    write_json,
)

logger = logging.getLogger("edgekd.distill")


@functools.lru_cache(maxsize=4)
def _cached_data(name: str, cfg_json: str, variant: str, variant_json: str) -> VariantData:
    splits = load_splits(name, DatasetConfig(**json.loads(cfg_json)))
    return apply_variant(splits, VariantConfig(**json.loads(variant_json)), f"variants.{variant}")


def dataset_splits(profile: Profile, name: str, variant: str = BASE_VARIANT) -> VariantData:
    """A dataset's splits with one of the profile's variants applied (`base`: unchanged unless redefined)."""
    v = profile.variants.get(variant, VariantConfig())
    return _cached_data(name, json.dumps(asdict(profile.datasets[name]), sort_keys=True), variant,
                        json.dumps(asdict(v), sort_keys=True))


def augment_for(cfg: DatasetConfig) -> ViewAugment:
    return ViewAugment(cfg.crop_padding, cfg.hflip)


def build_model(cfg: TrainConfig, data: DataSplits):
    return create_model(cfg.model, data.num_classes, data.channels, cfg.small_input, cfg.pretrained)


def job_execution(cfg: TrainConfig, data: DataSplits, job: Job, device: str) -> Execution:
    """The job's precision and layout: a resumed run keeps its own, else the plan's choice; a job run outside
    a plan measures (and writes nothing shared)."""
    saved = job.run_dir / CHECKPOINTS[0]
    try:
        execution = read_json(saved).get("execution") if saved.is_file() else None
    except (UnreadableFile, AttributeError):  # measured again; a damaged checkpoint is not resumed either
        execution = None
    if execution:
        return Execution(**execution)
    if job.params.get("execution") is not None:
        return Execution(**job.params["execution"])
    shape = (cfg.batch_size, data.channels, data.image_size, data.image_size)
    return measure_candidates(lambda: build_model(cfg, data), cfg, device, shape, data.num_classes)[0]


def trained_teacher(profile: Profile, root: Path, job: Job, data: DataSplits, stages: set[int] | None = None,
                    name: str = "") -> tuple[LiveTeacher, Path]:
    """A trained teacher of the job's dataset variant ("" = the main one), as a ready LiveTeacher, and its run
    dir; it runs in the numerics it trained with."""
    tdir = teacher_dir(profile, root, job, name)
    weights = tdir / WEIGHTS
    if not weights.is_file():
        raise EdgeKDError(f"{job.label}: teacher not trained yet ({weights} missing): run the teacher job first")
    cfg = train_config(profile, teacher_role(name))  # an early-stopped teacher is built as [teacher]
    model = load_weights(build_model(cfg, data), weights)
    try:
        execution = Execution(**read_json(tdir / METRICS)["execution"])
    except (UnreadableFile, KeyError, TypeError):
        teacher_job = Job(job.dataset, job.variant, str(Role("teacher", name)), 0, tdir)
        execution = job_execution(cfg, data, teacher_job, resolve_device(profile.study.device))
    return LiveTeacher(model, execution, stages), tdir


class _RunLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")  # noqa: SIM115 - closed in finish

    def __call__(self, line: str) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def identity(job: Job, model: str) -> dict:
    """A record's identity fields: dataset, variant, role (teacher, teacher_cache, scratch or kd), method, seed,
    family, model."""
    role = Role.parse(job.role)
    method = role.base if role.is_method else ""
    return {"dataset": job.dataset, "variant": job.variant, "role": "kd" if role.is_method else role.base,
            "method": method, "seed": job.seed, "family": role.family, "model": model}


class _Run:
    """One training or cache job being run: the profile, study root, device and reporter it runs with."""

    def __init__(self, ctx: Context, job: Job):
        self.profile, self.root, self.force, self.job = ctx.profile, ctx.root, ctx.force, job
        self.reporter = ctx.reporter or Reporter()
        self.device = resolve_device(self.profile.study.device)

    # -- teachers and the cache ------------------------------------------------------------------------------------
    def ensemble(self, data: DataSplits, spec: dict, criterion: ComposedLoss) -> EnsembleTeacher:
        names = ["" if n == "main" else n for n in spec["teachers"]]
        members = [trained_teacher(self.profile, self.root, self.job, data, None, n)[0] for n in names]
        if spec.get("combine", "mean") == "val_weighted":
            weights = [read_json(teacher_dir(self.profile, self.root, self.job, n) / METRICS)["val_acc"]
                       for n in names]
        else:
            weights = [1.0] * len(names)
        temperature = next((t.temperature for t in criterion.terms.values() if hasattr(t, "temperature")), 1.0)
        return EnsembleTeacher(members, weights, temperature)

    def storage_key(self, key: dict, data: DataSplits) -> dict:
        """What a cache's stored values are checked against: its job key, with the two sizes its loader reads."""
        return {**key, "num_classes": data.num_classes, "topk": self.profile.study.cache_topk}

    def load_cache(self, data: DataSplits, teacher: LiveTeacher) -> TeacherCache:
        """The variant's finished teacher cache, read-only: views no plan foresaw are computed in memory."""
        job = self.job
        where = cache_dir(self.profile, self.root, job)
        try:
            key = read_json(where / METRICS)["key"]
        except (UnreadableFile, KeyError, TypeError):
            raise EdgeKDError(f"{job.label}: its teacher cache ({where}) is not built: run the cache job first") from None
        loaded = TeacherCache.load(where / CACHE_STEM, self.storage_key(key, data), self.device)
        if loaded is None:
            raise EdgeKDError(f"{job.label}: the teacher cache in {where} was made for another teacher or data: run "
                              "the cache job again")
        cache, _ = loaded
        cache.live = teacher
        return cache

    # -- making room -----------------------------------------------------------------------------------------------
    def clear(self, key: dict) -> None:
        """Make room for a run: --force starts from nothing; otherwise the stale record goes, and a checkpoint is
        kept only when it was made for the same key (then training resumes from it)."""
        job = self.job
        if self.force:
            if job.run_dir.exists():
                shutil.rmtree(job.run_dir)
            return
        (job.run_dir / METRICS).unlink(missing_ok=True)
        if job.kind != "train":
            return
        try:
            made_for = read_json(job.run_dir / RUN_PROFILE).get("fingerprint")
        except (UnreadableFile, AttributeError):
            made_for = None
        if made_for != fingerprint(key):
            for name in CHECKPOINTS:
                (job.run_dir / name).unlink(missing_ok=True)

    def grid(self, role: Role) -> dict:
        """A tuned method's run records its grid and the choice; a candidate run, which one it is."""
        from edgekd.config import method_grid

        if role.grid:
            return {"grid": {"candidate": role.grid[1]}}
        if role.ce_only or len(method_grid(self.profile.methods[loss_method(self.profile, role.base)])) < 2:
            return {}
        return {"grid": grid_choice(self.profile, self.root, self.job.dataset, self.job.variant, role.family,
                                    loss_method(self.profile, role.base))}

    def reuse_chosen_candidate(self, key: dict) -> dict | None:
        """A tuned method's first seed trains exactly as its chosen grid candidate did (the same losses, seed, data,
        teacher and numerics: the same key), so that run is copied, not trained again. None where there is none."""
        from edgekd.config import method_grid

        job, role = self.job, Role.parse(self.job.role)
        if role.ce_only or role.grid or job.seed != self.profile.study.seeds[0]:
            return None
        method = loss_method(self.profile, role.base)
        if len(method_grid(self.profile.methods[method])) < 2:
            return None
        chosen = grid_choice(self.profile, self.root, job.dataset, job.variant, role.family, method)["chosen"]
        source = run_dir(self.root, job.dataset, job.variant, grid_role(method, chosen) + role.suffix, job.seed)
        try:
            record = read_json(source / METRICS)
        except UnreadableFile:
            return None
        if record.get("fingerprint") != fingerprint(key):
            return None
        job.run_dir.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.name not in (METRICS, RUN_PROFILE) and path.name not in CHECKPOINTS:
                shutil.copyfile(path, job.run_dir / path.name)
        profile = read_json(source / RUN_PROFILE)
        write_json(job.run_dir / RUN_PROFILE, {**profile, "job": job_data(job)})
        metrics = {**record, **identity(job, record["model"]), **self.grid(role),
                   "wall_s": 0.0, "copied_from": str(source)}  # its time was spent, and counted, by the candidate
        write_json(job.run_dir / METRICS, metrics)
        return metrics


def job_data(job: Job) -> dict:
    """A job as JSON data (its run profile's `job`), from which `job_from_data` rebuilds it."""
    return {**asdict(job), "run_dir": str(job.run_dir)}


def job_from_data(data: dict, run: Path) -> Job:
    """The job a run profile's `job` describes, in `run` (what a plan gave it, its precision and layout say,
    travels with it; JSON made its tuples lists). TypeError when the data describes no job."""
    fields = {f.name for f in dataclasses.fields(Job)} - {"run_dir"}
    return Job(**{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in data.items()
                  if k in fields}, run_dir=Path(run))


def run_cache(ctx: Context, job: Job, key: dict) -> dict:
    """Build (or extend) a variant's cache of its teacher's outputs for every view the planned students draw."""
    run = _Run(ctx, job)
    run.clear(key)
    data = dataset_splits(run.profile, job.dataset, job.variant).splits
    start = time.perf_counter()
    teacher, _ = trained_teacher(run.profile, run.root, job, data)
    images = data.train.images.to(run.device)
    study = run.profile.study

    def progress(done, total):
        if done <= study.eval_batch_size:
            run.reporter.start(job, total)
        run.reporter.advance(job, done, None, None)

    needs = cache_needs(run.profile, len(data.train))
    with cpu_threads(job.params.get("threads", 0)):  # the plan's, as a student's: they change the logits kept
        _, info = build_cache(job.run_dir / CACHE_STEM, run.storage_key(key, data), teacher, images,
                              augment_for(run.profile.datasets[job.dataset]),
                              Normalize(data.mean, data.std, run.device), needs["seeds"], needs["epochs"],
                              study.eval_batch_size, progress)
    info = {k: v for k, v in info.items() if k != "key"}
    metrics = {**identity(job, ""), "wall_s": round(time.perf_counter() - start, 2), **info,
               "samples": len(data.train), "coverage": needs, "schema_version": key["schema_version"],
               "key": key, "fingerprint": fingerprint(key)}
    write_json(job.run_dir / METRICS, metrics)
    return metrics


def run_training(ctx: Context, job: Job, key: dict) -> dict:
    """Train a teacher, scratch or KD student run (or copy its chosen grid candidate's) and write its record."""
    run = _Run(ctx, job)
    run.clear(key)
    reused = run.reuse_chosen_candidate(key)
    if reused is not None:
        return reused
    variant = dataset_splits(run.profile, job.dataset, job.variant)
    ex = job_execution(train_config(run.profile, job.role), variant.splits, job, run.device)
    log = _RunLog(job.run_dir / TRAIN_LOG)
    try:
        with ex.cpu_threads():  # its own threads, whichever executor runs it: they change the numbers
            return _train_job(run, variant, ex, log, time.perf_counter(), key)
    finally:
        log.close()


def _prune(run: _Run, model, data: DataSplits, role: Role, log) -> dict:
    """Load the trained student a pruned run starts from and remove its share of channels; what the record keeps."""
    job = run.job
    source, share = role.pruned
    source_dir = run_dir(run.root, job.dataset, job.variant, str(role.with_base(source)), job.seed)
    load_weights(model, source_dir / WEIGHTS)
    before = count_parameters(model)
    prune_channels(model, torch.zeros(1, data.channels, data.image_size, data.image_size), share)
    log(f"{job.label}: pruned {share:.0%} of the channels of {source_dir}: {before:,} -> "
        f"{count_parameters(model):,} parameters")
    return {"source": str(source_dir), "share": share, "params_before": before}


def _teacher_source(run: _Run, model, data: DataSplits, spec: dict, criterion: ComposedLoss):
    """What a training learns from besides its labels (None, a live teacher, an ensemble, or the cache), and the
    main teacher's test logits for the agreement metric."""
    job, profile = run.job, run.profile
    tdir = teacher_dir(profile, run.root, job)
    if criterion.needs_teacher and spec.get("teachers", ["main"]) != ["main"]:
        if criterion.needs_features:
            raise EdgeKDError(f"methods.{Role.parse(job.role).base}: feature losses learn from one teacher; drop "
                              "'teachers' or the feature terms")
        return run.ensemble(data, spec, criterion), load_tensors(tdir / PREDICTIONS)["test_logits"]
    if criterion.needs_teacher:
        teacher, tdir = trained_teacher(profile, run.root, job, data, criterion.stages()[1])
        criterion.bind(model, teacher.model)
        logits = load_tensors(tdir / PREDICTIONS)["test_logits"]
        # The cache holds logits; feature terms need the teacher's activations of this very batch.
        if profile.study.teacher_cache and not criterion.needs_features:
            return run.load_cache(data, teacher), logits
        return teacher, logits
    if not Role.parse(job.role).is_teacher and (tdir / PREDICTIONS).is_file():
        return None, load_tensors(tdir / PREDICTIONS)["test_logits"]
    return None, None


def _labeled_only(run: _Run, data: DataSplits, cfg: TrainConfig, log) -> tuple[DataSplits, TrainConfig, dict]:
    """A cross-entropy-only training on a `labels` variant: the labeled images, for the steps of every image."""
    every = len(data.train)
    data = replace(data, train=data.train.subset((data.train.labels != UNLABELED).nonzero().flatten()))
    cfg = replace(cfg, min_steps=max(cfg.min_steps, cfg.steps_for(every)))
    log(f"{run.job.label}: cross-entropy only: the {len(data.train):,} labeled of {every:,} training images, "
        f"{cfg.epochs_for(len(data.train))} epochs ({cfg.min_steps:,} steps, as many as every image's)")
    return data, cfg, {"images": len(data.train), "min_steps": cfg.min_steps}


def _train_job(run: _Run, variant: VariantData, ex: Execution, log: _RunLog, start: float, key: dict) -> dict:
    job, profile = run.job, run.profile
    data = variant.splits
    role = Role.parse(job.role)
    cfg = train_config(profile, job.role)
    write_json(job.run_dir / RUN_PROFILE, {"job": job_data(job), "train": asdict(cfg), "data": data.describe(),
                                           "variant": variant.stats, "profile": profile.to_dict(),
                                           "key": key, "fingerprint": fingerprint(key)})
    torch.manual_seed(job.seed)  # the same initial weights for the scratch and KD students of one seed
    model = build_model(cfg, data)
    pruned = _prune(run, model, data, role, log) if role.pruned else None
    log(f"{job.label}: {cfg.model}, {count_parameters(model):,} parameters, {ex}")
    teacher_logits, teacher_source, history, labeled_only = None, None, {}, None
    losses = training_losses(profile, run.root, job)
    stopped = None  # an early-stopped teacher: the main teacher's weights after epoch stop_epoch
    if role.is_teacher and cfg.stop_epoch:
        stopped = snapshot_path(teacher_dir(profile, run.root, job), cfg.stop_epoch)
    if role.is_teacher and (cfg.checkpoint or stopped):
        load_weights(model, stopped or cfg.checkpoint)
        ex.prepare(model)
        history = {"epoch": cfg.stop_epoch, "best_epoch": cfg.stop_epoch, "history": [], "train_s": 0.0, "images": 0}
        log(f"teacher weights from {stopped or cfg.checkpoint}, not trained")
    else:
        criterion = ComposedLoss(method_losses(losses), f"methods.{loss_method(profile, role.base)}",
                                 cfg.label_smoothing, data.multilabel).to(run.device)
        teacher_source, teacher_logits = _teacher_source(run, model, data, losses, criterion)
        if trains_on_labeled_only(profile, job):
            data, cfg, labeled_only = _labeled_only(run, data, cfg, log)
        run.reporter.start(job, cfg.steps_for(len(data.train)))

        def on_step(r):
            run.reporter.advance(job, r.epoch * r.steps + r.step, r.loss, r.images_per_s,
                                 f"epoch {r.epoch + 1}/{r.epochs}")

        history = train(model, data, cfg, criterion, ex, augment_for(profile.datasets[job.dataset]), seed=job.seed,
                        run_dir=job.run_dir, teacher=teacher_source, eval_batch_size=profile.study.eval_batch_size,
                        on_step=on_step, log=log, snapshots=snapshot_epochs(profile) if job.role == TEACHER else ())
    metrics, test_logits = evaluate(model, data, ex, profile.study.eval_batch_size, teacher_logits,
                                    variant.extra_tests, variant.stats)
    save_tensors(job.run_dir / WEIGHTS, model.state_dict(),
                 {"model": cfg.model, "num_classes": str(data.num_classes), "in_chans": str(data.channels),
                  "small_input": str(cfg.small_input), **({PRUNED: str(pruned["share"])} if pruned else {})})
    save_tensors(job.run_dir / PREDICTIONS, {"test_logits": test_logits})
    images = history["images"]
    metrics = {
        **identity(job, cfg.model), **metrics, "params": count_parameters(model),
        "epochs": history["epoch"], "best_epoch": history["best_epoch"],
        "wall_s": round(time.perf_counter() - start + history.get("prior_s", 0.0), 2),
        "train_s": round(history["train_s"], 2),
        "images_per_s": round(images / history["train_s"], 1) if history["train_s"] else None,
        "execution": {**asdict(ex), "compile": history.get("compile", "")}, "threads": torch.get_num_threads(),
        "teacher_cache": isinstance(teacher_source, TeacherCache), "losses": losses,
        "teachers": [] if role.is_teacher else
        profile.methods.get(loss_method(profile, role.base), {}).get("teachers", ["main"]),
        **run.grid(role),
        **({"pruned": pruned} if pruned else {}),
        **({"labeled_only": labeled_only} if labeled_only else {}),
        "history": history["history"], "data": variant.splits.describe(), "variant_stats": variant.stats,
        "schema_version": key["schema_version"], "key": key, "fingerprint": fingerprint(key),
    }
    write_json(job.run_dir / METRICS, metrics)
    (job.run_dir / CHECKPOINTS[1]).unlink(missing_ok=True)  # the best weights are saved above
    return metrics

