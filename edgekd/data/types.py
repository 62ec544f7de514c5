"""In-memory datasets: uint8 image tensors plus the metadata every later stage needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgekd.runtime.evalset import is_multilabel


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]; multi-label data: uint8 [N, classes], 1 where the image has the class

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class RawDataset:
    """What a source returns: its own train and test splits at native size."""

    train: ImageSet
    test: ImageSet
    classes: list[str]
    origin: str  # where the files came from, for the log and the manifest
    notes: list[str] = field(default_factory=list)  # e.g. unreadable files skipped


@dataclass
class SourceSizes:
    """Images per class in a source's own train and test splits, known without loading the images: what
    `edgekd check` sizes the splits from."""

    classes: list[str]
    train: torch.Tensor  # int64 [classes]
    test: torch.Tensor


@dataclass
class DataSplits:
    """Train / validation / test after resizing, channel conversion, the validation carve and limits."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]
    mean: list[float]
    std: list[float]
    origin: str
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Each image carries a set of classes (labels [N, classes], 0/1), scored by macro AUC, not top-1."""
        return is_multilabel(self.train.labels)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "origin": self.origin,
            "classes": self.classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "notes": self.notes,
        }
