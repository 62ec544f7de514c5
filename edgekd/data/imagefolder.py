"""Class-per-folder image directories: the domain data users bring (plants, X-rays, satellite tiles).

Mixed sizes and colour modes are normalised here to the profile's size and channels, so the result stacks into
one uint8 tensor. Unreadable files are skipped and counted, never a crash mid-run; `folder_sizes` counts the
readable images per class from their headers alone, so a plan is checked before any image is decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekd.config import DatasetConfig
from edgekd.data.sampling import HOLDOUT_FRACTION, HOLDOUT_SEED, holdout_sizes, stratified_holdout
from edgekd.data.types import ImageSet, RawDataset, SourceSizes
from edgekd.errors import EdgeKDError

log = logging.getLogger("edgekd.data")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_SIZE = 32  # a mixed-size folder needs one size; 32 keeps CPU training of small students practical


@dataclass
class FolderLayout:
    class_root: Path  # the folder whose sub-folders are the classes
    classes: list[str]
    split_dirs: tuple[Path, Path] | None  # (train/, test/), or None: the test split is held out of the images


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_layout(root: Path, source: str = "imagefolder", files: str = "images") -> FolderLayout:
    """The class folders under `root` (with train/ and test/, or without); `source` and `files` name the data
    source and what its folders hold, in errors."""
    if not root.is_dir():
        raise EdgeKDError(f"{source}: directory {str(root)!r} does not exist: fix data_dir or --data-dir")
    split_dirs = (root / "train", root / "test")
    has_splits = all(d.is_dir() for d in split_dirs)
    class_root = split_dirs[0] if has_splits else root
    classes = [p.name for p in _class_dirs(class_root)]
    if not classes:
        raise EdgeKDError(
            f"{source}: no class folders in {str(class_root)!r}: put one folder per class with its {files} inside"
        )
    return FolderLayout(class_root, classes, split_dirs if has_splits else None)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _unreadable_errors():
    from PIL import Image, UnidentifiedImageError

    # DecompressionBombError: a header claiming an absurd size, the mark of a damaged (or hostile) file.
    return OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError


def _no_images(layout: FolderLayout, skipped: list[str]) -> EdgeKDError:
    example = f", e.g. {skipped[0]}" if skipped else ""
    return EdgeKDError(
        f"imagefolder: no readable images in {str(layout.class_root)!r} ({len(skipped)} unreadable{example}): "
        f"add image files ({', '.join(sorted(IMAGE_SUFFIXES))}) inside the class folders"
    )


def folder_sizes(root: Path) -> tuple[SourceSizes, list[str]]:
    """Readable images per class and split, judged by their headers (no decoding), and the unreadable files."""
    from PIL import Image

    layout = folder_layout(root)
    skipped: list[str] = []

    def count(folder: Path) -> torch.Tensor:
        readable = []
        for name in layout.classes:
            n = 0
            for path in _image_files(folder / name):
                try:
                    with Image.open(path):
                        n += 1
                except _unreadable_errors():
                    skipped.append(str(path))
            readable.append(n)
        return torch.tensor(readable, dtype=torch.int64)

    if layout.split_dirs:
        train, test = (count(d) for d in layout.split_dirs)
    else:
        train, test = holdout_sizes(count(root))
    if int(train.sum()) + int(test.sum()) == 0:
        raise _no_images(layout, skipped)
    return SourceSizes(layout.classes, train, test), skipped


def _read_split(root: Path, classes: list[str], size: int, mode: str) -> tuple[ImageSet, list[str]]:
    from PIL import Image

    images, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        for path in _image_files(root / name):
            try:
                with Image.open(path) as img:
                    img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except _unreadable_errors():
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
    layout = folder_layout(root)
    size = cfg.image_size or DEFAULT_SIZE
    mode = "L" if cfg.channels == 1 else "RGB"
    if layout.split_dirs:
        (train, skip_a), (test, skip_b) = (_read_split(d, layout.classes, size, mode) for d in layout.split_dirs)
        skipped = skip_a + skip_b
    else:
        train, skipped = _read_split(root, layout.classes, size, mode)
    if len(train) == 0:
        raise _no_images(layout, skipped)
    if not layout.split_dirs:
        keep, hold = stratified_holdout(train.labels, HOLDOUT_FRACTION, HOLDOUT_SEED)
        train, test = train.subset(keep), train.subset(hold)
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        log.warning("imagefolder: %s", notes[-1])
    return RawDataset(train, test, layout.classes, str(root), notes)
