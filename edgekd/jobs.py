"""The study as a job graph: what each job needs, the key that says whether its output is current, and the driver
that runs the jobs that are not on an executor (edgekd/executors.py).

Jobs: a teacher (per dataset, teacher variant and teacher name), a teacher cache (per variant; needs the main
teacher), a student (scratch or a KD method, per variant, family and seed; needs the main teacher, the teachers
its method names, and its variant's cache when it learns from it), a bundle (`edgekd export`; needs its student),
a bench (`edgekd bench`; needs its bundle) and the report (needs everything; the driver builds it at the end,
from whatever is current).

A job is a pure function of (resolved profile, study root, job): `execute` runs it anywhere the study root can be
read and written. Its record (metrics.json, bundle/manifest.json, bundle/bench-*.json) carries its key: the
resolved settings that affect it, the data description, content fingerprints of the inputs it read, and the
record format. A job whose record has the key the current profile and inputs give is skipped; any other runs,
and the driver says why (`student.epochs 10 -> 12`). Precision and memory format are chosen here at plan time,
once per (model, device, input), before any job runs, and recorded in the plan (`<study>/plan.json`); no job
writes shared files.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd import __version__
from edgekd.errors import EdgeKDError
from edgekd.records import PLAN_FILE, SCHEMA_VERSION, fingerprint, make_key, read_plan, why_stale
from edgekd.runio import UnreadableFile, read_json, run_dir, sha256_file, tensor_shapes, write_json

if TYPE_CHECKING:
    from edgekd.config import Profile, TrainConfig

TEACHER, SCRATCH, CACHE = "teacher", "scratch", "teacher_cache"
BASE_VARIANT = "base"
KINDS = ("train", "cache", "bundle", "bench", "explain")
EXPLAIN = "explain"  # the role of a variant's Grad-CAM job (explain@family for a second student family)
# What a finished run holds besides metrics.json: every training role (teacher, scratch, KD), and a teacher cache.
RUN_OUTPUTS = {"training": ("model.safetensors", "predictions.safetensors"),
               CACHE: ("teacher_cache.json", "teacher_cache.safetensors")}


@dataclass(frozen=True)
class Job:
    dataset: str
    variant: str
    role: str  # teacher[@name] | teacher_cache | scratch[@family] | <method>[@family]
    seed: int
    run_dir: Path
    kind: str = "train"  # train | cache | bundle | bench
    stage: str = ""  # what a deploy job makes in the run directory: bundle | bench-<backend>-<device>
    deps: tuple[str, ...] = ()  # labels of the jobs whose outputs this one reads
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    exclusive: bool = False  # alone on its machine while it runs (a bench times latency)
    execution: tuple[str, bool, str] | None = None  # (precision, channels_last, device), chosen at plan time

    def __post_init__(self):
        if self.role == CACHE and self.kind == "train":
            object.__setattr__(self, "kind", "cache")

    @property
    def label(self) -> str:
        base = f"{self.dataset}/{self.variant}/{self.role}/seed{self.seed}"
        return f"{base}/{self.stage}" if self.stage else base

    @property
    def record(self) -> Path:
        """The file whose presence (with the current key) means the job is done."""
        if self.kind == "bundle":
            return self.run_dir / "bundle" / "manifest.json"
        if self.kind == "bench":
            return self.run_dir / "bundle" / f"{self.stage}.json"
        if self.kind == "explain":
            return self.run_dir / "explain.json"
        return self.run_dir / "metrics.json"


# -- the graph ---------------------------------------------------------------------------------------------------
def teacher_variant(profile: Profile, variant: str) -> str:
    """Where a variant's teacher lives: its own variant, or the clean data's (`base`)."""
    return variant if profile.study.teacher_regime == "variant" else BASE_VARIANT


def pruned_source(base: str) -> tuple[str, float] | None:
    """`kd+prune50` -> ("kd", 0.5): the student a pruned run starts from and the share of channels removed; None
    for any other role."""
    from edgekd.config import PRUNE_TAG

    source, tag, percent = base.partition(PRUNE_TAG)
    return (source, int(percent) / 100) if tag else None


def grid_candidate(base: str) -> tuple[str, int] | None:
    """`kd~2` -> ("kd", 2): a candidate run of a method's hyper-parameter grid; None for any other role."""
    from edgekd.config import GRID_TAG

    method, tag, index = base.partition(GRID_TAG)
    return (method, int(index)) if tag else None


def loss_method(profile: Profile, base: str) -> str:
    """The method whose losses (and teachers) a student role trains with: its own, a grid candidate's method, or
    for a pruned student the fine-tune method `compress.method`."""
    if pruned_source(base):
        return profile.compress.method
    candidate = grid_candidate(base)
    return candidate[0] if candidate else base


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
    base, _, family = role.partition("@")
    if base == CACHE:
        return None
    if base == TEACHER:
        return profile.teachers[family] if family else profile.teacher
    cfg = profile.student_config(family)
    if pruned_source(base):  # a short fine-tune of trained weights: a low rate from the start, no warm-up
        c = profile.compress
        return replace(cfg, epochs=c.finetune_epochs, min_steps=0, lr=c.finetune_lr or cfg.lr / 10,
                       warmup_epochs=0.0)
    return cfg


def plan_jobs(profile: Profile, study_root: Path, deploy: bool = False, device: str = "cpu",
              cpus_per_job: float = 1.0) -> list[Job]:
    """Every job of the profile with its dependencies, in an order that respects them: teachers, teacher caches,
    students, then (deploy) bundles and benches."""
    from edgekd.config import GRID_TAG, method_grid

    gpus = 1.0 if device.startswith("cuda") else 0.0
    seed0 = profile.study.teacher_seed
    cached = needs_cache(profile)
    teachers: list[Job] = []
    caches: list[Job] = []
    students: list[Job] = []
    for name in profile.datasets:
        def job(variant, role, seed, deps=(), name=name):
            return Job(name, variant, role, seed, run_dir(study_root, name, variant, role, seed), deps=tuple(deps),
                       num_cpus=cpus_per_job, num_gpus=gpus)

        for variant in profile.variants:
            tv = teacher_variant(profile, variant)
            for extra in ["", *profile.teachers]:
                teacher = job(tv, f"{TEACHER}@{extra}" if extra else TEACHER, seed0)
                if teacher not in teachers:
                    teachers.append(teacher)
            main = job(tv, TEACHER, seed0).label
            cache = job(variant, CACHE, seed0, [main]) if cached else None
            if cache:
                caches.append(cache)
            for family in profile.families:
                suffix = f"@{family}" if family else ""
                for seed in profile.study.seeds:
                    pruned = [profile.compress.role(s) for s in profile.compress.sources]
                    tuned = [f"{m}{GRID_TAG}{k}" for m, spec in profile.methods.items()
                             for k in range(len(method_grid(spec)))
                             if len(method_grid(spec)) > 1 and seed == profile.study.seeds[0]]
                    for role in (*tuned, SCRATCH, *profile.methods, *pruned):
                        deps = [main]
                        if role != SCRATCH:
                            deps += [job(tv, f"{TEACHER}@{t}", seed0).label for t in
                                     profile.methods[loss_method(profile, role)].get("teachers", ["main"])
                                     if t != "main"]
                            if cache and uses_cache(profile, role):
                                deps.append(cache.label)
                        if pruned_source(role):  # starts from the trained student it prunes
                            deps.append(job(variant, pruned_source(role)[0] + suffix, seed).label)
                        tuned_by = loss_method(profile, role) if role != SCRATCH else ""
                        grid = method_grid(profile.methods[tuned_by]) if tuned_by else []
                        if len(grid) > 1 and not grid_candidate(role):  # waits for the choice on validation
                            deps += [job(variant, f"{tuned_by}{GRID_TAG}{k}{suffix}", profile.study.seeds[0]).label
                                     for k in range(len(grid))]
                        students.append(job(variant, role + suffix, seed, deps))
    jobs = teachers + caches + students
    if profile.explain.images:  # per variant and family: the teacher and every scratch and KD student (all seeds)
        groups: dict[tuple[str, str, str], list[str]] = {}
        for s in students:
            base, _, family = s.role.partition("@")
            if not grid_candidate(base) and not pruned_source(base):
                groups.setdefault((s.dataset, s.variant, family), [s.deps[0]]).append(s.label)
        for (dataset, variant, family), deps in groups.items():
            role = f"{EXPLAIN}@{family}" if family else EXPLAIN
            jobs.append(Job(dataset, variant, role, seed0, run_dir(study_root, dataset, variant, role, seed0),
                            kind="explain", deps=tuple(deps), num_cpus=cpus_per_job))
    if deploy:
        d = profile.deploy
        bundles = [replace(s, kind="bundle", stage="bundle", deps=(s.label,), num_cpus=1.0, num_gpus=0.0)
                   for s in students if not grid_candidate(s.role.partition("@")[0])]  # tuning runs stay runs
        benches = [replace(b, kind="bench", stage=f"bench-{d.backend}-{d.device}", deps=(b.label,),
                           num_gpus=1.0 if d.device == "cuda" else 0.0, exclusive=True) for b in bundles]
        jobs += bundles + benches
    return jobs


# -- keys ----------------------------------------------------------------------------------------------------------
class NotReady(EdgeKDError):
    """An input of the job is not there (yet): the job it needs has not finished."""


_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Content hash of a file, remembered per (path, size, mtime) for the life of the process."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA:
        _SHA[memo] = sha256_file(path)
    return _SHA[memo]


_SIZES: dict[str, dict | None] = {}


def _source_sizes(cfg) -> dict | None:
    """Images and classes of a data source's splits, counted without loading them (None: not knowable yet)."""
    from edgekd.data.sources import SOURCES

    memo = json.dumps(asdict(cfg), sort_keys=True)
    if memo not in _SIZES:
        try:
            sizes = SOURCES.get(cfg.source).sizes(cfg)
        except EdgeKDError:
            sizes = None
        _SIZES[memo] = None if sizes is None else {"classes": len(sizes.classes), "train": int(sizes.train.sum()),
                                                   "test": int(sizes.test.sum())}
    return _SIZES[memo]


def data_description(profile: Profile, dataset: str, variant: str) -> dict:
    """The data a job trains on: the dataset's settings (not where its files live), the variant's, and the source's
    split sizes."""
    from edgekd.config import VariantConfig
    from edgekd.data.variants import REVISIONS

    cfg = profile.datasets[dataset]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "download")}
    config = profile.variants.get(variant, VariantConfig())
    described = {f"datasets.{dataset}": settings, f"variants.{variant}": asdict(config), "sizes": _source_sizes(cfg)}
    if config.kind in REVISIONS:  # runs made by an earlier version of the kind's transformation are stale
        described["variant_revision"] = REVISIONS[config.kind]
    return described


def _config_name(role: str) -> str:
    base, _, family = role.partition("@")
    if base == TEACHER:
        return f"teachers.{family}" if family else "teacher"
    return f"students.{family}" if family else "student"


def _weights(path: Path, what: str) -> str:
    if not path.is_file():
        raise NotReady(f"{what} is not trained yet ({path} missing)")
    return file_sha256(path)


def teacher_dir(profile: Profile, root: Path, job: Job, name: str = "") -> Path:
    return run_dir(root, job.dataset, teacher_variant(profile, job.variant), f"{TEACHER}@{name}" if name else TEACHER,
                   profile.study.teacher_seed)


def cache_dir(profile: Profile, root: Path, job: Job) -> Path:
    return run_dir(root, job.dataset, job.variant, CACHE, profile.study.teacher_seed)


def _recorded_execution(tdir: Path) -> dict:
    try:
        return read_json(tdir / "metrics.json")["execution"]
    except (UnreadableFile, KeyError, TypeError):
        raise NotReady(f"the teacher in {tdir} is not finished yet") from None


def trains_on_labeled_only(profile: Profile, job: Job) -> bool:
    """A training whose only loss is cross-entropy (a teacher, a scratch student) on a `labels` variant learns from
    the labeled images alone, in full batches, for as many steps as a run over every image: the supervised baseline
    a user would train on their labeled data. Masked inside batches of mostly unlabeled images, cross-entropy saw ~6
    labels per batch of 128 at 5% and diverged (fashion-mnist-labels, session 11): a broken baseline, not KD's gain."""
    from edgekd.config import VariantConfig

    base = job.role.partition("@")[0]
    return base in (TEACHER, SCRATCH) and profile.variants.get(job.variant, VariantConfig()).kind == "labels"


def train_key(profile: Profile, root: Path, job: Job) -> dict:
    """The key of a teacher, scratch or KD student run."""
    base, _, _ = job.role.partition("@")
    cfg = train_config(profile, job.role)
    config: dict[str, Any] = {_config_name(job.role): asdict(cfg), "seed": job.seed}
    inputs = {}
    if trains_on_labeled_only(profile, job):
        config["train_images"] = "labeled only, the steps of every image"
    if base == TEACHER and cfg.checkpoint:
        inputs["checkpoint"] = _weights(Path(cfg.checkpoint).expanduser(), f"teacher checkpoint {cfg.checkpoint}")
    if base != TEACHER:
        inputs["teacher"] = _weights(teacher_dir(profile, root, job) / "model.safetensors", "its teacher")
    if pruned_source(base):
        source, ratio = pruned_source(base)
        config["compress"] = {"prune": ratio, "method": profile.compress.method}
        inputs["student"] = _weights(run_dir(root, job.dataset, job.variant, source + job.role[len(base):],
                                             job.seed) / "model.safetensors", f"the {source} student it prunes")
    if base not in (TEACHER, SCRATCH):
        method = loss_method(profile, base)
        spec = method_spec(profile, root, job)
        config[f"methods.{method}"] = spec
        for name in spec.get("teachers", ["main"]):
            if name != "main":
                inputs[f"teacher@{name}"] = _weights(teacher_dir(profile, root, job, name) / "model.safetensors",
                                                     f"teacher {name}")
        if uses_cache(profile, base):
            config["study.teacher_cache"] = profile.study.teacher_cache
            if profile.study.teacher_cache:
                try:
                    inputs["teacher_cache"] = read_json(cache_dir(profile, root, job) / "metrics.json")["fingerprint"]
                except (UnreadableFile, KeyError, TypeError):
                    raise NotReady("its teacher cache is not built yet") from None
    if job.execution is not None:
        precision, channels_last, device = job.execution
        config["execution"] = {"precision": precision, "channels_last": channels_last, "device": device}
    return make_key("train", config, data_description(profile, job.dataset, job.variant), inputs)


def grid_choice(profile: Profile, root: Path, dataset: str, variant: str, family: str, method: str) -> dict:
    """The candidate of `method`'s grid with the best validation accuracy on the first seed (the first of equals),
    with every candidate's: {"chosen": k, "candidates": [{"params": {loss.param: value}, "val_acc": ...}]}.
    NotReady until every candidate has trained."""
    from edgekd.config import GRID_TAG, grid_axes, method_grid

    spec = profile.methods[method]
    suffix = f"@{family}" if family else ""
    axes = grid_axes(spec)
    candidates = []
    for k, candidate in enumerate(method_grid(spec)):
        path = run_dir(root, dataset, variant, f"{method}{GRID_TAG}{k}{suffix}", profile.study.seeds[0])
        try:
            val_acc = read_json(path / "metrics.json")["val_acc"]
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

    base, _, family = job.role.partition("@")
    candidate = grid_candidate(base)
    if candidate:
        return method_grid(profile.methods[candidate[0]])[candidate[1]]
    method = loss_method(profile, base)
    grid = method_grid(profile.methods[method])
    if len(grid) == 1:
        return grid[0]
    return grid[grid_choice(profile, root, job.dataset, job.variant, family, method)["chosen"]]


def cache_key(profile: Profile, root: Path, job: Job) -> dict:
    """The key of a teacher cache: what its stored values are a function of (the teacher's weights and numerics,
    the data and its augmentation, top-k). Which (seed, epoch) views it holds is its coverage, not its key: more
    seeds or epochs extend a cache, they do not invalidate it."""
    tdir = teacher_dir(profile, root, job)
    inputs = {"teacher": _weights(tdir / "model.safetensors", "its teacher")}
    config = {"study.cache_topk": profile.study.cache_topk, "teacher_execution": _recorded_execution(tdir)}
    return make_key("cache", config, data_description(profile, job.dataset, job.variant), inputs)


def cache_needs(profile: Profile, samples: int) -> dict:
    """The views the planned students draw: their seeds, and the most epochs any student family trains."""
    epochs = max(profile.student_config(f).epochs_for(samples) for f in profile.families)
    return {"seeds": sorted(profile.study.seeds), "epochs": epochs}


def export_options(profile: Profile):
    from edgekd.export.bundle import ExportOptions

    d = profile.deploy
    return ExportOptions(targets=tuple(d.targets), calib_size=d.calib_size, calib_method=d.calib_method,
                         int8_presets=tuple(d.int8_presets), eval_limit=d.eval_limit, int8_method=d.int8_method,
                         qat_epochs=d.qat_epochs, qat_lr=d.qat_lr,
                         int8_compare=tuple(d.int8_compare))


def bench_options(profile: Profile):
    from edgekd.bench.harness import BenchOptions

    d = profile.deploy
    return BenchOptions(d.backend, d.device, tuple(d.batch_sizes), d.threads, d.iters)


def wanted_models(profile: Profile) -> set[str]:
    d = profile.deploy
    return {"onnx-fp32"} | ({f"onnx-int8-{p}" for p in d.int8_presets} if "int8" in d.targets else set())


def job_key(profile: Profile, root: Path, job: Job) -> dict:
    """The key the job's output must carry to count as current; NotReady when an input is missing."""
    if job.kind == "train":
        return train_key(profile, root, job)
    if job.kind == "cache":
        return cache_key(profile, root, job)
    if job.kind == "bundle":
        from edgekd.export.bundle import export_key

        if not (job.run_dir / "metrics.json").is_file():
            raise NotReady(f"student {job.run_dir} is not trained yet")
        return export_key(job.run_dir, export_options(profile))
    if job.kind == "explain":
        inputs = {}
        for label in job.deps:
            dataset, variant, role, seed = label.split("/")
            inputs[label] = _weights(run_dir(root, dataset, variant, role, int(seed.removeprefix("seed")))
                                     / "model.safetensors", label)
        return make_key("explain", {"explain": asdict(profile.explain)},
                        data_description(profile, job.dataset, job.variant), inputs)
    if job.kind == "bench":
        from edgekd.bench.harness import bench_key

        bundle = job.run_dir / "bundle"
        if not (bundle / "manifest.json").is_file():
            raise NotReady(f"bundle {bundle} is not exported yet")
        return bench_key(bundle, bench_options(profile))
    raise EdgeKDError(f"unknown job kind {job.kind!r}")


@dataclass
class Status:
    current: bool
    reason: str = ""  # why it runs: "new", a key change, damage, --force, a dependency that runs first
    key: dict | None = None
    record: dict | None = None  # the finished record, when current
    had_record: bool = False  # a record was there (stale or damaged), so the reason is worth a line


def _check_outputs(job: Job, record: dict, profile: Profile) -> str | None:
    """What is wrong with a finished job's outputs (None: whole); cheap, headers only."""
    if not isinstance(record, dict):
        return f"{job.record} is not an edgekd record"
    if job.kind in ("train", "cache"):
        if "role" not in record:
            return f"{job.record} holds no run metrics"
        for name in RUN_OUTPUTS[CACHE if job.kind == "cache" else "training"]:
            (read_json if name.endswith(".json") else tensor_shapes)(job.run_dir / name)
    elif job.kind == "bundle":
        missing = sorted(wanted_models(profile) - set(record.get("models", {})))
        if missing:
            return f"it has no {', '.join(missing)} yet"
        for entry in record["models"].values():
            if not (job.run_dir / "bundle" / entry["file"]).is_file():
                return f"{entry['file']} is missing"
    return None


def job_status(profile: Profile, root: Path, job: Job, force: bool = False) -> Status:
    """Whether the job's output is current (its record carries the key the profile and its inputs give now)."""
    had = job.record.is_file()
    if force:
        return Status(False, "--force", had_record=had)
    try:
        key = job_key(profile, root, job)
    except NotReady as exc:
        return Status(False, str(exc), had_record=had)
    except UnreadableFile as exc:
        return Status(False, f"an input is damaged: {exc}", had_record=had)
    if not had:
        return Status(False, "new", key)
    try:
        record = read_json(job.record)
        damage = _check_outputs(job, record, profile)
    except UnreadableFile as exc:
        return Status(False, f"its files are damaged: {exc}", key, had_record=True)
    if damage:
        return Status(False, damage, key, had_record=True)
    if record.get("fingerprint") != fingerprint(key):
        return Status(False, why_stale(record.get("key"), key), key, had_record=True)
    if job.kind == "cache":
        covered, samples = record.get("coverage") or {}, record.get("samples", 0)
        needs = cache_needs(profile, samples)
        if not (set(needs["seeds"]) <= set(covered.get("seeds", [])) and needs["epochs"] <= covered.get("epochs", 0)):
            return Status(False, f"extends seeds {covered.get('seeds')} x {covered.get('epochs')} epochs to "
                                 f"{needs['seeds']} x {needs['epochs']} (only the new views are computed)", key,
                          had_record=True)
    return Status(True, "", key, record, True)


# -- precision and memory format, at plan time -----------------------------------------------------------------------
def _execution_slot(profile: Profile, job: Job, device: str) -> str:
    cfg = train_config(profile, job.role)
    data = json.dumps({k: v for k, v in asdict(profile.datasets[job.dataset]).items()
                       if k not in ("data_dir", "download")}, sort_keys=True)
    return (f"{cfg.model}|small_input={cfg.small_input}|{device}|{job.dataset}:{fingerprint({'d': data})}|"
            f"batch={cfg.batch_size}|{cfg.precision}|{cfg.channels_last}")


def measure_execution(profile_data: dict, dataset: str, role: str, device: str) -> dict:
    """Time the (precision, layout) candidates of one training configuration on this machine's `device`; runs
    before any job (locally, or as one task on the cluster) so nothing else loads the machine meanwhile."""
    from edgekd.config import profile_from_dict
    from edgekd.distill.execution import measure_candidates
    from edgekd.distill.study import dataset_splits
    from edgekd.models import create_model

    profile = profile_from_dict(profile_data)
    cfg = train_config(profile, role)
    data = dataset_splits(profile, dataset).splits
    shape = (cfg.batch_size, data.channels, data.image_size, data.image_size)
    best, speeds = measure_candidates(
        lambda: create_model(cfg.model, data.num_classes, data.channels, cfg.small_input, cfg.pretrained),
        cfg, device, shape, data.num_classes)
    return {"choice": {"precision": best.precision, "channels_last": best.channels_last, "device": best.device},
            "images_per_s": speeds, "shape": list(shape)}


def choose_executions(profile: Profile, jobs: list[Job], device: str, table: dict,
                      measure: Callable[..., dict]) -> list[Job]:
    """Every training job with its precision and memory format: fixed by the profile, taken from the study's
    table of earlier measurements, or measured now (once per model, device and input) with `measure`."""
    out = []
    for job in jobs:
        cfg = train_config(profile, job.role) if job.kind == "train" else None
        if cfg is None:
            out.append(job)
            continue
        if cfg.precision != "auto" and cfg.channels_last != "auto":
            choice = {"precision": cfg.precision, "channels_last": cfg.channels_last == "on", "device": device}
        else:
            slot = _execution_slot(profile, job, device)
            if slot not in table:
                table[slot] = measure(measure_execution, profile.to_dict(), job.dataset, job.role, device)
            choice = table[slot]["choice"]
        out.append(replace(job, execution=(choice["precision"], bool(choice["channels_last"]), choice["device"])))
    return out


# -- running one job -----------------------------------------------------------------------------------------------
def one_line(exc: BaseException) -> str:
    """An error as one line: edgekd's own messages as they are, anything else with its type."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps a task's exception (cause: None if not unpicklable)
    text = [t.strip() for t in str(cause).strip().splitlines() if t.strip()]
    if isinstance(cause, EdgeKDError):
        return " / ".join(text)[:400]
    if cause is exc and hasattr(exc, "cause"):  # a Ray error without its cause: its last line names it
        return (text[-1] if text else type(exc).__name__)[:300]
    return f"{type(cause).__name__}: {text[0][:300] if text else ''}"


def execute(profile: Profile, root: Path, job: Job, force: bool = False, reporter=None) -> dict:
    """Run one job (or find it current): a pure function of (profile, study root, job). Returns what the driver
    records: whether it was skipped, the fingerprint of its output, its record and its wall time."""
    start = time.perf_counter()
    with _job_lock(root, job):
        return _execute(profile, root, job, force, reporter, start)


@contextmanager
def _job_lock(root: Path, job: Job):
    """One process at a time per job, across drivers and machines: a killed driver's Ray workers can still be
    finishing jobs when the study is run again, and then the new run waits for them and finds their jobs current
    instead of training in the same directory. The lock goes with the process that holds it."""
    import fcntl

    path = root / ".locks" / (job.label.replace("/", "__") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _execute(profile: Profile, root: Path, job: Job, force: bool, reporter, start: float) -> dict:
    try:
        if job.kind in ("train", "cache"):
            from edgekd.distill.study import StudyRunner

            runner = StudyRunner(profile, root, _StepsOnly(reporter), force)
            record = runner.run_job(job)
            skipped = runner.last_skipped
        elif job.kind == "bundle":
            from edgekd.study import run_bundle_job

            record, skipped = run_bundle_job(profile, root, job, force)
        elif job.kind == "bench":
            from edgekd.study import run_bench_job

            record, skipped = run_bench_job(profile, root, job, force)
        elif job.kind == "explain":
            from edgekd.explain import run_explain_job

            record, skipped = run_explain_job(profile, root, job, force)
        else:
            raise EdgeKDError(f"unknown job kind {job.kind!r}")
    except EdgeKDError:
        raise
    except Exception as exc:  # a bug or an environment problem: one line here, the traceback beside the job
        log = job.record.parent / "error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {job.label}\n{traceback.format_exc()}\n")
            where = f" (traceback in {log})"
        except OSError:
            where = ""
        raise EdgeKDError(f"{one_line(exc)}{where}") from exc
    return {"label": job.label, "skipped": skipped, "fingerprint": record.get("fingerprint"),
            "record": _brief(job, record), "wall_s": round(time.perf_counter() - start, 2)}


def _brief(job: Job, record: dict) -> dict:
    """The part of a record the driver shows and keeps (a training's history stays in its file)."""
    return {k: v for k, v in record.items() if k not in ("history", "key", "per_class_test_acc", "data", "results",
                                                          "environment", "packages", "classes")} | (
        {"results": [{"model": r["model"], "accuracy": r.get("accuracy"),
                      "latency": {b: {"p50_ms": s["p50_ms"]} for b, s in r["latency"].items()}}
                     for r in record.get("results", [])]} if job.kind == "bench" else {})


def execute_in_worker(profile_data: dict, root: str, job: Job, force: bool, threads: int, started=None,
                      *deps) -> dict:
    """`execute` in a worker process or a Ray task: the profile as plain data, `threads` CPU threads for torch;
    `started` (a Ray actor) hears when the job starts; `deps` are the results of the jobs it needs (Ray passes
    them as object refs, so the task starts only after they finished)."""
    if started is not None:
        started.mark.remote(job.label)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from edgekd.config import profile_from_dict

    return execute(profile_from_dict(profile_data), Path(root), job, force)


class _StepsOnly:
    """Hands a training's step progress to the driver's reporter; the driver itself reports the job's end."""

    def __init__(self, reporter):
        self.reporter = reporter

    def start(self, job, total_steps):
        if self.reporter:
            self.reporter.start(job, total_steps)

    def advance(self, job, completed, loss, images_per_s, epoch=""):
        if self.reporter:
            self.reporter.advance(job, completed, loss, images_per_s, epoch)

    def finish(self, job, metrics, skipped):
        pass


# -- the driver ----------------------------------------------------------------------------------------------------
class JobsFailed(EdgeKDError):
    """Some jobs failed; everything that did not depend on them finished. `result` is what the caller made of the
    rest (the records, the report)."""

    def __init__(self, failed: dict[str, str], result: Any = None):
        super().__init__("\n".join(f"{label}: {why}" for label, why in failed.items()))
        self.failed, self.result = failed, result

    def __reduce__(self):
        return (JobsFailed, (self.failed,))


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class PlanFile:
    """`<study>/plan.json`: the job graph with each job's resources, execution, state and current fingerprint.
    Only the driver writes it; `edgekd report` reads which records are current from it."""

    def __init__(self, root: Path, profile: Profile, jobs: list[Job], execution: dict, executor: str):
        self.path = root / PLAN_FILE
        self.entries = {j.label: {"id": j.label, "kind": j.kind, "record": j.record.relative_to(root).as_posix(),
                                  "deps": list(j.deps), "resources": {"num_cpus": j.num_cpus, "num_gpus": j.num_gpus,
                                                                      "exclusive": j.exclusive},
                                  "execution": dict(zip(("precision", "channels_last", "device"), j.execution,
                                                        strict=True)) if j.execution else None,
                                  "state": "queued", "fingerprint": None, "reason": ""} for j in jobs}
        # The graph's sink: the driver builds the report after the rest, from whatever is current then.
        report = {"id": "report", "kind": "report", "record": None, "deps": list(self.entries)}
        self.data = {"schema_version": SCHEMA_VERSION, "written_by": f"edgekd {__version__}", "executor": executor,
                     "profile": profile.to_dict(), "execution": execution, "jobs": [*self.entries.values(), report]}

    def set(self, label: str, state: str, fp: str | None = None, reason: str | None = None,
            wall_s: float | None = None) -> None:
        entry = self.entries[label]
        entry["state"] = state
        if fp is not None or state in ("queued", "failed"):
            entry["fingerprint"] = fp if state != "failed" else None
        if reason is not None:
            entry["reason"] = reason
        if wall_s is not None:
            entry["wall_s"] = wall_s

    def write(self) -> None:
        write_json(self.path, self.data)


def previous_execution(root: Path) -> dict:
    """The precision/layout measurements of earlier runs of this study (the plan records them)."""
    try:
        plan = read_plan(root)
    except EdgeKDError:
        return {}
    table = (plan or {}).get("execution")
    return dict(table) if isinstance(table, dict) else {}


class Driver:
    """Decides what is current, hands the rest to an executor, and keeps plan.json and the reporter up to date."""

    def __init__(self, profile: Profile, root: Path, jobs: list[Job], executor, reporter=None, force: bool = False,
                 execution: dict | None = None):
        from edgekd.distill.study import Reporter

        self.profile, self.root, self.jobs, self.executor, self.force = profile, root, jobs, executor, force
        self.reporter = reporter or Reporter()
        self.plan = PlanFile(root, profile, jobs, execution or {}, executor.name)
        self.outcome = Outcome()
        self.by_label = {j.label: j for j in jobs}

    def run(self) -> Outcome:
        todo, pending = [], set()
        for job in self.jobs:
            waits = [d for d in job.deps if d in pending]
            if waits and not self.force:
                status = Status(False, f"after {waits[0]}, which runs first", had_record=job.record.is_file())
            else:
                status = job_status(self.profile, self.root, job, self.force)
            if status.current:
                self.plan.set(job.label, "current", status.record.get("fingerprint"), "")
                self.outcome.skipped.append(job.label)
                self.reporter.finish(job, status.record, skipped=True)
            else:
                pending.add(job.label)
                todo.append(job)
                self.plan.set(job.label, "queued", None, status.reason)
                if status.had_record:
                    self.reporter.rerun(job, status.reason)
        self.plan.write()
        if todo:
            self.reporter.queued(todo)
            self.executor.run(self.profile, self.root, todo, self.force, self)
        return self.outcome

    # -- what the executors report ---------------------------------------------------------------------------------
    def running(self, job: Job) -> None:
        self.plan.set(job.label, "running")
        self.reporter.running(job)

    def done(self, job: Job, result: dict) -> None:
        state = "current" if result["skipped"] else "done"
        self.plan.set(job.label, state, result["fingerprint"], "", result.get("wall_s"))
        (self.outcome.skipped if result["skipped"] else self.outcome.ran).append(job.label)
        self.plan.write()
        record = dict(result["record"])
        record.setdefault("wall_s", result.get("wall_s"))
        self.reporter.finish(job, record, skipped=result["skipped"])

    def failed(self, job: Job, message: str) -> None:
        self.plan.set(job.label, "failed", None, f"failed: {message}")
        self.outcome.failed[job.label] = message
        self.plan.write()
        self.reporter.failed(job, message)


def run_graph(profile: Profile, root: Path, executor, reporter=None, force: bool = False,
              deploy: bool = False) -> Outcome:
    """Plan the profile's jobs (with deploy: bundles and benches too), choose every training's precision and
    memory format once, and run what is not current on `executor`."""
    device = executor.resolve_device(profile.study.device)
    jobs = plan_jobs(profile, root, deploy, device, executor.job_cpus(profile))
    table = previous_execution(root)
    jobs = choose_executions(profile, jobs, device, table, executor.measure)
    return Driver(profile, root, jobs, executor, reporter, force, table).run()
