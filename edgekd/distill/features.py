"""Intermediate features of timm models by stage, read with forward hooks during the normal forward pass.

Stages index timm's `feature_info` (-1 = the last stage). Hooks leave the model itself untouched, so the
student that is saved and exported is exactly the student, with no adapter or tap inside it.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from edgekd.errors import EdgeKDError


def stage_info(model: nn.Module, stage: int) -> dict:
    info = list(getattr(model, "feature_info", None) or [])
    if not info:
        raise EdgeKDError(f"{type(model).__name__} has no feature_info: feature and relation KD need a timm "
                          "model that reports its stages (most CNNs do)")
    if not -len(info) <= stage < len(info):
        raise EdgeKDError(f"feature stage {stage} does not exist: this model has stages 0..{len(info) - 1} (or -1)")
    return info[stage]


class FeatureTap:
    """Keeps the outputs of the chosen stages from the latest forward pass in `.outputs[stage]`."""

    def __init__(self, model: nn.Module, stages: set[int]):
        self.outputs: dict = {}
        self.handles = []
        for stage in sorted(stages):
            module = model.get_submodule(stage_info(model, stage)["module"])
            self.handles.append(module.register_forward_hook(partial(self._keep, stage)))

    def _keep(self, stage, module, inputs, output):
        self.outputs[stage] = output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
