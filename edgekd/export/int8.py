"""Post-training static INT8 with ONNX Runtime: calibrated on the training split, chosen on the validation split.

Two methods (`ExportOptions.int8_method`, `--int8-method`, `deploy.int8_method`):
- `ptq`: one calibration (method and size as configured), every quantizable node in INT8.
- `ptq-search`: the calibration (method x size, and for `trt` the Q/DQ placement) whose answers on the validation
  split are most often FP32's; then mixed precision: node groups kept in float in the order of their leave-one-out
  sensitivity (edgekd.export.sensitivity), k the smallest that is `faithful`. The test split never enters a choice.

What "holds" means (`faithful`, the deploy guard's rule too): the INT8 model gives FP32's top-1 answer on all but
`max_drop` of the validation images and views, as an upper bound: the share changed plus GUARD_Z standard errors
(clustered by image, so views of one image count once). Not the accuracy drop: on a split of 143 images one image is 0.7
points, a label-noise variant's validation labels are 30% wrong, and a drop of zero can hide 5% of answers changed,
which on the 359 test images alone moves accuracy by +-1.2 points (sd) from run to run. Changed answers are
label-free and bound the accuracy change on every labelled set: |FP32 - INT8 accuracy| <= the share changed.

This module is the policy; the mechanism it drives (presets, pre-processing, node groups, calibration, ORT's
quantize_static, scoring) is edgekd.export.quantize, kept apart so that the sensitivity analysis this search
uses depends on the mechanism only, not back on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.export.quantize import WEIGHTED_OPS, Evaluator, Quantizer, Recipe, Score
from edgekd.export.sensitivity import analyse, float_order
from edgekd.timing import Stopwatch

PTQ_METHODS = ("ptq", "ptq-search")  # post-training, here
# Part of every bundle's key: raised when ptq-search or the guard would choose differently for the same inputs, so
# that a study does not reuse bundles an older rule made (2: answers kept; 3: float regions cut into one quantized
# model, the trt preset scored as written; 4: up to half the groups chosen; 6: up to half the weights float;
# 7: the share changed judged by its upper bound, GUARD_Z).
RULES_REVISION = 7
# Standard errors added to the share of answers changed before it is held against the limit. The share measured on
# a small validation split (the quickstart's: 143 images) is itself a sample: judged by its point value (revision
# 6), 1 of 31 deployed quickstart models changed 0.54% of validation answers and lost 1.11 points on test. Two
# clustered SEs is a one-sided ~98% bound on the share a model changes on images like these.
GUARD_Z = 2.0
INT8_METHODS = (*PTQ_METHODS, "qat-kd")  # qat-kd: quantization-aware KD fine-tune, edgekd.distill.qat
VAL_MIN_IMAGES = 2000  # a validation split smaller than this is scored on its augmentation views too
# At most this share of the model's weights float, counting every group a choice leaves float (its closure), not
# only the chosen ones: beyond it the model is mostly float, and an "INT8" label on it misleads. Counting chosen
# groups (revision 4), the quickstart's MobileNetV3 students (90 groups) held with 17-40 chosen, which floated
# 46-88 groups and ~15-88% of the weights. Weights, not groups: 46 float groups can be 15% of the weights (gates,
# adds and pools hold none), and the weights are what INT8 makes smaller and faster.
MAX_FLOAT_SHARE = 0.5
# What ptq-search calibrates with. Not entropy: on all 18 quickstart students it changed the most answers (e.g.
# 32% vs minmax 4% on one) and took 2/3 of the search's time (a histogram per tensor); `calib_method` still has it.
SEARCH_CALIB_METHODS = ("minmax", "percentile")


def quantize(fp32_onnx: Path, out: Path, calibration: np.ndarray, preset: str, method: str = "minmax",
             float_groups: Sequence[str] = (), placement: str = "all") -> None:
    """One post-training quantization (the `ptq` method, or a recipe a search chose)."""
    with Quantizer(fp32_onnx, preset) as q:
        q.quantize(out, calibration, Recipe(method, len(calibration), placement, tuple(float_groups)))


def flips_bound(score: Score) -> float:
    """The share of answers a model changes against FP32, as the guard judges it: measured + GUARD_Z clustered SEs."""
    return score.flips + GUARD_Z * score.flips_se


def faithful(score: Score, max_drop: float) -> bool:
    """Does an INT8 model hold? Its top-1 answers differ from FP32's on at most `max_drop` (a fraction) of the
    scored images, by the upper bound `flips_bound`: see the module's docstring for why changed answers, not the
    accuracy drop."""
    return flips_bound(score) <= max_drop


def better(a: Score, b: Score) -> bool:
    """Is `a` the better candidate? Fewer answers changed by the upper bound first, so that a faithful candidate is better
    than every unfaithful one; closeness to FP32 (KL) breaks ties."""
    return (-flips_bound(a), -a.kl) > (-flips_bound(b), -b.kl)


@dataclass
class SearchResult:
    recipe: Recipe
    val: dict = field(default_factory=dict)  # fp32 / int8_all / int8 (chosen) scores on the validation split
    calibration_candidates: list[dict] = field(default_factory=list)
    mixed_precision_steps: list[dict] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    float_closure: list[str] = field(default_factory=list)  # every group left out (the chosen ones and neighbours)
    ranking: str = ""
    reached_target: bool = True
    max_drop: float = 0.0
    sensitivity: dict | None = None
    groups: int = 0  # node groups in the model
    float_weight_share: float = 0.0  # of the model's weights (elements), the share float_closure keeps in float

    def to_dict(self) -> dict:
        return {"calibration": {"split": "train", "method": self.recipe.method, "images": self.recipe.images,
                                "placement": self.recipe.placement, "chosen_on": "validation",
                                "candidates": self.calibration_candidates},
                "mixed_precision": {"float_groups": list(self.recipe.float_groups),
                                    "float_closure": self.float_closure, "float_nodes": self.float_nodes,
                                    "k": len(self.recipe.float_groups), "groups": self.groups,
                                    "float_weight_share": self.float_weight_share,
                                    "ranking": self.ranking,
                                    "max_flips_pts": self.max_drop * 100,
                                    "steps": self.mixed_precision_steps, "reached_target": self.reached_target},
                "validation": self.val}


def search_calibration(q: Quantizer, calibration: Callable[[int], np.ndarray], sizes: Sequence[int],
                       val: Evaluator, methods: Sequence[str] = SEARCH_CALIB_METHODS,
                       log: Callable[[str], None] = lambda line: None) -> tuple[Recipe, Score, list[dict]]:
    """Every (placement, method, size) quantized in full and scored on the validation split; the best one."""
    best, rows = None, []
    for size in sizes:
        images = calibration(size)
        for placement in q.preset.placements:
            for method in methods:
                recipe = Recipe(method, len(images), placement)
                s = val.score(q.quantize(q.scratch("calib"), images, recipe), q.preset.score_as_written)
                rows.append({**recipe.to_dict(), **s.to_dict()})
                rows[-1].pop("float_groups")
                log(f"{q.preset_name}: calibration {method} x {len(images)} ({placement}): val {s.accuracy:.4f} "
                    f"(KL {s.kl:.4f})")
                if best is None or better(s, best[1]):
                    best = (recipe, s)
    assert best is not None
    return best[0], best[1], rows


def search_ptq(q: Quantizer, out: Path, calibration: Callable[[int], np.ndarray], sizes: Sequence[int],
               val: Evaluator, max_drop: float, max_float: float = MAX_FLOAT_SHARE,
               methods: Sequence[str] = SEARCH_CALIB_METHODS,
               sensitivity: bool = False, log: Callable[[str], None] = lambda line: None) -> SearchResult:
    """The `ptq-search` method: calibration chosen on validation, then the fewest float groups that make the model
    `faithful` (answers changed against FP32 on at most `max_drop` of the validation images, a fraction). Writes the
    chosen model to `out`. Test data never enters: `val` is the only data it sees."""
    recipe, full, rows = search_calibration(q, calibration, sizes, val, methods, log)
    images = calibration(recipe.images)
    result = SearchResult(recipe, val={"fp32": val.fp32.to_dict(), "int8_all": full.to_dict()},
                          calibration_candidates=rows, max_drop=max_drop, groups=len(q.groups))
    missed = not faithful(full, max_drop)
    report = None
    if sensitivity or missed:
        report = analyse(q, images, recipe, val, single=sensitivity, log=log)
        result.sensitivity = report.to_dict()
    chosen, chosen_score = recipe, full
    if missed and report is not None:
        order, result.ranking = float_order(report)
        best, chosen_groups, covered = (recipe, full), [], set()
        weighted = {g.name for g in q.groups if g.op in WEIGHTED_OPS}
        for name in order:
            if name in covered:  # already float as part of an earlier group's closure
                continue
            chosen_groups.append(name)
            candidate = Recipe(recipe.method, recipe.images, recipe.placement, tuple(chosen_groups))
            path = q.quantize(q.scratch("mixed"), images, candidate)
            share = q.float_weight_share(q.last_float)
            if share > max_float:  # what is float, closures included, not what was chosen
                log(f"{q.preset_name}: mixed precision skips +{name}: {share:.0%} of the weights would be float "
                    f"(at most {max_float:.0%})")
                chosen_groups.pop()
                continue
            if weighted <= set(q.last_float):  # nothing weighted left in INT8: that is the FP32 model, not an INT8 one
                log(f"{q.preset_name}: mixed precision stops before k={len(chosen_groups)}: +{name} would leave "
                    "no weighted layer in INT8")
                break
            s = val.score(path, q.preset.score_as_written)
            covered |= set(q.last_float)
            k = len(chosen_groups)
            result.mixed_precision_steps.append({"k": k, "float": name, "left_out": len(covered), **s.to_dict(),
                                                 "flips_pts": s.flips * 100, "flips_bound_pts": flips_bound(s) * 100})
            log(f"{q.preset_name}: mixed precision k={k} (+{name}): val {s.accuracy:.4f}, "
                f"{s.flips * 100:.2f}% of answers changed (bound {flips_bound(s) * 100:.2f}%, KL {s.kl:.4f})")
            if better(s, best[1]):  # a faithful candidate is always better than every unfaithful one
                best = (candidate, s)
            if faithful(s, max_drop):
                break
        chosen, chosen_score = best
    result.recipe = chosen
    result.reached_target = faithful(chosen_score, max_drop)
    result.val["int8"] = {**chosen_score.to_dict(), "drop_pts": chosen_score.drop(val.fp32) * 100,
                          "flips_pts": chosen_score.flips * 100,
                          "flips_bound_pts": flips_bound(chosen_score) * 100}
    q.quantize(out, images, chosen)
    result.float_closure = list(q.last_float)
    result.float_weight_share = q.float_weight_share(q.last_float)
    result.float_nodes = [n for g in q.last_float for n in q.group(g).nodes]
    return result


def validation_views(images, labels, padding: int, hflip: bool, min_images: int = VAL_MIN_IMAGES):
    """The validation images under as many of the training augmentation's views (crop offsets, flips: labels
    unchanged) as it takes to reach `min_images`, the plain view first. A small validation split (digits: 143
    images, one image = 0.7 points) cannot tell a 1-point drop from none; its views can, at least for
    agreement with FP32. Returns (uint8 images, labels, views used)."""
    import torch

    from edgekd.data.augment import ViewAugment

    aug = ViewAugment(padding, hflip)
    wanted = min(aug.num_views, max(1, -(-min_images // max(1, len(images)))))
    center = (padding * aug.offsets + padding) * (2 if hflip else 1)  # no shift, no flip
    views = [center] + [v for v in range(aug.num_views) if v != center][: wanted - 1]
    out = [aug.apply(images, torch.full((len(images),), v, dtype=torch.long)) for v in views]
    return torch.cat(out).numpy(), np.tile(np.asarray(labels), len(views)), len(views)


def calibration_sizes(calib_size: int, available: int) -> list[int]:
    """The calibration sizes a search tries around the configured one: a quarter, it, four times it (capped)."""
    return sorted({max(1, min(s, available)) for s in (max(32, calib_size // 4), calib_size, calib_size * 4)})


def make_int8(fp32_onnx: Path, out: Path, preset: str, calibration: Callable[[int], np.ndarray], available: int,
              method: str = "ptq", calib_method: str = "minmax", calib_size: int = 512, val: Evaluator | None = None,
              max_drop: float = 0.01, sensitivity: bool = False,
              log: Callable[[str], None] = lambda line: None, watch: Stopwatch | None = None) -> tuple[dict, dict | None]:
    """An INT8 model at `out` by `method`; returns (what the manifest records about it, the sensitivity analysis
    or None). `calibration(n)` gives n preprocessed training images; `val` scores candidates on validation."""
    if method not in PTQ_METHODS:
        raise EdgeKDError(f"unknown INT8 method {method!r} for post-training quantization: use "
                          f"{', '.join(PTQ_METHODS)} (qat-kd fine-tunes in edgekd.distill.qat)")
    if (method == "ptq-search" or sensitivity) and val is None:
        raise EdgeKDError(f"INT8 method {method!r} and the sensitivity analysis need the validation split")
    with Quantizer(fp32_onnx, preset, watch) as q:
        if method == "ptq":
            recipe = Recipe(calib_method, min(calib_size, available))
            images = calibration(recipe.images)
            recipe = Recipe(calib_method, len(images))
            q.quantize(out, images, recipe)
            info = {"method": "ptq", "calibration": {"split": "train", "images": len(images), "method": calib_method}}
            record = None
            if sensitivity:
                report = analyse(q, images, recipe, val, log=log)
                record = report.to_dict()
                info["validation"] = {"fp32": report.fp32.to_dict(), "int8": report.int8_all.to_dict()}
            return info, record
        result = search_ptq(q, out, calibration, calibration_sizes(calib_size, available), val, max_drop,
                            sensitivity=sensitivity, log=log)
        return {"method": "ptq-search", **result.to_dict()}, result.sensitivity
