"""From run records to the study's answer: teacher, scratch and KD accuracy, and KD gain paired by seed.

The records, their grouping and the statistics live in `edgekd.records` (torch-free, shared with export and
report); this is the distill command's view of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekd.records import T_975, RunRecord, Spread, group_runs, paired_gain

__all__ = ["T_975", "MethodResult", "Spread", "VariantSummary", "paired_gain", "summarize"]


@dataclass
class MethodResult:
    method: str
    accuracy: Spread
    gain: Spread | None  # KD minus scratch, paired by seed; negative gains stay negative
    agreement: Spread | None


@dataclass
class VariantSummary:
    dataset: str
    variant: str
    teacher_acc: float | None
    teacher_model: str = ""
    student_model: str = ""
    scratch: Spread | None = None
    methods: list[MethodResult] = field(default_factory=list)
    cache_s: float | None = None
    metric: str = "accuracy"  # what the accuracies measure (RunGroup.metric)


def summarize(records: list[dict] | list[RunRecord]) -> list[VariantSummary]:
    """One summary per (dataset, variant, student family); a clean-regime teacher counts for every variant."""
    out = []
    for g in group_runs(records):
        summary = VariantSummary(g.dataset, g.label, g.teacher_acc, g.teacher["model"] if g.teacher else "",
                                 g.runs[0]["model"] if g.runs else "", g.scratch_acc(),
                                 cache_s=g.cache["fill_s"] if g.cache else None, metric=g.metric)
        for method in g.methods:
            agreement = [r["teacher_agreement"] for r in g.kd(method) if r.get("teacher_agreement") is not None]
            summary.methods.append(MethodResult(method, g.kd_acc(method), g.gain(method), Spread.of(agreement)))
        out.append(summary)
    return out
