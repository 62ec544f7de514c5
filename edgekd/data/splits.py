"""From a source's raw splits to what training uses: size, channels, a validation carve, limits, statistics.

The validation split and any caps are drawn with fixed seeds, so every role and seed of a study sees the same
images: KD gain is then paired on identical data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgekd.config import DatasetConfig
from edgekd.data.sampling import (
    cap_per_class,
    class_counts,
    random_take,
    share_per_class,
    stratified_take,
)
from edgekd.data.sources import SOURCES
from edgekd.data.types import DataSplits, ImageSet
from edgekd.errors import EdgeKDError
from edgekd.runtime.evalset import is_multilabel

SPLIT_SEED = 20261125  # fixed: the validation carve and caps must not move with the training seed


def stratified_cap(images: ImageSet, limit: int, num_classes: int, seed: int) -> ImageSet:
    """At most `limit` samples, each class keeping its share."""
    if limit <= 0 or limit >= len(images):
        return images
    if is_multilabel(images.labels):
        return images.subset(random_take(len(images), limit, torch.Generator().manual_seed(seed)))
    per_class = cap_per_class(class_counts(images.labels, num_classes), limit)
    return images.subset(stratified_take(images.labels, per_class, torch.Generator().manual_seed(seed)))


def split_sizes(train: torch.Tensor, test: torch.Tensor, cfg: DatasetConfig) -> dict[str, torch.Tensor]:
    """Images per class in the train, val and test splits `load_splits` makes from a source's own train and test
    splits of these per-class sizes: the validation carve, then the caps."""
    val = share_per_class(train, cfg.val_fraction)
    return {"train": cap_per_class(train - val, cfg.train_limit), "val": val,
            "test": cap_per_class(test, cfg.test_limit)}


def split_problems(name: str, classes: list[str], train: torch.Tensor, test: torch.Tensor,
                   cfg: DatasetConfig) -> list[str]:
    """Why a dataset of these per-class sizes cannot be trained and tested as `cfg` asks: fewer than two classes,
    or a class left without images in a split (an empty validation split never picks a best epoch)."""
    if len(classes) < 2:
        return [f"dataset {name!r} has {len(classes)} class{'' if len(classes) == 1 else 'es'} "
                f"({', '.join(classes) or 'none'}): a classifier needs at least two; add a folder per class"]
    sizes = split_sizes(train, test, cfg)
    short = [c for c in range(len(classes)) if min(int(sizes[split][c]) for split in sizes) < 1]
    if not short:
        return []
    c = short[0]
    got = ", ".join(f"{int(sizes[split][c])} {split}" for split in sizes)
    others = f" (and {len(short) - 1} more class{'es' if len(short) > 2 else ''})" if len(short) > 1 else ""
    return [f"dataset {name!r}: class {classes[c]!r}{others} would get {got} images of its {int(train[c])} "
            f"training and {int(test[c])} test images with val_fraction {cfg.val_fraction}"
            f"{f', train_limit {cfg.train_limit}' if cfg.train_limit else ''}"
            f"{f', test_limit {cfg.test_limit}' if cfg.test_limit else ''}: every class needs at least one "
            f"image in each split; add images or raise datasets.{name}.val_fraction"]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 0 or images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if channels <= 0 or channels == have:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def load_splits(name: str, cfg: DatasetConfig) -> DataSplits:
    raw = SOURCES.get(cfg.source or name).load(cfg)
    classes = len(raw.classes)

    def normalise(s: ImageSet) -> ImageSet:
        return ImageSet(convert_channels(resize(s.images, cfg.image_size), cfg.channels), s.labels)

    train, test = normalise(raw.train), normalise(raw.test)
    problems = split_problems(name, raw.classes, class_counts(train.labels, classes),
                              class_counts(test.labels, classes), cfg)
    if problems:
        raise EdgeKDError(problems[0])
    g = torch.Generator().manual_seed(SPLIT_SEED)
    if is_multilabel(train.labels):
        val_idx = random_take(len(train), round(len(train) * cfg.val_fraction), g)
    else:
        val_per_class = share_per_class(class_counts(train.labels, classes), cfg.val_fraction)
        val_idx = stratified_take(train.labels, val_per_class, g)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    val, train = train.subset(val_idx), train.subset(keep.nonzero().flatten())
    train = stratified_cap(train, cfg.train_limit, classes, SPLIT_SEED + 1)
    test = stratified_cap(test, cfg.test_limit, classes, SPLIT_SEED + 2)
    mean, std = channel_stats(train.images.numpy())
    return DataSplits(name, train, val, test, raw.classes, mean, std, raw.origin, raw.notes)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 NCHW images in [0, 1], in numpy float64 over fixed chunks.
    Not torch: its float32 reduction splits the sum by its thread count, and a study's jobs run with 1 or 2 threads
    (edgekd/distill/sharing.py) in processes that keep their data; these constants normalize every image a
    training sees, so they must not depend on which job loaded the data first."""
    n = images.shape[0] * images.shape[2] * images.shape[3]
    total, squares = np.zeros(images.shape[1]), np.zeros(images.shape[1])
    for chunk in np.array_split(images, max(1, len(images) // 4096)):
        x = chunk.astype(np.float64) / 255
        total += x.sum(axis=(0, 2, 3))
        squares += (x * x).sum(axis=(0, 2, 3))
    mean = total / n
    std = np.sqrt(np.maximum(squares - n * mean**2, 0) / max(1, n - 1))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()
