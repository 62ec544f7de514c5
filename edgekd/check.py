"""The plan check: everything a command will need, checked in about a second before its first job, with no training.

`distill`, `study` and `export` run it first, and `edgekd check PROFILE` runs it alone. It collects every problem
and reports them together, one line each: model names (with the closest ones), losses and their parameters,
variant parameters against the data, paths (data directories, checkpoints, runs, bundles), each dataset's
classes and images per class against the splits asked for, options, and what each export target needs installed.
Files are opened only far enough to know they are whole (JSON parsed, safetensors headers checked against the
file's length, image headers read), never decoded in full.

Importing this module imports no PyTorch: `bundle_problems` serves `edgekd bench` and `edgekd build` on devices
without it.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgekd.errors import EdgeKDError
from edgekd.roles import segment_problem
from edgekd.runio import METRICS, RUN_PROFILE, WEIGHTS, UnreadableFile, read_json, sha256_file, tensor_shapes

if TYPE_CHECKING:
    from edgekd.config import DatasetConfig, DeployConfig, Profile
    from edgekd.data.types import SourceSizes

RETRAIN = "run `edgekd distill` on its profile again: runs with damaged files are recomputed"
TRAIN_STACK = "pip install 'edgekd[train]'"
# What each `edgekd export --target` imports beyond PyTorch. Every target exports ONNX first and checks it with
# ONNX Runtime; `trt` is checked by TensorRT's own import (PyPI's placeholder package imports but cannot build).
EXPORT_NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"),
                "int8": ("onnx", "onnxscript", "onnxruntime", "onnxruntime.quantization"),
                "trt": ("onnx", "onnxscript", "onnxruntime"),
                "pte": ("onnx", "onnxscript", "onnxruntime", "executorch")}  # model.onnx: the INT8 guard's FP32
# Loss parameters whose range does not depend on the loss: (allowed?, what it must be).
LOSS_PARAMETER_RULES = {"weight": (lambda v: v >= 0, "at least 0"),
                        "temperature": (lambda v: v > 0, "above 0 (it divides the logits)")}


class PlanError(EdgeKDError):
    """Every problem found in a plan, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def require(problems: list[str]) -> None:
    """Raise the problems found, if any, as one PlanError."""
    if problems:
        raise PlanError(problems)


@dataclass
class ProfileCheck:
    """A profile as read, every problem found in it and its plan, and what the plan will train on."""

    profile: Profile | None
    problems: list[str] = field(default_factory=list)
    images: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset -> split -> images

    def summary(self) -> str:
        """One line: what the plan trains, on what, and how many jobs."""
        from edgekd.workflows import plan_jobs

        p = self.profile
        data = "; ".join(f"{name} ({', '.join(f'{n:,} {split}' for split, n in sizes.items())})"
                         for name, sizes in self.images.items()) or ", ".join(p.datasets)
        students = ", ".join(cfg.model for where, cfg in p.trainings() if where.startswith("student"))
        teachers = ", ".join(p.teacher.model + f" (after epoch {cfg.stop_epoch})" if cfg.stop_epoch else
                             cfg.model + (" (from checkpoint)" if cfg.checkpoint else "")
                             for where, cfg in p.trainings() if where.startswith("teacher"))
        jobs = len(plan_jobs(p, Path(p.study.name)))
        return (f"{p.study.name}: {data}; {len(p.variants)} variant(s); teacher {teachers}; student {students}; "
                f"{len(p.methods)} method(s) ({', '.join(p.methods) or 'scratch only'}); seeds "
                f"{', '.join(map(str, p.study.seeds))}: {jobs} jobs")


# -- profiles -----------------------------------------------------------------------------------------------------
def check_profile(path: str | Path, overrides: list[str] | None = None, out: Path | None = None,
                  force: bool = False, deploy: bool = False) -> ProfileCheck:
    """Read a profile and check its whole plan; `out` (the runs directory) adds the checks of what is there, and
    `deploy` those of the [deploy] table and what it needs here (`edgekd study` exports and benches)."""
    from edgekd.config import parse_profile, read_profile_data

    try:
        data = read_profile_data(path, overrides)
    except EdgeKDError as exc:  # no file, no TOML, no tables, a malformed --set: nothing more can be checked
        return ProfileCheck(None, [str(exc)])
    profile, problems = parse_profile(data)
    losses = loss_problems(profile)
    data_problems, images = _data_problems(profile)
    problems += losses + model_problems(profile) + data_problems + _device_problems(profile.study.device)
    problems += multilabel_problems(profile, deploy)
    if deploy:
        problems += deploy_problems(profile.deploy, profile.devices)
    if out is not None:
        problems += writable_problems(out)
        if not losses and not force:  # the plan's jobs are known only when every method's losses are
            problems += stale_run_problems(profile, Path(out) / profile.study.name)
    return ProfileCheck(profile, problems, images)


def checked_profile(path: str | Path, overrides: list[str] | None = None, out: Path | None = None,
                    force: bool = False, jobs: int | None = None, deploy: bool = False) -> Profile:
    """The profile, when its plan has no problem; else a PlanError with them all (`jobs`: also that option)."""
    checked = check_profile(path, overrides, out, force, deploy)
    require(checked.problems + (jobs_problems(jobs) if jobs is not None else []))
    return checked.profile


def model_problems(profile: Profile) -> list[str]:
    """Model names timm does not know (with the closest it does), and teacher checkpoints missing or unreadable."""
    from edgekd.models import read_state_dict, unknown_model

    problems = []
    for where, cfg in profile.trainings():
        unknown = unknown_model(cfg.model) if cfg.model else None
        if unknown:
            problems.append(f"profile key '{where}.model': {unknown}")
        if not cfg.checkpoint or not where.startswith("teacher"):
            continue
        checkpoint = Path(cfg.checkpoint).expanduser()
        if not checkpoint.is_file():
            problems.append(f"profile key '{where}.checkpoint' names {cfg.checkpoint!r}, which does not exist: fix "
                            "the path, or train that teacher first (a finished run's model.safetensors)")
            continue
        try:
            if checkpoint.suffix == ".safetensors":
                tensor_shapes(checkpoint, fix=f"give a complete file in {where}.checkpoint")
            else:
                read_state_dict(checkpoint)
        except EdgeKDError as exc:
            problems.append(f"profile key '{where}.checkpoint': {exc}")
    return problems


def multilabel_problems(profile: Profile, deploy: bool = False) -> list[str]:
    """What a multi-label dataset (config.MULTILABEL_SOURCES) cannot do: losses without a multi-label form, variants
    that need one class per image, mixed batches; qat-kd and ExecuTorch programs in a study."""
    from edgekd.config import MULTILABEL_SOURCES, method_losses
    from edgekd.data.variants import MULTILABEL_KINDS
    from edgekd.distill.losses import LOSSES

    multi = [n for n, ds in profile.datasets.items() if ds.source in MULTILABEL_SOURCES]
    if not multi:
        return []
    named = f"dataset {multi[0]!r} is multi-label"
    usable = ", ".join(n for n, c in LOSSES.items() if c.supports_multilabel)
    problems = [f"'methods.{m}.{name}': loss {name!r} needs one class per image and {named}: use {usable}"
                for m, spec in profile.methods.items() for name in method_losses(spec)
                if name in LOSSES and not LOSSES.get(name).supports_multilabel]
    problems += [f"'variants.{v}.kind' is {c.kind!r}{' with shift' if c.shift else ''}, which needs one class per "
                 f"image, and {named}: use {', '.join(MULTILABEL_KINDS)}"
                 for v, c in profile.variants.items() if c.kind not in MULTILABEL_KINDS or c.shift]
    problems += [f"'{where}.mix' mixes batches, which {named} does not support yet: remove it"
                 for where, cfg in (("student", profile.student), *((f"students.{n}", c) for n, c in
                                                                     profile.students.items())) if cfg.mix]
    if deploy:
        methods = [profile.deploy.int8_method, *profile.deploy.int8_escalation, *profile.deploy.int8_compare]
        if "qat-kd" in methods:
            problems.append(f"deploy: qat-kd fine-tunes with one class per image and {named}: use ptq or "
                            "ptq-search")
        if "pte" in profile.deploy.targets:
            problems.append(f"deploy.targets: pte is not scored for multi-label data yet and {named}: remove it")
    return problems


def loss_problems(profile: Profile) -> list[str]:
    """Losses of the methods that do not exist, or do not take the parameters given, or not in their range."""
    from edgekd.config import method_grid, method_losses
    from edgekd.distill.losses import LOSSES, ComposedLoss

    problems = []
    for method, spec in profile.methods.items():
        where = f"methods.{method}"
        listed = {name: params for name, params in method_losses(spec).items() if isinstance(params, dict)}
        terms = {name: params for name, params in method_losses(method_grid(spec)[0]).items()  # built once
                 if isinstance(params, dict)}
        built = {}
        for name, params in terms.items():
            try:  # one term at a time, so each bad one gets its line
                LOSSES.get(name)
            except EdgeKDError as exc:
                problems.append(f"profile key '{where}.{name}': {exc}")
                continue
            try:
                built[name] = ComposedLoss({name: params}, where)
            except EdgeKDError as exc:
                problems.append(str(exc))
                continue
            for key, values in listed[name].items():
                allowed, expected = LOSS_PARAMETER_RULES.get(key, (None, ""))
                for value in values if isinstance(values, list) else [values]:  # every candidate of a grid
                    if allowed and not allowed(value):
                        problems.append(f"profile key '{where}.{name}.{key}' must be {expected}, got {value!r}")
        if (spec.get("teachers", ["main"]) != ["main"] and len(built) == len(terms)
                and any(b.needs_features for b in built.values())):
            problems.append(f"{where}: feature losses learn from one teacher; drop 'teachers' or the feature terms")
        mixing = [key for key, cfg in profile.trainings() if cfg.mix and not key.startswith("teacher")]
        if mixing and any(b.needs_teacher for b in built.values()) and profile.study.teacher_cache:
            problems.append(f"profile key '{mixing[0]}.mix' mixes images no teacher cache has outputs for ({where} "
                            "distils): set study.teacher_cache = false, so the teacher runs online on each mixed batch")
        if mixing and "dkd" in terms:
            problems.append(f"{where}: dkd splits KD by the image's labelled class, and a mixed image has two: drop "
                            f"'{mixing[0]}.mix' or the dkd term")
    return problems


def _device_problems(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    from edgekd.distill.execution import resolve_device

    try:
        resolve_device(device)
    except EdgeKDError as exc:
        return [f"profile key 'study.device': {exc}"]
    return []


def _data_problems(profile: Profile) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Problems of each dataset and of the variants against it, and the images of each split of each dataset."""
    from edgekd.config import variant_problems
    from edgekd.data.splits import split_sizes

    problems, images = [], {}
    for name, cfg in profile.datasets.items():
        sizes, found = dataset_sizes(name, cfg)
        problems += found
        if sizes is None or found:
            continue
        splits = split_sizes(sizes.train, sizes.test, cfg)
        images[name] = {split: int(n.sum()) for split, n in splits.items()}
        for variant, v in profile.variants.items():
            where = f"variants.{variant}"
            if not variant_problems(v, where):  # those without the data are the profile's, reported already
                problems += variant_problems(v, where, len(sizes.classes), int(splits["train"].min()))
    return problems, images


def dataset_sizes(name: str, cfg: DatasetConfig) -> tuple[SourceSizes | None, list[str]]:
    """A dataset's images per class and split (None when not knowable before a download), and its problems."""
    from edgekd.data.sources import SOURCES
    from edgekd.data.splits import split_problems

    if cfg.data_dir and not cfg.download and not Path(cfg.data_dir).expanduser().exists():
        return None, [f"profile key 'datasets.{name}.data_dir' (or --data-dir) is {cfg.data_dir!r}, which does not "
                      "exist: fix the path, or pass --download to fetch the data there"]
    try:
        sizes = SOURCES.get(cfg.source).sizes(cfg)
    except EdgeKDError as exc:  # unknown source, missing or damaged files: the source names itself
        return None, [str(exc)]
    if sizes is None:
        return None, []
    return sizes, split_problems(name, sizes.classes, sizes.train, sizes.test, cfg)


def deploy_problems(deploy: DeployConfig, devices: dict | None = None) -> list[str]:
    """What `edgekd study` would refuse in the profile's [deploy] table, or lack on this machine to run it."""
    from edgekd.export.int8 import INT8_METHODS
    from edgekd.export.quantize import CALIB_METHODS
    from edgekd.targets import ONNX_EXPORTERS, TARGETS

    presets = sorted({t.preset for t in TARGETS.values() if t.preset})
    rules = {
        "targets": (set(deploy.targets) <= {"onnx", "int8", "pte"},
                    "some of 'onnx', 'int8' and 'pte' (TensorRT engines are built on the target GPU with `edgekd "
                    "build`)"),
        "int8_presets": (set(deploy.int8_presets) <= set(presets), f"some of {', '.join(presets)}"),
        "calib_size": (deploy.calib_size >= 1, "at least 1"),
        "calib_method": (deploy.calib_method in CALIB_METHODS, ", ".join(CALIB_METHODS)),
        "int8_method": (deploy.int8_method in INT8_METHODS, ", ".join(INT8_METHODS)),
        "int8_compare": (set(deploy.int8_compare) <= set(INT8_METHODS), f"a list of {', '.join(INT8_METHODS)}"),
        "int8_escalation": (set(deploy.int8_escalation) <= set(INT8_METHODS),
                            f"a list of {', '.join(INT8_METHODS)} (tried in turn when an INT8 model fails the guard)"),
        "int8_max_drop": (deploy.int8_max_drop >= 0,
                          "percent of FP32's answers an INT8 model may change on validation, e.g. 1.0"),
        "qat_epochs": (deploy.qat_epochs >= 1, "at least 1"),
        "qat_lr": (deploy.qat_lr >= 0, "0 (a hundredth of the student's lr) or more"),
        "eval_limit": (deploy.eval_limit >= 0, "0 (the whole test split) or more"),
        "onnx_exporter": (deploy.onnx_exporter in ONNX_EXPORTERS, " or ".join(ONNX_EXPORTERS)),
        "batch_sizes": (bool(deploy.batch_sizes) and min(deploy.batch_sizes) >= 1, "sizes of at least 1, e.g. [1, 64]"),
        "iters": (deploy.iters >= 1, "at least 1"),
        "threads": (deploy.threads >= 0, "0 (the runtime's default) or more"),
    }
    problems = [f"profile key 'deploy.{key}' must be {expected}, got {getattr(deploy, key)!r}"
                for key, (ok, expected) in rules.items() if not ok]
    if not devices:
        problems += _bench_problems(deploy.backend, deploy.device, "deploy.backend", "deploy.device", here=True)
    for name, d in (devices or {}).items():
        where = f"devices.{name}"
        named = segment_problem(name, "device name")
        if named:
            problems.append(named)
        if d.ssh and d.ray:
            problems.append(f"profile table '{where}' has both ssh and ray: a device is reached one way; keep one")
        if d.retries < 0:
            problems.append(f"profile key '{where}.retries' must be 0 or more, got {d.retries!r}")
        for backend in d.backends or [deploy.backend]:
            problems += _bench_problems(backend, d.device or deploy.device, f"{where}.backends", f"{where}.device",
                                        here=not (d.ssh or d.ray))
    return problems + target_needs(deploy.targets, "deploy.targets")


def _bench_problems(name: str, device: str, backend_key: str, device_key: str, here: bool) -> list[str]:
    """A backend and device a bench runs with: known, a pair the targets table has, and (benched `here`, on this
    machine) its runtime installed. A remote device's runtimes are checked on the device, before any work."""
    from edgekd.targets import BACKENDS, missing_for

    backend = BACKENDS.get(name)
    if backend is None:
        return [f"profile key '{backend_key}' names {name!r}, which is not a backend: use {', '.join(BACKENDS)}"]
    if device not in backend.devices:
        return [f"profile key '{device_key}' must be {' or '.join(backend.devices)} for backend {name}, got "
                f"{device!r}"]
    if here and missing_for(name):
        return [f"backend {name} ({backend_key}) needs {backend.module}, which is not installed here: "
                f"{missing_for(name)}"]
    return []


def stale_run_problems(profile: Profile, study_root: Path) -> list[str]:
    """Finished runs in the study directory that the profile would reuse although it now names another model for
    them: their weights are not the profile's (a changed teacher.model would teach every student from the old one)."""
    from edgekd.distill.plan import train_config
    from edgekd.models import unknown_model
    from edgekd.workflows import plan_jobs

    problems = []
    for job in plan_jobs(profile, study_root) if study_root.is_dir() else []:
        cfg = train_config(profile, job.role) if job.kind == "train" else None
        try:
            made = read_json(job.run_dir / METRICS).get("model") if cfg else None
        except (UnreadableFile, AttributeError):  # absent, or damaged: it runs again anyway
            continue
        if made and made != cfg.model and not unknown_model(cfg.model):  # an unknown one has its own line
            problems.append(f"{job.run_dir} was trained as {made}, but the profile now asks for {cfg.model}: pass "
                            "--force to retrain it, or choose another --out")
    return problems


def writable_problems(out: Path) -> list[str]:
    """Whether files can be made under `out` (made if missing): checked with the temporary file every write
    starts with (runio writes to a temporary name and renames)."""
    out = Path(out)
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        return [f"--out {str(out)!r} cannot be a directory: {existing} is a file; choose another --out"]
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".edgekd-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return [f"--out {str(out)!r} cannot be written ({exc.strerror or exc}): free space there, fix its "
                "permissions, or choose another --out"]
    return []


def jobs_problems(jobs: int) -> list[str]:
    return [] if jobs >= 1 else [f"--jobs must be at least 1 (trainings run side by side), got {jobs}"]


# -- export and bundles ----------------------------------------------------------------------------------------
def export_problems(run_dir: Path, targets: tuple[str, ...], int8_presets: tuple[str, ...], calib_size: int,
                    eval_limit: int) -> list[str]:
    """What `edgekd export` would fail on: what the targets need installed, options, the runs and their data."""
    from edgekd.config import DatasetConfig
    from edgekd.export.bundle import find_student_runs
    from edgekd.targets import TARGETS, missing_for

    problems = target_needs(targets, "--target")
    if "trt" in targets:
        if missing_for("trt"):
            problems.append(f"--target trt needs TensorRT, which is not installed here: {missing_for('trt')}")
        else:
            from edgekd.runtime.tensorrt import engine_builder

            try:
                engine_builder()  # TensorRT's bindings and the GPU it builds for
            except EdgeKDError as exc:
                problems.append(f"--target trt: {exc}")
    presets = sorted({t.preset for t in TARGETS.values() if t.preset})
    if ("int8" in targets or "trt" in targets) and not set(int8_presets) <= set(presets):
        problems.append(f"--int8-preset {','.join(int8_presets)!r} must name some of {', '.join(presets)}")
    if calib_size < 1:
        problems.append(f"--calib-size must be at least 1, got {calib_size}")
    if eval_limit < 0:
        problems.append(f"--eval-limit must be 0 (the whole test split) or more, got {eval_limit}")
    try:
        runs = find_student_runs(Path(run_dir))
    except EdgeKDError as exc:
        return problems + [str(exc)]
    seen_data: set[str] = set()
    for run in runs:
        try:
            tensor_shapes(run / WEIGHTS, fix=RETRAIN)
            profile = read_json(run / RUN_PROFILE, fix=RETRAIN)
            name = profile["job"]["dataset"]
            cfg = profile["profile"]["datasets"][name]
        except UnreadableFile as exc:
            problems.append(str(exc))
            continue
        except (KeyError, TypeError):
            problems.append(f"{run / 'profile.json'} is not an edgekd run profile: {RETRAIN}")
            continue
        key = repr(sorted(cfg.items()))
        if key not in seen_data:  # a study's runs share a few datasets: each is checked once
            seen_data.add(key)
            problems += dataset_sizes(name, DatasetConfig(**cfg))[1]
    return problems


def target_needs(targets: tuple[str, ...] | list[str], option: str) -> list[str]:
    """The modules export targets need that are not installed here (TensorRT aside: see export_problems)."""
    problems = []
    for module in sorted({m for t in targets for m in EXPORT_NEEDS.get(t, ())}):
        if _missing(module):
            users = ", ".join(t for t in targets if module in EXPORT_NEEDS.get(t, ()))
            fix = "pip install 'edgekd[executorch]'" if module == "executorch" else TRAIN_STACK
            problems.append(f"{option} {users} needs {module}, which is not installed: {fix}")
    return problems


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return True


def bundle_problems(bundle: Path) -> list[str]:
    """What `edgekd bench` / `edgekd build` would trip over in a bundle: its manifest (damaged, or newer than this
    edgekd reads), and each file it lists (missing, or not the file exported: its sha256 differs), eval.npz."""
    from edgekd.runtime.manifest import read_manifest

    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
    except EdgeKDError as exc:
        return [str(exc)]
    again = f"export the run again (edgekd export {bundle.parent})"
    problems = []
    for key, entry in manifest["models"].items():
        path = bundle / str(entry.get("file", ""))
        if not path.is_file():
            problems.append(f"{path} is missing, though the manifest lists it as {key}: {again}")
        elif entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} is not the file exported as {key} (its sha256 differs): it is damaged or was "
                            f"replaced; {again}")
    evalset = bundle / "eval.npz"
    whole = zipfile.is_zipfile(evalset)
    if whole:
        with zipfile.ZipFile(evalset) as z:
            whole = {"images.npy", "labels.npy"} <= set(z.namelist()) and z.testzip() is None
    if not whole:
        problems.append(f"{evalset} is missing or damaged: {again}")
    return problems
