"""Procedurally drawn images for tests: one bar orientation per class, with jitter and noise.

Learnable in a few epochs by a tiny net, yet not trivial (orientation survives crops, not rotations).
"""

from __future__ import annotations

import math

import torch

from edgekd.config import DatasetConfig
from edgekd.data.types import ImageSet, RawDataset, SourceSizes


def _draw(n_per_class: int, classes: int, size: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    n = len(labels)
    angle = labels.float() * math.pi / classes + (torch.rand(n, generator=g) - 0.5) * (0.6 * math.pi / classes)
    centre = (torch.rand(n, 2, generator=g) - 0.5) * size * 0.3 + size / 2
    width = 1.0 + torch.rand(n, generator=g) * size / 12
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    dy = ys[None] - centre[:, 0, None, None]
    dx = xs[None] - centre[:, 1, None, None]
    distance = (dx * torch.sin(angle)[:, None, None] - dy * torch.cos(angle)[:, None, None]).abs()
    bar = (distance < width[:, None, None]).float()
    noise = torch.rand(n, size, size, generator=g) * 0.35
    images = ((bar * 0.65 + noise).clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)
    return ImageSet(images, labels)


def synthetic_sizes(cfg: DatasetConfig) -> SourceSizes:
    """Images per class of each split: `samples_per_class` for training, a quarter of it (at least one) for test."""
    per_split = (cfg.samples_per_class, max(cfg.samples_per_class // 4, 1))
    train, test = (torch.full((cfg.classes,), n, dtype=torch.int64) for n in per_split)
    return SourceSizes([f"bar{c}" for c in range(cfg.classes)], train, test)


def draw_synthetic(cfg: DatasetConfig) -> RawDataset:
    size = cfg.image_size or 16
    sizes = synthetic_sizes(cfg)
    train = _draw(int(sizes.train[0]), cfg.classes, size, seed=0)
    test = _draw(int(sizes.test[0]), cfg.classes, size, seed=1)
    return RawDataset(train, test, sizes.classes, "synthetic bars")
