"""One training job on several processes: `torchrun --nproc-per-node N -m edgekd.distill.worker RUN_DIR...`.

A run directory names its job: its `profile.json` holds the resolved profile (`profile`) and the job (`job`:
dataset, variant, role, seed), as `edgekd distill` writes it when a training starts, and the directory sits
where the study keeps that job (`<study>/<dataset>/<variant>/<role>/seed<k>`), so the study root is three
levels up and the job's teacher and teacher cache are found there. `prepare` (or `--prepare PROFILE`) writes
`profile.json` ahead of training, so a study, a scheduler or a user can hand the directory to torchrun:

    python -m edgekd.distill.worker --prepare profiles/big.toml --out /shared/runs --only teacher
    torchrun --nproc-per-node 4 -m edgekd.distill.worker /shared/runs/big/imagenet/base/teacher/seed0
    edgekd distill profiles/big.toml --out /shared/runs     # the teacher is finished: the students train

Rank 0 runs the job as `edgekd distill` would (same checks, teacher and cache, same records, resumable from its
checkpoint, skipped when finished); when its training starts, it tells the other ranks, which then build the
same model, data and teacher in a scratch directory of their own and train their part of every global batch
with it (`edgekd.distill.train`). Without torchrun (no WORLD_SIZE), the worker trains the job in this process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

from edgekd.distill.execution import resolve_device
from edgekd.distill.train import FollowerDone, Ranks, from_rank0, ranks
from edgekd.errors import EdgeKDError
from edgekd.pipeline.events import Reporter
from edgekd.pipeline.graph import Job
from edgekd.roles import Role

TIMEOUT_ENV = "EDGEKD_DDP_TIMEOUT_S"  # how long ranks wait for each other (rank 0 fills the teacher cache alone)


def prepare(profile, job: Job) -> Path:
    """Write what the worker needs into the job's run directory; returns the directory. What an interrupted run
    wrote there besides (the key its checkpoint was made for) is kept, so preparing again never costs a resume."""
    from edgekd.distill.runner import job_data
    from edgekd.runio import RUN_PROFILE, UnreadableFile, read_json, write_json

    path = job.run_dir / RUN_PROFILE
    try:
        kept = read_json(path) if path.is_file() else {}
    except UnreadableFile:
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    write_json(path, {**kept, "job": job_data(job), "profile": profile.to_dict()})
    return job.run_dir


def read_run_dir(path: Path):
    """(profile, job, study root) of a prepared run directory, checked against where the study keeps the job."""
    from edgekd.config import ProfileError, saved_profile
    from edgekd.distill.runner import job_from_data
    from edgekd.runio import RUN_PROFILE, read_json, run_dir, study_root_of

    path = Path(path).resolve()
    saved = read_json(path / RUN_PROFILE, "prepare it: python -m edgekd.distill.worker --prepare PROFILE")
    if not isinstance(saved, dict) or not {"job", "profile"} <= set(saved):
        raise EdgeKDError(f"{path / RUN_PROFILE} names no job: prepare the directory with "
                          "python -m edgekd.distill.worker --prepare PROFILE")
    try:
        profile = saved_profile(saved["profile"])
    except ProfileError as exc:
        raise EdgeKDError(f"{path / RUN_PROFILE}: {exc}") from None
    root = study_root_of(path)
    try:
        job = job_from_data(saved["job"], path)
    except TypeError as exc:
        raise EdgeKDError(f"{path / RUN_PROFILE} describes no job edgekd knows ({exc}): prepare it again") from None
    if run_dir(root, job.dataset, job.variant, job.role, job.seed) != path:
        raise EdgeKDError(f"{path} holds job {job.label}, which its study keeps in <study>/{job.label}: train it "
                          "there (the teacher and its cache are found from it), or prepare this directory again")
    return profile, job, root


class LineReporter(Reporter):
    """Rank 0's progress, a line at a time (at most every `every_s` seconds while a job trains)."""

    def __init__(self, world: int, every_s: float = 30.0):
        self.world, self.every_s, self.total, self.last = world, every_s, 0, 0.0

    def start(self, job, total_steps):
        self.total, self.last = total_steps, time.monotonic()
        print(f"{job.label}: {total_steps} steps on {self.world} process{'es' if self.world > 1 else ''}",
              flush=True)

    def advance(self, job, completed, loss, images_per_s, epoch=""):
        if completed < self.total and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        rate = "" if loss is None else f"  loss {loss:.3f}  {images_per_s:,.0f} img/s"
        print(f"{job.label}: {epoch} step {completed}/{self.total}{rate}", flush=True)

    def finish(self, job, metrics, skipped):
        if skipped:
            print(f"{job.label}: finished earlier, skipped (--force trains it again)", flush=True)
        elif "test_acc" in metrics:
            print(f"{job.label}: done, test {metrics['test_acc'] * 100:.2f}%  val {metrics['val_acc'] * 100:.2f}%  "
                  f"{metrics['wall_s']:.1f} s", flush=True)
        else:
            print(f"{job.label}: done", flush=True)


def _train_one(path: Path, rank: int, world: int, global_bn: bool, force: bool) -> None:
    from edgekd.workflows import run_job

    profile, job, root = read_run_dir(path)
    if world > 1 and profile.study.device.startswith("cuda:"):
        raise EdgeKDError(f"study.device = {profile.study.device!r} puts every process on one GPU; torchrun gives each "
                          "its own: set study.device = \"cuda\" (or \"auto\") in the profile and prepare again")
    group = Ranks(rank, world, global_bn)
    if rank == 0:
        started = []

        def on_start(ex):  # the other ranks wait for this before building their copy of the job
            started.append(True)
            if world > 1:
                from_rank0(("train", asdict(ex)), 0)

        reporter = LineReporter(world)
        try:
            with ranks(replace(group, on_start=on_start)):
                run_job(profile, root, job, reporter, force)
        except Exception as exc:
            if world > 1 and not started:
                from_rank0(("failed", f"{exc}"), 0)
            raise
        if world > 1 and not started:  # finished earlier, or nothing to train (a teacher cache, given weights)
            from_rank0(("done", ""), 0)
        return
    message, detail = from_rank0(None, rank)
    if message == "failed":
        raise EdgeKDError(f"rank {rank}: rank 0 stopped before training {job.label}: {detail}")
    if message == "done":
        return
    job = replace(job, params={**job.params, "execution": detail})  # rank 0's numerics: nothing to measure here
    scratch = Path(tempfile.mkdtemp(prefix=f"edgekd-rank{rank}-"))  # this rank's records, never kept
    try:
        with ranks(group):
            run_job(profile, root, replace(job, run_dir=scratch))
        raise EdgeKDError(f"rank {rank}: {job.label} finished without training together with rank 0")
    except FollowerDone:
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prepare_cli(args) -> int:
    from edgekd.check import checked_profile
    from edgekd.workflows import plan_jobs

    profile = checked_profile(args.prepare, list(args.set or []), Path(args.out))
    root = Path(args.out) / profile.study.name
    for job in plan_jobs(profile, root):
        base = Role.parse(job.role).base
        if job.kind != "train" or (args.only and job.role not in args.only and base not in args.only):
            continue
        print(prepare(profile, job))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgekd.distill.worker", description="Train prepared run "
                                     "directories, one after the other, on every process of a torchrun group.")
    parser.add_argument("run_dir", nargs="*", help="prepared run directories, e.g. runs/quickstart/digits/base/"
                        "teacher/seed0")
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument("--local-bn", action="store_true", help="BatchNorm statistics of each process's part of the "
                        "batch (faster) instead of the global batch's (what one process computes)")
    parser.add_argument("--prepare", metavar="PROFILE", help="write profile.json into every training job's run "
                        "directory of this profile and print the directories; trains nothing")
    parser.add_argument("--out", default="runs", help="with --prepare: the runs directory (default: runs)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --prepare: override a profile key")
    parser.add_argument("--only", action="append", metavar="ROLE", help="with --prepare: only these roles "
                        "(teacher, scratch, a method, teacher@name), repeatable")
    args = parser.parse_args(argv)
    try:
        if args.prepare:
            return _prepare_cli(args)
        if not args.run_dir:
            parser.error("name a prepared run directory, or --prepare PROFILE")
        return _run(args)
    except EdgeKDError as exc:
        print(f"edgekd worker: error: {exc}", file=sys.stderr, flush=True)
        return 2


def _run(args) -> int:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # DDP warns once when a 1-channel stem's weight gradient has other (equivalent) strides than its bucket view.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    for path in args.run_dir:  # every rank checks every directory before anyone waits for anyone
        read_run_dir(Path(path))
    if world > 1:
        cuda = any(resolve_device(read_run_dir(Path(p))[0].study.device).startswith("cuda") for p in args.run_dir)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 7200))))
    try:
        for path in args.run_dir:
            _train_one(Path(path), rank, world, not args.local_bn, args.force and rank == 0)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
