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
