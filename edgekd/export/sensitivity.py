"""Which node groups does INT8 hurt? Per-group sensitivity on the validation split (`edgekd export --int8-sensitivity`).

Two measurements per node group (edgekd.export.int8.NodeGroup: a Conv/Gemm/MatMul with its activation and
weight Q/DQ, or one Add/Mul/pooling node), each a full ONNX Runtime quantization with its include/exclude lists
and one shared calibration:

- only: this group INT8, everything else float. The damage the group does on its own.
- leave-one-out: everything INT8 except this group. What keeping it float gives back; in a net where many small
  errors add up, this is the one that finds the group to keep float.

Scores are validation accuracy, top-1 agreement with FP32 and KL(FP32 || INT8): on a small validation split
accuracy moves in steps of one image, and KL orders the groups that accuracy cannot tell apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgekd.export.int8 import Evaluator, NodeGroup, Quantizer, Score


@dataclass
class GroupSensitivity:
    group: NodeGroup
    only: Score | None = None
    leave_one_out: Score | None = None


@dataclass
class SensitivityReport:
    preset: str
    method: str
    images: int
    samples: int
    fp32: Score
    int8_all: Score
    rows: list[GroupSensitivity]

    def only_change(self, r: GroupSensitivity) -> float:
        return r.only.accuracy - self.fp32.accuracy if r.only else 0.0

    def recovery(self, r: GroupSensitivity) -> float:
        return r.leave_one_out.accuracy - self.int8_all.accuracy if r.leave_one_out else 0.0

    def worst(self) -> list[GroupSensitivity]:
        """Most harmful first: by the accuracy the group costs on its own, then by what keeping it float gives
        back, then by KL."""
        return sorted(self.rows, key=lambda r: (self.only_change(r), -self.recovery(r),
                                                -(r.only.kl if r.only else 0.0),
                                                r.leave_one_out.kl if r.leave_one_out else 0.0))

    def to_dict(self) -> dict:
        def score(s: Score | None, base: Score) -> dict | None:
            if s is None:
                return None
            return {**s.to_dict(), "change_pts": (s.accuracy - base.accuracy) * 100}

        return {"split": "validation", "samples": self.samples, "preset": self.preset,
                "calibration": {"split": "train", "method": self.method, "images": self.images},
                "fp32": self.fp32.to_dict(), "int8_all": self.int8_all.to_dict(),
                "groups": [{**r.group.to_dict(), "only": score(r.only, self.fp32),
                            "leave_one_out": score(r.leave_one_out, self.int8_all)} for r in self.worst()]}


def analyse(q: Quantizer, images: np.ndarray, method: str, val: Evaluator, groups: Sequence[NodeGroup] | None = None,
            single: bool = True, leave_one_out: bool = True,
            log: Callable[[str], None] = lambda line: None) -> SensitivityReport:
    """Quantize each group alone and/or all but each group, with one calibration; score each on `val`."""
    groups = list(groups or q.groups)
    full = val.score(q.quantize(q.scratch("all"), images, method))
    rows = []
    for i, g in enumerate(groups):
        row = GroupSensitivity(g)
        if single:
            row.only = val.score(q.quantize(q.scratch("only"), images, method, only=g.nodes))
        if leave_one_out:
            row.leave_one_out = val.score(q.quantize(q.scratch("loo"), images, method, exclude=g.nodes))
        rows.append(row)
        if (i + 1) % 10 == 0 or i + 1 == len(groups):
            log(f"sensitivity: {i + 1}/{len(groups)} node groups")
    return SensitivityReport(q.preset_name, method, len(images), len(val.labels), val.fp32, full, rows)


def float_order(report: SensitivityReport) -> tuple[list[str], str]:
    """The order in which mixed precision keeps groups float: largest leave-one-out gain first (validation
    accuracy, then KL); groups whose leave-one-out was not measured follow by their own damage."""
    how = ("leave-one-out validation accuracy gain, then KL reduction"
           if any(r.leave_one_out for r in report.rows) else "single-group validation damage")

    def key(r: GroupSensitivity):
        if r.leave_one_out:
            return (0, -report.recovery(r), r.leave_one_out.kl)
        return (1, report.only_change(r), -(r.only.kl if r.only else 0.0))

    return [r.group.name for r in sorted(report.rows, key=key)], how


def sensitivity_table(record: dict, title: str, top: int = 10):
    """A rich table of a manifest's `int8_sensitivity[preset]` record: the `top` worst groups."""
    from rich.table import Table

    table = Table(title=title, caption=f"validation split ({record['samples']} images); FP32 "
                  f"{record['fp32']['accuracy'] * 100:.2f}%, all INT8 {record['int8_all']['accuracy'] * 100:.2f}% "
                  f"({record['calibration']['method']}, {record['calibration']['images']} train images); only = "
                  "this group INT8, rest float (pts vs FP32); leave-one-out = all INT8 but this group (pts vs all "
                  "INT8)")
    for col in ("group", "op", "tags", "only pts", "only KL", "leave-one-out pts", "leave-one-out KL"):
        table.add_column(col, justify="left" if col in ("group", "op", "tags") else "right")
    for g in record["groups"][:top]:
        only, loo = g.get("only"), g.get("leave_one_out")
        table.add_row(g["name"], g["op"], ",".join(g["tags"]),
                      f"{only['change_pts']:+.2f}" if only else "-", f"{only['kl']:.4f}" if only else "-",
                      f"{loo['change_pts']:+.2f}" if loo else "-", f"{loo['kl']:.4f}" if loo else "-")
    return table
