"""From run records to the study's answer: teacher, scratch and KD accuracy, and KD gain paired by seed."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

# Student's t quantile 0.975 by degrees of freedom (no scipy dependency for a table lookup)
T_975 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                        2.052, 2.048, 2.045, 2.042], start=1))


@dataclass
class Spread:
    mean: float
    std: float  # sample standard deviation over seeds (0 with one seed)
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        return cls(mean, math.sqrt(var), len(values))

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean (Student's t; 0 with one seed)."""
        if self.n < 2:
            return 0.0
        return T_975.get(self.n - 1, 1.96) * self.std / math.sqrt(self.n)

    def fmt(self, scale: float = 100.0, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.mean * scale:{sign}.2f} ± {self.std * scale:.2f}"


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


def paired_gain(kd: dict[int, float], scratch: dict[int, float]) -> Spread | None:
    return Spread.of([kd[s] - scratch[s] for s in sorted(kd) if s in scratch])


def summarize(records: list[dict]) -> list[VariantSummary]:
    """One summary per (dataset, variant, student family); a clean-regime teacher counts for every variant."""
    teachers = {(r["dataset"], r["variant"]): r for r in records if r["role"] == "teacher" and not r.get("family")}
    caches = {(r["dataset"], r["variant"]): r for r in records if r["role"] == "teacher_cache"}
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r["role"] in ("scratch", "kd"):
            groups[(r["dataset"], r["variant"], r.get("family", ""))].append(r)
    for key in teachers:  # a study that has trained only its teachers so far
        if not any(k[:2] == key for k in groups):
            groups[(*key, "")] = []
    out = []
    for (dataset, variant, family), runs in groups.items():
        teacher = teachers.get((dataset, variant)) or teachers.get((dataset, "base"))
        cache = caches.get((dataset, variant))
        scratch = {r["seed"]: r["test_acc"] for r in runs if r["role"] == "scratch"}
        label = f"{variant}@{family}" if family else variant
        summary = VariantSummary(dataset, label, teacher["test_acc"] if teacher else None,
                                 teacher["model"] if teacher else "", runs[0]["model"] if runs else "",
                                 Spread.of(list(scratch.values())), cache_s=cache["fill_s"] if cache else None)
        for method in sorted({r["method"] for r in runs if r["role"] == "kd"}):
            mine = [r for r in runs if r["method"] == method]
            kd = {r["seed"]: r["test_acc"] for r in mine}
            agreement = [r["teacher_agreement"] for r in mine if r.get("teacher_agreement") is not None]
            summary.methods.append(MethodResult(method, Spread.of(list(kd.values())), paired_gain(kd, scratch),
                                                Spread.of(agreement)))
        out.append(summary)
    return out
