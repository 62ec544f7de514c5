"""Trainings at once and their threads (edgekd/distill/sharing.py): measured with real trainings side by side,
fixed by the profile or taken from the plan's table, given to every training job (threads in its execution and
key, its part of a GPU), and applied by every executor, so local and processes train with the same threads."""

import importlib.util
import json

import pytest

from edgekd.config import load_profile
from edgekd.distill.sharing import Sharing, candidates, measure_sharing
from edgekd.errors import EdgeKDError
from edgekd.pipeline.driver import Task
from edgekd.pipeline.executors import fitting_workers
from edgekd.pipeline.graph import PlanContext
from edgekd.workflows import plan_jobs, prepare_jobs

SPEC = ("test_efficientnet", 4, 1, True, (32, 1, 12, 12),
        {"precision": "fp32", "channels_last": False, "device": "cpu"})


def _prepared(profile, root, device="cpu", cores=4, measured=None, measure=None):
    ctx = PlanContext(profile, root, device=device, cores=cores, measure=measure)
    return {j.label: j for j in prepare_jobs(ctx, plan_jobs(profile, root, device=device),
                                             {} if measured is None else measured)}


def test_the_profile_fixes_trainings_and_threads(tiny_profile, tmp_path):
    """trainings_at_once = 2 of 4 threads: 2 each, in the execution and the key; study.threads = 1: 4 at once; on a
    GPU each training asks for half of it and its threads leave the numbers (and key) alone."""
    two = _prepared(load_profile(tiny_profile, ["study.seeds=[0]", "study.trainings_at_once=2"]), tmp_path)
    kd, cache = two["synthetic/base/kd/seed0"], two["synthetic/base/teacher_cache/seed0"]
    assert kd.num_cpus == cache.num_cpus == 2.0 and kd.params["execution"]["threads"] == 2
    one = _prepared(load_profile(tiny_profile, ["study.seeds=[0]", "study.trainings_at_once=0", "study.threads=1"]),
                    tmp_path)
    assert one["synthetic/base/kd/seed0"].params["execution"]["threads"] == 1
    gpu = _prepared(load_profile(tiny_profile, ["study.seeds=[0]", "study.trainings_at_once=2"]), tmp_path, "cuda",
                    cores=16)
    assert {gpu[k].num_gpus for k in ("synthetic/base/kd/seed0", "synthetic/base/teacher_cache/seed0")} == {0.5}
    teacher = two["synthetic/base/teacher/seed0"]  # alone, with every thread: every student waits for it
    assert teacher.num_cpus == 4.0 and teacher.params["execution"]["threads"] == 4
    assert gpu["synthetic/base/teacher/seed0"].num_gpus == 1.0
    assert one["synthetic/base/teacher/seed0"].params["execution"]["threads"] == 1  # study.threads: every one
    assert gpu["synthetic/base/kd/seed0"].num_cpus == 8.0 and gpu["synthetic/base/kd/seed0"].params["execution"][
        "threads"] == 0
    with pytest.raises(Exception, match="trainings_at_once"):
        load_profile(tiny_profile, ["study.trainings_at_once=-1"])


def test_measured_once_per_study_then_taken_from_the_plan(tiny_profile, tmp_path):
    """Left to measure: one measurement, on the first student's configuration, recorded in the plan's table under
    a slot naming the model, data, batch and cores; the next plan with that table measures nothing."""
    profile = load_profile(tiny_profile, ["study.seeds=[0, 1]", "study.trainings_at_once=0"])
    calls = []

    def measure(fn, profile, dataset, role, execution, slot, cores, num_gpus=0.0):
        calls.append((role, slot))
        assert cores == 4
        return {"choice": {"trainings": 2, "threads": 2}, "images_per_s": {"1x4": 1.0, "2x2": 2.0}}

    measured = {}
    jobs = _prepared(profile, tmp_path, measured=measured, measure=measure)
    (role, slot), = calls
    assert role == "scratch" and slot.startswith("sharing|test_efficientnet|") and slot.endswith("|cores=4")
    assert set(measured) == {slot} and jobs["synthetic/base/kd/seed1"].params["execution"]["threads"] == 2
    again = _prepared(profile, tmp_path, measured=dict(measured), measure=lambda *a, **k: pytest.fail("measured"))
    assert again["synthetic/base/scratch/seed0"].params["execution"]["threads"] == 2


def test_real_trainings_side_by_side_are_timed():
    """Spawned processes train a tiny model at once for each candidate; summed images/s per candidate, and the
    choice is one of them. A model that cannot be built is one line, not a hang."""
    assert candidates(16, "cpu") == [Sharing(1, 16), Sharing(2, 8), Sharing(4, 4), Sharing(8, 2)]
    assert candidates(2, "cuda")[-1] == Sharing(8, 1)
    best, speeds = measure_sharing(SPEC, 2, "cpu", rounds=1, window=0.2)
    assert set(speeds) == {"1x2", "2x1"} and min(speeds.values()) > 0 and best.name in speeds
    with pytest.raises(EdgeKDError, match="died"):
        measure_sharing(("no_such_model", *SPEC[1:]), 2, "cpu", rounds=1, window=0.1)


def test_workers_are_as_many_as_the_asks_fit():
    def task(cpus, gpus=0.0, exclusive=False):
        return Task("t", None, None, (), (), cpus, gpus, exclusive)

    assert fitting_workers([task(1.0), task(1.0)], 2) == 2
    assert fitting_workers([task(2.0), task(2.0)], 2) == 1  # trainings with every thread: one at a time
    assert fitting_workers([task(2.0), task(1.0)], 2) == 2  # the processes executor lets the asks decide
    assert fitting_workers([task(4.0, 0.25), task(1.0)], 16) == 4
    assert fitting_workers([task(16.0, exclusive=True)], 16) == 1


def test_local_and_processes_train_with_the_chosen_threads(tmp_path, monkeypatch):
    """Two trainings at once on 2 threads, on the real digits: the default executor runs the students side by side
    (processes), the local one after the other, Ray as tasks, all with 1 thread each (the teacher alone with 2), and
    their weights are the same bit for bit. (The local process loads the data at 2 threads, a worker at 1: the data's
    normalization constants once came from a float32 reduction split by the thread count, and differed.)"""
    import hashlib

    from conftest import tiny_profile_with
    from safetensors.torch import load_file

    import edgekd.workflows
    from edgekd.workflows import distill

    monkeypatch.setattr(edgekd.workflows, "machine_threads", lambda: 2)  # a 2-thread machine, whatever ran before
    path = tmp_path / "digits.toml"
    path.write_text(tiny_profile_with("[datasets.digits]\nimage_size = 16\ncrop_padding = 1", name="tiny"))
    profile = load_profile(path, ["study.seeds=[0]", "study.trainings_at_once=2", "teacher.epochs=1",
                                  "student.epochs=1"])
    executors = {"auto": {"jobs": None}, "local": {"executor": "local"}}
    if importlib.util.find_spec("ray") is not None:  # .ci/run installs it
        executors["ray"] = {"executor": "ray"}
    results = {}
    for name, options in executors.items():
        distill(profile, tmp_path / name, **options)
        root = tmp_path / name / "tiny"
        assert json.loads((root / "plan.json").read_text())["executor"] == name
        results[name] = {}
        for run in sorted(root.glob("digits/base/*/seed0")):
            if (run / "model.safetensors").is_file():
                threads = json.loads((run / "metrics.json").read_text())["threads"]
                weights = load_file(run / "model.safetensors")
                digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
                results[name][run.parent.name] = (threads, digest)
    assert all(results[name] == results["local"] for name in executors)
    assert {role: t for role, (t, _) in results["local"].items()} == {"teacher": 2, "scratch": 1, "kd": 1}


def _nap(threads, started, seconds):
    """A task for the processes executor: sleeps, returns what a job's result looks like."""
    import time

    time.sleep(seconds)
    return {"threads": threads}


def test_processes_schedule_by_asks_and_benches_wait_for_the_rest():
    """Without --jobs: a task asking for every CPU runs alone; two asking for one each run side by side; an
    exclusive task waits while anything else is ready, then runs alone, after a task that became ready with it."""
    import time

    from edgekd.pipeline.executors import ProcessExecutor

    class Driver:
        cores = 2

        def __init__(self):
            self.spans = {}

        def running(self, label):
            self.spans[label] = [time.monotonic(), None]

        def done(self, label, result):
            self.spans[label][1] = time.monotonic()

        def failed(self, label, message):
            raise AssertionError(f"{label}: {message}")

    def task(label, cpus, seconds, deps=(), exclusive=False):
        return Task(label, None, _nap, (seconds,), deps, cpus, 0.0, exclusive)

    tasks = [task("teacher", 2.0, 0.3), task("b", 1.0, 0.4, ("teacher",)), task("c", 1.0, 0.8, ("teacher",)),
             task("bench", 1.0, 0.1, ("b",), exclusive=True), task("f", 1.0, 0.3, ("c",))]
    driver = Driver()
    ProcessExecutor().run(tasks, driver)
    s = driver.spans

    def overlap(x, y):
        return s[x][0] < s[y][1] and s[y][0] < s[x][1]

    assert not any(overlap("teacher", t) for t in "bc")
    assert overlap("b", "c")
    assert not any(overlap("bench", t) for t in ("b", "c", "f")) and s["bench"][0] >= s["f"][1]
