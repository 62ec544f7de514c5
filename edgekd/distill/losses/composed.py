"""`ComposedLoss`: the training criterion, built from the profile's table of loss names and weights.

Each term comes from the `LOSSES` registry (filled by `logit.py` and `feature.py`, which the package imports), so
this module depends on the registry leaf only.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from edgekd.distill.losses._registry import LOSSES, StepOutputs
from edgekd.errors import EdgeKDError


class ComposedLoss(nn.Module):
    """sum_i weight_i * loss_i, with every component returned for logging.

    A term's `ramp` (a fraction of training) raises its weight linearly from zero over that part of training, as
    DKD does in its paper (20 of 240 epochs): a strong KD term on a random student otherwise diverges.
    """

    def __init__(self, spec: dict[str, dict[str, float]], where: str = "methods", label_smoothing: float = 0.0,
                 multilabel: bool = False):
        """`multilabel`: the data gives each image a set of classes; every term must have a multi-label form."""
        super().__init__()
        self.weights: dict[str, float] = {}
        self.ramps: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for name, params in spec.items():
            params = dict(params)
            weight = float(params.pop("weight", 1.0))
            ramp = float(params.pop("ramp", 0.0))
            if not 0.0 <= ramp <= 1.0:
                raise EdgeKDError(f"profile key '{where}.{name}.ramp' is {ramp}: use a fraction of training, 0 to 1")
            cls = LOSSES.get(name)
            if multilabel and not cls.supports_multilabel:
                usable = ", ".join(n for n, c in LOSSES.items() if c.supports_multilabel)
                raise EdgeKDError(f"'{where}.{name}': loss {name!r} needs one class per image, and the data is "
                                  f"multi-label: use {usable}")
            accepted = list(inspect.signature(cls.__init__).parameters)[1:]
            for key in params:
                if key not in accepted:
                    raise EdgeKDError(
                        f"unknown profile key '{where}.{name}.{key}': loss {name!r} takes "
                        f"{', '.join(['weight', 'ramp', *accepted])}"
                    )
            if name == "ce" and "label_smoothing" not in params:
                params["label_smoothing"] = label_smoothing
            self.terms[name] = cls(**params)
            self.terms[name].multilabel = multilabel
            self.weights[name] = weight
            self.ramps[name] = ramp
        if not self.terms:
            raise EdgeKDError(f"profile table '{where}' names no loss: add e.g. kd = {{ weight = 0.9 }}")

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    @property
    def needs_features(self) -> bool:
        return any(term.needs_features for term in self.terms.values())

    def stages(self) -> tuple[set[int], set[int]]:
        """(student stages, teacher stages) whose features the terms read."""
        terms = [t for t in self.terms.values() if t.needs_features]
        return {t.student_stage for t in terms}, {t.teacher_stage for t in terms}

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> ComposedLoss:
        """Give feature terms the two models' stage shapes, so adapters exist before the optimizer is made."""
        for term in self.terms.values():
            if hasattr(term, "bind"):
                term.bind(student, teacher)
        return self

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        parts, total = {}, 0.0
        for name, term in self.terms.items():
            value = term(out)
            if isinstance(value, dict):  # a term with components logs each of them
                parts.update({f"{name}.{k}": v for k, v in value.items() if k != "loss"})
                value = value["loss"]
            parts[name] = value
            ramp = self.ramps[name]
            total = total + self.weights[name] * (min(1.0, out.progress / ramp) if ramp else 1.0) * value
        parts["loss"] = total
        return parts
