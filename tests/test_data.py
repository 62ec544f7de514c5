import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.config import DatasetConfig
from edgekd.data.augment import ViewAugment
from edgekd.data.sources import SOURCES
from edgekd.data.splits import load_splits
from edgekd.errors import EdgeKDError
from tests.conftest import FASHION_DIR, needs_fashion_mnist


def _check_splits(s, classes, channels, size):
    assert s.num_classes == classes and s.channels == channels and s.image_size == size
    for part in (s.train, s.val, s.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (channels, size, size)
        assert part.labels.dtype == torch.int64 and len(part.labels) == len(part.images)
    assert len(s.mean) == channels and all(v > 0 for v in s.std)


def test_synthetic_is_deterministic_and_stratified():
    cfg = DatasetConfig(source="synthetic", classes=5, samples_per_class=40, image_size=16, val_fraction=0.25)
    a, b = load_splits("synthetic", cfg), load_splits("synthetic", cfg)
    _check_splits(a, 5, 1, 16)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert torch.bincount(a.val.labels).tolist() == [10] * 5  # stratified carve
    assert torch.bincount(a.train.labels).tolist() == [30] * 5


def test_digits_embedded_resized_to_rgb():
    s = load_splits("digits", DatasetConfig(source="digits", image_size=16, channels=3))
    _check_splits(s, 10, 3, 16)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.test) == 359


def test_train_limit_keeps_class_shares():
    s = load_splits("digits", DatasetConfig(source="digits", train_limit=300))
    counts = torch.bincount(s.train.labels, minlength=10)
    assert 290 <= len(s.train) <= 300 and counts.min() >= 28


@needs_fashion_mnist()
def test_fashion_mnist_from_debian_files():
    s = load_splits("fashion-mnist", DatasetConfig(source="fashion-mnist", train_limit=2000, test_limit=500))
    _check_splits(s, 10, 1, 28)
    assert len(s.val) == 6000 and 1990 <= len(s.train) <= 2000 and len(s.test) == 500
    assert s.classes[0] == "T-shirt/top" and s.origin == str(FASHION_DIR)


def test_missing_idx_directory_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(SOURCES.get("mnist"), "system_dirs", ())
    with pytest.raises(EdgeKDError, match="--data-dir or \\$EDGEKD_DATA"):
        load_splits("mnist", DatasetConfig(source="mnist", data_dir=str(tmp_path / "nope")))


def test_torchvision_source_without_files_says_download(tmp_path):
    with pytest.raises(EdgeKDError, match="pass --download"):
        load_splits("cifar10", DatasetConfig(source="cifar10", data_dir=str(tmp_path)))


def _write_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    modes = [("RGB", (20, 24)), ("L", (32, 32)), ("RGBA", (17, 9)), ("P", (40, 40))]
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            mode, size = modes[(i + c) % len(modes)]
            array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / name / f"{i}.png")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")


def test_imagefolder_mixed_modes_and_a_corrupt_file(tmp_path):
    _write_folder(tmp_path / "pets")
    cfg = DatasetConfig(source="imagefolder", data_dir=str(tmp_path / "pets"), image_size=16, channels=3,
                        val_fraction=0.25)
    s = load_splits("pets", cfg)
    _check_splits(s, 3, 3, 16)
    assert s.classes == ["cat", "dog", "eel"]
    assert len(s.train) + len(s.val) + len(s.test) == 24  # the corrupt file is skipped, not fatal
    assert any("skipped 1 unreadable" in note for note in s.notes)


def test_imagefolder_with_train_test_folders_grayscale(tmp_path):
    _write_folder(tmp_path / "d" / "train", corrupt=False)
    _write_folder(tmp_path / "d" / "test", corrupt=False)
    s = load_splits("d", DatasetConfig(source="imagefolder", data_dir=str(tmp_path / "d"), image_size=8,
                                       channels=1, val_fraction=0.25))
    _check_splits(s, 3, 1, 8)
    assert len(s.test) == 24


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root / "a").mkdir(parents=True), "no readable images"),
])
def test_imagefolder_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(EdgeKDError, match=message):
        load_splits("x", DatasetConfig(source="imagefolder", data_dir=str(root)))


@pytest.mark.parametrize("padding, hflip", [(0, False), (0, True), (2, False), (2, True), (3, True)])
def test_views_match_explicit_crop_and_flip(padding, hflip):
    augment = ViewAugment(padding, hflip)
    images = torch.randint(0, 255, (augment.num_views, 2, 7, 9), dtype=torch.uint8)
    views = torch.arange(augment.num_views)
    out = augment.apply(images, views)
    side = 2 * padding + 1
    for v in range(augment.num_views):
        flip, offset = (v % 2 == 1, v // 2) if hflip else (False, v)
        dy, dx = divmod(offset, side)
        padded = torch.nn.functional.pad(images[v], (padding,) * 4)
        expected = padded[:, dy : dy + 7, dx : dx + 9]
        if flip:
            expected = expected.flip(-1)
        assert torch.equal(out[v], expected), v


def test_epoch_draws_are_replayable():
    augment = ViewAugment(2, True)
    a, b = augment.draw_epoch(100, seed=3, epoch=4), augment.draw_epoch(100, seed=3, epoch=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], augment.draw_epoch(100, seed=4, epoch=4)[1])
    assert sorted(a[0].tolist()) == list(range(100)) and int(a[1].max()) < 50
