"""Teacher outputs for a student's batch: from a view-keyed cache, or by running the teacher on the batch.

The cache holds the teacher's logits per (training sample, augmentation view), fp16, dense or top-k. It is
filled once per teacher with exactly the views the planned students will draw (their draws depend only on
seed and epoch), stored beside the teacher, and shared by every student, seed and method that distils from it.
A view no plan foresaw is computed on the spot from the student's own augmented batch and added.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.data.augment import ViewAugment
from edgekd.distill.execution import Execution
from edgekd.distill.features import FeatureTap
from edgekd.runio import load_tensors, read_json, save_tensors, write_json

CACHE_STEM = "teacher_cache"  # a cache job's run directory holds teacher_cache.json and teacher_cache.safetensors
CACHE_FILES = (f"{CACHE_STEM}.json", f"{CACHE_STEM}.safetensors")


class Normalize:
    def __init__(self, mean: list[float], std: list[float], device: str):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255.0 - self.mean) / self.std


class LiveTeacher:
    """Runs the teacher without autograd on the very batch the student sees (and keeps the stage features
    that feature-based losses ask for)."""

    def __init__(self, model: nn.Module, execution: Execution, stages: set[int] | None = None):
        self.model = execution.prepare(model).eval()
        self.execution = execution
        self.tap = FeatureTap(self.model, stages) if stages else None

    @property
    def features(self) -> dict:
        return self.tap.outputs if self.tap else {}

    @torch.no_grad()  # not inference_mode: losses may save teacher activations for the student's backward
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.execution.autocast():
            return self.model(x.contiguous(memory_format=self.execution.memory_format())).float()

    def outputs(self, idx: torch.Tensor, views: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class EnsembleTeacher:
    """Several teachers as one: their softened outputs p_i = softmax(z_i / T) averaged with weights w_i, handed on
    as logits T * log(sum_i w_i p_i), whose softmax at temperature T is exactly that average."""

    def __init__(self, members: list[LiveTeacher], weights: list[float], temperature: float):
        total = sum(weights)
        self.members, self.weights, self.temperature = members, [w / total for w in weights], temperature
        self.features: dict = {}

    def outputs(self, idx: torch.Tensor, views: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        probs = sum(w * torch.softmax(m(x) / T, dim=1) for m, w in zip(self.members, self.weights, strict=True))
        return T * torch.log(probs.clamp_min(1e-12))


class TeacherCache:
    def __init__(self, n: int, num_views: int, num_classes: int, topk: int = 0, device: str = "cpu"):
        self.num_classes = num_classes
        self.topk = topk if 0 < topk < num_classes else 0
        width = self.topk or num_classes
        self.values = torch.zeros(n, num_views, width, dtype=torch.float16, device=device)
        self.indices = torch.zeros(n, num_views, width, dtype=torch.int16, device=device) if self.topk else None
        self.filled = torch.zeros(n, num_views, dtype=torch.bool, device=device)
        self.live: LiveTeacher | None = None  # fills views no plan foresaw
        self.fills = 0

    def store(self, idx: torch.Tensor, views: torch.Tensor, logits: torch.Tensor) -> None:
        if self.topk:
            top = logits.topk(self.topk, dim=1)
            self.values[idx, views] = top.values.half()
            self.indices[idx, views] = top.indices.to(torch.int16)
        else:
            self.values[idx, views] = logits.half()
        self.filled[idx, views] = True

    def lookup(self, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        values = self.values[idx, views].float()
        if not self.topk:
            return values
        # Classes outside the top-k get the row's smallest kept logit: a lower bound on their softmax mass.
        dense = values.min(dim=1, keepdim=True).values.expand(-1, self.num_classes).clone()
        return dense.scatter_(1, self.indices[idx, views].long(), values)

    def outputs(self, idx: torch.Tensor, views: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        missing = ~self.filled[idx, views]
        if missing.any():
            self.store(idx[missing], views[missing], self.live(x[missing]))
            self.fills += int(missing.sum())
        return self.lookup(idx, views)

    # -- planning and filling ------------------------------------------------------------------------------
    def plan(self, augment: ViewAugment, seeds: list[int], epochs: int) -> torch.Tensor:
        """Mask [N, V] of the (sample, view) pairs that students with these seeds and epochs will draw."""
        n = self.filled.shape[0]
        needed = torch.zeros(n, augment.num_views, dtype=torch.bool)
        for seed in seeds:
            for epoch in range(epochs):
                _, views = augment.draw_epoch(n, seed, epoch)
                needed[torch.arange(n), views] = True
        return needed.to(self.filled.device)

    def fill(self, needed: torch.Tensor, images: torch.Tensor, augment: ViewAugment, normalize: Normalize,
             batch_size: int, progress=None) -> int:
        todo = (needed & ~self.filled).nonzero()
        for start in range(0, len(todo), batch_size):
            idx, views = todo[start : start + batch_size].unbind(1)
            x = normalize(augment.apply(images[idx], views))
            self.store(idx, views, self.live(x))
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))
        return len(todo)

    # -- disk ----------------------------------------------------------------------------------------------
    def save(self, path: Path, info: dict) -> None:
        tensors = {"values": self.values, "filled": self.filled}
        if self.indices is not None:
            tensors["indices"] = self.indices
        save_tensors(path.with_suffix(".safetensors"), tensors)
        write_json(path.with_suffix(".json"), info)

    @classmethod
    def load(cls, path: Path, key: dict, device: str) -> tuple[TeacherCache, dict] | None:
        """The stored cache if it was made for the same teacher, data and augmentation (`key`), else None."""
        meta, blob = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not (meta.is_file() and blob.is_file()):
            return None
        info = read_json(meta)
        if info.get("key") != key:
            return None
        tensors = load_tensors(blob, device)
        cache = cls.__new__(cls)
        cache.num_classes, cache.topk = key["num_classes"], key["topk"]
        cache.values, cache.filled = tensors["values"], tensors["filled"]
        cache.indices = tensors.get("indices")
        cache.live, cache.fills = None, 0
        return cache, info


def build_cache(path: Path, key: dict, teacher: LiveTeacher, images: torch.Tensor, augment: ViewAugment,
                normalize: Normalize, seeds: list[int], epochs: int, batch_size: int, progress=None
                ) -> tuple[TeacherCache, dict]:
    """Load the teacher's cache, fill in whatever the planned students need, and save it back."""
    loaded = TeacherCache.load(path, key, str(images.device))
    cache, info = loaded or (TeacherCache(len(images), augment.num_views, key["num_classes"], key["topk"],
                                          str(images.device)), {"key": key, "fill_s": 0.0, "teacher_forwards": 0})
    cache.live = teacher
    start = time.perf_counter()
    added = cache.fill(cache.plan(augment, seeds, epochs), images, augment, normalize, batch_size, progress)
    if added or not loaded:
        info["fill_s"] = round(info["fill_s"] + time.perf_counter() - start, 2)
        info["teacher_forwards"] += added
        info["views_filled"] = int(cache.filled.sum())
        info["views_possible"] = cache.filled.numel()
        info["bytes"] = cache.values.numel() * 2 + (cache.indices.numel() * 2 if cache.indices is not None else 0)
        cache.save(path, info)
    return cache, info
