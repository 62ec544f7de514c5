"""Data sources, one registry: each loads its own train and test splits as uint8 tensors at native size.

Nothing downloads unless the profile or CLI asks (`download = true` / `--download`): tests and benchmarks run
on files already on disk (scikit-learn's digits, Debian's Fashion-MNIST).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekd.config import DatasetConfig
from edgekd.data.idx import find_idx, read_idx
from edgekd.data.sampling import HOLDOUT_FRACTION, HOLDOUT_SEED, holdout_sizes, stratified_holdout
from edgekd.data.types import ImageSet, RawDataset, SourceSizes
from edgekd.errors import EdgeKDError
from edgekd.registry import Registry


@dataclass
class Source:
    description: str

    def search_paths(self, cfg: DatasetConfig) -> list[Path]:
        return []

    def load(self, cfg: DatasetConfig) -> RawDataset:
        raise EdgeKDError(f"data source {cfg.source!r} cannot load")

    def sizes(self, cfg: DatasetConfig) -> SourceSizes | None:
        """Images per class of the source's splits, found without loading them (file counts, label files, known
        sizes); raises what `load` would for missing files. None: not knowable yet (a download is pending)."""
        return None


SOURCES: Registry[Source] = Registry("data source")


def _user_dirs(cfg: DatasetConfig, subdir: str) -> list[Path]:
    if cfg.data_dir:  # the one place the user named: a copy found elsewhere would answer another question
        return [Path(cfg.data_dir).expanduser()]
    if os.environ.get("EDGEKD_DATA"):
        root = Path(os.environ["EDGEKD_DATA"]).expanduser()
        return [root / subdir, root]
    return []


def _from_numpy(images: np.ndarray, labels, channels_last: bool) -> ImageSet:
    x = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2).contiguous()
    return ImageSet(x.to(torch.uint8), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


class DigitsSource(Source):
    CLASS_SIZES = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)  # images of each digit in scikit-learn's copy

    def search_paths(self, cfg):
        return [Path("<inside scikit-learn>")]

    def load(self, cfg):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        full = _from_numpy(images, bunch.target, channels_last=False)
        # digits has no official test split: hold out 20% per class with a fixed seed, the same everywhere.
        train, test = stratified_holdout(full.labels, HOLDOUT_FRACTION, HOLDOUT_SEED)
        return RawDataset(full.subset(train), full.subset(test), [str(d) for d in range(10)], "scikit-learn digits")

    def sizes(self, cfg):
        train, test = holdout_sizes(torch.tensor(self.CLASS_SIZES))
        return SourceSizes([str(d) for d in range(10)], train, test)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@dataclass
class IdxSource(Source):
    subdir: str = ""
    torchvision_name: str = ""
    system_dirs: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()

    def search_paths(self, cfg):
        dirs = _user_dirs(cfg, self.subdir) + ([] if cfg.data_dir else [Path(d) for d in self.system_dirs])
        # torchvision's own download layout, so data fetched with --download is found next time.
        return dirs + [d / self.torchvision_name / "raw" for d in list(dirs)]

    def _find(self, cfg) -> Path | None:
        for d in self.search_paths(cfg):
            if all(find_idx(d, f"{prefix}-{kind}") for prefix in ("train", "t10k")
                   for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")):
                return d
        return None

    def _not_found(self, cfg) -> EdgeKDError:
        looked = ", ".join(str(p) for p in self.search_paths(cfg)) or "nowhere"
        hint = " install Debian's dataset-fashion-mnist," if self.system_dirs and not cfg.data_dir else ""
        return EdgeKDError(
            f"{cfg.source}: no IDX files found (looked in {looked}):{hint} point --data-dir or "
            f"$EDGEKD_DATA at the files, or pass --download"
        )

    def sizes(self, cfg):
        directory = self._find(cfg)
        if directory is None:
            if cfg.download:
                return None
            raise self._not_found(cfg)
        counts = [torch.bincount(torch.from_numpy(read_idx(find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
                                                  .astype(np.int64)), minlength=len(self.classes))
                  for prefix in ("train", "t10k")]
        return SourceSizes(list(self.classes), *counts)

    def load(self, cfg):
        directory = self._find(cfg)
        if directory is None and cfg.download:
            root = Path(cfg.data_dir or os.environ.get("EDGEKD_DATA") or "data").expanduser()
            import torchvision

            getattr(torchvision.datasets, self.torchvision_name)(str(root), train=True, download=True)
            getattr(torchvision.datasets, self.torchvision_name)(str(root), train=False, download=True)
            directory = self._find(DatasetConfig(source=cfg.source, data_dir=str(root)))
        if directory is None:
            raise self._not_found(cfg)
        splits = []
        for prefix in ("train", "t10k"):
            images = read_idx(find_idx(directory, f"{prefix}-images-idx3-ubyte"))
            labels = read_idx(find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
            splits.append(_from_numpy(images, labels.astype(np.int64), channels_last=False))
        return RawDataset(splits[0], splits[1], list(self.classes), str(directory))


@dataclass
class TorchvisionSource(Source):
    dataset: str = ""
    files: tuple[str, ...] = ()  # what torchvision keeps under its root once downloaded
    train_sizes: tuple[int, ...] = ()  # images per class
    test_sizes: tuple[int, ...] = ()

    def search_paths(self, cfg):
        return _user_dirs(cfg, self.dataset.lower()) or [Path("data")]

    def _not_found(self, cfg, root: Path, reason: str) -> EdgeKDError:
        return EdgeKDError(f"{cfg.source}: dataset not found under {root} ({reason}): pass --download, or point "
                           "--data-dir at it")

    def sizes(self, cfg):
        root = self.search_paths(cfg)[0]
        missing = [name for name in self.files if not (root / name).exists()]
        if missing and not cfg.download:
            raise self._not_found(cfg, root, f"no {missing[0]}")
        classes = [str(c) for c in range(len(self.train_sizes))]
        return SourceSizes(classes, torch.tensor(self.train_sizes), torch.tensor(self.test_sizes))

    def load(self, cfg):
        import torchvision

        root = self.search_paths(cfg)[0]
        cls = getattr(torchvision.datasets, self.dataset)
        try:
            if self.dataset == "SVHN":
                parts = [cls(str(root), split=s, download=cfg.download) for s in ("train", "test")]
                sets = [_from_numpy(p.data, p.labels, channels_last=False) for p in parts]
                classes = [str(d) for d in range(10)]
            else:
                parts = [cls(str(root), train=t, download=cfg.download) for t in (True, False)]
                sets = [_from_numpy(p.data, p.targets, channels_last=True) for p in parts]
                classes = list(parts[0].classes)
        except RuntimeError as exc:
            raise self._not_found(cfg, root, str(exc)) from None
        return RawDataset(sets[0], sets[1], classes, str(root))


class ImageFolderSource(Source):
    folder = "imagefolder"  # the source's name, and its folder under $EDGEKD_DATA

    def search_paths(self, cfg):
        return _user_dirs(cfg, self.folder)

    def load(self, cfg):
        from edgekd.data.imagefolder import load_image_folder

        return load_image_folder(self._root(cfg), cfg)

    def sizes(self, cfg):
        from edgekd.data.imagefolder import folder_sizes

        return folder_sizes(self._root(cfg))[0]

    def _root(self, cfg) -> Path:
        paths = self.search_paths(cfg)
        if not paths:
            raise EdgeKDError(f"{self.folder}: no directory given: set data_dir in the profile or pass --data-dir")
        return paths[0]


class AudioFolderSource(ImageFolderSource):
    """Class-per-folder WAV clips, as one-channel feature maps (edgekd.data.audio)."""

    folder = "audiofolder"

    def load(self, cfg):
        from edgekd.data.audio import load_audio_folder

        return load_audio_folder(self._root(cfg), cfg)

    def sizes(self, cfg):
        from edgekd.data.audio import folder_audio_sizes

        return folder_audio_sizes(self._root(cfg))


class SpokenDigitsSource(Source):
    """espeak-ng's spoken digits (edgekd.data.spoken_digits), synthesized on first use, read as an audio folder."""

    def search_paths(self, cfg):
        return _user_dirs(cfg, "spoken-digits")[:1] or [Path.home() / ".cache" / "edgekd" / "spoken-digits"]

    def load(self, cfg):
        from edgekd.data.audio import load_audio_folder
        from edgekd.data.spoken_digits import is_made, make_spoken_digits

        root = self.search_paths(cfg)[0].expanduser()
        if not is_made(root):
            make_spoken_digits(root)
        return load_audio_folder(root, cfg)

    def sizes(self, cfg):
        from edgekd.data.spoken_digits import CLASSES, clips_per_word, espeak, is_made

        if not is_made(self.search_paths(cfg)[0].expanduser()):
            espeak()  # what load would raise: it cannot make the clips here
        train, test = clips_per_word()
        return SourceSizes(list(CLASSES), torch.full((len(CLASSES),), train), torch.full((len(CLASSES),), test))


class LabelSetsSource(ImageFolderSource):
    """Images listed with their label sets (edgekd.data.labelsets): multi-label, as ChestX-ray14 ships them."""

    folder = "labelsets"

    def load(self, cfg):
        from edgekd.data.labelsets import load_label_sets

        return load_label_sets(self._root(cfg), cfg)

    def sizes(self, cfg):
        return None  # classes are the labels the lists name: known once they are read


class MosaicSource(Source):
    """Multi-label 2x2 mosaics of another source's images (edgekd.data.mosaic)."""

    def search_paths(self, cfg):
        return SOURCES.get(cfg.tiles).search_paths(cfg) if cfg.tiles in SOURCES and cfg.tiles != "mosaic" else []

    def load(self, cfg):
        from edgekd.data.mosaic import mosaics_of

        if cfg.tiles not in SOURCES or cfg.tiles == "mosaic":
            raise EdgeKDError(f"mosaic: unknown tile source {cfg.tiles!r}: use one of "
                              f"{', '.join(n for n in SOURCES if n != 'mosaic')}")
        tiles = DatasetConfig(source=cfg.tiles, data_dir=cfg.data_dir, download=cfg.download)
        return mosaics_of(SOURCES.get(cfg.tiles).load(tiles), cfg)


class SyntheticSource(Source):
    def search_paths(self, cfg):
        return [Path("<drawn in memory>")]

    def load(self, cfg):
        from edgekd.data.synthetic import draw_synthetic

        return draw_synthetic(cfg)

    def sizes(self, cfg):
        from edgekd.data.synthetic import synthetic_sizes

        return synthetic_sizes(cfg)


SOURCES.register("digits")(DigitsSource("scikit-learn's 8x8 handwritten digits (1,797 images), embedded"))
SOURCES.register("fashion-mnist")(IdxSource(
    "Fashion-MNIST IDX files (60,000 + 10,000 28x28 images)", "fashion-mnist", "FashionMNIST",
    ("/usr/share/datasets/fashion-mnist",), tuple(FASHION_CLASSES)))
SOURCES.register("mnist")(IdxSource(
    "MNIST IDX files (60,000 + 10,000 28x28 digits)", "mnist", "MNIST", ("/usr/share/datasets/mnist",),
    tuple(str(d) for d in range(10))))
SOURCES.register("cifar10")(TorchvisionSource(
    "CIFAR-10 via torchvision (50,000 + 10,000 32x32)", "CIFAR10", ("cifar-10-batches-py",), (5000,) * 10,
    (1000,) * 10))
SOURCES.register("cifar100")(TorchvisionSource(
    "CIFAR-100 via torchvision (50,000 + 10,000 32x32)", "CIFAR100", ("cifar-100-python",), (500,) * 100,
    (100,) * 100))
SOURCES.register("svhn")(TorchvisionSource(
    "SVHN via torchvision (73,257 + 26,032 32x32)", "SVHN", ("train_32x32.mat", "test_32x32.mat"),
    (4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659),
    (1744, 5099, 4149, 2882, 2523, 2384, 1977, 2019, 1660, 1595)))
SOURCES.register("imagefolder")(ImageFolderSource("a class-per-folder directory of images (train/ and test/ "
                                                  "subfolders, or classes directly: 20% held out for test)"))
SOURCES.register("audiofolder")(AudioFolderSource("a class-per-folder directory of WAV clips, as log-mel or MFCC "
                                                  "maps (train/ and test/ subfolders, or 20% held out)"))
SOURCES.register("spoken-digits")(SpokenDigitsSource("spoken digits synthesized by espeak-ng (7 accents x 8 speakers "
                                                     "x 2 speeds x 2 pitches; 2 speakers held out for test)"))
SOURCES.register("labelsets")(LabelSetsSource("multi-label images listed with their label sets: train.csv and test.csv "
                                              "(or labels.csv) of path,labels ('|'-separated), as ChestX-ray14"))
SOURCES.register("mosaic")(MosaicSource("multi-label: 2x2 mosaics of another source's images (tiles = ...), labelled "
                                         "with the set of their classes"))
SOURCES.register("synthetic")(SyntheticSource("procedurally drawn bars; classes and samples set in the profile"))
