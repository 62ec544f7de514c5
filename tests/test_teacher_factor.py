"""The teacher as a factor: KD methods that learn from different teachers get a "which teacher teaches best" table
with each teacher's accuracy and the paired KD gain, best first."""

from __future__ import annotations

from edgekd.report import _teacher_table
from edgekd.report.tables import teacher_rows


def _records():
    out = [{"dataset": "d", "variant": "base", "role": "teacher", "seed": 0, "family": "", "test_acc": 0.95,
            "model": "resnet18"},
           {"dataset": "d", "variant": "base", "role": "teacher", "seed": 0, "family": "big", "test_acc": 0.97,
            "model": "resnet50"}]
    for seed, (scratch, small, big) in enumerate([(0.80, 0.85, 0.82), (0.81, 0.86, 0.81), (0.79, 0.85, 0.80)]):
        out += [{"dataset": "d", "variant": "base", "role": "scratch", "seed": seed, "method": "", "family": "",
                 "test_acc": scratch, "model": "mnv3"},
                {"dataset": "d", "variant": "base", "role": "kd", "seed": seed, "method": "kd", "family": "",
                 "test_acc": small, "model": "mnv3", "teachers": ["main"]},
                {"dataset": "d", "variant": "base", "role": "kd", "seed": seed, "method": "kd_big", "family": "",
                 "test_acc": big, "model": "mnv3", "teachers": ["big"]}]
    return out


def test_the_less_accurate_teacher_can_teach_better_and_the_table_says_so():
    rows = teacher_rows(_records())
    assert [r["method"] for r in rows] == ["kd", "kd_big"]  # best gain first
    assert rows[0]["teacher_acc"] == 0.95 and rows[1]["teacher_acc"] == 0.97
    assert abs(rows[0]["gain"].mean - 0.0533) < 1e-3 and abs(rows[1]["gain"].mean - 0.01) < 1e-3
    text = "\n".join(_teacher_table(rows))
    assert "| d | base | kd | main | 95.00 |" in text and "| d | base | kd_big | big | 97.00 |" in text
    assert "main (kd) teaches best, its interval clear of the next one's" in text


def test_methods_sharing_one_teacher_get_no_teacher_table():
    records = [r for r in _records() if r.get("method") != "kd_big"]
    assert teacher_rows(records) == [] and _teacher_table([]) == []


def test_an_early_stopped_teacher_is_the_main_teachers_run_after_that_epoch(tmp_path):
    import json

    from conftest import TINY_PROFILE

    from edgekd.config import load_profile
    from edgekd.runio import load_tensors
    from edgekd.workflows import distill

    profile = tmp_path / "p.toml"
    profile.write_text(TINY_PROFILE.replace("seeds = [0, 1]", "seeds = [0]")
                       + '\n[teachers.e1]\nstop_epoch = 1\n\n[methods.kd_e1]\nteachers = ["e1"]\n'
                         'kd = { weight = 1.0, temperature = 2.0 }\n')
    records = distill(load_profile(profile), tmp_path / "runs")
    root = tmp_path / "runs" / "tiny" / "synthetic" / "base"
    snapshot = load_tensors(root / "teacher" / "seed0" / "snapshots" / "epoch1.safetensors")
    early = load_tensors(root / "teacher@e1" / "seed0" / "model.safetensors")
    assert snapshot.keys() == early.keys() and all((snapshot[k] == early[k]).all() for k in snapshot)
    stopped = json.loads((root / "teacher@e1" / "seed0" / "metrics.json").read_text())
    assert stopped["epochs"] == 1 and stopped["model"] == "test_resnet"
    assert {r["method"] for r in teacher_rows(records)} == {"kd", "kd_e1"}
    again = distill(load_profile(profile), tmp_path / "runs")  # nothing retrains
    assert [r["fingerprint"] for r in again] == [r["fingerprint"] for r in records]


def test_stop_epoch_belongs_to_named_teachers_within_the_main_run(tmp_path):
    from conftest import TINY_PROFILE

    from edgekd.check import check_profile

    profile = tmp_path / "p.toml"
    profile.write_text(TINY_PROFILE.replace('model = "test_resnet"', 'model = "test_resnet"\nstop_epoch = 2')
                       + "\n[teachers.late]\nstop_epoch = 9\n")
    problems = check_profile(profile).problems
    assert any("'teacher.stop_epoch' is for [teachers.<name>]" in p for p in problems)
    assert any("'teachers.late.stop_epoch' is 9, past [teacher]'s 3 epochs" in p for p in problems)
