"""The leaf every loss module imports: the `LOSSES` registry, `register_loss` and `StepOutputs`.

Kept apart from the losses themselves (as timm keeps its model registry in `_registry.py`) so that the logit,
feature and composed-loss modules depend on this one only and never on each other or on the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from edgekd.registry import Registry


@dataclass
class StepOutputs:
    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> output
    teacher_features: dict[int, torch.Tensor] = field(default_factory=dict)
    progress: float = 1.0  # fraction of training done, for terms that ramp in
    # a mixed batch (mixup, cutmix): each image is `mix_weight` of its own and 1 - mix_weight of the image whose
    # label is `mixed_targets`; the hard-label term weighs the two labels so (teacher terms need nothing: the
    # teacher saw the mixed image itself)
    mixed_targets: torch.Tensor | None = None
    mix_weight: float = 1.0


LOSSES: Registry[type[nn.Module]] = Registry("loss")


def register_loss(name: str, needs_teacher: bool = True, needs_features: bool = False, multilabel: bool = False):
    """Losses with `needs_features` read `student_stage` / `teacher_stage` outputs; the teacher cache holds logits
    only, so their teacher runs live on each batch. `multilabel`: the loss is defined for multi-label data (targets
    [B, classes] of 0/1, sigmoid outputs): ComposedLoss sets its instances' `multilabel` on such data and refuses
    the others there."""

    def add(cls):
        cls.needs_teacher, cls.needs_features, cls.supports_multilabel = needs_teacher, needs_features, multilabel
        cls.multilabel = False
        return LOSSES.register(name)(cls)

    return add
