"""Which node groups does INT8 hurt? Per-group sensitivity on the validation split (`edgekd export --int8-sensitivity`).

Two measurements per node group (edgekd.export.quantize.NodeGroup: a Conv/Gemm/MatMul with its activation and
weight Q/DQ, or one Add/Mul/pooling node), each a full ONNX Runtime quantization with its include/exclude lists
and one shared calibration:

- only: this group INT8, everything else float. The damage the group does on its own.
- leave-one-out: everything INT8 except this group, kept float the way the preset keeps groups float (`cpu`: its
  activations in 16-bit Q/DQ; `trt`: its nodes left out, for groups without weights only: see edgekd.export.quantize).
  What keeping it float gives back; mixed precision keeps groups float in this order.

Scores are validation accuracy, top-1 agreement with FP32 and KL(FP32 || INT8): on a small validation split
accuracy moves in steps of one image, and KL orders the groups that accuracy cannot tell apart.

It quantizes through edgekd.export.quantize only: edgekd.export.int8's ptq-search calls it, so importing int8
here would make the two import each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgekd.export.quantize import Evaluator, NodeGroup, Quantizer, Recipe, Score


@dataclass
class GroupSensitivity:
    group: NodeGroup
    only: Score | None = None
    leave_one_out: Score | None = None
    closure: tuple[str, ...] = ()  # the groups leave-one-out left out with it (see Quantizer.closure)


@dataclass
class SensitivityReport:
    preset: str
    recipe: Recipe
    samples: int
    fp32: Score
    int8_all: Score
    rows: list[GroupSensitivity]

    def only_change(self, r: GroupSensitivity) -> float:
        return r.only.accuracy - self.fp32.accuracy if r.only else 0.0

    def recovery(self, r: GroupSensitivity) -> float:
        return r.leave_one_out.accuracy - self.int8_all.accuracy if r.leave_one_out else 0.0

    def attributable_kl(self, r: GroupSensitivity) -> float:
        """The KL to FP32 the group accounts for: what its INT8 alone adds, or what keeping it float removes,
        whichever is larger."""
        return max(r.only.kl if r.only else 0.0, self.int8_all.kl - r.leave_one_out.kl if r.leave_one_out else 0.0)

    def worst(self) -> list[GroupSensitivity]:
        """Most harmful first, by the KL the group accounts for, then by the accuracy it costs on its own."""
        return sorted(self.rows, key=lambda r: (-self.attributable_kl(r), self.only_change(r), -self.recovery(r)))

    def to_dict(self) -> dict:
        def score(s: Score | None, base: Score) -> dict | None:
            if s is None:
                return None
            return {**s.to_dict(), "change_pts": (s.accuracy - base.accuracy) * 100}

        return {"split": "validation", "samples": self.samples, "preset": self.preset,
                "calibration": {"split": "train", "method": self.recipe.method, "images": self.recipe.images,
                                "placement": self.recipe.placement},
                "fp32": self.fp32.to_dict(), "int8_all": self.int8_all.to_dict(),
                "groups": [{**r.group.to_dict(), "attributable_kl": self.attributable_kl(r),
                            "float_closure": list(r.closure),
                            "only": score(r.only, self.fp32), "leave_one_out": score(r.leave_one_out, self.int8_all)}
                           for r in self.worst()]}


def analyse(q: Quantizer, images: np.ndarray, recipe: Recipe, val: Evaluator,
            groups: Sequence[NodeGroup] | None = None, single: bool = True, leave_one_out: bool = True,
            log: Callable[[str], None] = lambda line: None) -> SensitivityReport:
    """Quantize each group alone and/or all but each group (with `recipe`'s calibration and placement, `images`
    its calibration images); score each on `val`."""
    groups = list(groups or q.groups)
    base = Recipe(recipe.method, recipe.images, recipe.placement)
    as_written = q.preset.score_as_written
    full = val.score(q.quantize(q.scratch("all"), images, base), as_written)
    rows, pending = [], []
    for g in groups:  # each candidate is scored in the background while the next one is made
        row, only, loo = GroupSensitivity(g), None, None
        if single:
            only = val.submit(q.quantize(q.scratch("only"), images, base, only=[g.name]), as_written)
        if leave_one_out:
            recipe_loo = Recipe(base.method, base.images, base.placement, (g.name,))
            loo = val.submit(q.quantize(q.scratch("loo"), images, recipe_loo), as_written)
            row.closure = tuple(q.last_float)
        rows.append(row)
        pending.append((row, only, loo))
    for i, (row, only, loo) in enumerate(pending):
        row.only = val.wait(only) if only else None
        row.leave_one_out = val.wait(loo) if loo else None
        if (i + 1) % 10 == 0 or i + 1 == len(groups):
            log(f"{q.preset_name}: sensitivity {i + 1}/{len(groups)} node groups")
    return SensitivityReport(q.preset_name, base, len(val.labels), val.fp32, full, rows)


# At most this many leave-one-out candidates rank a model's groups when mixed precision needs an order and no full
# analysis was asked for. Each candidate costs a float region and an ONNX Runtime session (~30-45 ms to open a
# quickstart student's ~500-node Q/DQ graph, several times what running its 143 plain validation images costs):
# ranking all 91 groups one by one was ~40% of a quickstart bundle's export (rules revision 9). A model with more
# groups is ranked by contiguous runs of them in graph order, left out together: neighbours share their activations'
# Q/DQ (see Quantizer.closure), so a run floats little beyond its own groups, and the ranking still finds the region
# that INT8 hurts. The top run's groups are ranked one by one too, but only where the answer lies inside that run
# (edgekd.export.int8's search): R runs cost R candidates where it lies past the top run (half the quickstart's
# students, and those where nothing holds) and R + G/R + log2(G/R) where inside (Fashion-MNIST's), least around
# R = 6-8 for G = 91. 8 against 12 (rules revision 16 against 15, the same students): quickstart 13.3 vs 17.4
# candidates a bundle, 8 of 18 deployed either way (worst -0.56 vs -0.28 on test), Fashion-MNIST the same 16 of 16.
RANK_UNITS = 8


def removal_key(kl_removed: float, left_out: int, accuracy: float) -> tuple[float, float]:
    """How mixed precision orders leave-one-out candidates (sort ascending): most KL to FP32 removed per group left
    out (KL orders what a small split's accuracy cannot: it moves by single images), so that of two ways to float
    the same tensors the smaller comes first; then the higher accuracy."""
    return -kl_removed / max(1, left_out), -accuracy


def contiguous_units(groups: Sequence[NodeGroup], max_units: int = RANK_UNITS) -> list[list[NodeGroup]]:
    """`groups` (graph order) cut into at most `max_units` contiguous runs of equal length (the last shorter)."""
    size = max(1, -(-len(groups) // max(1, max_units)))
    return [list(groups[i : i + size]) for i in range(0, len(groups), size)]


def rank_units(q: Quantizer, images: np.ndarray, recipe: Recipe, val: Evaluator,
               units: Sequence[Sequence[NodeGroup]]) -> list[dict]:
    """Each unit (groups left float together) as a leave-one-out candidate of `recipe`, scored on `val`; one row
    per unit (its groups, the groups its closure left out, the KL to FP32 it removed, its accuracy), most harmful
    first by removal_key. A unit of one group is that group's leave-one-out, as float_order ranks it."""
    base = Recipe(recipe.method, recipe.images, recipe.placement)
    as_written = q.preset.score_as_written
    full = val.score(q.quantize(q.scratch("all"), images, base), as_written)
    pending = []
    for unit in units:  # each scored in the background while the next one is made
        left = Recipe(base.method, base.images, base.placement, tuple(g.name for g in unit))
        path = q.quantize(q.scratch("unit"), images, left)
        pending.append((unit, val.submit(path, as_written), len(q.last_float)))
    rows = []
    for unit, scored, left_out in pending:
        s = val.wait(scored)
        rows.append({"groups": [g.name for g in unit], "left_out": left_out, "kl_removed": full.kl - s.kl,
                     "accuracy": s.accuracy})
    return sorted(rows, key=lambda r: removal_key(r["kl_removed"], r["left_out"], r["accuracy"]))


def float_order(report: SensitivityReport) -> tuple[list[str], str]:
    """The order in which mixed precision keeps groups float, by removal_key over each group's leave-one-out (its
    closure: what floating it takes). Groups without a leave-one-out measurement are not in it."""
    rows = [r for r in report.rows if r.leave_one_out]
    rows.sort(key=lambda r: removal_key(report.int8_all.kl - r.leave_one_out.kl, len(r.closure),
                                        r.leave_one_out.accuracy))
    return [r.group.name for r in rows], "leave-one-out KL removed per group left out (largest first)"


def sensitivity_table(record: dict, title: str, top: int = 10):
    """A rich table of a manifest's `int8_sensitivity[preset]` record: the `top` worst groups."""
    from rich.table import Table

    c = record["calibration"]
    table = Table(title=title, caption=f"validation split ({record['samples']} images); FP32 "
                  f"{record['fp32']['accuracy'] * 100:.2f}%, all INT8 {record['int8_all']['accuracy'] * 100:.2f}% "
                  f"(KL {record['int8_all']['kl']:.4f}; {c['method']}, {c['images']} train images, {c['placement']} "
                  "Q/DQ); only = this group INT8, the rest float (pts vs FP32); leave-one-out = all INT8 but this "
                  "group (pts vs all INT8; '-' = not measured)")
    for col in ("group", "op", "tags", "only pts", "only KL", "leave-one-out pts", "leave-one-out KL"):
        table.add_column(col, justify="left" if col in ("group", "op", "tags") else "right")
    for g in record["groups"][:top]:
        only, loo = g.get("only"), g.get("leave_one_out")
        table.add_row(g["name"], g["op"], ",".join(g["tags"]),
                      f"{only['change_pts']:+.2f}" if only else "-", f"{only['kl']:.4f}" if only else "-",
                      f"{loo['change_pts']:+.2f}" if loo else "-", f"{loo['kl']:.4f}" if loo else "-")
    return table
