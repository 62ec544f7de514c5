"""The driver: decides what is current, hands the rest to an executor as plain tasks, and keeps plan.json and the
reporter up to date. Skip-if-current, the per-job lock and the error log live here, once, for every kind of job.

`execute` is the one function that runs a job anywhere the study root can be read and written: it takes the job's
lock, finds it current (then it is skipped) or runs its kind. A task that fails with anything but edgekd's own
one-line errors leaves its traceback in `error.log` beside the job's record.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.pipeline.events import Reporter, StepsOnly
from edgekd.pipeline.graph import Context, Job, NotReady, PlanFile, Status, job_status, kind_of
from edgekd.runio import ERROR_LOG

logger = logging.getLogger("edgekd.pipeline")


def one_line(exc: BaseException) -> str:
    """An error as one line: edgekd's own messages as they are, anything else with its type."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps a task's exception (cause: None if not unpicklable)
    text = [t.strip() for t in str(cause).strip().splitlines() if t.strip()]
    if isinstance(cause, EdgeKDError):
        return " / ".join(text)[:400]
    if cause is exc and hasattr(exc, "cause"):  # a Ray error without its cause: its last line names it
        return (text[-1] if text else type(exc).__name__)[:300]
    return f"{type(cause).__name__}: {text[0][:300] if text else ''}"


@contextmanager
def job_lock(root: Path, job: Job):
    """One process at a time per job output, across drivers and machines: a killed driver's Ray workers can still
    be finishing jobs when the study is run again, and then the new run waits for them and finds their jobs current
    instead of working in the same directory. Keyed by the record's path, not the label: a torchrun follower runs
    its rank 0's job into a scratch directory of its own, beside rank 0, which holds the job's lock. The lock goes
    with the process that holds it."""
    import hashlib

    record = job.record.absolute()
    try:
        name = record.relative_to(Path(root).absolute()).as_posix().replace("/", "__")
    except ValueError:  # outside the study (a follower's scratch directory)
        name = hashlib.sha256(str(record).encode()).hexdigest()[:16]
    with file_lock(root / ".locks" / (name + ".lock")):
        yield


@contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (made if absent) while the block runs, released when it ends or its process dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def execute(ctx: Context, job: Job) -> tuple[dict, bool]:
    """Run one job, or find it current: returns (its record, whether it was skipped). The job's inputs must be
    there; exceptions propagate as they are."""
    kind = kind_of(job)
    with job_lock(ctx.root, job):
        status = job_status(ctx, job)
        if status.current:
            return status.record, True
        if status.had_record and not ctx.force:
            logger.info("%s: runs again: %s", job.label, status.reason)
        if status.key is None:  # --force, or an input that is not there: the key says which
            try:
                status.key = kind.key(ctx, job)
            except NotReady as exc:
                raise EdgeKDError(f"{job.label}: {exc}: {exc.fix}") from None
        return kind.run(ctx, job, status), False


def run_task(ctx: Context, job: Job) -> dict:
    """`execute` as the driver's task: any failure becomes one line (the traceback beside the job), and the
    result is what the driver records: skipped or not, the output's fingerprint, its brief record, wall time."""
    start = time.perf_counter()
    try:
        record, skipped = execute(ctx, job)
    except EdgeKDError:
        raise
    except Exception as exc:  # a bug or an environment problem: one line here, the traceback beside the job
        raise EdgeKDError(f"{one_line(exc)}{_log_traceback(job)}") from exc
    return {"label": job.label, "skipped": skipped, "fingerprint": record.get("fingerprint"),
            "record": kind_of(job).brief(record), "wall_s": round(time.perf_counter() - start, 2)}


def _log_traceback(job: Job) -> str:
    log = job.record.parent / ERROR_LOG
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {job.label}\n{traceback.format_exc()}\n")
        return f" (traceback in {log})"
    except OSError:
        return ""


def run_in_worker(threads: int, started, ctx: Context, job: Job, *deps) -> dict:
    """`run_task` in a worker process or a Ray task with `threads` CPU threads (the context's `setup` applies
    them); `started` (a Ray actor) hears when the job starts; `deps` are the results of the jobs it needs (Ray
    passes them as object refs, so the task starts only after they finished)."""
    if started is not None:
        started.mark.remote(job.label)
    if ctx.setup is not None:
        ctx.setup(threads)
    return run_task(ctx, job)


@dataclass(frozen=True)
class Task:
    """What an executor runs: `here()` in this process (with live progress), or `fn(threads, started, *args,
    *dep_results)` in a worker, with the job's resource ask."""

    id: str
    here: Any  # Callable[[], dict]
    fn: Any  # a module-level callable, picklable
    args: tuple
    deps: tuple[str, ...]
    num_cpus: float
    num_gpus: float
    exclusive: bool
    resources: Any = None  # Mapping[str, float]: custom Ray resources; None or empty: none


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


class Driver:
    """Decides what is current, hands the rest to an executor, and keeps plan.json and the reporter up to date."""

    def __init__(self, ctx: Context, jobs: list[Job], executor, measured: dict | None = None,
                 cores: int | None = None, trainings_at_once: int = 1):
        self.ctx, self.jobs, self.executor = ctx, jobs, executor
        self.cores = cores or os.cpu_count() or 1  # the CPU threads the plan shares among jobs on this machine
        self.trainings_at_once = trainings_at_once  # the plan's choice (edgekd/distill/sharing.py)
        self.reporter = ctx.reporter or Reporter()
        self.plan = PlanFile(ctx.root, ctx.profile.to_dict(), jobs, measured or {}, executor.name)
        self.outcome = Outcome()
        self.by_label = {j.label: j for j in jobs}

    def run(self) -> Outcome:
        todo, pending = [], set()
        for job in self.jobs:
            waits = [d for d in job.deps if d in pending]
            if waits and not self.ctx.force:
                status = Status(False, f"after {waits[0]}, which runs first", had_record=job.record.is_file())
            else:
                status = job_status(self.ctx, job)
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
            self.executor.run([self._task(job) for job in todo], self)
        return self.outcome

    def _task(self, job: Job) -> Task:
        ctx = self.ctx
        remote = Context(ctx.profile, ctx.root, ctx.force, setup=ctx.setup, services=ctx.services)
        local = Context(ctx.profile, ctx.root, ctx.force, StepsOnly(self.reporter), services=ctx.services)
        return Task(job.label, lambda: run_task(local, job), run_in_worker, (remote, job), job.deps, job.num_cpus,
                    job.num_gpus, job.exclusive, dict(job.resources))

    # -- what the executors report, by task id -------------------------------------------------------------------
    def running(self, label: str) -> None:
        self.plan.set(label, "running")
        self.reporter.running(self.by_label[label])

    def done(self, label: str, result: dict) -> None:
        state = "current" if result["skipped"] else "done"
        self.plan.set(label, state, result["fingerprint"], "", result.get("wall_s"))
        (self.outcome.skipped if result["skipped"] else self.outcome.ran).append(label)
        self.plan.write()
        record = dict(result["record"])
        record.setdefault("wall_s", result.get("wall_s"))
        self.reporter.finish(self.by_label[label], record, skipped=result["skipped"])

    def failed(self, label: str, message: str) -> None:
        self.plan.set(label, "failed", None, f"failed: {message}")
        self.outcome.failed[label] = message
        self.plan.write()
        self.reporter.failed(self.by_label[label], message)
