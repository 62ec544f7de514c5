"""Dataset variants: what a dataset's size and biases do to KD, each seeded and applied to training data only.

A variant transforms the training split (size, imbalance, label noise, a spurious cue, a class subset) and may
add test-time sets (bias-aligned and bias-conflicting images, corruptions, another resolution); the clean test
split itself is never changed. Each returns its exact statistics for the run's metadata.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgekd.config import CORRUPTIONS, VariantConfig, variant_problems
from edgekd.data.sampling import UNLABELED, class_counts, random_take, stratified_take
from edgekd.data.types import DataSplits, ImageSet
from edgekd.errors import EdgeKDError
from edgekd.runtime.evalset import is_multilabel


@dataclass
class VariantData:
    splits: DataSplits
    extra_tests: dict[str, ImageSet]  # name -> test set (e.g. "aligned", "conflicting", "blur@3")
    stats: dict

# A kind whose transformation changed keeps its profile keys but makes other data: its number here goes up, so the
# study's keys change and runs made the old way are retrained, never reused. labels 2: validation keeps only the
# labeled share (it kept every label before).
REVISIONS = {"labels": 2}


def _generator(cfg: VariantConfig) -> torch.Generator:
    return torch.Generator().manual_seed(9_176 + cfg.seed)


def imbalance_counts(available: torch.Tensor, ratio: float) -> torch.Tensor:
    """n_c = n_max * ratio^(-c / (C - 1)), n_max the smallest class size so every class can supply its share."""
    classes = len(available)
    n_max = int(available.min())
    exponent = torch.arange(classes, dtype=torch.float64) / max(classes - 1, 1)
    return torch.floor(n_max * ratio ** (-exponent) + 1e-9).long().clamp_min(1)


def noisy_labels(labels: torch.Tensor, classes: int, cfg: VariantConfig, g: torch.Generator):
    """Exactly round(rate * n_c) labels of each class c changed; returns new labels and the flip mask."""
    original, labels = labels, labels.clone()
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    target = {c: (c + 1) % classes for c in range(classes)}
    for a, b in cfg.pairs:
        target[a], target[b] = b, a
    for c in range(classes):
        idx = (original == c).nonzero().flatten()  # chosen among the clean labels, never twice
        idx = idx[torch.randperm(len(idx), generator=g)][: int(round(cfg.rate * len(idx)))]
        if cfg.noise == "symmetric":
            offset = torch.randint(1, classes, (len(idx),), generator=g)
            labels[idx] = (c + offset) % classes
        else:
            labels[idx] = target[c]
        flipped[idx] = True
    return labels, flipped


# What a multi-label dataset can be made into: the kinds below transform class indices (a spurious cue per class, a
# class subset) or split by class, which a set of classes does not have.
MULTILABEL_KINDS = ("base", "fraction", "label_noise")


def noisy_label_sets(labels: torch.Tensor, cfg: VariantConfig, g: torch.Generator):
    """Multi-label noise: exactly round(rate * n) images, chosen at random, have one of their classes swapped for one
    they do not have (a finding missed and another reported: the set keeps its size). Returns new labels and the
    mask of changed images."""
    labels = labels.clone()
    n, classes = labels.shape
    changed = torch.zeros(n, dtype=torch.bool)
    for i in torch.randperm(n, generator=g)[: int(round(cfg.rate * n))].tolist():
        present, absent = labels[i].nonzero().flatten(), (labels[i] == 0).nonzero().flatten()
        if len(present) == 0 or len(absent) == 0:
            continue
        labels[i, present[torch.randint(len(present), (1,), generator=g)]] = 0
        labels[i, absent[torch.randint(len(absent), (1,), generator=g)]] = 1
        changed[i] = True
    return labels, changed


def add_cue(images: torch.Tensor, cue_class: torch.Tensor, classes: int) -> torch.Tensor:
    """A bright square whose position along the image border encodes a class: a shortcut a net learns fast."""
    images = images.clone()
    _, _, h, w = images.shape
    size = max(2, h // 7)
    slots = [(0, x) for x in range(0, w - size + 1, size)] + [(h - size, x) for x in range(0, w - size + 1, size)]
    if len(slots) < classes:
        raise EdgeKDError(f"spurious cue: {classes} classes do not fit on a {h}x{w} border: use a larger image_size")
    for c in range(classes):
        y, x = slots[c]
        images[cue_class == c, :, y : y + size, x : x + size] = 255
    return images


def corrupt(images: torch.Tensor, kind: str, severity: int) -> torch.Tensor:
    """ImageNet-C style corruptions of uint8 images, severity 1 (mild) to 5 (strong)."""
    x = images.float() / 255
    s = severity - 1
    if kind == "gaussian_noise":
        g = torch.Generator().manual_seed(severity)
        x = x + torch.randn(x.shape, generator=g) * [0.04, 0.08, 0.12, 0.18, 0.26][s]
    elif kind == "blur":
        sigma = [0.4, 0.6, 0.8, 1.0, 1.3][s]
        radius = max(1, int(round(2 * sigma)))
        k = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
        k = (k / k.sum()).to(x)
        c = x.shape[1]
        x = F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    elif kind == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * [0.75, 0.5, 0.4, 0.3, 0.15][s] + m
    elif kind == "brightness":
        x = x + [0.1, 0.2, 0.3, 0.4, 0.5][s]
    elif kind == "jpeg":
        from PIL import Image

        quality = [80, 50, 30, 15, 8][s]
        out = []
        for img in images:
            array = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=quality)
            decoded = np.asarray(Image.open(buf), dtype=np.uint8)
            out.append(torch.from_numpy(decoded.reshape(array.shape).copy()).permute(2, 0, 1))
        return torch.stack(out)
    else:
        raise EdgeKDError(f"unknown corruption {kind!r}: use {', '.join(CORRUPTIONS)}")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _transform_training_like(s: ImageSet, cfg: VariantConfig, classes: int, g: torch.Generator, share: float,
                             stats: dict | None) -> ImageSet:
    """The variant's change to data drawn from the training distribution (the training split, and the validation
    split carved from it: a user's held-out data is as small, skewed, noisy or biased as their training data)."""
    if is_multilabel(s.labels):
        if cfg.kind == "fraction":
            return s.subset(random_take(len(s), round(len(s) * cfg.fraction), g))
        if cfg.kind == "label_noise":
            labels, changed = noisy_label_sets(s.labels, cfg, g)
            if stats is not None:
                stats.update(noise_rate=float(changed.float().mean()))
            return ImageSet(s.images, labels)
        return s
    counts = class_counts(s.labels, classes)
    if cfg.kind == "fraction":
        return s.subset(stratified_take(s.labels, torch.round(counts * cfg.fraction).long(), g))
    if cfg.kind == "labels":
        keep = stratified_take(s.labels, torch.round(counts * cfg.fraction).long().clamp_min(1), g)
        if share != 1.0:  # validation: a user with 5% of the labels holds out 5% too, and an unlabeled one is no use
            return s.subset(keep)
        labels = torch.full_like(s.labels, UNLABELED)
        labels[keep] = s.labels[keep]
        if stats is not None:
            stats.update(labeled=len(keep), unlabeled=len(s) - len(keep))
        return ImageSet(s.images, labels)
    if cfg.kind == "per_class":
        n = cfg.per_class if share == 1.0 else max(1, round(cfg.per_class * share))
        return s.subset(stratified_take(s.labels, torch.full((classes,), n), g))
    if cfg.kind == "imbalance":
        return s.subset(stratified_take(s.labels, imbalance_counts(counts, cfg.ratio), g))
    if cfg.kind == "label_noise":
        labels, flipped = noisy_labels(s.labels, classes, cfg, g)
        if stats is not None:
            transition = torch.zeros(classes, classes, dtype=torch.long)
            transition.index_put_((s.labels, labels), torch.ones(len(labels), dtype=torch.long), accumulate=True)
            stats.update(noise_rate=float(flipped.float().mean()), transition=transition.tolist())
        return ImageSet(s.images, labels)
    if cfg.kind == "spurious":
        aligned = torch.rand(len(s), generator=g) < cfg.p
        other = (s.labels + torch.randint(1, classes, (len(s),), generator=g)) % classes
        if stats is not None:
            stats["bias_aligned_rate"] = float(aligned.float().mean())
        return ImageSet(add_cue(s.images, torch.where(aligned, s.labels, other), classes), s.labels)
    return s


def apply_variant(splits: DataSplits, cfg: VariantConfig, where: str = "variant") -> VariantData:
    """`where` names the variant's profile key (variants.<name>) in errors."""
    classes = splits.num_classes
    problems = variant_problems(cfg, where, classes, int(class_counts(splits.train.labels, classes).min()))
    if splits.multilabel and (cfg.kind not in MULTILABEL_KINDS or cfg.shift):
        problems.append(f"'{where}.kind' is {cfg.kind!r}{' with shift' if cfg.shift else ''}, which needs one class "
                        f"per image; {splits.name!r} is multi-label: use one of {', '.join(MULTILABEL_KINDS)}")
    if problems:
        raise EdgeKDError(problems[0])
    g = _generator(cfg)
    stats: dict = {"kind": cfg.kind, "seed": cfg.seed}
    extra: dict[str, ImageSet] = {}
    share = len(splits.val) / max(len(splits.train), 1)
    train = _transform_training_like(splits.train, cfg, classes, g, 1.0, stats)
    val = _transform_training_like(splits.val, cfg, classes, g, share, None)
    test, names = splits.test, list(splits.classes)
    if cfg.kind == "spurious":
        conflicting = (test.labels + torch.randint(1, classes, (len(test),), generator=g)) % classes
        extra["aligned"] = ImageSet(add_cue(test.images, test.labels, classes), test.labels)
        extra["conflicting"] = ImageSet(add_cue(test.images, conflicting, classes), test.labels)
    elif cfg.kind == "classes":
        keep = sorted(set(cfg.classes))
        remap = torch.full((classes,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))

        def restrict(s: ImageSet) -> ImageSet:
            idx = (remap[s.labels] >= 0).nonzero().flatten()
            return ImageSet(s.images[idx], remap[s.labels[idx]])

        train, val, test, names = restrict(train), restrict(val), restrict(test), [names[c] for c in keep]
    if cfg.kind == "corruption" or cfg.shift:
        for kind in cfg.corruptions:
            for severity in cfg.severities:
                extra[f"{kind}@{severity}"] = ImageSet(corrupt(test.images, kind, severity), test.labels)
    if cfg.resolution and (cfg.kind == "resolution" or cfg.shift):
        size = splits.image_size
        low = F.interpolate(test.images.float(), size=(cfg.resolution,) * 2, mode="bilinear", antialias=True)
        back = F.interpolate(low, size=(size, size), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
        extra[f"resolution@{cfg.resolution}"] = ImageSet(back, test.labels)
    out = DataSplits(splits.name, train, val, test, names, splits.mean, splits.std, splits.origin, splits.notes)
    stats.update(train_per_class=class_counts(train.labels, len(names)).tolist(), train_size=len(train),
                 val_size=len(val))
    return VariantData(out, extra, stats)
