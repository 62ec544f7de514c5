"""Class-per-folder image directories: the domain data users bring (plants, X-rays, satellite tiles).

Mixed sizes and colour modes are normalised here to the profile's size and channels, so the result stacks into
one uint8 tensor. Unreadable files are skipped and counted, never a crash mid-run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from edgekd.config import DatasetConfig
from edgekd.data.sampling import stratified_holdout
from edgekd.data.types import ImageSet, RawDataset
from edgekd.errors import EdgeKDError

log = logging.getLogger("edgekd.data")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_SIZE = 32  # a mixed-size folder needs one size; 32 keeps CPU training of small students practical


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_split(root: Path, classes: list[str], size: int, mode: str) -> tuple[ImageSet, list[str]]:
    from PIL import Image, UnidentifiedImageError

    images, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                skipped.append(str(path))
                continue
            images.append(array if array.ndim == 3 else array[..., None])
            labels.append(label)
    if not images:
        return ImageSet(torch.zeros(0, 1 if mode == "L" else 3, size, size, dtype=torch.uint8),
                        torch.zeros(0, dtype=torch.int64)), skipped
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64)), skipped


def load_image_folder(root: Path, cfg: DatasetConfig) -> RawDataset:
    if not root.is_dir():
        raise EdgeKDError(f"imagefolder: directory {str(root)!r} does not exist: fix data_dir or --data-dir")
    split_dirs = (root / "train", root / "test")
    has_splits = all(d.is_dir() for d in split_dirs)
    class_root = split_dirs[0] if has_splits else root
    classes = [p.name for p in _class_dirs(class_root)]
    if not classes:
        raise EdgeKDError(
            f"imagefolder: no class folders in {str(class_root)!r}: put one folder per class with its images inside"
        )
    size = cfg.image_size or DEFAULT_SIZE
    mode = "L" if cfg.channels == 1 else "RGB"
    if has_splits:
        (train, skip_a), (test, skip_b) = (_read_split(d, classes, size, mode) for d in split_dirs)
        skipped = skip_a + skip_b
    else:
        train, skipped = _read_split(root, classes, size, mode)
    if len(train) == 0:
        raise EdgeKDError(
            f"imagefolder: no readable images in {str(class_root)!r} ({len(skipped)} unreadable): "
            f"add image files ({', '.join(sorted(IMAGE_SUFFIXES))}) inside the class folders"
        )
    if not has_splits:
        keep, hold = stratified_holdout(train.labels, 0.2, seed=1234)
        train, test = train.subset(keep), train.subset(hold)
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        log.warning("imagefolder: %s", notes[-1])
    return RawDataset(train, test, classes, str(root), notes)
