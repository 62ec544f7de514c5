"""Profiles: TOML study definitions read into typed dataclasses.

Unknown keys and wrong types are rejected with the key's dotted name, `--set a.b=v` overrides any key,
and the resolved profile is plain data (`to_dict`) saved beside every run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

from edgekd.errors import EdgeKDError
from edgekd.roles import FAMILY_TAG, GRID_TAG, PRUNE_TAG, pruned_role, segment_problem


@dataclass
class DatasetConfig:
    source: str = ""  # data-source name; empty means the dataset's table key (`[datasets.digits]`)
    image_size: int = 0  # 0 keeps the native size; otherwise every image is resized to a square of this side
    channels: int = 0  # 0 keeps the native channels; 1 or 3 converts (imagefolder data comes in mixed modes)
    val_fraction: float = 0.1  # carved from training data, stratified: checkpoints are chosen here, never on test
    train_limit: int = 0  # 0 = all; a stratified cap that keeps CPU studies inside their time budget
    test_limit: int = 0  # 0 = all; a stratified cap on the reported test split
    data_dir: str = ""  # where files live; empty means $EDGEKD_DATA, then the source's default places
    download: bool = False  # torchvision downloads only when asked: tests and benchmarks never download
    hflip: bool = True  # off where a mirror image is another class (digits, text)
    crop_padding: int = 2  # random-crop padding; views per image = (2p+1)^2 x (2 if hflip)
    classes: int = 10  # synthetic source only
    samples_per_class: int = 60  # synthetic source only
    # Audio sources (audiofolder, spoken-digits): each clip becomes an image_size x image_size feature map, one
    # channel, as uint8 (edgekd.data.audio says how), so views, the teacher cache, export and bench are unchanged.
    features: str = "logmel"  # logmel | mfcc
    sample_rate: int = 16000  # clips are resampled to this rate (Hz) first: 16 kHz is what keyword spotting uses
    clip_seconds: float = 1.0  # each clip centre-padded with silence or centre-cropped to this length
    # Background noise: white noise mixed into every clip (train and test) at this signal-to-noise ratio in dB,
    # seeded per file; a noisy recording condition as its own dataset. Empty (none) by default.
    snr_db: float | None = None
    # mosaic source: 2x2 mosaics of another source's images (`tiles`: digits, fashion-mnist, mnist, ...), labelled
    # with the set of their tiles' classes (multi-label); `mosaics` per split, 0 = as many as the tile split has
    tiles: str = "digits"
    mosaics: int = 0


# The dataset keys only some sources read: in a key (edgekd.data.describe) only where the source reads them, so
# adding them changed no other dataset's key.
AUDIO_SETTINGS = ("features", "sample_rate", "clip_seconds", "snr_db")
SOURCE_SETTINGS = {"audiofolder": AUDIO_SETTINGS, "spoken-digits": AUDIO_SETTINGS, "mosaic": ("tiles", "mosaics")}
MULTILABEL_SOURCES = ("mosaic", "labelsets")  # sources whose images carry a set of classes (edgekd.data.sampling.multilabel)

VARIANT_KINDS = ("base", "fraction", "labels", "per_class", "imbalance", "label_noise", "spurious", "classes",
                 "corruption", "resolution")
CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "brightness", "jpeg")


@dataclass
class VariantConfig:
    kind: str = "base"
    # fraction: stratified share of the training set kept; labels: the share that keeps its labels (the rest is
    # unlabeled: cross-entropy skips it, KD terms learn from it; validation keeps only that labeled share)
    fraction: float = 1.0
    per_class: int = 0  # per_class: samples kept per class
    ratio: float = 1.0  # imbalance: n_max / n_min, exponential profile over classes (CIFAR-10-LT)
    rate: float = 0.0  # label_noise: share of training labels changed
    noise: str = "symmetric"  # symmetric (uniform over other classes) | pairs (fixed confusable pairs)
    pairs: list[list[int]] = field(default_factory=list)  # pairs noise; empty = each class c -> (c + 1) mod C
    p: float = 0.9  # spurious: probability that the cue agrees with the label in training
    classes: list[int] = field(default_factory=list)  # classes: the subset kept (train and test)
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))  # corruption: test-time sets
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    resolution: int = 0  # resolution: test images seen at this side, resized back to the training size
    # Any kind: also test on the corrupted sets (and at `resolution` if set). Shifts change no training, so a base
    # variant with shift = true measures domain shift without training the same students twice.
    shift: bool = False
    seed: int = 0


@dataclass
class TrainConfig:
    model: str = "resnet18"  # any timm model name
    epochs: int = 10
    # At least this many optimizer steps: a variant with a tenth of the data then trains for more epochs instead of
    # a tenth of the steps, so the comparison measures the data, not an unfinished schedule. 0 = epochs only.
    min_steps: int = 0
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to zero
    label_smoothing: float = 0.0
    # Drop the stem's max-pool: ImageNet stems shrink 28x28 inputs to 7x7 before the first stage, which costs
    # Fashion-MNIST accuracy; without the pool the first stage sees 14x14.
    small_input: bool = True
    pretrained: bool = False  # timm's pretrained weights, where they are already in the local cache
    checkpoint: str = ""  # teacher only: a local .safetensors or weights-only .pth instead of training
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto measures the candidates on the device
    channels_last: str = "auto"  # auto | on | off; auto measures, as precision
    # auto | on | off: torch.compile of the model a training steps. auto: where measured faster, counting the
    # compile against the training's steps (edgekd/distill/execution.py); on: the default mode, unmeasured
    compile: str = "auto"
    # Batch mixing on top of the crop/flip views: "mixup" (Zhang et al. 2018) or "cutmix" (Yun et al. 2019), the
    # mixing share drawn from Beta(mix_alpha, mix_alpha) per step. A mixed image is in no teacher cache, so a KD
    # student that mixes distils from its teacher run online on each mixed batch (study.teacher_cache = false), the
    # "consistent teaching" of Beyer et al. (CVPR 2022): teacher and student see the very same image.
    mix: str = ""
    mix_alpha: float = 1.0
    # [teachers.<name>] only: k > 0 makes this teacher [teacher]'s own run stopped after epoch k (its weights at
    # the end of that epoch, which that run saves), not a training of its own: an early-stopped teacher, which
    # can teach better than the finished one (Cho & Hariharan, ICCV 2019). Its other settings are [teacher]'s.
    stop_epoch: int = 0

    def steps_per_epoch(self, samples: int) -> int:
        return max(1, samples // self.batch_size)  # the trainer drops a trailing partial batch

    def epochs_for(self, samples: int) -> int:
        return max(self.epochs, -(-self.min_steps // self.steps_per_epoch(samples))) if samples else self.epochs

    def steps_for(self, samples: int) -> int:
        """The optimizer steps a training on `samples` images takes."""
        return self.steps_per_epoch(samples) * self.epochs_for(samples)


@dataclass
class StudyConfig:
    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # students; KD gain is paired by seed
    teacher_seed: int = 0  # one teacher per dataset variant serves every student seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512
    # Teacher outputs per (sample, augmentation view), computed once and shared by every student (FKD).
    teacher_cache: bool = True
    cache_topk: int = 0  # 0 = dense logits; k > 0 keeps the top-k logits per view where classes are many
    threads: int = 0  # CPU threads per training; 0 = this machine's, shared by the trainings at once
    # clean: one teacher per dataset, trained on the unmodified data, teaches every variant's students;
    # variant: each variant trains its own teacher on the same modified data as its students.
    teacher_regime: str = "clean"
    # Trainings side by side on one device, each with its share of the CPU threads (and 1/N of a GPU). Small
    # students leave a device mostly idle: two quickstart students on one thread each do 1.6x the work of one on two
    # threads here, and a small MobileNet ran an H100 at 4.2k img/s where a larger one does 27.6k. 0: measured once
    # per machine (edgekd/distill/sharing.py) unless study.threads fixes them; threads change float rounding on a
    # CPU, so every executor trains with the chosen threads.
    trainings_at_once: int = 0


@dataclass
class DeployConfig:
    """What `edgekd study` exports and benches for every student (see `edgekd export` / `edgekd bench`)."""

    targets: list[str] = field(default_factory=lambda: ["onnx", "int8"])
    int8_presets: list[str] = field(default_factory=lambda: ["cpu"])
    calib_size: int = 512
    calib_method: str = "minmax"
    # "ptq" or "ptq-search": plain post-training INT8 costs depthwise students points (MobileNetV3's hard-swish
    # outliers); ptq-search picks the calibration and keeps the fewest sensitive node groups float, on validation.
    int8_method: str = "ptq"
    # The guard on every deployed INT8 model: at most this percent of FP32's top-1 answers changed on the validation
    # split (never test), which bounds the points it can lose; label-free, so wrong validation labels hide nothing.
    # A model past it is made again by each method of int8_escalation in turn (qat-kd trains, so it is left to the
    # profile to ask for); if none holds, the bundle keeps it marked not deployed, with the reason.
    int8_max_drop: float = 1.0
    int8_escalation: list[str] = field(default_factory=lambda: ["ptq-search"])
    # qat-kd: fine-tune each student this many epochs with fake quantization, against its own teacher and losses, at
    # qat_lr (0: a hundredth of the student's lr: the weights are trained; only the rounding is being learned).
    qat_epochs: int = 2
    qat_lr: float = 0.0
    # Other INT8 methods to score beside int8_method (e.g. ["ptq", "qat-kd"]): each is made per preset, scored on
    # the bundle's evaluation images and recorded, not deployed, so the report's "KD gain kept after INT8" table
    # has a row per method. Each costs an export (or a qat fine-tune) per student.
    int8_compare: list[str] = field(default_factory=list)
    eval_limit: int = 2000  # test images carried in each bundle; bench accuracy is measured on them
    # "torchscript" (torch's TorchScript-based exporter + onnxscript's optimizer: the same graph, 9-20x faster on
    # these students) or "dynamo" (torch's default, for a model TorchScript cannot trace); targets.ONNX_EXPORTERS
    onnx_exporter: str = "torchscript"
    backend: str = "ort"
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    iters: int = 100
    threads: int = 0


@dataclass
class DeviceConfig:
    """A machine a study's bundles are benched on (edgekd/bench/devices.py), `[devices.<name>]`. Neither `ssh` nor
    `ray`: this machine. Each bundle is benched there on each of `backends`, its record named by the device
    (bundle/bench-<backend>-<device>@<name>.json), its key holding the device's identity (hostname, CPU, GPU, edgekd
    and runtime versions) so a changed device reruns its own benches only."""

    # user@host, or a Host of the ssh config: reached with the system's OpenSSH client (keys, agent, ProxyJump as in
    # ~/.ssh/config), files copied with rsync (content checksums: only what changed), else scp
    ssh: str = ""
    # a Ray custom resource the device's node was started with (ray start --resources '{"orin": 1}'): the bench jobs
    # ask for it, so Ray places them there; the study runs with --executor ray
    ray: str = ""
    ssh_config: str = ""  # an ssh config file (ssh -F) instead of ~/.ssh/config
    edgekd: str = "edgekd"  # the command that runs edgekd on the device, e.g. ~/venv/bin/edgekd (ssh only)
    workdir: str = ".cache/edgekd/bundles"  # where bundles are copied on the device: under the login's home, or absolute
    backends: list[str] = field(default_factory=list)  # empty: [deploy.backend]
    device: str = ""  # cpu | cuda; empty: deploy.device
    retries: int = 2  # a lost SSH connection is tried again this many times (after 1 s, 2 s, ...) before its job fails


@dataclass
class CompressConfig:
    """The compression ladder: each KD student of `students` is also pruned and fine-tuned with KD from the same
    teacher, as its own run (`<method>+prune<percent>`, e.g. kd+prune50) with its own bundle and bench, so the
    report lines up FP32 -> pruned -> pruned + INT8 (the bundle's INT8 models) with their KD gains."""

    prune: float = 0.0  # share of the channels removed from every prunable group (Torch-Pruning); 0: no pruning
    finetune_epochs: int = 5
    # 0: a tenth of the student's lr. The pruned weights are trained already: a full learning rate (and warm-up
    # from zero) would throw away what the unpruned student learned before the fine-tune could use it.
    finetune_lr: float = 0.0
    method: str = "kd"  # the method whose losses (and teachers) fine-tune the pruned students
    students: list[str] = field(default_factory=list)  # the methods whose students are pruned; empty: `method`'s

    @property
    def sources(self) -> list[str]:
        return (self.students or [self.method]) if self.prune else []

    def role(self, source: str) -> str:
        return pruned_role(source, self.prune)


@dataclass
class ExplainConfig:
    """Where the students look (edgekd/explain.py): Grad-CAM maps of the teacher, scratch and KD students of every
    variant on a fixed, stratified sample of test images, compared with the teacher's."""

    images: int = 0  # test images per variant; 0: no maps
    top: float = 0.2  # the share of a map's pixels that counts as where it looks (top-20% IoU)


# A method table holds its losses (name -> {weight, parameters}) and two optional keys: `teachers`, the teachers
# it learns from ("main" is [teacher]; others are [teachers.<name>]), and `combine`, how their softened outputs
# are merged: "mean", or "val_weighted" (weights proportional to each teacher's validation accuracy).
# A loss parameter may list candidate values (`kd = { temperature = [2, 4, 8] }`): the method is then tuned, per
# dataset variant and student family, on the first seed by validation accuracy (never test), and every seed trains
# with the choice (edgekd.distill.plan.method_spec).
METHOD_OPTIONS = ("teachers", "combine")
MethodSpec = dict[str, dict[str, float | list[float]] | list[str] | str]


def method_losses(spec: MethodSpec) -> dict[str, dict[str, float]]:
    return {k: v for k, v in spec.items() if k not in METHOD_OPTIONS}


def grid_axes(spec: MethodSpec) -> list[tuple[str, str, list[float]]]:
    """(loss, parameter, candidate values) of every loss parameter that lists values, in the table's order."""
    return [(loss, key, values) for loss, params in method_losses(spec).items() if isinstance(params, dict)
            for key, values in params.items() if isinstance(values, list)]


def method_grid(spec: MethodSpec) -> list[MethodSpec]:
    """Every candidate of a method: the cartesian product of its listed parameter values (the first listed varying
    slowest); a method that lists none is its own only candidate."""
    axes = grid_axes(spec)
    if not axes:
        return [spec]
    out = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        candidate = copy.deepcopy(spec)
        for (loss, key, _), value in zip(axes, combo, strict=True):
            candidate[loss][key] = float(value)
        out.append(candidate)
    return out


def _default_methods() -> dict[str, MethodSpec]:
    return {"kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}}}


@dataclass
class Profile:
    study: StudyConfig = field(default_factory=StudyConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=lambda: {"digits": DatasetConfig()})
    teacher: TrainConfig = field(default_factory=TrainConfig)
    student: TrainConfig = field(default_factory=lambda: TrainConfig(model="mobilenetv3_small_100"))
    # More student families, trained with the same seeds and methods (e.g. a depthwise and a plain-conv one):
    # their runs sit beside the main student's as `<role>@<family>` (scratch@resnet, kd@resnet).
    students: dict[str, TrainConfig] = field(default_factory=dict)
    # method name -> loss name -> {weight, loss parameters}; each method is one KD student per seed.
    methods: dict[str, MethodSpec] = field(default_factory=_default_methods)
    # Extra teachers for multi-teacher methods, trained beside [teacher] as `teacher@<name>`.
    teachers: dict[str, TrainConfig] = field(default_factory=dict)
    variants: dict[str, VariantConfig] = field(default_factory=lambda: {"base": VariantConfig()})
    deploy: DeployConfig = field(default_factory=DeployConfig)
    # Where bundles are benched; empty: this machine, with deploy.backend and deploy.device. When given, only these
    # (add a table with neither ssh nor ray to keep this machine too).
    devices: dict[str, DeviceConfig] = field(default_factory=dict)
    compress: CompressConfig = field(default_factory=CompressConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def student_config(self, family: str = "") -> TrainConfig:
        return self.students[family] if family else self.student

    @property
    def families(self) -> list[str]:
        return ["", *self.students]

    def trainings(self) -> list[tuple[str, TrainConfig]]:
        """Every training configuration with its profile key: teacher, student, students.*, teachers.*."""
        return [("teacher", self.teacher), ("student", self.student),
                *((f"students.{k}", v) for k, v in self.students.items()),
                *((f"teachers.{k}", v) for k, v in self.teachers.items())]


class ProfileError(EdgeKDError):
    pass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclass tables become instances).

    A value that cannot be converted raises; the keys of nested tables that cannot be are added to `problems`
    and left at their defaults, so one pass names every bad key of a profile.
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ProfileError(f"profile key '{key}' must be a table, got {type(value).__name__}")
        return _build(tp, value, key, problems)
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"profile key '{key}' must be a table, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {k: _convert(v, vt, f"{key}.{k}", problems) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ProfileError(f"profile key '{key}' must be a list, got {type(value).__name__}")
        (it,) = typing.get_args(tp)
        return [_convert(v, it, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            tried: list[str] = []
            try:
                converted = _convert(value, option, key, tried)
            except ProfileError:
                continue
            if not tried:
                return converted
        raise ProfileError(f"profile key '{key}' has the wrong type: got {value!r}, expected {_type_name(tp)}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ProfileError(
            f"profile key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            if dotted in RETIRED:
                problems.append(f"profile key '{dotted}' is retired: {RETIRED[dotted]}")
                continue
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            problems.append(f"unknown profile key '{dotted}': {hint}")
            continue
        try:
            kwargs[key] = _convert(value, hints[key], dotted, problems)
        except ProfileError as exc:
            problems.append(str(exc))
    return cls(**kwargs)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`student.epochs=3` -> (['student', 'epochs'], 3); values are TOML, bare words are strings."""
    if "=" not in assignment:
        raise ProfileError(f"--set {assignment!r} needs the form key=value, e.g. --set student.epochs=3")
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ProfileError(f"--set {assignment!r}: '{part}' is not a table")
        node[path[-1]] = value
    return data


# What each value may be, by key, as (allowed?, what to write instead). Rules that need the data or the machine
# (model names, paths, class counts, GPUs) are `edgekd check`'s (edgekd/check.py).
def _at_least(low):
    return lambda v: v >= low, f"at least {low}"


TRAIN_RULES = {
    "model": (bool, "a timm model name, e.g. resnet18"),
    "epochs": _at_least(1),
    "min_steps": _at_least(0),
    "batch_size": _at_least(1),
    "optimizer": (lambda v: v in ("sgd", "adamw"), "'sgd' or 'adamw'"),
    "lr": (lambda v: v > 0, "above 0"),
    "weight_decay": _at_least(0),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_epochs": _at_least(0),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    "channels_last": (lambda v: v in ("auto", "on", "off"), "auto, on or off"),
    "compile": (lambda v: v in ("auto", "on", "off"), "auto, on or off"),
    "mix": (lambda v: v in ("", "mixup", "cutmix"), "'' (none), 'mixup' or 'cutmix'"),
    "mix_alpha": (lambda v: v > 0, "above 0 (the Beta distribution's parameter)"),
    "stop_epoch": _at_least(0),
}
DATASET_RULES = {
    "image_size": (lambda v: v == 0 or v >= 4, "0 (the native size) or a side of at least 4 pixels"),
    "channels": (lambda v: v in (0, 1, 3), "0 (the native channels), 1 or 3"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1): checkpoints are chosen on this share of the training data"),
    "train_limit": _at_least(0),
    "test_limit": _at_least(0),
    "crop_padding": _at_least(0),
    "classes": _at_least(2),
    "samples_per_class": _at_least(1),
    "features": (lambda v: v in ("logmel", "mfcc"), "'logmel' or 'mfcc'"),
    "sample_rate": (lambda v: 1000 <= v <= 192000, "a sample rate in Hz, e.g. 16000"),
    "clip_seconds": (lambda v: 0 < v <= 60, "a clip length in seconds, above 0 and at most 60"),
    "snr_db": (lambda v: v is None or -20 <= v <= 60, "a signal-to-noise ratio in dB from -20 to 60, or absent"),
    "tiles": (lambda v: v not in ("", "mosaic"), "the data source of the tiles, e.g. digits or fashion-mnist"),
    "mosaics": _at_least(0),
}
STUDY_RULES = {
    "name": (lambda v: bool(v) and not set(v) & set("/\\") and v not in (".", ".."),
             "a directory name (no slashes), e.g. my-study"),
    "teacher_regime": (lambda v: v in ("clean", "variant"), "'clean' or 'variant'"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
               "auto, cpu, cuda or cuda:N"),
    "eval_batch_size": _at_least(1),
    "cache_topk": _at_least(0),
    "threads": _at_least(0),
    "trainings_at_once": _at_least(0),
}


def _rule_problems(obj: Any, rules: dict, where: str) -> list[str]:
    out = []
    for key, (allowed, expected) in rules.items():
        value = getattr(obj, key)
        if not allowed(value):
            out.append(f"profile key '{where}.{key}' must be {expected}, got {value!r}")
    return out


def variant_problems(cfg: VariantConfig, where: str = "variant", classes: int | None = None,
                     smallest_class: int | None = None) -> list[str]:
    """What is wrong with a variant's parameters; given the dataset's class count and its smallest class's training
    images, also what does not fit the data."""
    if cfg.kind not in VARIANT_KINDS:
        return [f"unknown variant kind {cfg.kind!r} in '{where}.kind': use one of {', '.join(VARIANT_KINDS)}"]

    def index_ok(c: int) -> bool:
        return c >= 0 and (classes is None or c < classes)

    most = "the smallest class size" if smallest_class is None else smallest_class
    indices = "the class indices" if classes is None else f"0..{classes - 1}"
    checks = {  # kind -> [(its parameter is fine, key, what it must be)]
        "fraction": [(0 < cfg.fraction <= 1, "fraction", "in (0, 1]")],
        "labels": [(0 < cfg.fraction <= 1, "fraction", "the labeled share, in (0, 1]")],
        "per_class": [(1 <= cfg.per_class and (smallest_class is None or cfg.per_class <= smallest_class),
                       "per_class", f"between 1 and {most}")],
        "imbalance": [(cfg.ratio >= 1, "ratio", "at least 1 (n_max / n_min)")],
        "label_noise": [(0 <= cfg.rate < 1, "rate", "a share with 0 <= rate < 1"),
                        (cfg.noise in ("symmetric", "pairs"), "noise", "'symmetric' or 'pairs'"),
                        (all(len(pair) == 2 and all(map(index_ok, pair)) for pair in cfg.pairs), "pairs",
                         f"pairs of class indices ({indices}), e.g. [[0, 6], [2, 4]]")],
        "spurious": [(0 <= cfg.p <= 1, "p", "a probability in [0, 1]")],
        "classes": [(len(set(cfg.classes)) >= 2 and all(map(index_ok, cfg.classes)), "classes",
                     f"a list naming at least two of {indices}")],
        "resolution": [(cfg.resolution >= 2, "resolution", "the test-time side in pixels, e.g. 14")],
    }.get(cfg.kind, [])
    if cfg.kind == "corruption" or cfg.shift:
        checks += [(set(cfg.corruptions) <= set(CORRUPTIONS), "corruptions", f"some of {', '.join(CORRUPTIONS)}"),
                   (all(1 <= s <= 5 for s in cfg.severities), "severities", "from 1 (mild) to 5 (strong)")]
    if cfg.shift and cfg.kind != "resolution":
        checks.append((cfg.resolution == 0 or cfg.resolution >= 2, "resolution", "0 (none) or at least 2 pixels"))
    return [f"profile key '{where}.{key}' must be {expected}, got {getattr(cfg, key)!r}"
            for ok, key, expected in checks if not ok]


def profile_problems(profile: Profile) -> list[str]:
    """Every value of a parsed profile that is out of range or contradicts another; empty when all are fine."""
    found = []
    for where, train in profile.trainings():
        found += _rule_problems(train, TRAIN_RULES, where)
        if train.checkpoint and not where.startswith("teacher"):
            found.append(f"profile key '{where}.checkpoint' is for teachers: students always train")
        if train.stop_epoch and not where.startswith("teachers."):
            found.append(f"profile key '{where}.stop_epoch' is for [teachers.<name>]: the named teacher that is "
                         "[teacher]'s run stopped after that epoch")
        elif train.stop_epoch and train.stop_epoch > profile.teacher.epochs:
            found.append(f"profile key '{where}.stop_epoch' is {train.stop_epoch}, past [teacher]'s "
                         f"{profile.teacher.epochs} epochs: choose an epoch it trains")
    found += _rule_problems(profile.study, STUDY_RULES, "study")
    if not profile.study.seeds:
        found.append("profile key 'study.seeds' is empty: give at least one seed, e.g. seeds = [0]")
    elif len(set(profile.study.seeds)) < len(profile.study.seeds):
        found.append(f"profile key 'study.seeds' repeats a seed: {profile.study.seeds}")
    if not profile.datasets:
        found.append("profile table 'datasets' is empty: name at least one, e.g. [datasets.digits]")
    for name, ds in profile.datasets.items():
        found += _rule_problems(ds, DATASET_RULES, f"datasets.{name}")
    if not profile.variants:
        found.append("profile table 'variants' is empty: keep at least the base one, e.g. [variants.base]")
    for name, v in profile.variants.items():
        found += variant_problems(v, f"variants.{name}")
        if v.kind == "classes" and profile.study.teacher_regime == "clean":
            found.append(f"variant '{name}' keeps a subset of classes, which a teacher trained on all classes "
                         "cannot teach: set study.teacher_regime = 'variant'")
    for method, spec in profile.methods.items():
        names = spec.get("teachers", ["main"])
        if not isinstance(names, list) or not names:
            found.append(f"profile key 'methods.{method}.teachers' must be a list such as [\"main\", \"r18\"]")
            names = []
        for name in names:
            if name != "main" and name not in profile.teachers:
                found.append(f"profile key 'methods.{method}.teachers' names {name!r}, which is not a teacher: "
                             f"add a [teachers.{name}] table or use \"main\"")
        if spec.get("combine", "mean") not in ("mean", "val_weighted"):
            found.append(f"profile key 'methods.{method}.combine' must be 'mean' or 'val_weighted'")
        for loss, key, values in grid_axes(spec):
            if not values:
                found.append(f"profile key 'methods.{method}.{loss}.{key}' lists no value: give candidates, e.g. "
                             f"{key} = [1, 2], or one number")
        if GRID_TAG in method:
            found.append(f"method name {method!r} may not contain '{GRID_TAG}'")
        for key, value in method_losses(spec).items():
            if not isinstance(value, dict):
                found.append(f"profile key 'methods.{method}.{key}' must be a table of loss parameters, "
                             f"e.g. {key} = {{ weight = 1.0 }}")
        if not method_losses(spec):
            found.append(f"profile table 'methods.{method}' names no loss: add e.g. kd = {{ weight = 0.9 }}")
    if profile.explain.images < 0 or not 0 < profile.explain.top < 1:
        found.append(f"profile keys 'explain.images' (0: off, or test images per variant) and 'explain.top' (a share "
                     f"in (0, 1)) got {profile.explain.images!r} and {profile.explain.top!r}")
    c = profile.compress
    if not 0 <= c.prune < 1:
        found.append(f"profile key 'compress.prune' must be the share of channels to remove, in [0, 1), got {c.prune!r}")
    if c.prune:
        if c.finetune_epochs < 1:
            found.append(f"profile key 'compress.finetune_epochs' must be at least 1, got {c.finetune_epochs!r}")
        if c.finetune_lr < 0:
            found.append("profile key 'compress.finetune_lr' must be above 0 (or 0: a tenth of the student's lr)")
        for key, names in (("method", [c.method]), ("students", c.sources)):
            for name in names:
                if name not in profile.methods:
                    found.append(f"profile key 'compress.{key}' names {name!r}, which is not a method: use one of "
                                 f"{', '.join(profile.methods) or '(none: add a [methods.kd] table)'}")
    for method in profile.methods:
        if PRUNE_TAG in method or FAMILY_TAG in method or "/" in method:
            found.append(f"method name {method!r} may not contain '{PRUNE_TAG}', '{FAMILY_TAG}' or '/'")
    for family in [*profile.students, *profile.teachers]:
        if FAMILY_TAG in family or "/" in family:
            found.append(f"student or teacher name {family!r} may not contain '{FAMILY_TAG}' or '/'")
    return found + _path_problems(profile)


def _path_problems(profile: Profile) -> list[str]:
    """Every name that becomes a directory level of a run's path (edgekd.roles) must be one path segment; a name
    already refused for holding a role tag is not named twice."""
    tagged = (GRID_TAG, PRUNE_TAG, FAMILY_TAG, "/")
    names = [("study name", [profile.study.name]), ("dataset name", [*profile.datasets]),
             ("variant name", [*profile.variants]), ("method name", [*profile.methods]),
             ("student or teacher name", [*profile.students, *profile.teachers])]
    found = []
    for what, values in names:
        for name in values:
            problem = segment_problem(name, what)
            if problem and (what in ("study name", "dataset name", "variant name")
                            or not any(tag in name for tag in tagged)):
                found.append(problem)
    return found


def parse_profile(data: dict[str, Any]) -> tuple[Profile, list[str]]:
    """The profile `data` describes, and every problem in it: unknown keys and wrong types (those keys keep their
    defaults), then values out of range. `edgekd check` reports them all at once."""
    problems: list[str] = []
    profile = _build(Profile, data, "", problems)
    # A table that names its datasets replaces the default, rather than merging with `digits`.
    for name, ds in profile.datasets.items():
        ds.source = ds.source or name
    return profile, problems + profile_problems(profile)


# Keys an older edgekd wrote, with what replaces them: a user's profile gets the line; a run's saved profile
# (saved_profile) is read without them.
RETIRED = {"study.trainings_per_gpu": "set study.trainings_at_once = N (trainings side by side on one device, "
                                       "CPU or GPU), or leave it out to have it measured"}


def profile_from_dict(data: dict[str, Any]) -> Profile:
    profile, problems = parse_profile(data)
    if problems:
        raise ProfileError("\n".join(problems))
    return profile


def saved_profile(data: dict[str, Any]) -> Profile:
    """The profile a run saved (run_profile.json), read without the keys retired since it was written."""
    data = {**data}
    for dotted in RETIRED:
        table, _, key = dotted.rpartition(".")
        if isinstance(data.get(table), dict) and key in data[table]:
            data[table] = {k: v for k, v in data[table].items() if k != key}
    return profile_from_dict(data)


STARTING_PROFILE = "profiles/quickstart.toml"


def read_profile_data(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A profile file's tables with the `--set` overrides applied, not yet checked."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {str(path)!r} not found: pass a TOML file such as {STARTING_PROFILE}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if isinstance(exc, tomllib.TOMLDecodeError) else "not text"
        raise ProfileError(f"profile {str(path)!r} is not valid TOML ({reason}): fix the syntax there") from None
    if not data:  # running every default silently would answer a question nobody asked
        raise ProfileError(f"profile {str(path)!r} is empty: start from a complete one, e.g. "
                           f"cp {STARTING_PROFILE} {path}, and edit it")
    data.setdefault("study", {}).setdefault("name", path.stem)
    return apply_overrides(data, overrides or [])


def load_profile(path: str | Path, overrides: list[str] | None = None) -> Profile:
    return profile_from_dict(read_profile_data(path, overrides))
