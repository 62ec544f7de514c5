"""Multi-label images made from single-label ones: 2x2 mosaics of a source's tiles, each labelled with the set of its
tiles' classes (the construction of multi-label MNIST benchmarks). A stand-in, built here from real images, for the
label sets of ChestX-ray14 or CheXpert: several findings per image, some frequent together, none exclusive.

Train mosaics are made from the source's training tiles and test mosaics from its test tiles, so no tile is in
both; each split is drawn with its own fixed seed, the same on every machine.
"""

from __future__ import annotations

import torch

from edgekd.config import DatasetConfig
from edgekd.data.types import ImageSet, RawDataset
from edgekd.errors import EdgeKDError

MOSAIC_SEED = 20261207


def make_mosaics(tiles: ImageSet, count: int, classes: int, seed: int) -> ImageSet:
    """`count` 2x2 mosaics of tiles drawn at random (with replacement); labels uint8 [count, classes]."""
    if len(tiles) == 0:
        raise EdgeKDError("mosaic: the tile source has no images in this split")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(tiles), (count, 4), generator=g)
    t = tiles.images[pick]  # [count, 4, C, h, w]
    images = torch.cat([torch.cat([t[:, 0], t[:, 1]], dim=-1), torch.cat([t[:, 2], t[:, 3]], dim=-1)], dim=-2)
    labels = torch.zeros(count, classes, dtype=torch.uint8)
    labels.scatter_(1, tiles.labels[pick], 1)
    return ImageSet(images.contiguous(), labels)


def mosaics_of(raw: RawDataset, cfg: DatasetConfig) -> RawDataset:
    """The mosaic dataset made of a single-label source's splits (`raw`, the `tiles` source as loaded)."""
    if raw.train.labels.ndim != 1:
        raise EdgeKDError(f"mosaic: tiles must come from a single-label source, not {cfg.tiles!r}")
    classes = len(raw.classes)
    train = make_mosaics(raw.train, cfg.mosaics or len(raw.train), classes, MOSAIC_SEED)
    test = make_mosaics(raw.test, cfg.mosaics and max(1, cfg.mosaics * len(raw.test) // max(1, len(raw.train)))
                        or len(raw.test), classes, MOSAIC_SEED + 1)
    return RawDataset(train, test, raw.classes, f"2x2 mosaics of {cfg.tiles} ({raw.origin})", raw.notes)
