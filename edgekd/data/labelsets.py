"""Multi-label images listed with their label sets, as ChestX-ray14 ships them: a CSV of `path, labels` rows
(ChestX-ray14's own header, `Image Index, Finding Labels`, is read as such), labels separated by "|", or a JSON list
of {"path": ..., "labels": [...]}. "No Finding" (ChestX-ray14's empty set) is no label. Paths are relative to the
list's folder (or its images/ folder, where ChestX-ray14 keeps them).

`data_dir` holds train.csv and test.csv (or .json), or one labels.csv (or .json) of which 20% of the images are
held out for test with the same seed as every source without a test split. Classes are every label the lists name,
sorted. Unreadable or missing images are skipped and counted, as in an image folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from edgekd.config import DatasetConfig
from edgekd.data.imagefolder import DEFAULT_SIZE, _unreadable_errors
from edgekd.data.sampling import HOLDOUT_FRACTION, HOLDOUT_SEED, random_take
from edgekd.data.types import ImageSet, RawDataset
from edgekd.errors import EdgeKDError

NO_LABEL = "No Finding"
PATH_COLUMNS = ("path", "Image Index")
LABEL_COLUMNS = ("labels", "Finding Labels")


def read_list(path: Path) -> list[tuple[str, list[str]]]:
    """(image path, labels) rows of a CSV or JSON list; one clear line for a list edgekd cannot read."""
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            return [(str(r["path"]), [str(x) for x in r["labels"]]) for r in rows]
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            p = next((c for c in PATH_COLUMNS if c in names), None)
            lab = next((c for c in LABEL_COLUMNS if c in names), None)
            if p is None or lab is None:
                raise EdgeKDError(f"labelsets: {path} has columns {', '.join(names) or 'none'}: it needs a path column "
                                  f"({' or '.join(PATH_COLUMNS)}) and a labels column ({' or '.join(LABEL_COLUMNS)})")
            return [(row[p], [x.strip() for x in (row[lab] or "").split("|") if x.strip()]) for row in reader]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeKDError(f"labelsets: cannot read {path} ({type(exc).__name__}: {str(exc)[:120]}): a CSV with "
                          "path,labels columns or a JSON list of {\"path\", \"labels\"}") from None


def _lists(root: Path) -> dict[str, Path]:
    for suffix in (".csv", ".json"):
        if (root / f"train{suffix}").is_file() and (root / f"test{suffix}").is_file():
            return {"train": root / f"train{suffix}", "test": root / f"test{suffix}"}
        if (root / f"labels{suffix}").is_file():
            return {"all": root / f"labels{suffix}"}
    raise EdgeKDError(f"labelsets: no train.csv and test.csv (or labels.csv, or .json) in {str(root)!r}: list each "
                      "image's path and its labels separated by '|'")


def _image(root: Path, rel: str, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    path = root / rel if (root / rel).is_file() else root / "images" / rel
    with Image.open(path) as img:
        array = np.asarray(img.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return array if array.ndim == 3 else array[..., None]


def load_label_sets(root: Path, cfg: DatasetConfig) -> RawDataset:
    if not root.is_dir():
        raise EdgeKDError(f"labelsets: directory {str(root)!r} does not exist: fix data_dir or --data-dir")
    lists = {name: read_list(path) for name, path in _lists(root).items()}
    classes = sorted({x for rows in lists.values() for _, labels in rows for x in labels if x != NO_LABEL})
    if len(classes) < 2:
        raise EdgeKDError(f"labelsets: the lists in {str(root)!r} name {len(classes)} label(s): a multi-label study "
                          "needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    size, mode = cfg.image_size or DEFAULT_SIZE, "L" if cfg.channels == 1 else "RGB"
    sets, skipped = {}, []
    for name, rows in lists.items():
        images, labels = [], []
        for rel, names in rows:
            try:
                images.append(_image(root, rel, size, mode))
            except (*_unreadable_errors(), FileNotFoundError):
                skipped.append(rel)
                continue
            row = torch.zeros(len(classes), dtype=torch.uint8)
            row[[index[x] for x in names if x != NO_LABEL]] = 1
            labels.append(row)
        channels = 1 if mode == "L" else 3
        x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images
             else torch.zeros(0, channels, size, size, dtype=torch.uint8))
        sets[name] = ImageSet(x, torch.stack(labels) if labels else torch.zeros(0, len(classes), dtype=torch.uint8))
    if "all" in sets:
        hold = random_take(len(sets["all"]), round(len(sets["all"]) * HOLDOUT_FRACTION),
                           torch.Generator().manual_seed(HOLDOUT_SEED))
        keep = torch.ones(len(sets["all"]), dtype=torch.bool)
        keep[hold] = False
        sets = {"train": sets["all"].subset(keep.nonzero().flatten()), "test": sets["all"].subset(hold)}
    if len(sets["train"]) == 0:
        raise EdgeKDError(f"labelsets: no readable images listed in {str(root)!r} ({len(skipped)} unreadable or "
                          f"missing{', e.g. ' + skipped[0] if skipped else ''})")
    notes = [f"skipped {len(skipped)} unreadable or missing image(s), e.g. {skipped[0]}"] if skipped else []
    return RawDataset(sets["train"], sets["test"], classes, str(root), notes)
