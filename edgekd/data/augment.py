"""Batched augmentation on tensors, on the training device, with a finite and numbered set of views.

A view is (crop offset, flip). Numbering them lets the teacher's outputs be cached per (sample, view) and
shared by every student (FKD, Shen & Xing, ECCV 2022): a student's batch looks its teacher outputs up instead
of running the teacher. View draws and the shuffle depend only on (seed, epoch), so any run can be replayed,
resumed mid-study, or planned ahead to fill the cache with exactly the views training will use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + epoch)


@dataclass(frozen=True)
class ViewAugment:
    padding: int  # random crop with this zero padding; 0 disables crops
    hflip: bool

    @property
    def offsets(self) -> int:
        return 2 * self.padding + 1

    @property
    def num_views(self) -> int:
        return self.offsets**2 * (2 if self.hflip else 1)

    def draw_epoch(self, n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample order, view id per sample) for one epoch; the same on every machine for the same seed."""
        g = epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=g)
        views = torch.randint(0, self.num_views, (n,), generator=g)
        return order, views

    def apply(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Crop and flip a batch [B, C, H, W] (any dtype), view by view, without a Python loop over samples."""
        if self.num_views == 1:
            return images
        views = views.to(images.device)
        flip = views % 2 == 1 if self.hflip else torch.zeros_like(views, dtype=torch.bool)
        offset = views // 2 if self.hflip else views
        b, _, h, w = images.shape
        if self.padding:
            dy, dx = offset // self.offsets, offset % self.offsets
            padded = F.pad(images, (self.padding,) * 4)
            rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # [B, H, 1]
            cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [B, 1, W]
            batch = torch.arange(b, device=images.device)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
        if self.hflip:
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images


MIXES = ("mixup", "cutmix")


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one training step's batch mixing: replayable on resume, the same on every machine."""
    return 1_000_003 * seed + 7_919 * epoch + step + 1


def mix_batch(images: torch.Tensor, kind: str, alpha: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a normalised batch with a permutation of itself: (mixed images, partner of each image, the share `lam`
    of each image that is its own). mixup: lam x + (1 - lam) x[partner], lam ~ Beta(alpha, alpha). cutmix: a box of
    area (1 - lam) of the image, at a uniform centre, clipped to the image, taken from x[partner]; lam is then the
    share left after clipping, as the reference implementation (clovaai/CutMix-PyTorch) recomputes it."""
    import numpy as np

    if kind not in MIXES:
        raise ValueError(f"unknown batch mix {kind!r}: use one of {', '.join(MIXES)}")
    rng = np.random.default_rng(seed)  # numpy: torch's Beta has no seeded generator
    b, _, h, w = images.shape
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(b)).to(images.device)
    if kind == "mixup":
        return lam * images + (1 - lam) * images[partner], partner, lam
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[partner, :, y0:y1, x0:x1]  # only the box is gathered
    return mixed, partner, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
