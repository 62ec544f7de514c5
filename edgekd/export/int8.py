"""Post-training static INT8 with ONNX Runtime: calibrated on the training split, chosen on the validation split.

Two methods (`ExportOptions.int8_method`, `--int8-method`, `deploy.int8_method`):
- `ptq`: one calibration (method and size as configured), every quantizable node in INT8.
- `ptq-search`: the calibration whose answers on the validation split are most often FP32's: for `trt` among
  methods, sizes and Q/DQ placements, for `cpu` the configured one (Preset.search_calibration); then mixed
  precision: node groups kept in float in the order of their leave-one-out sensitivity (edgekd.export.sensitivity),
  k the smallest that holds (`Guard`), found by bisection over k (`_mixed_precision` says in which order). The test
  split never enters a choice.

What "holds" means (`Guard`, the deploy guard's rule too): the INT8 model loses at most `max_drop` of accuracy
against FP32 on the validation images and views, as an upper bound (GUARD_Z standard errors, clustered by image, so
views of one image count once), by either of two certificates:
- the accuracy drop itself, paired image by image against FP32 (FP32 right and INT8 wrong counts +1, the reverse
  -1), where the split's labels can be trusted;
- the share of FP32's top-1 answers it changes, which is label-free and bounds the accuracy change on every
  labelled set (|FP32 - INT8 accuracy| <= the share changed): what holds where the labels are known to be wrong
  (a label-noise variant's validation labels are 30% wrong, and a drop measured on them shrinks towards zero).
The drop certifies only where the split resolves it: its margin (GUARD_Z SEs) at most DROP_RESOLUTION of the limit.
On a small split it cannot: the quickstart's 143 images (x9 views) bound a drop to +-0.7-1.0 points, and judged by
the drop there (revision 8), 3 of 13 deployed models lost 1.1-1.4 points on its 359 test images (models changing
3.6-7% of answers, whose test accuracy moves +-1 point by chance alone). Judged by changed answers alone (revisions
2-7), a Fashion-MNIST MobileNet changing 1.3-3% of 6000 validation answers at a 0.1-0.5 point drop (SE ~0.2, -0.15
to -0.5 on 2000 test images) was refused.

This module is the policy; the mechanism it drives (presets, pre-processing, node groups, calibration, ORT's
quantize_static, scoring) is edgekd.export.quantize, kept apart so that the sensitivity analysis this search
uses depends on the mechanism only, not back on this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.export.quantize import WEIGHTED_OPS, Evaluator, Quantizer, Recipe, Score
from edgekd.export.sensitivity import analyse, contiguous_units, float_order, rank_units
from edgekd.timing import Stopwatch

PTQ_METHODS = ("ptq", "ptq-search")  # post-training, here
# Part of every bundle's key: raised when ptq-search or the guard would choose differently for the same inputs, so
# that a study does not reuse bundles an older rule made (2: answers kept; 3: float regions cut into one quantized
# model, the trt preset scored as written; 4: up to half the groups chosen; 6: up to half the weights float;
# 7: the share changed judged by its upper bound, GUARD_Z; 8: the accuracy drop's upper bound certifies too, Guard;
# 9: only where the split resolves it, DROP_RESOLUTION; 10: the configured calibration only, groups ranked by at
# most RANK_UNITS runs and the groups of the top runs one by one, k found by galloping and bisection; 11: by
# bisection alone, the top run's groups one by one; 12: the trt preset searches its calibration again, Preset.search_calibration; 13: every
# calibration image counts, quantize.calibration_chunks; 14: rankings on at most RANK_IMAGES images; 15: the top
# run's groups ranked one by one only where the answer lies inside it, and the most float candidate judged before
# bisecting past it, _mixed_precision; 16: 8 runs, sensitivity.RANK_UNITS).
RULES_REVISION = 16
# Standard errors added to the share of answers changed before it is held against the limit. The share measured on
# a small validation split (the quickstart's: 143 images) is itself a sample: judged by its point value (revision
# 6), 1 of 31 deployed quickstart models changed 0.54% of validation answers and lost 1.11 points on test. Two
# clustered SEs is a one-sided ~98% bound on the share a model changes on images like these.
GUARD_Z = 2.0
# The accuracy drop certifies a model only when its margin, GUARD_Z standard errors, is at most this share of the
# limit (a split that measures a 1-point limit to +-0.5 points or better): a loose bound on a small split passes
# models that change many answers and lose more than the limit on the next images (see the module docstring).
DROP_RESOLUTION = 0.5
INT8_METHODS = (*PTQ_METHODS, "qat-kd")  # qat-kd: quantization-aware KD fine-tune, edgekd.distill.qat
VAL_MIN_IMAGES = 2000  # a validation split smaller than this is scored on its augmentation views too
# At most this many validation images (plain views, spread over the split) rank the node groups (rules revision 14;
# all of them before: Fashion-MNIST's 6,000, scored as written for `trt`, made the ranking ~half a bundle's export).
# A ranking only orders the candidates; the guard still judges each on the whole split.
RANK_IMAGES = VAL_MIN_IMAGES
# At most this share of the model's weights float, counting every group a choice leaves float (its closure), not
# only the chosen ones: beyond it the model is mostly float, and an "INT8" label on it misleads. Counting chosen
# groups (revision 4), the quickstart's MobileNetV3 students (90 groups) held with 17-40 chosen, which floated
# 46-88 groups and ~15-88% of the weights. Weights, not groups: 46 float groups can be 15% of the weights (gates,
# adds and pools hold none), and the weights are what INT8 makes smaller and faster.
MAX_FLOAT_SHARE = 0.5
# What ptq-search's calibration search tries (presets with Preset.search_calibration; the others calibrate as
# configured: on the 18 quickstart students the `cpu` preset's six candidates changed FP32's answers within ~1-2
# points of one another, within the split's noise, so the "best" was chosen on noise, on the very split whose bound
# then certifies it, at 40% of the search's time). Not entropy: it changed the most answers (e.g. 32% vs minmax 4%
# on one) and costs a histogram per tensor; `calib_method` still has it.
SEARCH_CALIB_METHODS = ("minmax", "percentile")


def calibration_sizes(calib_size: int, available: int) -> list[int]:
    """The calibration sizes a search tries around the configured one: a quarter, it, four times it (capped)."""
    return sorted({max(1, min(s, available)) for s in (max(32, calib_size // 4), calib_size, calib_size * 4)})


def quantize(fp32_onnx: Path, out: Path, calibration: np.ndarray, preset: str, method: str = "minmax",
             float_groups: Sequence[str] = (), placement: str = "all") -> None:
    """One post-training quantization (the `ptq` method, or a recipe a search chose)."""
    with Quantizer(fp32_onnx, preset) as q:
        q.quantize(out, calibration, Recipe(method, len(calibration), placement, tuple(float_groups)))


def flips_bound(score: Score) -> float:
    """The share of answers a model changes against FP32, as the guard judges it: measured + GUARD_Z clustered SEs."""
    return score.flips + GUARD_Z * score.flips_se


def drop_bound(score: Score, fp32: Score) -> float:
    """The accuracy a model loses against FP32 on the same images, as the guard judges it: the paired drop +
    GUARD_Z clustered SEs."""
    return score.drop(fp32) + GUARD_Z * score.drop_se


def resolves(score: Score, max_drop: float) -> bool:
    """Does the split measure this model's drop finely enough to certify it (DROP_RESOLUTION)?"""
    return GUARD_Z * score.drop_se <= DROP_RESOLUTION * max_drop + 1e-12


@dataclass(frozen=True)
class Guard:
    """Whether a candidate holds, and which of two is the better (the module docstring says why two
    certificates, and when the drop counts). `fp32` is the FP32 model's score on the split when its labels can be
    trusted, else None (then the share of answers changed alone decides)."""

    max_drop: float  # a fraction of the scored images: 0.01 is 1 point
    fp32: Score | None = None

    @classmethod
    def on(cls, val: Evaluator, max_drop: float = 0.0) -> Guard:
        """The guard for scores made by `val` (max_drop 0: for comparing candidates only)."""
        return cls(max_drop, val.fp32 if val.labels_trusted else None)

    def holds(self, score: Score) -> bool:
        return self.held_by(score) is not None

    def better(self, a: Score, b: Score) -> bool:
        """Is `a` the better candidate? One that holds beats every one that does not; then fewer answers changed by
        the upper bound (label-free: a drop of zero can hide many answers changed, and wrong labels hide any
        drop); closeness to FP32 (KL) breaks ties."""
        def key(s: Score) -> tuple:
            return self.holds(s), -flips_bound(s), -s.kl

        return key(a) > key(b)

    def resolves(self, score: Score) -> bool | None:
        """Does the split measure this model's drop finely enough to certify it? None without trusted labels."""
        return None if self.fp32 is None else resolves(score, self.max_drop)

    def held_by(self, score: Score) -> str | None:
        """The certificate that holds: "accuracy drop", "answers changed" (label-free), or None."""
        if self.resolves(score) and drop_bound(score, self.fp32) <= self.max_drop + 1e-12:  # equal to the limit holds
            return "accuracy drop"
        return "answers changed" if flips_bound(score) <= self.max_drop + 1e-12 else None

    def bounds(self, score: Score) -> dict:
        """Both upper bounds in points, as the manifest and the CLI show them."""
        out = {"flips_bound_pts": round(flips_bound(score) * 100, 3)}
        if self.fp32 is not None:
            out["drop_bound_pts"] = round(drop_bound(score, self.fp32) * 100, 3)
        return out


@dataclass
class SearchResult:
    recipe: Recipe
    val: dict = field(default_factory=dict)  # fp32 / int8_all / int8 (chosen) scores on the validation split
    calibration_candidates: list[dict] = field(default_factory=list)
    mixed_precision_steps: list[dict] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    float_closure: list[str] = field(default_factory=list)  # every group left out (the chosen ones and neighbours)
    ranking: str = ""
    ranked_units: list[dict] = field(default_factory=list)  # the leave-one-out candidates that ranked the groups
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
                                    "ranking": self.ranking, "ranked_units": self.ranked_units,
                                    "max_drop_pts": self.max_drop * 100,
                                    "steps": self.mixed_precision_steps, "reached_target": self.reached_target},
                "validation": self.val}


def search_calibration(q: Quantizer, calibration: Callable[[int], np.ndarray], sizes: Sequence[int],
                       val: Evaluator, methods: Sequence[str] = SEARCH_CALIB_METHODS,
                       log: Callable[[str], None] = lambda line: None,
                       ) -> tuple[Recipe, Score, list[dict], np.ndarray]:
    """Every (placement, method, size) quantized in full and scored on the validation split; the best one: its
    recipe, score, every candidate's row, and its calibration images (`calibration(size)` may draw fewer than
    `size`, and asked for that many again it draws another set)."""
    best, rows, pending, drawn = None, [], [], {}
    for size in sizes:  # each candidate is scored in the background while the next one is made
        images = calibration(size)
        drawn[len(images)] = images
        for placement in q.preset.placements:
            for method in methods:
                recipe = Recipe(method, len(images), placement)
                path = q.quantize(q.scratch("calib"), images, recipe)
                pending.append((recipe, val.submit(path, q.preset.score_as_written)))
    guard = Guard.on(val)  # made here: the FP32 score it holds is computed in the background meanwhile
    for recipe, scored in pending:
        s = val.wait(scored)
        rows.append({**recipe.to_dict(), **s.to_dict()})
        rows[-1].pop("float_groups")
        log(f"{q.preset_name}: calibration {recipe.method} x {recipe.images} ({recipe.placement}): val "
            f"{s.accuracy:.4f} (KL {s.kl:.4f})")
        if best is None or guard.better(s, best[1]):
            best = (recipe, s)
    assert best is not None
    return best[0], best[1], rows, drawn[best[0].images]


def search_ptq(q: Quantizer, out: Path, calibration: Callable[[int], np.ndarray], sizes: Sequence[int],
               val: Evaluator, max_drop: float, max_float: float = MAX_FLOAT_SHARE,
               methods: Sequence[str] = SEARCH_CALIB_METHODS,
               sensitivity: bool = False, log: Callable[[str], None] = lambda line: None) -> SearchResult:
    """The `ptq-search` method: the calibration chosen on validation among `sizes` x `methods` x the preset's
    placements (make_int8 passes one of each where the preset does not search), then the fewest float groups that
    make the model hold by the `Guard` (at most `max_drop` lost against FP32 on the validation images, a fraction).
    Writes the chosen model to `out`. Test data never enters: `val` is the only data it sees."""
    recipe, full, rows, images = search_calibration(q, calibration, sizes, val, methods, log)
    guard = Guard.on(val, max_drop)
    result = SearchResult(recipe, val={"fp32": val.fp32.to_dict(), "int8_all": full.to_dict()},
                          calibration_candidates=rows, max_drop=max_drop, groups=len(q.groups))
    report = None
    if sensitivity:  # asked for: every group alone and left out, which then orders mixed precision too
        report = analyse(q, images, recipe, val, log=log)
        result.sensitivity = report.to_dict()
    chosen, chosen_score = recipe, full
    if not guard.holds(full):
        refine = None
        if report is not None:
            order, result.ranking = float_order(report)
            top = order[:1]
        else:
            ranker = val.ranking_view(RANK_IMAGES)  # a ranking needs no certificate's power
            units = contiguous_units(q.groups)
            result.ranked_units = rank_units(q, images, recipe, ranker, units)
            order = [name for row in result.ranked_units for name in row["groups"]]
            top = result.ranked_units[0]["groups"]
            seen = "" if ranker is val else (f", scored on the plain view of {len(ranker.labels)} of the "
                                             f"{val.images_scored} validation images")
            how = "leave-one-out KL removed per group left out (largest first)"
            if len(units) < len(q.groups):
                how += f": {len(units)} runs of contiguous groups (graph order within a run)"
            result.ranking = how + seen
            if len(top) > 1:
                def refine() -> list[str]:  # the top run's groups one by one, and the order they give it
                    rows = rank_units(q, images, recipe, ranker, [[q.group(name)] for name in top])
                    result.ranked_units += rows
                    result.ranking = how + f", the top run's {len(rows)} groups one by one first" + seen
                    log(f"{q.preset_name}: ranked the top run's {len(rows)} node groups one by one")
                    return [row["groups"][0] for row in rows]
        chosen, chosen_score = _mixed_precision(q, images, recipe, full, order, top, refine, val, guard, max_float,
                                                result, log)
    result.recipe = chosen
    result.reached_target = guard.holds(chosen_score)
    result.val["int8"] = {**chosen_score.to_dict(), "drop_pts": chosen_score.drop(val.fp32) * 100,
                          "flips_pts": chosen_score.flips * 100, **guard.bounds(chosen_score),
                          "held_by": guard.held_by(chosen_score)}
    q.quantize(out, images, chosen)
    result.float_closure = list(q.last_float)
    result.float_weight_share = q.float_weight_share(q.last_float)
    result.float_nodes = [n for g in q.last_float for n in q.group(g).nodes]
    return result


def float_prefixes(q: Quantizer, order: Sequence[str], max_float: float,
                   log: Callable[[str], None] = lambda line: None) -> list[tuple[str, tuple[str, ...]]]:
    """The candidates mixed precision chooses among: for k = 1, 2, ..., the k-th group of `order` added to the float
    ones, as (group added, float groups). Groups an earlier one already floats (its closure) are passed over, and so
    is a group that would take the weights left float past `max_float`; it ends before a group would leave no
    weighted layer in INT8 (that is the FP32 model). From the graph alone: no model is made."""
    weighted = {g.name for g in q.groups if g.op in WEIGHTED_OPS}
    chosen: list[str] = []
    covered: set[str] = set()
    out = []
    for name in order:
        if name in covered:
            continue
        closure = {g.name for g in q.closure([*chosen, name])}
        share = q.float_weight_share(sorted(closure))
        if share > max_float:  # what is float, closures included, not what was chosen
            log(f"{q.preset_name}: mixed precision skips +{name}: {share:.0%} of the weights would be float "
                f"(at most {max_float:.0%})")
            continue
        if weighted <= closure:
            log(f"{q.preset_name}: mixed precision stops before k={len(chosen) + 1}: +{name} would leave no weighted "
                "layer in INT8")
            break
        chosen.append(name)
        covered = closure
        out.append((name, tuple(chosen)))
    return out


def smallest_holding(n: int, holds: Callable[[int], bool]) -> int | None:
    """The smallest i in [0, n) for which `holds(i)`, taking it as monotone in i (False, ..., False, True, ...), by
    bisection: at most bit_length(n) calls to `holds`; None if it holds nowhere it was asked. (Galloping from i = 0
    first, tried in revision 10's making, took ~10 calls on the quickstart's students, whose k is mostly 30-40 of
    ~41; bisection takes 6.)"""
    lo, hi = -1, n  # the largest probe that did not hold, the smallest that did (n: none yet)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi if hi < n else None


def past_the_top(n: int, top: int, holds: Callable[[int], bool | None]) -> int | None:
    """The smallest i in (top, n) for which `holds(i)`, where prefix `top` (the top unit floated; -1: none) did not
    hold, taking holding as monotone: the last prefix judged first, since where even it does not hold nothing does
    (1 candidate judged instead of bisection's ~6: half the quickstart's students hold nowhere), then bisection
    between. `holds(i)` None: i is no candidate (over the float budget), and bisection decides without it."""
    last = n - 1
    if last <= top:
        return None
    verdict = holds(last)
    if verdict is False:
        return None
    i = smallest_holding(last - top - 1, lambda m: bool(holds(top + 1 + m)))
    return top + 1 + i if i is not None else (last if verdict else None)


def _mixed_precision(q: Quantizer, images: np.ndarray, recipe: Recipe, full: Score, order: list[str],
                     top: Sequence[str], refine: Callable[[], list[str]] | None, val: Evaluator, guard: Guard,
                     max_float: float, result: SearchResult, log: Callable[[str], None]) -> tuple[Recipe, Score]:
    """The fewest groups of `order` kept float (float_prefixes) for which the model holds, taking holding as
    monotone in k (more float is closer to FP32). `top`: the groups of the first unit of the ranking (the top run,
    or the first group where groups were ranked one by one); `refine()`: their order one by one, where only a run
    was ranked. First judged: the prefix that floats all of `top`. Where it holds, the answer lies inside the top
    run, which is then ranked one by one (refine) and bisected; where not, the order inside it does not matter (all
    of it is float in every later prefix), and past_the_top searches the rest. On the quickstart's students the
    answer lay past the top run (k 27-41 of ~41) or nowhere, which ranking the top run's 8 groups one by one (rules
    10-14) and bisecting blindly spent ~12 of a bundle's ~27 ONNX Runtime sessions on; on Fashion-MNIST's it lies
    inside (k 1-3). The smallest holding k is chosen; when none holds, the best candidate judged (Guard.better),
    marked as missing the target."""
    weighted = {g.name for g in q.groups if g.op in WEIGHTED_OPS}
    best, smallest = (recipe, full), None
    verdicts: dict[frozenset, bool | None] = {}  # by the float groups: a refined order can repeat a candidate

    def judge(prefixes: list[tuple[str, tuple[str, ...]]], i: int) -> bool | None:
        """Prefix i (k = i + 1 groups float): holds, does not, or None: no candidate (over the budget)."""
        nonlocal best, smallest
        name, k = prefixes[i][0], i + 1
        key = frozenset(prefixes[i][1])
        if key in verdicts:
            return verdicts[key]
        candidate = Recipe(recipe.method, recipe.images, recipe.placement, prefixes[i][1])
        path = q.quantize(q.scratch("mixed"), images, candidate)
        share, left_out = q.float_weight_share(q.last_float), len(q.last_float)
        # the closure ORT's re-quantization pass grew (Quantizer.quantize) can pass the budget the graph promised
        if share > max_float or weighted <= set(q.last_float):
            log(f"{q.preset_name}: mixed precision k={k} (+{name}) floats {share:.0%} of the weights with the "
                f"groups ONNX Runtime forces float too (at most {max_float:.0%}): not a candidate")
            result.mixed_precision_steps.append({"k": k, "float": name, "left_out": left_out, "over_budget": True})
            verdicts[key] = None
            return None
        # Scored now, its batches shared out over the scoring workers (Evaluator.score). Making both next probes
        # while this one was scored (rules 10-12's making) wasted one of them per step: 0.34 CPU-s a quickstart
        # bundle, for no shorter wall time on 2 cores.
        s = val.score(path, q.preset.score_as_written)
        result.mixed_precision_steps.append({"k": k, "float": name, "left_out": left_out, **s.to_dict(),
                                             "flips_pts": s.flips * 100, **guard.bounds(s)})
        log(f"{q.preset_name}: mixed precision k={k} (+{name}): val {s.accuracy:.4f}, "
            f"{s.flips * 100:.2f}% of answers changed (bound {flips_bound(s) * 100:.2f}%, KL {s.kl:.4f})")
        verdicts[key] = guard.holds(s)
        if verdicts[key]:
            if smallest is None or k < len(smallest[0].float_groups):
                smallest = (candidate, s)
        elif guard.better(s, best[1]):
            best = (candidate, s)
        return verdicts[key]

    def top_end(prefixes: list[tuple[str, tuple[str, ...]]]) -> int:
        """The prefix that floats the last of `top` to fit the budget (-1: none of them fits)."""
        return max((i for i, (name, _) in enumerate(prefixes) if name in top), default=-1)

    prefixes = float_prefixes(q, order, max_float, log)
    end = top_end(prefixes)
    if end >= 0 and judge(prefixes, end):
        if refine is not None:
            inside = refine()
            prefixes = float_prefixes(q, inside + [name for name in order if name not in inside], max_float, log)
            end = top_end(prefixes)
        smallest_holding(end + 1, lambda i: bool(judge(prefixes, i)))
    else:
        past_the_top(len(prefixes), end, lambda i: judge(prefixes, i))
    return smallest or best


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
    labels = np.asarray(labels)
    return torch.cat(out).numpy(), np.tile(labels, (len(views),) + (1,) * (labels.ndim - 1)), len(views)


def make_int8(fp32_onnx: Path, out: Path, preset: str, calibration: Callable[[int], np.ndarray], available: int,
              method: str = "ptq", calib_method: str = "minmax", calib_size: int = 512, val: Evaluator | None = None,
              max_drop: float = 0.01, sensitivity: bool = False,
              log: Callable[[str], None] = lambda line: None, watch: Stopwatch | None = None,
              quantizer: Quantizer | None = None) -> tuple[dict, dict | None]:
    """An INT8 model at `out` by `method`; returns (what the manifest records about it, the sensitivity analysis
    or None). `calibration(n)` gives n preprocessed training images; `val` scores candidates on validation.
    `quantizer`: one already open on `fp32_onnx` for this preset, whose pre-processing, calibrations and full
    quantizations (cached by content) the guard's escalation steps then share instead of redoing."""
    if method not in PTQ_METHODS:
        raise EdgeKDError(f"unknown INT8 method {method!r} for post-training quantization: use "
                          f"{', '.join(PTQ_METHODS)} (qat-kd fine-tunes in edgekd.distill.qat)")
    if (method == "ptq-search" or sensitivity) and val is None:
        raise EdgeKDError(f"INT8 method {method!r} and the sensitivity analysis need the validation split")
    with contextlib.nullcontext(quantizer) if quantizer else Quantizer(fp32_onnx, preset, watch) as q:
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
        if q.preset.search_calibration:
            sizes, methods = calibration_sizes(calib_size, available), SEARCH_CALIB_METHODS
        else:
            sizes, methods = [min(calib_size, available)], (calib_method,)
        result = search_ptq(q, out, calibration, sizes, val, max_drop, methods=methods, sensitivity=sensitivity,
                            log=log)
        return {"method": "ptq-search", **result.to_dict()}, result.sensitivity
