"""Run, bundle and bench records: the one place that reads them from a study directory, groups them, and
computes the paired KD gains and spreads that `distill`, `export`, `study` and `report` show.

A study directory holds, per run, `<dataset>/<variant>/<role>/seed<k>/metrics.json` (a run record), and per
exported student `.../bundle/manifest.json` (a bundle record) and `.../bundle/bench-<backend>-<device>.json`
(a bench record). Every record carries a `schema_version` (a file written before the field existed is version 1);
a record newer than this edgekd reads is refused with one line, never half-read.

Standard library only: `edgekd report` and the bench read these on machines without PyTorch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd import __version__
from edgekd.errors import EdgeKDError
from edgekd.roles import BASE_VARIANT, GRID_TAG
from edgekd.runio import MANIFEST, METRICS, RUN_PROFILE, WEIGHTS, UnreadableFile, read_json, sha256_file

SCHEMA_VERSION = 1  # the newest record format this edgekd reads and writes
STUDENT_ROLES = ("scratch", "kd")

# Student's t quantile 0.975 by degrees of freedom (no scipy dependency for a table lookup)
T_975 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                        2.052, 2.048, 2.045, 2.042], start=1))

# A run record's fields, in the order summary.json and runs.csv list them.
RUN_IDENTITY = ("dataset", "variant", "role", "method", "seed", "family", "model")
RUN_VALUES = ("test_acc", "val_acc", "balanced_test_acc", "ece", "head_acc", "tail_acc", "worst_group_acc",
              "extra_test_acc", "teacher_agreement", "params", "epochs", "wall_s", "train_s", "images_per_s", "fill_s",
              "teacher_forwards", "grid", "teachers", "metric", "test_map")


# -- statistics ----------------------------------------------------------------------------------------------------
@dataclass
class Spread:
    mean: float
    std: float  # sample standard deviation over seeds (0 with one seed)
    n: int
    values: tuple[float, ...] = field(default=(), compare=False, repr=False)  # the per-seed values, for the bootstrap

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        return cls(mean, math.sqrt(var), len(values), tuple(values))

    def bootstrap95(self) -> tuple[float, float] | None:
        """Percentile bootstrap 95% interval of the mean (None below 2 values). Over few seeds every resample is
        enumerated (n**n of them up to n = 6), so the interval is exact and the same on every run; above, 20,000
        resamples from a fixed seed. With 3 seeds it can only span the values' range: read it beside the t-interval,
        not instead of it."""
        values, n = self.values, len(self.values)
        if n < 2:
            return None
        if n <= 6:
            means = sorted(sum(values[i] for i in combo) / n for combo in itertools.product(range(n), repeat=n))
        else:
            rng = random.Random(0)
            means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(20000))
        return means[int(0.025 * (len(means) - 1))], means[int(math.ceil(0.975 * (len(means) - 1)))]

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean (Student's t; 0 with one seed)."""
        if self.n < 2:
            return 0.0
        return T_975.get(self.n - 1, 1.96) * self.std / math.sqrt(self.n)

    def fmt(self, scale: float = 100.0, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.mean * scale:{sign}.2f} ± {self.std * scale:.2f}"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def paired_gain(kd: Mapping[int, float], scratch: Mapping[int, float]) -> Spread | None:
    """KD minus scratch over the seeds both have (same seed = same initial weights); negative gains stay negative."""
    return Spread.of([kd[s] - scratch[s] for s in sorted(kd) if s in scratch])


def by_seed(runs: Iterable[Mapping], key: str = "test_acc") -> dict[int, float]:
    """One value per seed (runs without the value are left out)."""
    return {r["seed"]: r[key] for r in runs if r.get(key) is not None}


def variant_label(variant: str, family: str = "") -> str:
    """How a variant is shown: `noisy`, or `noisy@plain` for a second student family."""
    return f"{variant}@{family}" if family else variant


# -- fingerprints --------------------------------------------------------------------------------------------------
# Every stage's record carries the key of what made it: the resolved settings that affect it (`config`), the data
# description (`data`), content fingerprints of its inputs (`inputs`: the weights, caches and model files it read)
# and the record format (`schema_version`). A finished job counts only while its key is the one the current
# profile and inputs give; otherwise it runs again, and `key_changes` says why.
def make_key(kind: str, config: Mapping, data: Mapping | None = None, inputs: Mapping | None = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "config": dict(config), "data": dict(data or {}),
            "inputs": dict(inputs or {})}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(key: Mapping) -> str:
    """The content hash of a key: sha256 of its canonical JSON, 16 hex digits."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]


_ABSENT = object()


def _flatten(value: Any, prefix: str, out: dict) -> dict:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value
    return out


def _setting(path: str) -> str:
    section, _, rest = path.partition(".")
    if section in ("config", "data") and rest:
        return rest
    return {"inputs": f"input {rest}", "schema_version": "record format"}.get(section, path)


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    if isinstance(value, str):
        hexdigits = len(value) >= 16 and all(c in "0123456789abcdef" for c in value)
        return value[:8] if hexdigits else value or "''"
    return _canonical(value)


def key_changes(old: Mapping | None, new: Mapping, limit: int = 4) -> list[str]:
    """What differs between a recorded key and the current one, as `student.epochs 10 -> 12` lines."""
    if not old:
        return ["no key recorded (made before edgekd fingerprinted its records)"]
    a = _flatten(json.loads(_canonical(old)), "", {})
    b = _flatten(json.loads(_canonical(new)), "", {})
    names = [k for k in b if k != "kind"] + [k for k in a if k not in b and k != "kind"]
    changes = [f"{_setting(k)} {_shown(a.get(k, _ABSENT))} -> {_shown(b.get(k, _ABSENT))}"
               for k in names if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    if len(changes) > limit:
        changes = changes[:limit] + [f"{len(changes) - limit} more"]
    return changes


def why_stale(old: Mapping | None, new: Mapping) -> str:
    return ", ".join(key_changes(old, new)) or "the same key, but its record is incomplete"


# -- reading -------------------------------------------------------------------------------------------------------
def check_schema(data: Mapping, source: Path | str) -> int:
    """The record's schema_version (1 when absent); a newer one than this edgekd reads is a one-line error."""
    version = data.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise EdgeKDError(f"{source}: schema_version {version!r} is not a whole number: the file is damaged; "
                          "delete it and re-run the stage that wrote it")
    if version > SCHEMA_VERSION:
        raise EdgeKDError(f"{source}: record schema_version {version} is newer than edgekd {__version__} reads "
                          f"(up to {SCHEMA_VERSION}): upgrade edgekd (pip install -U edgekd)")
    return version


def _read(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise EdgeKDError(f"{path}: not an edgekd record (a JSON object is expected): delete it and re-run the stage "
                          "that wrote it")
    check_schema(data, path)
    return data


@dataclass(frozen=True)
class RunRecord:
    """One finished run (teacher, teacher cache, scratch or KD student), as summary.json lists it."""

    dataset: str
    variant: str
    role: str  # teacher | teacher_cache | scratch | kd
    seed: int
    method: str = ""  # the KD method of a kd run
    family: str = ""  # the student family ("" = the profile's student) or the teacher's name
    model: str = ""
    kind: str = BASE_VARIANT  # the variant's kind: base, label_noise, corruption, ...
    run_dir: str = ""  # relative to the study root
    values: dict[str, Any] = field(default_factory=dict)  # the measured fields metrics.json has (RUN_VALUES)
    schema_version: int = SCHEMA_VERSION
    fingerprint: str = ""  # of the key the run was made for ("" in records written before keys)

    @classmethod
    def from_metrics(cls, metrics: Mapping, run_dir: str = "", source: Path | str = METRICS) -> RunRecord:
        """From a run's metrics.json (the variant's kind is in its variant_stats)."""
        kind = (metrics.get("variant_stats") or {}).get("kind", BASE_VARIANT)
        return cls._make(metrics, kind, run_dir, source)

    @classmethod
    def from_summary(cls, record: Mapping, source: Path | str = "summary record") -> RunRecord:
        """From a summary record (summary.json, `as_dict`)."""
        return cls._make(record, record.get("kind", BASE_VARIANT), record.get("run_dir", ""), source)

    @classmethod
    def _make(cls, m: Mapping, kind: str, run_dir: str, source: Path | str) -> RunRecord:
        version = check_schema(m, source)
        missing = [k for k in ("dataset", "variant", "role", "seed") if k not in m]
        if missing:
            raise EdgeKDError(f"{source}: not an edgekd run record (no {', '.join(missing)}): delete the run "
                              "directory and run `edgekd distill` again")
        return cls(m["dataset"], m["variant"], m["role"], m["seed"], m.get("method", ""), m.get("family", ""),
                   m.get("model", ""), kind, run_dir, {k: m[k] for k in RUN_VALUES if k in m}, version,
                   m.get("fingerprint", ""))

    @classmethod
    def read(cls, path: Path, study_root: Path | None = None) -> RunRecord:
        """A run's metrics.json; run_dir is given relative to study_root when one is given."""
        path = Path(path)
        run = path.parent.relative_to(study_root) if study_root is not None else path.parent
        return cls.from_metrics(_read(path), str(run), path)

    @property
    def label(self) -> str:
        return variant_label(self.variant, self.family)

    def as_dict(self) -> dict:
        """The summary record (summary.json, runs.csv): identity, the measured values metrics.json has, kind."""
        identity = {k: getattr(self, k) for k in RUN_IDENTITY}
        return {**identity, **{k: self.values[k] for k in RUN_VALUES if k in self.values}, "kind": self.kind,
                "run_dir": self.run_dir, "schema_version": self.schema_version,
                **({"fingerprint": self.fingerprint} if self.fingerprint else {})}


@dataclass(frozen=True)
class BundleRecord:
    """An exported student: its manifest.json (models, their accuracy against FP32, the distill record)."""

    path: Path  # the bundle directory
    dataset: str
    variant: str
    student: dict
    distill: dict
    models: dict[str, dict]
    source: dict
    schema_version: int = SCHEMA_VERSION
    manifest: dict = field(default_factory=dict, repr=False)
    fingerprint: str = ""  # of the export key (student weights, export options, data)

    @classmethod
    def read(cls, bundle: Path) -> BundleRecord:
        bundle = Path(bundle)
        path = bundle / MANIFEST
        if not path.is_file():
            raise EdgeKDError(f"{bundle} is not a bundle (no manifest.json): pass a directory made by `edgekd export`")
        m = _read(path)
        return cls(bundle, m["dataset"], m["variant"], m.get("student", {}), m.get("distill", {}), m.get("models", {}),
                   m.get("source", {}), m.get("schema_version", 1), m, m.get("fingerprint", ""))


@dataclass(frozen=True)
class BenchRecord:
    """One bench file: every model of a bundle on one backend and device, with the run it was exported from."""

    path: Path
    dataset: str
    variant: str
    backend: str
    device: str
    results: list[dict]  # per model: accuracy, latency by batch size, file size, memory, timing clock
    environment: dict
    options: dict
    run: RunRecord | None = None  # the student run, when the bundle sits in a study's run directory
    schema_version: int = SCHEMA_VERSION
    wall_s: float | None = None  # the bench's own time (absent in records written before edgekd recorded it)
    fingerprint: str = ""  # of the bench key (the bundle's model files, the bench options)
    not_deployed: dict = field(default_factory=dict)  # models the export's INT8 guard did not deploy: the reason
    on: dict = field(default_factory=dict)  # the device it ran on: name ("" this machine), reach, address, hostname

    @property
    def device_name(self) -> str:
        """The profile's name of the device (the [devices] table), "" for the machine that ran the study."""
        return str(self.on.get("name") or "")

    @classmethod
    def read(cls, path: Path, study_root: Path | None = None) -> BenchRecord:
        path = Path(path)
        b = _read(path)
        metrics = path.parent.parent / METRICS
        run = RunRecord.read(metrics, study_root) if metrics.is_file() else None
        opts = b.get("options", {})
        return cls(path, b["dataset"], b["variant"], opts.get("backend", ""), opts.get("device", ""), b["results"],
                   b.get("environment", {}), opts, run, b.get("schema_version", 1), b.get("wall_s"),
                   b.get("fingerprint", ""), dict(b.get("not_deployed") or {}), dict(b.get("on") or {}))


def read_runs(study_root: Path) -> list[RunRecord]:
    """Every finished run under a study (any run directory with a metrics.json), in path order."""
    study_root = Path(study_root)
    return [RunRecord.read(p, study_root) for p in sorted(study_root.glob("*/*/*/seed*/metrics.json"))]


def collect(study_root: Path) -> list[dict]:
    """Every finished run under a study, as summary records (the study root's summary.json)."""
    return [r.as_dict() for r in read_runs(study_root)]


def read_bundles(study_root: Path) -> list[BundleRecord]:
    return [BundleRecord.read(p.parent) for p in sorted(Path(study_root).glob("*/*/*/seed*/bundle/manifest.json"))]


def read_benches(study_root: Path) -> list[BenchRecord]:
    """Every bench file of the study's bundles (role directories include kd@family), in path order."""
    study_root = Path(study_root)
    return [BenchRecord.read(p, study_root) for p in sorted(study_root.glob("*/*/*/seed*/bundle/bench-*.json"))]


def read_run_setup(run_dir: Path) -> dict:
    """What a run was given, for the report's "what was run": the data description (split sizes, classes, files
    skipped), the variant's statistics and profile entry, the training settings, losses and the execution
    (precision, device) it ran with, from its metrics.json and profile.json; a field a record lacks is absent."""
    run_dir = Path(run_dir)
    metrics = _read(run_dir / METRICS)
    profile = _read(run_dir / RUN_PROFILE) if (run_dir / RUN_PROFILE).is_file() else {}
    setup = {"data": metrics.get("data") or profile.get("data"), "variant_stats": metrics.get("variant_stats"),
             "variant_config": ((profile.get("profile") or {}).get("variants") or {}).get(metrics.get("variant")),
             "train": profile.get("train"), "execution": metrics.get("execution"), "losses": metrics.get("losses")}
    return {k: v for k, v in setup.items() if v is not None}


# -- grouping ------------------------------------------------------------------------------------------------------
def teacher_for(teachers: Mapping[tuple[str, str], Any], dataset: str, variant: str) -> Any:
    """A variant's teacher: its own (teacher_regime "variant") or else the clean data's."""
    return teachers.get((dataset, variant)) or teachers.get((dataset, BASE_VARIANT))


@dataclass
class RunGroup:
    """The student runs of one (dataset, variant, student family), with the teacher and teacher cache they used."""

    dataset: str
    variant: str
    family: str
    runs: list[dict]  # scratch and kd summary records
    teacher: dict | None = None
    cache: dict | None = None

    @property
    def label(self) -> str:
        return variant_label(self.variant, self.family)

    @property
    def teacher_acc(self) -> float | None:
        return self.teacher["test_acc"] if self.teacher else None

    @property
    def metric(self) -> str:
        """What test_acc measures in this group's records: "accuracy" (top-1), or "macro AUC" (multi-label)."""
        first = self.teacher or (self.runs[0] if self.runs else {})
        return first.get("metric", "accuracy")

    @property
    def scratch(self) -> list[dict]:
        return [r for r in self.runs if r["role"] == "scratch"]

    @property
    def methods(self) -> list[str]:
        return sorted({r["method"] for r in self.runs if r["role"] == "kd"})

    def kd(self, method: str) -> list[dict]:
        return [r for r in self.runs if r["role"] == "kd" and r["method"] == method]

    def scratch_acc(self, key: str = "test_acc") -> Spread | None:
        return Spread.of(list(by_seed(self.scratch, key).values()))

    def kd_acc(self, method: str, key: str = "test_acc") -> Spread | None:
        return Spread.of(list(by_seed(self.kd(method), key).values()))

    def gain(self, method: str, key: str = "test_acc") -> Spread | None:
        """KD minus scratch paired by seed."""
        return paired_gain(by_seed(self.kd(method), key), by_seed(self.scratch, key))


def _as_dict(record: RunRecord | Mapping) -> dict:
    return record.as_dict() if isinstance(record, RunRecord) else dict(record)


def group_runs(records: Iterable[RunRecord | Mapping]) -> list[RunGroup]:
    """One group per (dataset, variant, student family) in the order the records list them; a teacher without
    students yet (a study that has trained only its teachers) gets an empty group after them."""
    records = [_as_dict(r) for r in records]
    teachers = {(r["dataset"], r["variant"]): r for r in records if r["role"] == "teacher" and not r.get("family")}
    caches = {(r["dataset"], r["variant"]): r for r in records if r["role"] == "teacher_cache"}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:  # a grid candidate (kd~2) is how a method was tuned, not a result of the study
        if r["role"] in STUDENT_ROLES and GRID_TAG not in (r.get("method") or ""):
            groups.setdefault((r["dataset"], r["variant"], r.get("family", "")), []).append(r)
    for key in teachers:
        if not any(k[:2] == key for k in groups):
            groups[(*key, "")] = []
    return [RunGroup(dataset, variant, family, runs, teacher_for(teachers, dataset, variant),
                     caches.get((dataset, variant)))
            for (dataset, variant, family), runs in groups.items()]


# -- what is current -----------------------------------------------------------------------------------------------
PLAN_FILE = "plan.json"  # the last run's job graph: per job its record and the fingerprint that is current


def read_plan(study_root: Path) -> dict | None:
    """The study's plan.json as `edgekd study` / `edgekd distill` last wrote it, or None (none, or unreadable)."""
    path = Path(study_root) / PLAN_FILE
    try:
        plan = read_json(path) if path.is_file() else None
    except UnreadableFile:
        return None
    if not isinstance(plan, dict) or not isinstance(plan.get("jobs"), list):
        return None
    check_schema(plan, path)
    return plan


@dataclass
class Selection:
    """The records of a study that are current for the profile it was last run with, and what was left out."""

    runs: list[RunRecord]
    benches: list[BenchRecord]
    left_out: list[str]  # "<run dir>/<file>: why", one per record not shown
    planned: bool  # False: no plan.json (a study made before plans), every run is shown
    explains: list[dict] = field(default_factory=list)  # Grad-CAM records (edgekd/explain.py), with their "path"


def _bench_still_matches(bench: BenchRecord, root: Path) -> str | None:
    """Why a bench record no longer describes its bundle and run (None when it does); for benches no plan covers."""
    bundle = bench.path.parent
    try:
        manifest = read_json(bundle / MANIFEST)
        weights = sha256_file(bundle.parent / WEIGHTS)
    except (UnreadableFile, OSError):
        return "its bundle or run is gone"
    if manifest.get("source", {}).get("checkpoint_sha256") != weights:
        return "its run was trained again after the export"
    key = read_json(bench.path).get("key") or {}
    for name, digest in (key.get("inputs") or {}).items():
        path = bundle / name
        if not path.is_file() or sha256_file(path) != digest:
            return f"{name} changed after the bench"
    return None


def select_current(study_root: Path) -> Selection:
    """Runs and benches whose fingerprints are the ones the study's plan.json lists as current. Benches of a
    plan without deploy jobs (`edgekd distill` last, then `edgekd bench` by hand) count while their run is current
    and their bundle's files are still the ones benched."""
    root = Path(study_root)
    plan = read_plan(root)
    jobs = {j["record"]: j for j in (plan or {}).get("jobs", []) if isinstance(j, dict) and j.get("record")}
    benched = any(j.get("kind") == "bench" for j in jobs.values())
    left: list[str] = []

    def current(path: Path, fp: str) -> bool:
        rel = path.relative_to(root).as_posix()
        job = jobs.get(rel)
        if job is None:
            left.append(f"{rel}: not in the last run's plan (the profile no longer has it)")
        elif not fp or job.get("fingerprint") != fp:
            left.append(f"{rel}: stale ({job.get('reason') or 'made for other settings or inputs'})")
        else:
            return True
        return False

    runs = [r for r in read_runs(root) if plan is None or current(root / r.run_dir / METRICS, r.fingerprint)]
    # The plan lists jobs in the profile's order (variants as written: base, labels25, labels10, labels5), which
    # is the order a reader expects in every table and plot; the path order would sort "labels10" before "labels5".
    order = {record: i for i, record in enumerate(jobs)}
    runs.sort(key=lambda r: order.get(f"{r.run_dir}/metrics.json", len(order)))
    kept = {r.run_dir for r in runs}
    benches = []
    for bench in read_benches(root):
        if plan is not None and benched:
            if current(bench.path, bench.fingerprint):
                benches.append(bench)
            continue
        rel = bench.path.relative_to(root).as_posix()
        why = None if bench.run is None or bench.run.run_dir in kept else "its run is not current"
        why = why or _bench_still_matches(bench, root)
        if why:
            left.append(f"{rel}: stale ({why})")
        else:
            benches.append(bench)
    benches.sort(key=lambda b: order.get(f"{b.run.run_dir}/metrics.json", len(order)) if b.run else len(order))
    explains = []
    for path in sorted(root.glob("*/*/explain*/seed*/explain.json")):
        record = _read(path)
        if plan is None or current(path, record.get("fingerprint", "")):
            explains.append({**record, "path": str(path)})
    return Selection(runs, benches, left, plan is not None, explains)


def current_runs(study_root: Path) -> list[dict]:
    """The current runs of a study (see `select_current`), as summary records."""
    return [r.as_dict() for r in select_current(study_root).runs]
