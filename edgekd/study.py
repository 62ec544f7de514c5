"""`edgekd study`: distill -> export -> bench -> report for every dataset variant of a profile, resumably.

The profile becomes one job graph (edgekd/jobs.py): teachers, teacher caches, students, a bundle per student, a
bench per bundle, and the report. A job whose record carries the key the current profile and inputs give is
skipped, any other runs (and the CLI says why); re-running a finished study rebuilds only the report. The jobs run
on an executor (edgekd/executors.py): in this process, in a pool of processes, or as Ray tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgekd.config import Profile
from edgekd.errors import EdgeKDError
from edgekd.runio import read_json


def run_bundle_job(profile: Profile, root: Path, job, force: bool = False) -> tuple[dict, bool]:
    """Export one student (its bundle), unless its manifest has the current key; returns (manifest, skipped)."""
    from edgekd.distill.qat import qat_trainer
    from edgekd.export.bundle import export_run
    from edgekd.jobs import export_options, job_status

    status = job_status(profile, root, job, force)
    if status.current:
        return status.record, True
    with open(job.run_dir / "export.log", "a") as log:
        options = export_options(profile)
        bundle = export_run(job.run_dir, options, log=lambda line: log.write(line + "\n"), qat=qat_trainer(options))
    return read_json(bundle / "manifest.json"), False


def run_bench_job(profile: Profile, root: Path, job, force: bool = False) -> tuple[dict, bool]:
    """Bench one bundle on the profile's backend and device, unless its record has the current key."""
    from edgekd.bench.harness import bench_bundle, save_bench
    from edgekd.jobs import bench_options, job_status

    status = job_status(profile, root, job, force)
    if status.current:
        return status.record, True
    record = bench_bundle(job.run_dir / "bundle", bench_options(profile))
    save_bench(record, job.record)
    return record, False


def run_full_study(profile: Profile, out: Path, reporter=None, jobs: int = 1, force: bool = False,
                   log: Callable[[str], None] = print, executor: str | None = None, address: str | None = None,
                   cpus_per_job: float | None = None):
    """Run the study's job graph on an executor (see `edgekd.distill.study.run_study`), then build the report from
    the records that are current. Raises JobsFailed (holding the report) when some job failed."""
    from edgekd.distill.study import Reporter
    from edgekd.executors import make_executor
    from edgekd.export.bundle import refresh_distill_records
    from edgekd.jobs import JobsFailed, run_graph
    from edgekd.report import build_report

    if "trt" in profile.deploy.targets:
        raise EdgeKDError("deploy.targets has 'trt': build TensorRT engines on the target GPU with `edgekd export "
                          "RUN_DIR --target trt`; a study exports onnx and int8")
    reporter = reporter or Reporter()
    root = Path(out).absolute() / profile.study.name
    with make_executor(executor, jobs, address, cpus_per_job) as ex:
        outcome = run_graph(profile, root, ex, reporter, force, deploy=True)
    refresh_distill_records(root)  # each manifest's study summary, now that every student is done
    try:
        report = build_report(root)
    except EdgeKDError:
        if outcome.failed:
            raise JobsFailed(outcome.failed) from None
        raise
    if report.left_out:
        reporter.left_out(report.left_out)
    if outcome.failed:
        raise JobsFailed(outcome.failed, report)
    return report
