"""`edgekd distill`: the training half of a study's job graph (teachers, teacher caches, scratch and KD students
over seeds), and `StudyRunner`, which runs one of those jobs.

The graph, the keys that decide what is current, and the driver live in `edgekd.jobs`; the executors (in-process,
processes, Ray) in `edgekd.executors`. Each job reads and writes only its own run directory (plus its teacher's
and cache's, read-only); a finished job is skipped while its key matches, a killed one resumes from its last
epoch when its key has not changed.
"""

from __future__ import annotations

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
from edgekd.distill.execution import Execution, measure_candidates, resolve_device
from edgekd.distill.losses import ComposedLoss
from edgekd.distill.teacher import EnsembleTeacher, LiveTeacher, Normalize, TeacherCache, build_cache
from edgekd.distill.train import evaluate, train
from edgekd.errors import EdgeKDError
from edgekd.jobs import (  # noqa: F401 - the graph's names, also edgekd.distill.study.<name>
    BASE_VARIANT,
    CACHE,
    RUN_OUTPUTS,
    SCRATCH,
    TEACHER,
    Job,
    JobsFailed,
    NotReady,
    cache_dir,
    cache_needs,
    grid_candidate,
    grid_choice,
    job_key,
    job_status,
    loss_method,
    method_spec,
    plan_jobs,
    previous_execution,
    pruned_source,
    teacher_dir,
    teacher_variant,
    train_config,
    trains_on_labeled_only,
    uses_cache,
)
from edgekd.models import count_parameters, create_model, load_weights
from edgekd.models.pruning import PRUNED, prune_channels
from edgekd.records import collect, fingerprint, select_current  # noqa: F401 - collect: also edgekd.distill.study.collect
from edgekd.runio import (
    UnreadableFile,
    load_tensors,
    read_json,
    run_dir,
    save_tensors,
    write_json,
)

logger = logging.getLogger("edgekd.study")


class Reporter:
    """What a running study tells its caller; the CLI's subclass draws the jobs view and progress bars."""

    def queued(self, jobs: list[Job]) -> None: ...  # the jobs that will run (the others were current)
    def rerun(self, job: Job, reason: str) -> None: ...  # a finished job runs again, and why
    def running(self, job: Job) -> None: ...
    def start(self, job: Job, total_steps: int) -> None: ...
    def advance(self, job: Job, completed: int, loss: float | None, images_per_s: float | None,
                epoch: str = "") -> None: ...
    def finish(self, job: Job, metrics: dict, skipped: bool) -> None: ...
    def failed(self, job: Job, message: str) -> None: ...
    def left_out(self, lines: list[str]) -> None: ...  # records on disk that are not current for this profile


def plan(profile: Profile, study_root: Path) -> list[Job]:
    """The training jobs in an order that respects their dependencies: teachers, then teacher caches, then
    students (`edgekd.jobs.plan_jobs` adds bundles and benches)."""
    return plan_jobs(profile, study_root)


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


class _RunLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")  # noqa: SIM115 - closed in finish

    def __call__(self, line: str) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class StudyRunner:
    def __init__(self, profile: Profile, study_root: Path, reporter: Reporter | None = None, force: bool = False):
        self.profile = profile
        self.root = study_root
        self.reporter = reporter or Reporter()
        self.force = force
        self.device = resolve_device(profile.study.device)
        self.last_skipped = False  # whether the last run_job found its job current
        if profile.study.threads:
            torch.set_num_threads(profile.study.threads)

    # -- pieces ----------------------------------------------------------------------------------------
    def _model(self, cfg: TrainConfig, data: DataSplits):
        return create_model(cfg.model, data.num_classes, data.channels, cfg.small_input, cfg.pretrained)

    def _execution(self, cfg: TrainConfig, data: DataSplits, job: Job) -> Execution:
        """The job's precision and layout: a resumed run keeps its own, else the plan's choice; a job run outside
        a plan measures (and writes nothing shared)."""
        saved = job.run_dir / "checkpoint.json"
        try:
            execution = read_json(saved).get("execution") if saved.is_file() else None
        except (UnreadableFile, AttributeError):  # measured again; a damaged checkpoint is not resumed either
            execution = None
        if execution:
            return Execution(**execution)
        if job.execution is not None:
            return Execution(*job.execution)
        shape = (cfg.batch_size, data.channels, data.image_size, data.image_size)
        return measure_candidates(lambda: self._model(cfg, data), cfg, self.device, shape, data.num_classes)[0]

    def _with_execution(self, job: Job) -> Job:
        """A training job from outside a plan (a torchrun worker, a direct call) gets the study's recorded choice
        for its model, or one measured here."""
        from edgekd.jobs import choose_executions

        table = previous_execution(self.root)
        return choose_executions(self.profile, [job], self.device, table, lambda fn, *args: fn(*args))[0]

    def _teacher(self, job: Job, data: DataSplits, stages: set[int] | None = None, name: str = ""):
        """A trained teacher of this dataset variant ("" = the main one), as a ready LiveTeacher, and its run dir."""
        tdir = self._teacher_dir(job, name)
        weights = tdir / "model.safetensors"
        if not weights.is_file():
            raise EdgeKDError(f"{job.label}: teacher not trained yet ({weights} missing): run the teacher job first")
        cfg = self.profile.teachers[name] if name else self.profile.teacher
        model = load_weights(self._model(cfg, data), weights)
        try:
            execution = Execution(**read_json(tdir / "metrics.json")["execution"])  # the numerics it trained with
        except (UnreadableFile, KeyError, TypeError):
            execution = self._execution(cfg, data, Job(job.dataset, job.variant, TEACHER, 0, tdir))
        return LiveTeacher(model, execution, stages), tdir

    def _teacher_dir(self, job: Job, name: str = "") -> Path:
        return teacher_dir(self.profile, self.root, job, name)

    def _ensemble(self, job: Job, data: DataSplits, spec: dict, criterion: ComposedLoss) -> EnsembleTeacher:
        names = ["" if n == "main" else n for n in spec["teachers"]]
        members = [self._teacher(job, data, None, n)[0] for n in names]
        if spec.get("combine", "mean") == "val_weighted":
            weights = [read_json(self._teacher_dir(job, n) / "metrics.json")["val_acc"] for n in names]
        else:
            weights = [1.0] * len(names)
        temperature = next((t.temperature for t in criterion.terms.values() if hasattr(t, "temperature")),
                           1.0)
        return EnsembleTeacher(members, weights, temperature)

    def _storage_key(self, key: dict, data: DataSplits) -> dict:
        """What a cache's stored values are checked against: its job key, with the two sizes its loader reads."""
        return {**key, "num_classes": data.num_classes, "topk": self.profile.study.cache_topk}

    def _build_cache(self, job: Job, data: DataSplits, teacher: LiveTeacher, key: dict):
        """The variant's cache of its teacher's outputs, extended to every view the planned students draw."""
        cfg = self.profile.datasets[job.dataset]
        images = data.train.images.to(self.device)

        def progress(done, total):
            if done <= self.profile.study.eval_batch_size:
                self.reporter.start(job, total)
            self.reporter.advance(job, done, None, None)

        needs = cache_needs(self.profile, len(data.train))
        cache, info = build_cache(job.run_dir / "teacher_cache", self._storage_key(key, data), teacher, images,
                                  augment_for(cfg), Normalize(data.mean, data.std, self.device), needs["seeds"],
                                  needs["epochs"], self.profile.study.eval_batch_size, progress)
        return cache, info, needs

    def _load_cache(self, job: Job, data: DataSplits, teacher: LiveTeacher) -> TeacherCache:
        """The variant's finished teacher cache, read-only: views no plan foresaw are computed in memory."""
        where = cache_dir(self.profile, self.root, job)
        try:
            key = read_json(where / "metrics.json")["key"]
        except (UnreadableFile, KeyError, TypeError):
            raise EdgeKDError(f"{job.label}: its teacher cache ({where}) is not built: run the cache job first") from None
        loaded = TeacherCache.load(where / "teacher_cache", self._storage_key(key, data), self.device)
        if loaded is None:
            raise EdgeKDError(f"{job.label}: the teacher cache in {where} was made for another teacher or data: run "
                              "the cache job again")
        cache, _ = loaded
        cache.live = teacher
        return cache

    def _ensure_cache(self, job: Job) -> None:
        """Outside a job graph (one job run alone), a KD student whose cache is missing or stale builds it first;
        a graph runs the cache job before its students, so this does nothing there."""
        base = job.role.partition("@")[0]
        if job.kind != "train" or base in (TEACHER, SCRATCH) or not self.profile.study.teacher_cache \
                or not uses_cache(self.profile, base):
            return
        cache_job = Job(job.dataset, job.variant, CACHE, self.profile.study.teacher_seed,
                        cache_dir(self.profile, self.root, job))
        if not job_status(self.profile, self.root, cache_job).current:
            StudyRunner(self.profile, self.root, Reporter()).run_job(cache_job)

    def _clear(self, job: Job, key: dict) -> None:
        """Make room for a run: --force starts from nothing; otherwise the stale record goes, and a checkpoint is
        kept only when it was made for the same key (then training resumes from it)."""
        if self.force:
            if job.run_dir.exists():
                shutil.rmtree(job.run_dir)
            return
        (job.run_dir / "metrics.json").unlink(missing_ok=True)
        if job.kind != "train":
            return
        try:
            made_for = read_json(job.run_dir / "profile.json").get("fingerprint")
        except (UnreadableFile, AttributeError):
            made_for = None
        if made_for != fingerprint(key):
            for name in ("checkpoint.json", "checkpoint.safetensors"):
                (job.run_dir / name).unlink(missing_ok=True)

    # -- jobs ------------------------------------------------------------------------------------------
    def run_job(self, job: Job) -> dict:
        """Run one training or cache job, or find it current (then `last_skipped` is True); returns its record."""
        self.last_skipped = False
        if job.kind == "train" and job.execution is None:
            job = self._with_execution(job)
        self._ensure_cache(job)
        status = job_status(self.profile, self.root, job, self.force)
        if status.current:
            self.last_skipped = True
            self.reporter.finish(job, status.record, skipped=True)
            return status.record
        if status.had_record and not self.force:
            logger.info("%s: runs again: %s", job.label, status.reason)
        try:
            key = status.key or job_key(self.profile, self.root, job)
        except NotReady as exc:
            raise EdgeKDError(f"{job.label}: {exc}: run the jobs it needs first") from None
        self._clear(job, key)
        if job.kind == "train":
            reused = self._reuse_chosen_candidate(job, key)
            if reused is not None:
                self.reporter.finish(job, reused, skipped=False)
                return reused
        metrics_path = job.run_dir / "metrics.json"
        variant = dataset_splits(self.profile, job.dataset, job.variant)
        data = variant.splits
        start = time.perf_counter()
        if job.kind == "cache":
            teacher, _ = self._teacher(job, data)
            _, info, needs = self._build_cache(job, data, teacher, key)
            info = {k: v for k, v in info.items() if k != "key"}
            metrics = {**self._identity(job, ""), "wall_s": round(time.perf_counter() - start, 2), **info,
                       "samples": len(data.train), "coverage": needs, "schema_version": key["schema_version"],
                       "key": key, "fingerprint": fingerprint(key)}
            write_json(metrics_path, metrics)
            self.reporter.finish(job, metrics, skipped=False)
            return metrics
        log = _RunLog(job.run_dir / "train.log")
        try:
            metrics = self._train_job(job, variant, log, start, key)
        finally:
            log.close()
        self.reporter.finish(job, metrics, skipped=False)
        return metrics

    def _identity(self, job: Job, model: str) -> dict:
        base, _, family = job.role.partition("@")
        method = "" if base in (TEACHER, SCRATCH, CACHE) else base
        role = base if base in (TEACHER, SCRATCH, CACHE) else "kd"
        return {"dataset": job.dataset, "variant": job.variant, "role": role, "method": method, "seed": job.seed,
                "family": family, "model": model}

    def _grid(self, job: Job, base: str, family: str) -> dict:
        """A tuned method's run records its grid and the choice; a candidate run, which one it is."""
        from edgekd.config import method_grid

        candidate = grid_candidate(base)
        if candidate:
            return {"grid": {"candidate": candidate[1]}}
        if base in (TEACHER, SCRATCH) or len(method_grid(self.profile.methods[loss_method(self.profile, base)])) < 2:
            return {}
        return {"grid": grid_choice(self.profile, self.root, job.dataset, job.variant, family,
                                    loss_method(self.profile, base))}

    def _reuse_chosen_candidate(self, job: Job, key: dict) -> dict | None:
        """A tuned method's first seed trains exactly as its chosen grid candidate did (the same losses, seed, data,
        teacher and numerics: the same key), so that run is copied, not trained again. None where there is none."""
        from edgekd.config import GRID_TAG, method_grid

        base, _, family = job.role.partition("@")
        if base in (TEACHER, SCRATCH) or grid_candidate(base) or job.seed != self.profile.study.seeds[0]:
            return None
        method = loss_method(self.profile, base)
        if len(method_grid(self.profile.methods[method])) < 2:
            return None
        chosen = grid_choice(self.profile, self.root, job.dataset, job.variant, family, method)["chosen"]
        source = run_dir(self.root, job.dataset, job.variant, f"{method}{GRID_TAG}{chosen}" + (f"@{family}" if family
                                                                                                  else ""), job.seed)
        try:
            record = read_json(source / "metrics.json")
        except UnreadableFile:
            return None
        if record.get("fingerprint") != fingerprint(key):
            return None
        job.run_dir.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.name not in ("metrics.json", "profile.json") \
                    and not path.name.startswith("checkpoint"):
                shutil.copyfile(path, job.run_dir / path.name)
        profile = read_json(source / "profile.json")
        write_json(job.run_dir / "profile.json", {**profile, "job": {**asdict(job), "run_dir": str(job.run_dir)}})
        metrics = {**record, **self._identity(job, record["model"]), **self._grid(job, base, family),
                   "wall_s": 0.0, "copied_from": str(source)}  # its time was spent, and counted, by the candidate
        write_json(job.run_dir / "metrics.json", metrics)
        return metrics

    def _train_job(self, job: Job, variant: VariantData, log: _RunLog, start: float, key: dict) -> dict:
        data = variant.splits
        base, _, family = job.role.partition("@")
        is_teacher = base == TEACHER
        cfg = train_config(self.profile, job.role)
        write_json(job.run_dir / "profile.json", {"job": {**asdict(job), "run_dir": str(job.run_dir)},
                                                  "train": asdict(cfg),
                                                  "data": data.describe(), "variant": variant.stats,
                                                  "profile": self.profile.to_dict(),
                                                  "key": key, "fingerprint": fingerprint(key)})
        torch.manual_seed(job.seed)  # the same initial weights for the scratch and KD students of one seed
        model = self._model(cfg, data)
        pruned = pruned_source(base)
        if pruned:  # the trained student it starts from, its channels pruned before the fine-tune
            source_dir = run_dir(self.root, job.dataset, job.variant, pruned[0] + (f"@{family}" if family else ""),
                                 job.seed)
            load_weights(model, source_dir / "model.safetensors")
            before = count_parameters(model)
            example = torch.zeros(1, data.channels, data.image_size, data.image_size)
            prune_channels(model, example, pruned[1])
            log(f"{job.label}: pruned {pruned[1]:.0%} of the channels of {source_dir}: {before:,} -> "
                f"{count_parameters(model):,} parameters")
        ex = self._execution(cfg, data, job)
        log(f"{job.label}: {cfg.model}, {count_parameters(model):,} parameters, {ex}")
        teacher_logits, teacher_source, history, labeled_only = None, None, {}, None
        if is_teacher and cfg.checkpoint:
            load_weights(model, cfg.checkpoint)
            ex.prepare(model)
            history = {"epoch": 0, "best_epoch": 0, "history": [], "train_s": 0.0, "images": 0}
            log(f"teacher weights from {cfg.checkpoint}, not trained")
        else:
            method = loss_method(self.profile, base)
            spec = {"ce": {"weight": 1.0}} if base in (TEACHER, SCRATCH) else method_spec(self.profile, self.root, job)
            criterion = ComposedLoss(method_losses(spec), f"methods.{method}", cfg.label_smoothing).to(self.device)
            if criterion.needs_teacher and spec.get("teachers", ["main"]) != ["main"]:
                if criterion.needs_features:
                    raise EdgeKDError(f"methods.{base}: feature losses learn from one teacher; drop 'teachers' "
                                      "or the feature terms")
                teacher_source = self._ensemble(job, data, spec, criterion)
                teacher_logits = load_tensors(self._teacher_dir(job) / "predictions.safetensors")["test_logits"]
            elif criterion.needs_teacher:
                teacher_source, tdir = self._teacher(job, data, criterion.stages()[1])
                criterion.bind(model, teacher_source.model)
                teacher_logits = load_tensors(tdir / "predictions.safetensors")["test_logits"]
                # The cache holds logits; feature terms need the teacher's activations of this very batch.
                if self.profile.study.teacher_cache and not criterion.needs_features:
                    teacher_source = self._load_cache(job, data, teacher_source)
            elif not is_teacher:
                tdir = self._teacher_dir(job)
                if (tdir / "predictions.safetensors").is_file():
                    teacher_logits = load_tensors(tdir / "predictions.safetensors")["test_logits"]
            if trains_on_labeled_only(self.profile, job):
                every = len(data.train)
                data = replace(data, train=data.train.subset((data.train.labels != UNLABELED).nonzero().flatten()))
                cfg = replace(cfg, min_steps=max(cfg.min_steps, cfg.epochs_for(every) * max(1, every // cfg.batch_size)))
                log(f"{job.label}: cross-entropy only: the {len(data.train):,} labeled of {every:,} training images, "
                    f"{cfg.epochs_for(len(data.train))} epochs ({cfg.min_steps:,} steps, as many as every image's)")
                labeled_only = {"images": len(data.train), "min_steps": cfg.min_steps}
            augment = augment_for(self.profile.datasets[job.dataset])
            steps = max(1, len(data.train) // cfg.batch_size)
            self.reporter.start(job, steps * cfg.epochs_for(len(data.train)))

            def on_step(r):
                self.reporter.advance(job, r.epoch * r.steps + r.step, r.loss, r.images_per_s,
                                      f"epoch {r.epoch + 1}/{r.epochs}")

            history = train(model, data, cfg, criterion, ex, augment, job.seed, job.run_dir, teacher_source,
                            self.profile.study.eval_batch_size, on_step, log)
        metrics, test_logits = evaluate(model, data, ex, self.profile.study.eval_batch_size, teacher_logits,
                                        variant.extra_tests, variant.stats)
        save_tensors(job.run_dir / "model.safetensors", model.state_dict(),
                     {"model": cfg.model, "num_classes": str(data.num_classes), "in_chans": str(data.channels),
                      "small_input": str(cfg.small_input), **({PRUNED: str(pruned[1])} if pruned else {})})
        save_tensors(job.run_dir / "predictions.safetensors", {"test_logits": test_logits})
        images = history["images"]
        metrics = {
            **self._identity(job, cfg.model), **metrics, "params": count_parameters(model),
            "epochs": history["epoch"], "best_epoch": history["best_epoch"],
            "wall_s": round(time.perf_counter() - start + history.get("prior_s", 0.0), 2),
            "train_s": round(history["train_s"], 2),
            "images_per_s": round(images / history["train_s"], 1) if history["train_s"] else None,
            "execution": asdict(ex), "teacher_cache": isinstance(teacher_source, TeacherCache),
            "losses": ({"ce": {"weight": 1.0}} if base in (TEACHER, SCRATCH)
                       else method_spec(self.profile, self.root, job)),
            "teachers": self.profile.methods.get(loss_method(self.profile, base), {}).get("teachers", ["main"])
            if not is_teacher else [],
            **self._grid(job, base, family),
            **({"pruned": {"source": str(source_dir), "share": pruned[1], "params_before": before}} if pruned else {}),
            **({"labeled_only": labeled_only} if labeled_only else {}),
            "history": history["history"], "data": variant.splits.describe(), "variant_stats": variant.stats,
            "schema_version": key["schema_version"], "key": key, "fingerprint": fingerprint(key),
        }
        write_json(job.run_dir / "metrics.json", metrics)
        (job.run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # the best weights are saved above
        return metrics


def run_study(profile: Profile, out: Path, reporter: Reporter | None = None, force: bool = False, jobs: int = 1,
              executor: str | None = None, address: str | None = None, cpus_per_job: float | None = None
              ) -> list[dict]:
    """Train every job of the plan that is not current, on an executor: `local` (in this process, the default),
    `processes` (`jobs` processes, each starting a job as soon as the jobs it needs are done) or `ray`. Returns
    the current run records (also written to summary.json); records that are not current are left out and named
    to the reporter. Raises JobsFailed (with the records) when a job failed; the others finished."""
    from edgekd.executors import make_executor
    from edgekd.jobs import run_graph

    reporter = reporter or Reporter()
    root = Path(out).absolute() / profile.study.name
    with make_executor(executor, jobs, address, cpus_per_job) as ex:
        outcome = run_graph(profile, root, ex, reporter, force, deploy=False)
    selection = select_current(root)
    records = [r.as_dict() for r in selection.runs]
    write_json(root / "summary.json", records)
    if selection.left_out:
        reporter.left_out(selection.left_out)
    if outcome.failed:
        raise JobsFailed(outcome.failed, records)
    return records
