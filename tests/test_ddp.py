"""One training on several processes: `torchrun -m edgekd.distill.worker RUN_DIR` with gloo on the CPU."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_PROFILE

from edgekd.config import load_profile
from edgekd.data.augment import ViewAugment
from edgekd.distill.train import shard
from edgekd.distill.worker import main as worker
from edgekd.distill.worker import prepare
from edgekd.pipeline.events import Reporter
from edgekd.runio import read_json
from edgekd.workflows import plan_jobs as plan
from edgekd.workflows import run_job

# Enough test images that 0.5 points is less than one image: the two results must agree image for image.
OVERRIDES = ["study.seeds=[0]", "teacher.epochs=1", "student.epochs=4", "datasets.synthetic.samples_per_class=100"]


def test_ranks_split_each_global_batch_of_the_one_process_draw():
    order, views = ViewAugment(1, True).draw_epoch(100, seed=3, epoch=2)  # the same draw on every rank
    batch = order[:32]
    for world in (1, 2, 3, 5):
        parts = [shard(batch, rank, world) for rank in range(world)]
        assert torch.equal(torch.cat(parts), batch)  # together, exactly the one-process batch, in its order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        # a rank looks views up by sample: the (image, view) pairs the teacher cache was filled with
        assert torch.equal(torch.cat([views[p] for p in parts]), views[batch])


def test_worker_needs_a_prepared_run_dir_and_prepare_writes_one(tmp_path, capsys):
    assert worker([str(tmp_path)]) == 2
    assert "prepare it: python -m edgekd.distill.worker --prepare PROFILE" in capsys.readouterr().err
    (tmp_path / "tiny.toml").write_text(TINY_PROFILE)
    assert worker(["--prepare", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "runs"), "--only",
                   "teacher", "--only", "kd"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.split("/")[-2:] for p in printed] == [["teacher", "seed0"], ["kd", "seed0"], ["kd", "seed1"]]
    saved = read_json(tmp_path / "runs" / "tiny" / "synthetic" / "base" / "kd" / "seed1" / "profile.json")
    assert saved["job"]["role"] == "kd" and saved["profile"]["study"]["name"] == "tiny"
    moved = tmp_path / "elsewhere" / "a" / "b" / "c" / "seed1"  # its study root would hold no teacher
    shutil.copytree(tmp_path / "runs" / "tiny" / "synthetic" / "base" / "kd" / "seed1", moved)
    assert worker([str(moved)]) == 2
    assert "which its study keeps in <study>/synthetic/base/kd/seed1" in capsys.readouterr().err


class Interrupt(Exception):
    pass


class StopInEpochTwo(Reporter):
    def advance(self, job, completed, loss, images_per_s, epoch=""):
        if epoch.startswith("epoch 2/"):
            raise Interrupt


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins, and each gloo process has one
    yield
    torch.set_num_threads(threads)


def test_two_gloo_processes_train_like_one_and_resume_its_checkpoint(tmp_path, one_thread):
    (tmp_path / "tiny.toml").write_text(TINY_PROFILE)
    profile = load_profile(tmp_path / "tiny.toml", OVERRIDES)
    one, two = tmp_path / "one" / "tiny", tmp_path / "two" / "tiny"
    for job in plan(profile, one):  # teacher, its cache, scratch and KD students: one process
        run_job(profile, one, job)
    jobs = {}
    for job in plan(profile, two):  # the two-process students learn from the same teacher and cache
        if job.role in ("teacher", "teacher_cache"):
            shutil.copytree(one / job.run_dir.relative_to(two), job.run_dir)
        else:
            jobs[job.role] = job
            prepare(profile, job)
    with pytest.raises(Interrupt):  # one process trains the scratch student's first epoch, then is killed
        run_job(profile, two, jobs["scratch"], StopInEpochTwo())
    assert read_json(jobs["scratch"].run_dir / "checkpoint.json")["epoch"] == 1

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "edgekd.distill.worker", str(jobs["kd"].run_dir), str(jobs["scratch"].run_dir)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "synthetic/base/kd/seed0: done, test" in run.stdout and "edgekd worker: error" not in run.stderr
    for role, job in jobs.items():
        single = read_json(one / job.run_dir.relative_to(two) / "metrics.json")
        double = read_json(job.run_dir / "metrics.json")
        assert abs(double["test_acc"] - single["test_acc"]) <= 0.005, role
        for a, b in zip(single["history"], double["history"], strict=True):  # the same global batches
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (role, a["epoch"])
        assert sorted(p.name for p in job.run_dir.iterdir()) == sorted(
            p.name for p in (one / job.run_dir.relative_to(two)).iterdir())  # rank 1 left nothing behind
    kd_log = (jobs["kd"].run_dir / "train.log").read_text()
    assert "2 processes (gloo): global batch 32, 16 or fewer per process" in kd_log
    assert "computed live" not in kd_log  # every rank's (image, view) pairs were in the planned cache
    scratch = read_json(jobs["scratch"].run_dir / "metrics.json")
    assert "resumed at epoch 1/4" in (jobs["scratch"].run_dir / "train.log").read_text()
    assert [h.get("processes", 1) for h in scratch["history"]] == [1, 2, 2, 2]
