"""Seeded stratified sampling, shared by the sources, the split carving and the variants."""

from __future__ import annotations

import torch

from edgekd.runtime.evalset import is_multilabel

UNLABELED = -1  # the label of a training image whose label a `labels` variant removed


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (multi-label: images carrying it); unlabeled images (UNLABELED) are not counted."""
    if is_multilabel(labels):
        return labels.sum(0).long()
    return torch.bincount(labels[labels >= 0], minlength=num_classes)


def random_take(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k of n indices at random (sorted): multi-label data's carves and caps, where a class is no stratum (an image
    is in several)."""
    return torch.randperm(n, generator=generator)[: max(0, min(k, n))].sort().values


def stratified_take(labels: torch.Tensor, per_class: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices with `per_class[c]` samples of class c drawn at random (sorted, so order is the source's)."""
    chosen = []
    for c in range(len(per_class)):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        chosen.append(idx[: int(per_class[c])])
    return torch.cat(chosen).sort().values


def share_per_class(counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """round(fraction * n_c) for each class c: the size of every stratified carve (a holdout, the validation split).
    `edgekd check` sizes the splits with it from file counts alone, so both agree to the image."""
    return torch.round(counts.double() * fraction).long()


def cap_per_class(counts: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` samples in all, each class keeping its share (rounded down); limit <= 0 keeps all."""
    total = int(counts.sum())
    if limit <= 0 or limit >= total:
        return counts
    return torch.floor(counts.double() * limit / total).long()


# Sources without a test split of their own (digits, an image folder without train/ and test/) hold this share
# of each class out for testing, with this seed: the same images on every machine.
HOLDOUT_FRACTION, HOLDOUT_SEED = 0.2, 1234


def holdout_sizes(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) images per class of a source that holds its test split out of its images."""
    hold = share_per_class(counts, HOLDOUT_FRACTION)
    return counts - hold, hold


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) with `fraction` of each class held out: a test split for sources without one."""
    per_class = share_per_class(class_counts(labels, int(labels.max()) + 1), fraction)
    hold = stratified_take(labels, per_class, torch.Generator().manual_seed(seed))
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[hold] = False
    return keep.nonzero().flatten(), hold
