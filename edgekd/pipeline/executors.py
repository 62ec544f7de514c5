"""Where a study's jobs run: `local` (one after the other in this process), `processes` (a pool of N processes on
this machine; N unset: as many as the jobs' resource asks fit, the plan's choice of trainings at once), `ray` (a
Ray task per job, on a Ray started for the run or an existing cluster), or, when nothing is asked, `auto`: the
processes executor when the plan runs several trainings at once, else local.

An executor runs plain tasks (edgekd.pipeline.driver.Task: a callable, its arguments, the ids it waits for and its
resource ask); it knows no job kind, no profile and no torch. It starts a task only once the tasks it needs have
finished, keeps going when one fails (tasks that need a failed one are not run, with a line saying so) and reports
each start, result and failure to the driver by task id. A task marked exclusive (a bench: it times latency) runs
with nothing else beside it on its machine.
"""

from __future__ import annotations

import os
import socket
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.pipeline.driver import Task, one_line

EXECUTORS = ("auto", "local", "processes", "ray")
RAY_INSTALL = "pip install 'edgekd[ray]' (or pip install 'ray[default]>=2.9')"


def make_executor(name: str | None = None, jobs: int | None = 1, address: str | None = None,
                  cpus_per_job: float | None = None):
    """`name` None: `processes` when jobs > 1, `local` when jobs is 1, `auto` when jobs is None."""
    name = name or ("auto" if jobs is None else "processes" if jobs > 1 else "local")
    if name == "auto":
        return AutoExecutor()
    if name == "local":
        return LocalExecutor()
    if name == "processes":
        return ProcessExecutor(jobs)
    if name == "ray":
        return RayExecutor(address, cpus_per_job)
    raise EdgeKDError(f"unknown executor {name!r}: use {', '.join(EXECUTORS)}")


def fitting_workers(tasks: list, cores: int) -> int:
    """How many of `tasks` (Tasks or Jobs: their num_cpus, num_gpus, exclusive) fit side by side on this machine by
    their asks: the CPUs of the smallest and the GPU part of the smallest GPU one (trainings with 1/2 of a GPU or 1
    of 2 CPUs each: 2)."""
    shared = [t for t in tasks if not t.exclusive and (t.num_cpus or t.num_gpus)]
    if not shared:
        return 1
    by_cpu = int(cores / max(1e-9, min(t.num_cpus for t in shared)) + 1e-9) or 1
    gpu_parts = [t.num_gpus for t in shared if t.num_gpus > 0]
    by_gpu = round(1 / min(gpu_parts)) if gpu_parts else by_cpu
    return max(1, min(by_cpu, by_gpu))


# A plan-time measurement on the cluster answers within this: a first torch.compile of a model and its timings take
# minutes on a small node (edgekd.distill.execution.measure_compile), more than a node that is down needs to show
MEASURE_TIMEOUT_S = 900


class Executor(ABC):
    name = "executor"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release; Ray stops its local cluster
        return None

    def cluster_has_gpu(self) -> bool | None:
        """Whether the machines the jobs run on have a GPU, when that is not this machine (None: ask this one)."""
        return None

    def measure(self, fn, *args, num_gpus: float = 0.0, resources: dict | None = None):
        """Run a plan-time measurement where the jobs will run (here: this process, before any job starts)."""
        if resources:
            raise EdgeKDError(f"the Ray resource {', '.join(resources)} is asked for: run with --executor ray")
        return fn(*args)

    @abstractmethod
    def run(self, tasks: list[Task], driver) -> None:
        """Run `tasks` (dependencies first), reporting each start, finish and failure to `driver` by task id."""


def _blocked_by(task: Task, failed: set[str]) -> str | None:
    return next((d for d in task.deps if d in failed), None)


def _not_run(dep: str) -> str:
    return f"not run: it needs {dep}, which failed"


def _refuse_resources(tasks: list[Task]) -> None:
    """Only Ray places a task by custom resource (a device's node): elsewhere say so before the first task."""
    asking = sorted({r for t in tasks for r in (t.resources or {})})
    if asking:
        raise EdgeKDError(f"jobs ask for the Ray resource(s) {', '.join(asking)} (a device reached through Ray): "
                          "run with --executor ray --address <the cluster>")


class LocalExecutor(Executor):
    """One job after the other in this process, with step-by-step progress (`auto` uses it when the plan trains
    one at a time). Each training sets its own threads, so the numbers are those of the other executors."""

    name = "local"

    def run(self, tasks, driver):
        failed: set[str] = set()
        _refuse_resources(tasks)
        for task in tasks:
            dep = _blocked_by(task, failed)
            if dep:
                failed.add(task.id)
                driver.failed(task.id, _not_run(dep))
                continue
            driver.running(task.id)
            try:
                result = task.here()
            except Exception as exc:  # KeyboardInterrupt is not caught: a stopped study stops
                failed.add(task.id)
                driver.failed(task.id, one_line(exc))
                continue
            driver.done(task.id, result)


class ProcessExecutor(Executor):
    """N worker processes on this machine, each job started as soon as the jobs it needs are done, with the threads
    it asks for. N None: as many as the asks fit (`fitting_workers`), and a job starts only while the CPU threads
    (and the one GPU) of the running ones leave room for its ask: a teacher asking for every thread trains alone,
    students asking for one each run side by side. An exclusive job (a bench) waits until nothing else is ready,
    then has the machine alone: it does not stop the others each time one becomes ready."""

    name = "processes"

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def run(self, tasks, driver):
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        _refuse_resources(tasks)
        cores = getattr(driver, "cores", None) or os.cpu_count() or 1
        workers = self.workers or fitting_workers(tasks, cores)
        ids = {t.id for t in tasks}
        waiting, running, done, failed = list(tasks), {}, set(), set()

        def fits(task) -> bool:
            if len(running) >= workers:
                return False
            if self.workers or not running:  # a count of processes asked for: that many, whatever they ask
                return True
            cpus = sum(t.num_cpus for t in running.values()) + task.num_cpus
            gpus = sum(t.num_gpus for t in running.values()) + task.num_gpus
            return cpus <= cores + 1e-9 and gpus <= 1 + 1e-9

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            def start(task):
                waiting.remove(task)
                threads = max(1, int(task.num_cpus))
                running[pool.submit(task.fn, threads, None, *task.args)] = task
                driver.running(task.id)

            while waiting or running:
                ready = []
                for task in list(waiting):
                    dep = _blocked_by(task, failed)
                    if dep:
                        waiting.remove(task)
                        failed.add(task.id)
                        driver.failed(task.id, _not_run(dep))
                    elif not any(d in ids and d not in done for d in task.deps):
                        ready.append(task)
                if not any(t.exclusive for t in running.values()):
                    for task in ready:
                        if not task.exclusive and fits(task):
                            start(task)
                    if not running:  # nothing else to run: an exclusive job has the machine
                        exclusive = next((t for t in ready if t.exclusive), None)
                        if exclusive is not None:
                            start(exclusive)
                if not running:
                    continue
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:
                        failed.add(task.id)
                        driver.failed(task.id, one_line(exc))
                        continue
                    done.add(task.id)
                    driver.done(task.id, result)


class AutoExecutor(Executor):
    """What runs when no executor is asked for: the processes executor when the plan trains several at once (as
    many side by side as their asks fit), else the local executor, with its live progress."""

    name = "auto"

    def run(self, tasks, driver):
        side_by_side = getattr(driver, "trainings_at_once", 1) > 1
        (ProcessExecutor() if side_by_side else LocalExecutor()).run(tasks, driver)


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
    --out at the same path (checked before the first job). A training asks for `cpus_per_job` CPUs (default: its
    threads, the plan's choice) and trains with the plan's threads either way: the same float results as the
    other executors."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_job: float | None = None):
        self.ray = _import_ray()
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.started = False

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

    def cluster_has_gpu(self) -> bool | None:
        if not self.address:  # a local Ray runs on this machine
            return None
        self._start()
        return self.ray.cluster_resources().get("GPU", 0) > 0

    def measure(self, fn, *args, num_gpus: float = 0.0, resources: dict | None = None):
        if not self.address and not resources:  # a local Ray runs on this machine: measure here, before any task
            return fn(*args)
        self._start()
        self._check_resources(resources or {})
        task = self.ray.remote(num_cpus=0 if resources else 1, num_gpus=num_gpus, resources=resources or None,
                               max_retries=0)(fn)
        try:
            return self.ray.get(task.remote(*args), timeout=MEASURE_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise EdgeKDError(f"no Ray node with {resources or 'a free CPU'} answered in {MEASURE_TIMEOUT_S} s: check "
                              "that its node is up (ray status)") from None

    def _check_resources(self, resources: dict) -> None:
        """A custom resource no node of the cluster has would leave its jobs waiting for ever: one line instead."""
        have = self.ray.cluster_resources()
        for name in resources:
            if have.get(name, 0) <= 0:
                raise EdgeKDError(f"no node of the Ray cluster has the resource {name!r}: start the device's node "
                                  f"with ray start --address <head> --resources '{{\"{name}\": 1}}'")

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

    def run(self, tasks, driver):
        ray = self.ray
        self._start()
        self._check_storage(driver.ctx.root)
        alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for task in tasks:
            self._check_resources(task.resources or {})
        started = ray.remote(num_cpus=0)(_Started).remote()
        refs, by_ref, remotes = {}, {}, {}
        for task in tasks:
            # the nodes that can run it (those with its custom resources); never more CPUs than the biggest has
            node_cpus = max((n.get("CPU", 1) for n in alive if all(n.get(r, 0) > 0 for r in task.resources or {})),
                            default=1)
            cpus = node_cpus if task.exclusive else min(task.num_cpus, node_cpus)
            threads = max(1, int(cpus))
            deps = [refs[d] for d in task.deps if d in refs]
            remote = remotes.setdefault(task.fn, ray.remote(max_retries=0)(task.fn))
            ref = remote.options(num_cpus=cpus, num_gpus=task.num_gpus, resources=dict(task.resources or {}) or None,
                                 name=task.id).remote(threads, started, *task.args, *deps)
            refs[task.id], by_ref[ref] = ref, task
        order = {task.id: i for i, task in enumerate(tasks)}
        failed: set[str] = set()
        pending = dict(by_ref)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for label in ray.get(started.drain.remote()):
                driver.running(label)
            for ref in sorted(ready, key=lambda r: order[pending[r].id]):
                task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task's own error, or the one of a task it needed
                    dep = _blocked_by(task, failed)
                    failed.add(task.id)
                    driver.failed(task.id, _not_run(dep) if dep else one_line(exc))
                    continue
                driver.done(task.id, result)
