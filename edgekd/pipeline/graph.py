"""The job graph: jobs, the kinds of job stages register, a job's status, and the plan file.

A `Job` is a place in the study (dataset, variant, role, seed: its run directory) plus what the graph needs to
order and place it (kind, deps, resources) and `params`, whatever its kind decided for it at plan time (a
training's precision and memory format). A job is a pure function of (profile, study root, job): its record
carries its key (the resolved settings that affect it, the data, content fingerprints of the inputs it read), and
a job whose record has the key the profile and inputs give now is current.

A stage implements `JobKind` beside its code and registers it (`register_kind`); nothing here knows what any
kind does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd import __version__
from edgekd.errors import EdgeKDError
from edgekd.records import PLAN_FILE, SCHEMA_VERSION, fingerprint, why_stale
from edgekd.registry import Registry
from edgekd.roles import Label
from edgekd.runio import UnreadableFile, read_json, sha256_file, write_json

if TYPE_CHECKING:
    from collections.abc import Callable



@dataclass(frozen=True)
class Job:
    dataset: str
    variant: str
    role: str  # edgekd.roles: teacher[@name] | teacher_cache | scratch[@family] | <method>[@family] | explain[@family]
    seed: int
    run_dir: Path
    kind: str = "train"  # a registered JobKind's name
    output: str = ""  # what a job makes inside the run directory, when that is not the run itself (bundle, bench-...)
    deps: tuple[str, ...] = ()  # labels of the jobs whose outputs this one reads
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    exclusive: bool = False  # alone on its machine while it runs (a bench times latency)
    # custom resources it asks of a Ray cluster ({"orin": 1}: a node started with that resource runs it)
    resources: Mapping[str, float] = field(default_factory=dict, hash=False)
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)  # its kind's plan-time choices (JSON data)

    @property
    def label(self) -> str:
        return str(Label(self.dataset, self.variant, self.role, self.seed, self.output))

    @property
    def record(self) -> Path:
        """The file whose presence (with the current key) means the job is done."""
        return kind_of(self).record(self)


@dataclass
class Context:
    """What every job runs against: the resolved profile, the study root, --force, (in this process only) a
    reporter for step progress, and `setup`, a module-level function a worker process calls first with its CPU
    share (the composition root's: it registers the stages' kinds and sets torch's threads). Sent whole to worker
    processes and Ray tasks (the reporter stays behind)."""

    profile: Any
    root: Path
    force: bool = False
    reporter: Any = None  # an edgekd.pipeline.events.Reporter; None: nobody listens
    setup: Callable[[int], None] | None = None
    # What the composition root wires between stages that may not import each other, by name (module-level
    # callables, so the context still pickles): export's INT8 trainer `int8_trainer` comes from distill.
    services: Mapping[str, Any] = field(default_factory=dict)

    def __getstate__(self):
        return {**self.__dict__, "reporter": None}


class NotReady(EdgeKDError):
    """An input of the job is not there (yet): the job it needs has not finished."""

    fix = "run the jobs it needs first"  # what the job's one-line failure tells the user to do


_SHA: dict[tuple[str, int, int], str] = {}


def input_fingerprint(path: Path, what: str) -> str:
    """Content hash of an input file, remembered per (path, size, mtime) for the life of the process; NotReady
    while the job that makes it has not finished."""
    path = Path(path)
    if not path.is_file():
        raise NotReady(f"{what} is not trained yet ({path} missing)")
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA:
        _SHA[memo] = sha256_file(path)
    return _SHA[memo]


class JobKind(ABC):
    """What a stage implements for each kind of job it runs. `plan` adds the kind's jobs to the graph (after those
    of earlier stages, which it may depend on); `key` is what the record must carry to be current (NotReady while
    an input is missing); `damage` finds broken outputs cheaply; `outgrown` says why a record with the current key
    still falls short (a cache that covers too few views); `run` does the work and returns the record; `prepare`
    is plan-time work done once before any job runs (measure, choose) whose results go in the plan file."""

    name = ""
    deploy = False  # a deployment stage: planned by `edgekd study`, not by `edgekd distill`
    derived = False  # built on demand, when not current, before a job that needs it runs alone (outside a plan)

    def plan(self, ctx: PlanContext, planned: list[Job]) -> list[Job]:
        return []

    @abstractmethod
    def record(self, job: Job) -> Path:
        """The file whose presence, with the current key, means the job is done."""

    @abstractmethod
    def key(self, ctx: Context, job: Job) -> dict:
        """What the record must carry to be current; NotReady while an input is missing."""

    def damage(self, ctx: Context, job: Job, record: dict) -> str | None:
        return None

    def outgrown(self, ctx: Context, job: Job, record: dict) -> str | None:
        return None

    @abstractmethod
    def run(self, ctx: Context, job: Job, status: Status) -> dict:
        """Do the work (the driver found the job not current; `status.key` is its key) and return the record."""

    def prepare(self, ctx: PlanContext, jobs: list[Job], measured: dict) -> list[Job]:
        return jobs

    def brief(self, record: dict) -> dict:
        """The part of a record the driver shows and keeps in memory (a training's history stays in its file)."""
        return {k: v for k, v in record.items() if k not in ("history", "key", "per_class_test_acc", "data",
                                                              "results", "environment", "packages", "classes")}


@dataclass
class PlanContext(Context):
    """A Context at plan time: also the device the jobs train on, the CPU threads of the machine they run on
    (`cores`), the CPUs a training asks the executor for when it says (Ray's --cpus-per-job; 0: its threads),
    `measure`, which runs a plan-time measurement where the jobs will run (the executor's; `resources=`: on a Ray
    node that has them), and the executor's name."""

    device: str = "cpu"
    cores: int = 1
    cpus_per_job: float = 0.0
    measure: Callable[..., Any] | None = None
    executor: str = "local"  # the executor's name: a job that needs a Ray resource needs "ray"


KINDS: Registry[JobKind] = Registry("job kind")


def register_kind(kind: JobKind) -> JobKind:
    return KINDS.register(kind.name)(kind)


def kind_of(job: Job) -> JobKind:
    return KINDS.get(job.kind)


def kinds_of(module: str) -> list[JobKind]:
    """The kinds a stage module registered, in its order."""
    return [k for k in KINDS.registered() if type(k).__module__ == module]


@dataclass
class Status:
    current: bool
    reason: str = ""  # why it runs: "new", a key change, damage, --force, a dependency that runs first
    key: dict | None = None
    record: dict | None = None  # the finished record, when current
    had_record: bool = False  # a record was there (stale or damaged), so the reason is worth a line


def job_status(ctx: Context, job: Job) -> Status:
    """Whether the job's output is current (its record carries the key the profile and its inputs give now)."""
    kind = kind_of(job)
    had = job.record.is_file()
    if ctx.force:
        return Status(False, "--force", had_record=had)
    try:
        key = kind.key(ctx, job)
    except NotReady as exc:
        return Status(False, str(exc), had_record=had)
    except UnreadableFile as exc:
        return Status(False, f"an input is damaged: {exc}", had_record=had)
    if not had:
        return Status(False, "new", key)
    try:
        record = read_json(job.record)
        damage = (f"{job.record} is not an edgekd record" if not isinstance(record, dict)
                  else kind.damage(ctx, job, record))
    except UnreadableFile as exc:
        return Status(False, f"its files are damaged: {exc}", key, had_record=True)
    if damage:
        return Status(False, damage, key, had_record=True)
    if record.get("fingerprint") != fingerprint(key):
        return Status(False, why_stale(record.get("key"), key), key, had_record=True)
    short = kind.outgrown(ctx, job, record)
    if short:
        return Status(False, short, key, had_record=True)
    return Status(True, "", key, record, True)


class PlanFile:
    """`<study>/plan.json`: the job graph with each job's resources, plan-time choices, state and current
    fingerprint, and the plan-time measurements (`execution`) later runs reuse. Only the driver writes it;
    `edgekd report` reads which records are current from it."""

    def __init__(self, root: Path, profile_data: dict, jobs: list[Job], measured: dict, executor: str):
        self.path = root / PLAN_FILE
        self.entries = {j.label: {"id": j.label, "kind": j.kind, "record": j.record.relative_to(root).as_posix(),
                                  "deps": list(j.deps), "resources": {"num_cpus": j.num_cpus, "num_gpus": j.num_gpus,
                                                                      "exclusive": j.exclusive, **j.resources},
                                  **j.params, "state": "queued", "fingerprint": None, "reason": ""} for j in jobs}
        # The graph's sink: the workflow builds the report after the rest, from whatever is current then.
        report = {"id": "report", "kind": "report", "record": None, "deps": list(self.entries)}
        self.data = {"schema_version": SCHEMA_VERSION, "written_by": f"edgekd {__version__}", "executor": executor,
                     "profile": profile_data, "execution": measured, "jobs": [*self.entries.values(), report]}

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


def previous_measurements(root: Path) -> dict:
    """The plan-time measurements of earlier runs of this study (the plan file records them)."""
    from edgekd.records import read_plan

    try:
        plan = read_plan(root)
    except EdgeKDError:
        return {}
    table = (plan or {}).get("execution")
    return dict(table) if isinstance(table, dict) else {}
