"""Where a study's jobs run: `local` (one after the other in this process), `processes` (a pool of N processes on
this machine) or `ray` (a Ray task per job, on a Ray started for the run or an existing cluster).

Every executor runs the same pure job function (`edgekd.jobs.execute`) on the jobs the driver hands it, starts a
job only once the jobs it needs have finished, keeps going when one fails (jobs that need a failed one are not
run, with a line saying so) and reports each start, result and failure to the driver (`edgekd.jobs.Driver`).
A job marked exclusive (a bench: it times latency) runs with nothing else beside it on its machine.
"""

from __future__ import annotations

import os
import socket
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.jobs import Job, execute, execute_in_worker, one_line

EXECUTORS = ("local", "processes", "ray")
RAY_INSTALL = "pip install 'edgekd[ray]' (or pip install 'ray[default]>=2.9')"


def make_executor(name: str | None = None, jobs: int = 1, address: str | None = None,
                  cpus_per_job: float | None = None):
    """`name` None: `processes` when jobs > 1, else `local`."""
    name = name or ("processes" if jobs > 1 else "local")
    if name == "local":
        return LocalExecutor()
    if name == "processes":
        return ProcessExecutor(max(1, jobs))
    if name == "ray":
        return RayExecutor(address, cpus_per_job)
    raise EdgeKDError(f"unknown executor {name!r}: use {', '.join(EXECUTORS)}")


def default_threads(profile) -> int:
    """A training's CPU threads when nothing else says: study.threads, else all of this machine's (torch's default).
    Float results depend on them, so every executor trains with the same count unless told otherwise."""
    import torch

    return profile.study.threads or torch.get_num_threads()


class Executor(ABC):
    name = "executor"

    def job_cpus(self, profile) -> float:
        """The CPUs (and torch threads) of one training job."""
        return float(default_threads(profile))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release; Ray stops its local cluster
        return None

    def resolve_device(self, name: str) -> str:
        from edgekd.distill.execution import resolve_device

        return resolve_device(name)

    def measure(self, fn, *args):
        """Run a plan-time measurement where the jobs will run (here: this process, before any job starts)."""
        return fn(*args)

    @abstractmethod
    def run(self, profile, root: Path, jobs: list[Job], force: bool, driver) -> None:
        """Run `jobs` (dependencies first), reporting each start, finish and failure to `driver`."""


def _blocked_by(job: Job, failed: set[str]) -> str | None:
    return next((d for d in job.deps if d in failed), None)


def _not_run(dep: str) -> str:
    return f"not run: it needs {dep}, which failed"


class LocalExecutor(Executor):
    """One job after the other in this process, with step-by-step progress; the default."""

    name = "local"

    def run(self, profile, root, jobs, force, driver):
        failed: set[str] = set()
        for job in jobs:
            dep = _blocked_by(job, failed)
            if dep:
                failed.add(job.label)
                driver.failed(job, _not_run(dep))
                continue
            driver.running(job)
            try:
                result = execute(profile, root, job, force, driver.reporter)
            except Exception as exc:  # KeyboardInterrupt is not caught: a stopped study stops
                failed.add(job.label)
                driver.failed(job, one_line(exc))
                continue
            driver.done(job, result)


class ProcessExecutor(Executor):
    """N worker processes on this machine, each job started as soon as the jobs it needs are done; each worker
    gets its share of the CPU threads. An exclusive job waits for the running ones and runs alone."""

    name = "processes"

    def __init__(self, workers: int):
        self.workers = workers

    def job_cpus(self, profile) -> float:
        return float(max(1, default_threads(profile) // self.workers))

    def run(self, profile, root, jobs, force, driver):
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        data, labels = profile.to_dict(), {j.label for j in jobs}
        waiting, running, done, failed = list(jobs), {}, set(), set()
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            while waiting or running:
                for job in list(waiting):
                    dep = _blocked_by(job, failed)
                    if dep:
                        waiting.remove(job)
                        failed.add(job.label)
                        driver.failed(job, _not_run(dep))
                        continue
                    if any(d in labels and d not in done for d in job.deps):
                        continue
                    if any(j.exclusive for j in running.values()) or len(running) >= self.workers:
                        break
                    if job.exclusive and running:
                        break  # nothing new starts until the running jobs are done and it has the machine
                    waiting.remove(job)
                    threads = max(1, int(job.num_cpus))
                    running[pool.submit(execute_in_worker, data, str(root), job, force, threads)] = job
                    driver.running(job)
                    if job.exclusive:
                        break
                if not running:
                    continue
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:
                        failed.add(job.label)
                        driver.failed(job, one_line(exc))
                        continue
                    done.add(job.label)
                    driver.done(job, result)


# -- Ray -----------------------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
    except ImportError:
        raise EdgeKDError(f"--executor ray needs Ray, which is not installed here: {RAY_INSTALL}") from None
    return ray


class _Started:
    """A Ray actor the tasks tell when they start, so the driver can show what runs (not just what waits)."""

    def __init__(self):
        self.labels: list[str] = []

    def mark(self, label: str) -> None:
        self.labels.append(label)

    def drain(self) -> list[str]:
        out, self.labels = self.labels, []
        return out


PROBE_DIR = ".edgekd-probe"


def probe_storage(root: str, token: str) -> str | None:
    """On a Ray node: can this worker see what the driver wrote under the study root, and write beside it? Returns
    what is wrong, or None."""
    where = Path(root) / PROBE_DIR
    try:
        if (where / token).read_text() != token:
            return "sees another file under --out than the driver wrote"
    except OSError:
        return "cannot see the files the driver writes under --out"
    try:
        (where / f"{token}.{socket.gethostname()}.{os.getpid()}").write_text(token)
    except OSError as exc:
        return f"cannot write under --out ({exc.strerror or exc})"
    return None


class RayExecutor(Executor):
    """A Ray task per job with its resource request (num_cpus, num_gpus from the job's device; a bench asks for a
    whole node's CPUs), the jobs it needs passed as object refs. `address` None starts a local Ray for the run
    (all CPUs of this machine); `auto` or `ray://host:10001` joins a running cluster, whose nodes must all see
    --out at the same path (checked before the first job). A training asks for `cpus_per_job` CPUs and trains
    with as many threads (default: study.threads, else this machine's thread count, as the local executor: the
    same float results; fewer run more trainings side by side, with other float rounding)."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_job: float | None = None):
        self.ray = _import_ray()
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.started = False

    def job_cpus(self, profile) -> float:
        return float(self.cpus_per_job or default_threads(profile))

    def _start(self) -> None:
        import logging

        ray = self.ray
        if ray.is_initialized():
            return
        options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise EdgeKDError(f"cannot start or reach {where}: {one_line(exc)}") from None
        self.started = True

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def resolve_device(self, name: str) -> str:
        if name != "auto" or not self.address:
            return super().resolve_device(name)
        self._start()
        return "cuda" if self.ray.cluster_resources().get("GPU", 0) > 0 else "cpu"

    def measure(self, fn, *args):
        if not self.address:  # a local Ray runs on this machine: measure here, before any task
            return fn(*args)
        self._start()
        gpus = 1 if str(args[-1]).startswith("cuda") else 0
        return self.ray.get(self.ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(fn).remote(*args))

    def _check_storage(self, root: Path) -> None:
        """Fail with one line when a node's workers cannot read and write the study root."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self.ray
        token = uuid.uuid4().hex
        where = root / PROBE_DIR
        where.mkdir(parents=True, exist_ok=True)
        (where / token).write_text(token)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            probe = ray.remote(num_cpus=0, max_retries=0)(probe_storage)
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(root), token) for n in nodes]
            for node, problem in zip(nodes, ray.get(refs), strict=True):
                if problem is None and not any(p.name.startswith(f"{token}.") for p in where.iterdir()):
                    problem = "writes under --out to storage the driver does not see"
                if problem:
                    raise EdgeKDError(f"a Ray worker on {node.get('NodeManagerAddress', '?')} {problem} ({root}): put "
                                      "--out on storage every Ray node mounts at the same path (NFS, a cluster "
                                      "filesystem) and run again")
        finally:
            for p in where.glob(f"{token}*"):
                p.unlink(missing_ok=True)
            try:
                where.rmdir()
            except OSError:
                pass

    def run(self, profile, root, jobs, force, driver):
        ray = self.ray
        self._start()
        self._check_storage(root)
        node_cpus = max((n.get("Resources", {}).get("CPU", 1) for n in ray.nodes() if n.get("Alive")), default=1)
        started = ray.remote(num_cpus=0)(_Started).remote()
        task = ray.remote(max_retries=0)(execute_in_worker)
        data, refs, by_ref = profile.to_dict(), {}, {}
        for job in jobs:
            cpus = node_cpus if job.exclusive else min(job.num_cpus, node_cpus)  # never more than a node has
            threads = max(1, int(cpus))
            deps = [refs[d] for d in job.deps if d in refs]
            ref = task.options(num_cpus=cpus, num_gpus=job.num_gpus, name=job.label).remote(
                data, str(root), job, force, threads, started, *deps)
            refs[job.label], by_ref[ref] = ref, job
        order = {job.label: i for i, job in enumerate(jobs)}
        by_label = {job.label: job for job in jobs}
        failed: set[str] = set()
        pending = dict(by_ref)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for label in ray.get(started.drain.remote()):
                driver.running(by_label[label])
            for ref in sorted(ready, key=lambda r: order[pending[r].label]):
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task's own error, or the one of a job it needed
                    dep = _blocked_by(job, failed)
                    failed.add(job.label)
                    driver.failed(job, _not_run(dep) if dep else one_line(exc))
                    continue
                driver.done(job, result)
