"""Distillation losses, composed by name and weight from the profile (as torchdistill does).

Each loss takes the step's outputs and returns its value; `ComposedLoss` weights and sums them and returns
every component, so the trainer can log each one per epoch. The package is split so that no module imports
another's importer: `_registry` (the `LOSSES` registry, `register_loss`, `StepOutputs`) is the leaf that
`logit` (KD, DKD, DIST, LSKD, CE), `feature` (feature and relation losses) and `composed` (`ComposedLoss`)
import; this file imports them all, which registers every loss, and names the public API.
"""

from edgekd.distill.losses import feature, logit  # noqa: F401  (registers the logit, feature and relation losses)
from edgekd.distill.losses._registry import LOSSES, StepOutputs, register_loss
from edgekd.distill.losses.composed import ComposedLoss

__all__ = ["LOSSES", "ComposedLoss", "StepOutputs", "register_loss"]
