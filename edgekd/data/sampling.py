"""Seeded stratified sampling, shared by the sources, the split carving and the variants."""

from __future__ import annotations

import torch


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes)


def stratified_take(labels: torch.Tensor, per_class: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices with `per_class[c]` samples of class c drawn at random (sorted, so order is the source's)."""
    chosen = []
    for c in range(len(per_class)):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        chosen.append(idx[: int(per_class[c])])
    return torch.cat(chosen).sort().values


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) with `fraction` of each class held out: a test split for sources without one."""
    per_class = torch.round(class_counts(labels, int(labels.max()) + 1).double() * fraction).long()
    hold = stratified_take(labels, per_class, torch.Generator().manual_seed(seed))
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[hold] = False
    return keep.nonzero().flatten(), hold
