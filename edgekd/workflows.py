"""The composition root: the stages in data-flow order, and the workflows the CLI runs on them.

`edgekd study` is the whole graph (distill -> explain -> export -> bench, then the report from whatever is
current); `edgekd distill` is the same run with the deployment stages left out, ending in summary.json instead of
the report. `run_job` runs one planned job alone (a torchrun worker, a test), with the plan-time choices a plan
would give it. Nothing else in edgekd imports the stages together; a stage imports the pipeline and the stages
before it, never a driver or an executor.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.pipeline.driver import Driver, JobsFailed, Outcome, execute
from edgekd.pipeline.events import Reporter
from edgekd.pipeline.graph import (
    Context,
    Job,
    JobKind,
    PlanContext,
    job_status,
    kind_of,
    kinds_of,
    previous_measurements,
)
from edgekd.records import select_current
from edgekd.runio import write_json

# The stages in data-flow order: importing one registers its job kinds, and each kind plans after the kinds above
# it (it may depend on their jobs). A new stage is a module that registers its kind, and one line here.
STAGES = (
    "edgekd.distill.stage",  # train, cache
    "edgekd.explain",  # explain
    "edgekd.export.stage",  # bundle
    "edgekd.bench.stage",  # bench
)


def pipeline() -> list[JobKind]:
    """Every job kind, in data-flow order."""
    kinds = []
    for module in STAGES:
        importlib.import_module(module)
        kinds += kinds_of(module)
    return kinds


def plan_jobs(profile, study_root: Path, deploy: bool = False, device: str = "cpu",
              cpus_per_job: float = 0.0) -> list[Job]:
    """Every job of the profile with its dependencies, in an order that respects them: teachers, teacher caches,
    students, Grad-CAM maps, then (deploy) bundles and benches. Their threads and device shares are the
    plan-time choices of `prepare_jobs`."""
    ctx = PlanContext(profile, Path(study_root), device=device, cores=machine_threads(), cpus_per_job=cpus_per_job)
    jobs: list[Job] = []
    for kind in pipeline():
        if deploy or not kind.deploy:
            jobs += kind.plan(ctx, jobs)
    return jobs


def _measure_here(fn, *args, num_gpus: float = 0.0, resources: dict | None = None):
    if resources:
        raise EdgeKDError(f"the Ray resource {', '.join(resources)} is asked for: run the study with --executor ray")
    return fn(*args)


def prepare_jobs(ctx: PlanContext, jobs: list[Job], measured: dict) -> list[Job]:
    """Each kind's plan-time work (a training's precision and layout), once, before any job runs; `measured` is
    the plan file's table of earlier measurements and gains the new ones."""
    for kind in pipeline():
        jobs = kind.prepare(ctx, jobs, measured)
    return jobs


def set_threads(threads: int) -> None:
    """CPU threads for torch where jobs start (a worker: the job's ask). A training sets its own for its run (the
    plan's choice, edgekd/distill/sharing.py), whichever executor runs it."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def services() -> dict:
    """What stages that may not import each other get from here: export's INT8 trainer (qat-kd) is distill's."""
    from edgekd.distill.qat import qat_trainer
    from edgekd.export.stage import INT8_TRAINER

    return {INT8_TRAINER: qat_trainer}


def setup_worker(threads: int) -> None:
    """What a worker process does before its first job: know every job kind, train with its share of threads."""
    pipeline()
    set_threads(threads)


def machine_threads() -> int:
    """This machine's CPU threads for torch (its default: the cores it may use), which the trainings at once share."""
    import torch

    return torch.get_num_threads()


def study_device(profile, executor) -> str:
    """The device trainings run on: the profile's, with `auto` answered by the machines the executor runs on."""
    from edgekd.distill.execution import resolve_device

    remote = executor.cluster_has_gpu() if profile.study.device == "auto" else None
    if remote is not None:
        return "cuda" if remote else "cpu"
    return resolve_device(profile.study.device)


# What a pinned choice holds: a training's precision and layout, the trainings at once and their threads, or the
# timings torch.compile is chosen by
PINNABLE = ({"precision", "channels_last", "device"}, {"trainings", "threads"}, {"eager_step_s", "modes"})


def pinned_execution(path: Path | None) -> dict:
    """The execution choices a file pins (`--execution`): a study's plan.json (its `execution` table), that table
    alone, or a machine's execution cache (choices per machine, all of them taken)."""
    if path is None:
        return {}
    from edgekd.runio import read_json

    data = read_json(Path(path), fix="pass a study's plan.json or an execution cache file")
    table = data.get("execution", data) if isinstance(data, dict) else None
    if isinstance(table, dict) and table and all(isinstance(v, dict) and "choice" not in v for v in table.values()):
        table = {slot: e for per_machine in table.values() for slot, e in per_machine.items()}  # a machine cache
    good = isinstance(table, dict) and table and all(
        isinstance(e, dict) and isinstance(e.get("choice"), dict)
        and any(fields <= set(e["choice"]) for fields in PINNABLE) for e in table.values())
    if not good:
        raise EdgeKDError(f"--execution {path}: no execution choices in it (expected a study's plan.json, its "
                          "'execution' table, or an execution cache file)")
    return {slot: {**e, "source": f"pinned by --execution {path}"} for slot, e in table.items()}


def run_graph(profile, root: Path, executor, reporter: Reporter | None = None, force: bool = False,
              deploy: bool = False, pinned: dict | None = None) -> Outcome:
    """Plan the profile's jobs (with deploy: bundles and benches too), make every kind's plan-time choices once,
    and run what is not current on `executor`. `pinned`: execution choices that override measuring."""
    device = study_device(profile, executor)
    cpus = getattr(executor, "cpus_per_job", None) or 0.0
    jobs = plan_jobs(profile, root, deploy, device, cpus)
    measured = {**previous_measurements(root), **(pinned or {})}
    ctx = PlanContext(profile, root, force, reporter, device=device, cores=machine_threads(), cpus_per_job=cpus,
                      measure=executor.measure, executor=executor.name)
    jobs = prepare_jobs(ctx, jobs, measured)
    cores = ctx.cores
    ctx = Context(profile, root, force, reporter, setup=setup_worker, services=services())
    return Driver(ctx, jobs, executor, measured, cores, trainings_at_once(jobs, cores)).run()


def trainings_at_once(jobs: list[Job], cores: int) -> int:
    """How many of the plan's trainings fit side by side by their asks (CPU threads of `cores`, parts of a GPU)."""
    from edgekd.pipeline.executors import fitting_workers

    return fitting_workers([j for j in jobs if j.kind == "train"], cores)


@dataclass
class StudyResult:
    outcome: Outcome
    records: list[dict] = field(default_factory=list)  # the current run records (summary.json)
    report: Any = None  # with deploy: the report built from the current records


def run(profile, out: Path, reporter: Reporter | None = None, force: bool = False, jobs: int = 1,
        executor: str | None = None, address: str | None = None, cpus_per_job: float | None = None,
        deploy: bool = False, execution: Path | None = None) -> StudyResult:
    """Run every job of the profile that is not current, on an executor: `local` (in this process; the default,
    jobs=1), `processes` (`jobs` processes, each starting a job as soon as the jobs it needs are done), `ray`, or
    with jobs=None `auto` (as many side by side as the plan's trainings at once). Without
    deploy the run ends with summary.json (the current run records); with deploy, with the report. Records that are
    not current are left out and named to the reporter. `execution`: a file of execution choices to train with
    (pinned_execution). Raises JobsFailed (holding the result) when a job failed; the others finished."""
    from edgekd.pipeline.executors import make_executor

    if deploy and "trt" in profile.deploy.targets:
        raise EdgeKDError("deploy.targets has 'trt': build TensorRT engines on the target GPU with `edgekd export "
                          "RUN_DIR --target trt`; a study exports onnx and int8")
    reporter = reporter or Reporter()
    root = Path(out).absolute() / profile.study.name
    with make_executor(executor, jobs, address, cpus_per_job) as ex:
        outcome = run_graph(profile, root, ex, reporter, force, deploy, pinned_execution(execution))
    result = StudyResult(outcome)
    if deploy:
        _finish_study(root, reporter, result)
    else:
        selection = select_current(root)
        result.records = [r.as_dict() for r in selection.runs]
        write_json(root / "summary.json", result.records)
        if selection.left_out:
            reporter.left_out(selection.left_out)
    if outcome.failed:
        raise JobsFailed(outcome.failed, result)
    return result


def _finish_study(root: Path, reporter: Reporter, result: StudyResult) -> None:
    """The report, from the records that are current, once each bundle's study summary is up to date."""
    from edgekd.export.bundle import refresh_distill_records
    from edgekd.report import build_report

    refresh_distill_records(root)  # each manifest's study summary, now that every student is done
    try:
        result.report = build_report(root)
    except EdgeKDError:
        if result.outcome.failed:
            raise JobsFailed(result.outcome.failed, result) from None
        raise
    if result.report.left_out:
        reporter.left_out(result.report.left_out)


def run_job(profile, root: Path, job: Job, reporter: Reporter | None = None, force: bool = False) -> dict:
    """Run one planned job alone, outside a driver: with the plan-time choices the plan file recorded (or measured
    here), after building what it needs that is derived and not current (its teacher cache). Returns its record;
    exceptions propagate as they are."""
    from edgekd.distill.execution import resolve_device

    reporter = reporter or Reporter()
    ctx = PlanContext(profile, Path(root), force, reporter, device=resolve_device(profile.study.device),
                      cores=machine_threads(), measure=_measure_here)
    planned = {j.label: j for j in plan_jobs(profile, ctx.root)}
    # prepared with the plan's trainings, in plan order (its first student sets the threads, as in the study)
    follower = "threads" in (job.params.get("execution") or {})  # a torchrun follower: rank 0's choices
    if not follower:
        trainings = [j for j in planned.values() if j.kind in ("train", "cache")]
        planned.update({j.label: j for j in prepare_jobs(ctx, trainings, previous_measurements(ctx.root))})
    mine = planned.get(job.label)
    if follower or mine is None:
        job = prepare_jobs(ctx, [job], previous_measurements(ctx.root))[0]
    else:
        job = replace(job, num_cpus=mine.num_cpus, num_gpus=mine.num_gpus, params=mine.params)
    for label in [] if follower else job.deps:  # a follower never builds what rank 0 reads
        dep = planned.get(label)
        if dep is not None and kind_of(dep).derived and not job_status(Context(profile, ctx.root), dep).current:
            execute(Context(profile, ctx.root), dep)
    record, skipped = execute(Context(profile, ctx.root, force, reporter, services=services()), job)
    reporter.finish(job, record, skipped=skipped)
    return record


def distill(profile, out: Path, reporter: Reporter | None = None, **options) -> list[dict]:
    """`edgekd distill`: the training half (teachers, caches, students, maps); returns the current run records."""
    try:
        return run(profile, out, reporter, deploy=False, **options).records
    except JobsFailed as exc:
        raise JobsFailed(exc.failed, exc.result.records) from None


def study(profile, out: Path, reporter: Reporter | None = None, **options):
    """`edgekd study`: distill, explain, export, bench, then the report, which it returns."""
    try:
        return run(profile, out, reporter, deploy=True, **options).report
    except JobsFailed as exc:
        raise JobsFailed(exc.failed, exc.result.report if exc.result else None) from None
