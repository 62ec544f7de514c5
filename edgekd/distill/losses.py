"""Distillation losses, composed by name and weight from the profile (as torchdistill does).

Each loss takes the step's outputs and returns its value; `ComposedLoss` weights and sums them and returns
every component, so the trainer can log each one per epoch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.errors import EdgeKDError
from edgekd.registry import Registry


@dataclass
class StepOutputs:
    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None


LOSSES: Registry[type[nn.Module]] = Registry("loss")


def register_loss(name: str, needs_teacher: bool = True):
    def add(cls):
        cls.needs_teacher = needs_teacher
        return LOSSES.register(name)(cls)

    return add


@register_loss("ce", needs_teacher=False)
class CrossEntropy(nn.Module):
    """The hard-label term; label smoothing comes from the student's training config."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return F.cross_entropy(out.student_logits.float(), out.targets, label_smoothing=self.label_smoothing)


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(p_t^T || p_s^T), batch mean, times T^2 so gradients keep their scale across T."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register_loss("kd")
class VanillaKD(nn.Module):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return kd_divergence(out.student_logits, out.teacher_logits, self.temperature)


class ComposedLoss(nn.Module):
    """sum_i weight_i * loss_i, with every component returned for logging."""

    def __init__(self, spec: dict[str, dict[str, float]], where: str = "methods", label_smoothing: float = 0.0):
        super().__init__()
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for name, params in spec.items():
            params = dict(params)
            weight = float(params.pop("weight", 1.0))
            cls = LOSSES.get(name)
            accepted = list(inspect.signature(cls.__init__).parameters)[1:]
            for key in params:
                if key not in accepted:
                    raise EdgeKDError(
                        f"unknown profile key '{where}.{name}.{key}': loss {name!r} takes "
                        f"{', '.join(['weight', *accepted])}"
                    )
            if name == "ce" and "label_smoothing" not in params:
                params["label_smoothing"] = label_smoothing
            self.terms[name] = cls(**params)
            self.weights[name] = weight
        if not self.terms:
            raise EdgeKDError(f"profile table '{where}' names no loss: add e.g. kd = {{ weight = 0.9 }}")

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        parts = {name: term(out) for name, term in self.terms.items()}
        parts["loss"] = sum(self.weights[name] * value for name, value in parts.items())
        return parts
