"""The study's job graph, content fingerprints and executors, on tiny data: what reruns after a change and why, a
killed driver resuming (local and Ray), a failed job that does not stop the rest, and records left out of the
report when their keys are not current."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekd.cli import main
from edgekd.config import load_profile
from edgekd.records import PLAN_FILE, fingerprint, key_changes, make_key, select_current
from edgekd.workflows import plan_jobs

HAS_RAY = importlib.util.find_spec("ray") is not None
FAST = ["--set", "study.seeds=[0]", "--set", "teacher.epochs=1", "--set", "deploy.targets=['onnx']",
        "--set", "deploy.iters=3", "--set", "deploy.batch_sizes=[1, 8]"]


def _records(root: Path) -> dict[str, int]:
    """Every record and output of a study, with its modification time."""
    names = ("metrics.json", "model.safetensors", "teacher_cache.safetensors", "manifest.json", "model.onnx")
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.name in names or p.name.startswith("bench-")}


def test_plan_is_a_graph_of_dependencies(tiny_profile, tmp_path):
    profile = load_profile(tiny_profile, [
        "study.seeds=[0]", "teachers={second={model='test_resnet', epochs=1}}",
        "methods={kd={kd={weight=1.0}}, at={ce={weight=1.0}, at={weight=1.0}}, "
        "two={teachers=['main', 'second'], kd={weight=1.0}}}"])
    jobs = plan_jobs(profile, tmp_path, deploy=True)
    by = {j.label: j for j in jobs}
    seen = set()
    for job in jobs:  # listed in an order any executor may follow
        assert set(job.deps) <= seen, job.label
        seen.add(job.label)
    t, base = "synthetic/base/teacher/seed0", "synthetic/base"
    assert by[f"{base}/scratch/seed0"].deps == (t,)
    assert by[f"{base}/kd/seed0"].deps == (t, f"{base}/teacher_cache/seed0")  # its teacher and its cache
    assert by[f"{base}/at/seed0"].deps == (t,)  # feature losses need the live teacher, not the cache
    assert by[f"{base}/two/seed0"].deps == (t, f"{base}/teacher@second/seed0")
    assert by[f"{base}/kd/seed0/bundle"].deps == (f"{base}/kd/seed0",)
    bench = by[f"{base}/kd/seed0/bench-ort-cpu"]
    assert bench.deps == (f"{base}/kd/seed0/bundle",) and bench.exclusive and bench.kind == "bench"
    assert len(jobs) == 2 + 1 + 4 + 4 + 4


def test_key_changes_name_the_setting_and_input():
    old = make_key("train", {"student": {"epochs": 10, "lr": 0.05}}, {"datasets.d": {"classes": 4}},
                   {"teacher": "a" * 64})
    new = make_key("train", {"student": {"epochs": 12, "lr": 0.05}}, {"datasets.d": {"classes": 4}},
                   {"teacher": "b" * 64})
    assert key_changes(old, new) == ["student.epochs 10 -> 12", "input teacher aaaaaaaa -> bbbbbbbb"]
    assert key_changes(old, old) == [] and fingerprint(old) == fingerprint(json.loads(json.dumps(old)))
    assert "no key recorded" in key_changes(None, new)[0]


def test_a_failed_job_stops_only_what_needs_it(tiny_profile, tmp_path, capsys):
    """On the processes executor: a diverging method fails with its one-line error; the other students train,
    the summary has them, plan.json has every training's precision choice made at plan time, and a rerun retries
    only the failed job."""
    args = ["distill", str(tiny_profile), "--out", str(tmp_path), *FAST[:4], "--set", "student.epochs=1",
            "--set", "student.precision='auto'", "--set", "methods={kd={kd={weight=1.0}}, bad={ce={weight=1e39}}}"]
    assert main([*args, "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    assert "failed synthetic/base/bad/seed0: " in " ".join(captured.out.split())
    assert "1 job(s) failed" in captured.err and "training diverged" in captured.err
    root = tmp_path / "tiny"
    summary = json.loads((root / "summary.json").read_text())
    assert sorted((r["role"], r["method"]) for r in summary) == [("kd", "kd"), ("scratch", ""), ("teacher", ""),
                                                                  ("teacher_cache", "")]
    plan = json.loads((root / PLAN_FILE).read_text())
    assert len(plan["execution"]) == 1 and "test_efficientnet" in next(iter(plan["execution"]))
    students = [j for j in plan["jobs"] if "/scratch/" in j["id"] or "/kd/" in j["id"] or "/bad/" in j["id"]]
    assert len({json.dumps(j["execution"]) for j in students}) == 1  # a scratch/KD pair trains in one precision
    assert not (root / ".execution.json").exists()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 4 and "failed synthetic/base/bad/seed0" in " ".join(out.split())


def test_report_shows_current_records_and_names_the_rest(tmp_path):
    def run(variant, role, fp):
        path = tmp_path / "d" / variant / role / "seed0" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"dataset": "d", "variant": variant, "role": role, "method": "", "seed": 0,
                                    "test_acc": 0.5, "fingerprint": fp}))
        return path.relative_to(tmp_path).as_posix()

    current, stale, gone = run("base", "scratch", "aaa"), run("base", "teacher", "old"), run("x", "scratch", "c")
    (tmp_path / PLAN_FILE).write_text(json.dumps({"jobs": [
        {"id": "s", "kind": "train", "record": current, "fingerprint": "aaa"},
        {"id": "t", "kind": "train", "record": stale, "fingerprint": None, "reason": "teacher.epochs 3 -> 5"}]}))
    selection = select_current(tmp_path)
    assert [r.run_dir for r in selection.runs] == ["d/base/scratch/seed0"]
    assert selection.left_out == [f"{stale}: stale (teacher.epochs 3 -> 5)",
                                  f"{gone}: not in the last run's plan (the profile no longer has it)"]
    (tmp_path / PLAN_FILE).unlink()  # a study from before plans: every run is shown
    assert len(select_current(tmp_path).runs) == 3


def test_report_lists_variants_in_the_profiles_order(tmp_path):
    """The plan's order (the profile's), not the path order that puts "labels10" before "labels5"."""
    jobs = []
    for variant in ("base", "labels25", "labels5", "labels10"):
        path = tmp_path / "d" / variant / "scratch" / "seed0" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"dataset": "d", "variant": variant, "role": "scratch", "method": "", "seed": 0,
                                    "test_acc": 0.5, "fingerprint": "f"}))
        jobs.append({"id": variant, "kind": "train", "record": path.relative_to(tmp_path).as_posix(),
                     "fingerprint": "f"})
    (tmp_path / PLAN_FILE).write_text(json.dumps({"jobs": jobs}))
    assert [r.variant for r in select_current(tmp_path).runs] == ["base", "labels25", "labels5", "labels10"]


def _kill_and_resume(args: list[str], root: Path, tmp_path: Path, capsys) -> dict[str, int]:
    """Start a study in another process, SIGKILL it while the scratch student trains, run it again here: nothing
    finished is redone (the teacher's files are untouched), nothing is lost (the student resumes from its last
    epoch). Returns the study's records after the second run."""
    checkpoint = root / "synthetic/base/scratch/seed0/checkpoint.json"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "edgekd.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.is_file() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert checkpoint.is_file(), (tmp_path / "driver.log").read_text()[-2000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        try:  # what the killed driver started (a local Ray) is in its process group
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    teacher = _records(root / "synthetic/base/teacher")
    assert teacher and not (root / "synthetic/base/scratch/seed0/metrics.json").exists()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skip synthetic/base/teacher/seed0: finished earlier" in out
    assert _records(root / "synthetic/base/teacher") == teacher
    scratch = root / "synthetic/base/scratch/seed0"
    log = (scratch / "train.log").read_text()
    assert log.count("epoch=1 ") == 1  # the killed training's epochs are kept: it resumed (or a killed driver's
    # Ray worker finished it while the second run waited for the job's lock)
    metrics = json.loads((scratch / "metrics.json").read_text())
    assert len(metrics["history"]) == metrics["epochs"]
    plan = json.loads((root / PLAN_FILE).read_text())
    states = {j["id"]: j["state"] for j in plan["jobs"] if j["kind"] != "report"}
    assert states.pop("synthetic/base/teacher/seed0") == "current" and set(states.values()) <= {"current", "done"}
    assert (scratch / "bundle/bench-ort-cpu.json").is_file() and (root / "report/report.html").is_file()
    return _records(root)


def test_killed_driver_resumes_then_reruns_only_what_a_change_reaches(tiny_profile, tmp_path, capsys):
    base = ["study", str(tiny_profile), "--out", str(tmp_path), *FAST, "--set", "student.warmup_epochs=0",
            "--set", "student.epochs=6"]
    root = tmp_path / "tiny"
    before = _kill_and_resume(base, root, tmp_path, capsys)
    assert "resumed at epoch" in (root / "synthetic/base/scratch/seed0/train.log").read_text()
    assert len(before) == 16 and not (root / ".execution.json").exists()

    start = time.perf_counter()
    assert main(base) == 0  # finished: nothing runs, only the report is rebuilt
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 8 and "done " not in out and _records(root) == before

    assert main([*base, "--set", "student.epochs=3"]) == 0
    out = capsys.readouterr().out
    changed = {k for k, v in _records(root).items() if before.get(k) != v}
    teacher_side = {k for k in before if "/teacher" in k}
    assert len(teacher_side) == 4 and not changed & teacher_side  # the teacher and its cache are kept
    assert "skip synthetic/base/teacher/seed0" in out and "skip synthetic/base/teacher_cache/seed0" in out
    for role in ("scratch", "kd"):
        assert f"rerun synthetic/base/{role}/seed0: student.epochs 6 -> 3" in out
        for stage in ("", "/bundle", "/bench-ort-cpu"):
            assert f"done synthetic/base/{role}/seed0{stage}:" in out
        assert json.loads((root / "synthetic/base" / role / "seed0/metrics.json").read_text())["epochs"] == 3
    assert changed == set(before) - teacher_side

    before = _records(root)
    assert main([*base, "--set", "student.epochs=3", "--set", "deploy.batch_sizes=[1, 32]"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 6 and out.count("deploy.batch_sizes [1,8] -> [1,32]") == 2
    assert {k for k, v in _records(root).items() if before[k] != v} == {
        f"synthetic/base/{role}/seed0/bundle/bench-ort-cpu.json" for role in ("scratch", "kd")}
    bench = json.loads((root / "synthetic/base/kd/seed0/bundle/bench-ort-cpu.json").read_text())
    assert bench["options"]["batch_sizes"] == [1, 32] and bench["key"]["inputs"]["model.onnx"]


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'edgekd[ray]'; .ci/run installs it)")
def test_killed_driver_resumes_on_ray(tiny_profile, tmp_path, capsys):
    args = ["study", str(tiny_profile), "--out", str(tmp_path), *FAST, "--set", "methods={}",
            "--set", "student.epochs=6", "--executor", "ray"]
    records = _kill_and_resume(args, tmp_path / "tiny", tmp_path, capsys)
    assert len(records) == 2 + 6  # the same runs as the local executor makes: teacher, scratch, its bundle, bench


def test_ray_missing_or_misused_is_one_line(tiny_profile, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else object())
    assert main(["study", str(tiny_profile), "--out", str(tmp_path), "--executor", "ray"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pip install 'edgekd[ray]'" in err and err.count("edgekd: error:") == 1
    monkeypatch.undo()
    assert main(["study", str(tiny_profile), "--out", str(tmp_path), "--address", "auto"]) == 2
    assert "add --executor ray" in capsys.readouterr().err
    assert main(["distill", str(tiny_profile), "--out", str(tmp_path), "--cpus-per-job", "1"]) == 2
    assert "use it with --executor ray" in capsys.readouterr().err
    assert main(["study", str(tiny_profile), "--out", str(tmp_path), "--jobs", "2", "--executor", "local"]) == 2
    assert "--jobs 2 sets the processes of --executor processes" in " ".join(capsys.readouterr().err.split())
    assert not tmp_path.joinpath("tiny").exists()


def test_storage_probe_names_what_a_worker_cannot_do(tmp_path):
    from edgekd.pipeline.executors import PROBE_DIR, probe_storage

    assert "cannot see the files" in probe_storage(str(tmp_path), "token")  # another machine's disk
    (tmp_path / PROBE_DIR).mkdir()
    (tmp_path / PROBE_DIR / "token").write_text("token")
    assert probe_storage(str(tmp_path), "token") is None
    assert len(list((tmp_path / PROBE_DIR).iterdir())) == 2  # it wrote its answer beside the driver's file


def test_method_grid_tuned_on_validation_then_every_seed(tiny_profile, tmp_path):
    """A loss parameter listing values is a grid: each candidate trains on the first seed, the best validation
    accuracy wins (never test), every seed trains with the choice; candidates stay out of the study's tables and
    the report shows the grid; a second run finds everything current."""
    from edgekd.config import load_profile
    from edgekd.records import group_runs
    from edgekd.report import build_report
    from edgekd.runio import read_json
    from edgekd.workflows import distill as run_study
    from edgekd.workflows import plan_jobs

    sets = ["study.seeds=[0, 1]", "student.epochs=1", "teacher.epochs=1",
            "methods.kd.kd={weight=0.5, temperature=[1.0, 8.0]}"]
    profile = load_profile(tiny_profile, sets)
    jobs = {j.label: j for j in plan_jobs(profile, tmp_path / "tiny")}
    assert "synthetic/base/kd~0/seed0" in jobs and "synthetic/base/kd~1/seed0" in jobs
    assert "synthetic/base/kd~0/seed1" not in jobs
    assert {"synthetic/base/kd~0/seed0", "synthetic/base/kd~1/seed0"} <= set(jobs["synthetic/base/kd/seed1"].deps)

    records = run_study(profile, tmp_path)
    base = tmp_path / "tiny" / "synthetic" / "base"
    vals = [read_json(base / f"kd~{k}" / "seed0" / "metrics.json")["val_acc"] for k in (0, 1)]
    chosen = max(range(2), key=lambda k: (vals[k], -k))
    for seed in (0, 1):
        metrics = read_json(base / "kd" / f"seed{seed}" / "metrics.json")
        assert metrics["losses"]["kd"]["temperature"] == [1.0, 8.0][chosen]
        assert metrics["grid"]["chosen"] == chosen and [c["val_acc"] for c in metrics["grid"]["candidates"]] == vals
    # the first seed trains exactly as the chosen candidate did (same key): copied, not trained again
    first, candidate = (read_json(base / r / "seed0" / "metrics.json") for r in ("kd", f"kd~{chosen}"))
    assert first["copied_from"] == str(base / f"kd~{chosen}" / "seed0") and first["wall_s"] == 0.0
    assert first["fingerprint"] == candidate["fingerprint"] and first["test_acc"] == candidate["test_acc"]
    assert first["role"] == "kd" and first["method"] == "kd" and "candidate" not in first["grid"]
    assert (base / "kd" / "seed0" / "model.safetensors").read_bytes() == \
        (base / f"kd~{chosen}" / "seed0" / "model.safetensors").read_bytes()
    assert "copied_from" not in read_json(base / "kd" / "seed1" / "metrics.json")
    assert all("~" not in m for grp in group_runs(records) for m in grp.methods)
    report = build_report(tmp_path / "tiny")
    text = report.files["md"].read_text()
    assert "Hyper-parameters chosen on validation" in text and "kd.temperature 1:" in text

    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").rglob("metrics.json")}
    run_study(profile, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").rglob("metrics.json")} == stamp


def test_jobs_set_processes_and_the_plan_sets_threads(tiny_profile, tmp_path):
    """--jobs 2 runs two processes; each training trains with the plan's threads (study.threads = 1 here: 1), not a
    share the executor works out, and a worker's next job does not inherit another's: the numbers do not depend
    on the executor."""
    args = ["distill", str(tiny_profile), "--out", str(tmp_path), *FAST[:4], "--set", "student.epochs=1",
            "--set", "study.threads=1", "--set", "study.trainings_at_once=0", "--jobs", "2"]
    assert main(args) == 0
    runs = [json.loads(p.read_text()) for p in (tmp_path / "tiny").rglob("metrics.json")]
    trained = {r["role"]: (r["threads"], r["execution"]["threads"]) for r in runs if "threads" in r}
    assert trained == {"teacher": (1, 1), "scratch": (1, 1), "kd": (1, 1)}


def test_a_name_that_is_not_one_path_segment_is_refused_before_any_work(tiny_profile, tmp_path, capsys):
    """A variant named "a/b" would become two directory levels of every run of it: the plan check refuses it (and
    any other name that cannot be one directory), with the fix, before anything trains."""
    assert main(["distill", str(tiny_profile), "--out", str(tmp_path), "--set",
                 "variants={'a/b'={kind='base'}, '..'={kind='base'}}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "variant name 'a/b' cannot name a directory" in err and "variant name '..' cannot name a directory" in err
    assert not (tmp_path / "tiny").exists()
