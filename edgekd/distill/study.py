"""`edgekd distill`: plan the runs of a profile (teacher, scratch and KD students over seeds) and run them.

Each job reads and writes only its own run directory (plus the teacher's, read-only), so the plan can be
handed to any executor; `run_study` is the simple in-process one. Finished runs are skipped, killed ones resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgekd.config import DatasetConfig, Profile, TrainConfig, VariantConfig, method_losses
from edgekd.data.augment import ViewAugment
from edgekd.data.splits import load_splits
from edgekd.data.types import DataSplits
from edgekd.data.variants import VariantData, apply_variant
from edgekd.distill.execution import Execution, choose_execution, resolve_device
from edgekd.distill.losses import ComposedLoss
from edgekd.distill.teacher import EnsembleTeacher, LiveTeacher, Normalize, TeacherCache, build_cache
from edgekd.distill.train import evaluate, train
from edgekd.errors import EdgeKDError
from edgekd.models import count_parameters, create_model, load_weights
from edgekd.records import collect  # the one reader of run records; also edgekd.distill.study.collect
from edgekd.runio import (
    UnreadableFile,
    load_tensors,
    read_json,
    run_dir,
    save_tensors,
    tensor_shapes,
    write_json,
)

TEACHER, SCRATCH, CACHE = "teacher", "scratch", "teacher_cache"
BASE_VARIANT = "base"
# What a finished run holds besides metrics.json: every training role (teacher, scratch, KD), and a teacher cache.
RUN_OUTPUTS = {"training": ("model.safetensors", "predictions.safetensors"),
               CACHE: ("teacher_cache.json", "teacher_cache.safetensors")}

logger = logging.getLogger("edgekd.study")


@dataclass(frozen=True)
class Job:
    dataset: str
    variant: str
    role: str  # teacher | teacher_cache | scratch | a method name
    seed: int
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.variant}/{self.role}/seed{self.seed}"


class Reporter:
    """What a running study tells its caller; the CLI's subclass draws progress bars."""

    def start(self, job: Job, total_steps: int) -> None: ...
    def advance(self, job: Job, completed: int, loss: float | None, images_per_s: float | None,
                epoch: str = "") -> None: ...
    def finish(self, job: Job, metrics: dict, skipped: bool) -> None: ...


def teacher_variant(profile: Profile, variant: str) -> str:
    """Where a variant's teacher lives: its own variant, or the clean data's (`base`)."""
    return variant if profile.study.teacher_regime == "variant" else BASE_VARIANT


def uses_cache(profile: Profile, method: str) -> bool:
    """The view-keyed cache serves methods that learn from the main teacher's logits only."""
    spec = profile.methods[method]
    criterion = ComposedLoss(method_losses(spec), f"methods.{method}")
    return criterion.needs_teacher and not criterion.needs_features and spec.get("teachers", ["main"]) == ["main"]


def train_config(profile: Profile, role: str) -> TrainConfig | None:
    """What a job of this role trains (`teacher@plain`: [teachers.plain]; `kd@resnet`: [students.resnet]); None for
    a teacher cache, which trains nothing."""
    base, _, family = role.partition("@")
    if base == CACHE:
        return None
    if base == TEACHER:
        return profile.teachers[family] if family else profile.teacher
    return profile.student_config(family)


def plan(profile: Profile, study_root: Path) -> list[Job]:
    """Jobs in an order that respects their dependencies: teachers, then teacher caches, then students."""
    needs_cache = profile.study.teacher_cache and any(uses_cache(profile, m) for m in profile.methods)
    teachers, caches, students = [], [], []
    for name in profile.datasets:
        def job(variant, role, seed, name=name):
            return Job(name, variant, role, seed, run_dir(study_root, name, variant, role, seed))

        for variant in profile.variants:
            for name in ["", *profile.teachers]:
                role = f"{TEACHER}@{name}" if name else TEACHER
                teacher = job(teacher_variant(profile, variant), role, profile.study.teacher_seed)
                if teacher not in teachers:
                    teachers.append(teacher)
            if needs_cache:
                caches.append(job(variant, CACHE, profile.study.teacher_seed))
            for family in profile.families:
                suffix = f"@{family}" if family else ""
                for seed in profile.study.seeds:
                    students += [job(variant, role + suffix, seed) for role in (SCRATCH, *profile.methods)]
    return teachers + caches + students


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        if profile.study.threads:
            torch.set_num_threads(profile.study.threads)

    # -- pieces ----------------------------------------------------------------------------------------
    def _model(self, cfg: TrainConfig, data: DataSplits):
        return create_model(cfg.model, data.num_classes, data.channels, cfg.small_input, cfg.pretrained)

    def _execution(self, cfg: TrainConfig, data: DataSplits, job_dir: Path) -> Execution:
        saved = job_dir / "checkpoint.json"
        try:
            execution = read_json(saved).get("execution") if saved.is_file() else None
        except (UnreadableFile, AttributeError):  # measured again; a damaged checkpoint is not resumed either
            execution = None
        if execution:  # a resumed run keeps its numerics
            return Execution(**execution)
        shape = (cfg.batch_size, data.channels, data.image_size, data.image_size)
        timings = self.root / ".execution.json"
        try:
            if timings.is_file():
                read_json(timings)
        except UnreadableFile:  # only a cache of measurements: measured again
            timings.unlink()
        return choose_execution(lambda: self._model(cfg, data), cfg, self.device, shape, data.num_classes, timings)

    def _teacher(self, job: Job, data: DataSplits, stages: set[int] | None = None, name: str = ""):
        """A trained teacher of this dataset variant ("" = the main one), as a ready LiveTeacher, and its run dir."""
        tdir = self._teacher_dir(job, name)
        weights = tdir / "model.safetensors"
        if not weights.is_file():
            raise EdgeKDError(f"{job.label}: teacher not trained yet ({weights} missing): run the teacher job first")
        cfg = self.profile.teachers[name] if name else self.profile.teacher
        model = load_weights(self._model(cfg, data), weights)
        return LiveTeacher(model, self._execution(cfg, data, tdir), stages), tdir

    def _teacher_dir(self, job: Job, name: str = "") -> Path:
        return run_dir(self.root, job.dataset, teacher_variant(self.profile, job.variant),
                       f"{TEACHER}@{name}" if name else TEACHER, self.profile.study.teacher_seed)

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

    def _cache_key(self, data: DataSplits, tdir: Path, teacher: LiveTeacher) -> dict:
        return {"teacher_sha256": _sha256(tdir / "model.safetensors"), "samples": len(data.train),
                "labels_sha256": hashlib.sha256(data.train.labels.numpy().tobytes()).hexdigest(),
                "augment": asdict(augment_for(self.profile.datasets[data.name])),
                "num_classes": data.num_classes, "topk": self.profile.study.cache_topk,
                "precision": teacher.execution.precision}

    def _build_cache(self, job: Job, data: DataSplits, teacher: LiveTeacher, tdir: Path):
        """The variant's cache of its teacher's outputs, in the variant's teacher_cache run directory."""
        cfg = self.profile.datasets[job.dataset]
        images = data.train.images.to(self.device)
        where = run_dir(self.root, job.dataset, job.variant, CACHE, self.profile.study.teacher_seed)

        def progress(done, total):
            if done <= self.profile.study.eval_batch_size:
                self.reporter.start(job, total)
            self.reporter.advance(job, done, None, None)

        return build_cache(where / "teacher_cache", self._cache_key(data, tdir, teacher), teacher, images,
                           augment_for(cfg), Normalize(data.mean, data.std, self.device), self.profile.study.seeds,
                           max(self.profile.student_config(f).epochs_for(len(data.train))
                               for f in self.profile.families),
                           self.profile.study.eval_batch_size, progress)

    # -- jobs ------------------------------------------------------------------------------------------
    def finished(self, job: Job) -> dict | None:
        """A finished run's metrics, or None when the job is to run (with --force, every job). A run whose metrics
        or outputs are damaged (cut short by a full disk, say) is removed and runs again from the start."""
        metrics_path = job.run_dir / "metrics.json"
        if self.force and job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        if not metrics_path.is_file():
            return None
        try:
            metrics = read_json(metrics_path)
            if not isinstance(metrics, dict) or "role" not in metrics:
                raise UnreadableFile(f"{metrics_path} holds no run metrics")
            for name in RUN_OUTPUTS[CACHE if job.role == CACHE else "training"]:
                (read_json if name.endswith(".json") else tensor_shapes)(job.run_dir / name)
        except UnreadableFile as exc:
            logger.warning("%s: recomputed, its files are damaged: %s", job.label, exc)
            shutil.rmtree(job.run_dir)
            return None
        return metrics

    def run_job(self, job: Job) -> dict:
        metrics_path = job.run_dir / "metrics.json"
        metrics = self.finished(job)
        if metrics is not None:
            self.reporter.finish(job, metrics, skipped=True)
            return metrics
        variant = dataset_splits(self.profile, job.dataset, job.variant)
        data = variant.splits
        start = time.perf_counter()
        if job.role == CACHE:
            teacher, tdir = self._teacher(job, data)
            _, info = self._build_cache(job, data, teacher, tdir)
            metrics = {**self._identity(job, ""), "wall_s": round(time.perf_counter() - start, 2), **info}
            write_json(metrics_path, metrics)
            self.reporter.finish(job, metrics, skipped=False)
            return metrics
        log = _RunLog(job.run_dir / "train.log")
        try:
            metrics = self._train_job(job, variant, log, start)
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

    def _train_job(self, job: Job, variant: VariantData, log: _RunLog, start: float) -> dict:
        data = variant.splits
        base, _, family = job.role.partition("@")
        is_teacher = base == TEACHER
        cfg = train_config(self.profile, job.role)
        write_json(job.run_dir / "profile.json", {"job": {**asdict(job), "run_dir": str(job.run_dir)},
                                                  "train": asdict(cfg),
                                                  "data": data.describe(), "variant": variant.stats,
                                                  "profile": self.profile.to_dict()})
        torch.manual_seed(job.seed)  # the same initial weights for the scratch and KD students of one seed
        model = self._model(cfg, data)
        ex = self._execution(cfg, data, job.run_dir)
        log(f"{job.label}: {cfg.model}, {count_parameters(model):,} parameters, {ex}")
        teacher_logits, teacher_source, history = None, None, {}
        if is_teacher and cfg.checkpoint:
            load_weights(model, cfg.checkpoint)
            ex.prepare(model)
            history = {"epoch": 0, "best_epoch": 0, "history": [], "train_s": 0.0, "images": 0}
            log(f"teacher weights from {cfg.checkpoint}, not trained")
        else:
            spec = {"ce": {"weight": 1.0}} if base in (TEACHER, SCRATCH) else self.profile.methods[base]
            criterion = ComposedLoss(method_losses(spec), f"methods.{base}", cfg.label_smoothing).to(self.device)
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
                    cache, _ = self._build_cache(job, data, teacher_source, tdir)
                    cache.live, teacher_source = teacher_source, cache
            elif not is_teacher:
                tdir = self._teacher_dir(job)
                if (tdir / "predictions.safetensors").is_file():
                    teacher_logits = load_tensors(tdir / "predictions.safetensors")["test_logits"]
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
                      "small_input": str(cfg.small_input)})
        save_tensors(job.run_dir / "predictions.safetensors", {"test_logits": test_logits})
        images = history["images"]
        metrics = {
            **self._identity(job, cfg.model), **metrics, "params": count_parameters(model),
            "epochs": history["epoch"], "best_epoch": history["best_epoch"],
            "wall_s": round(time.perf_counter() - start + history.get("prior_s", 0.0), 2),
            "train_s": round(history["train_s"], 2),
            "images_per_s": round(images / history["train_s"], 1) if history["train_s"] else None,
            "execution": asdict(ex), "teacher_cache": isinstance(teacher_source, TeacherCache),
            "losses": self.profile.methods.get(base, {"ce": {"weight": 1.0}}),
            "teachers": self.profile.methods.get(base, {}).get("teachers", ["main"]) if not is_teacher else [],
            "history": history["history"], "data": data.describe(), "variant_stats": variant.stats,
        }
        write_json(job.run_dir / "metrics.json", metrics)
        (job.run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # the best weights are saved above
        return metrics


def _run_in_process(profile_data: dict, root: str, job: Job, threads: int) -> str:
    """One job in a worker process (spawned: no state shared with the parent beyond the run directories)."""
    from edgekd.config import profile_from_dict

    torch.set_num_threads(threads)
    StudyRunner(profile_from_dict(profile_data), Path(root)).run_job(job)
    return job.label


def run_study(profile: Profile, out: Path, reporter: Reporter | None = None, force: bool = False,
              jobs: int = 1) -> list[dict]:
    """Run every job of the plan. With jobs > 1, the independent trainings of each dependency level (teachers,
    then caches, then students) run in that many processes, each with its share of the CPU threads."""
    root = Path(out) / profile.study.name
    runner = StudyRunner(profile, root, reporter, force)
    todo = plan(profile, root)
    if jobs <= 1:
        for job in todo:
            runner.run_job(job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (profile.study.threads or torch.get_num_threads()) // jobs)
        data = profile.to_dict()
        for level in (TEACHER, CACHE, None):
            wave = [j for j in todo if (j.role == level if level else j.role not in (TEACHER, CACHE))]
            pending = []
            for job in wave:
                metrics = runner.finished(job)
                if metrics is not None:
                    runner.reporter.finish(job, metrics, skipped=True)
                else:
                    pending.append(job)
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_run_in_process, data, str(root), job, threads): job for job in pending}
                for future, job in futures.items():
                    future.result()
                    runner.reporter.finish(job, read_json(job.run_dir / "metrics.json"), skipped=False)
    records = collect(root)
    write_json(root / "summary.json", records)
    return records
