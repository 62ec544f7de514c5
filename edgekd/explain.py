"""Where the students look: Grad-CAM maps of the teacher, the scratch and the KD students of a dataset variant.

On a fixed, stratified sample of test images (`[explain] images`), each model's Grad-CAM map for the true class (on
multi-label data: for each class the image has, one map per image and label, with agreement per label too) is
computed with captum's `LayerGradCam` at the model's deepest feature stage (timm's `feature_info`) whose maps are
at least 4 pixels a side for the input, ReLU'd and upsampled to the input. Per student: the agreement of its maps with the teacher's (Spearman rank correlation per
image, and IoU of the top `top` share of pixels), as means over the images; the report gives mean ± std over
seeds. On a `spurious` variant the maps are also computed on the bias-conflicting test images (the cue patch
points to another class) and the share of each map's mass on the cue patch is recorded: does KD copy the teacher's
shortcut, or shed the student's? The record is `<variant>/explain[@family]/seed<k>/explain.json`, with a few
images and maps in `maps.npz` for the report's grid.

The stage's job kind `explain` (one job per dataset variant and student family, after its students) is
registered here, beside the code it runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgekd.data.describe import data_description
from edgekd.errors import EdgeKDError
from edgekd.pipeline.graph import Job, JobKind, input_fingerprint, register_kind
from edgekd.records import fingerprint, make_key
from edgekd.roles import EXPLAIN, Label, Role
from edgekd.runio import EXPLAIN_RECORD, METRICS, RUN_PROFILE, WEIGHTS, read_json, run_dir, write_json

GRID_IMAGES = 4  # images in the report's grid per variant


def _captum():
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise EdgeKDError("[explain] needs captum (Grad-CAM): pip install 'edgekd[train]'") from None
    return LayerGradCam, LayerAttribution


MIN_SIDE = 4  # the deepest feature stage whose maps are at least this many pixels a side: a 1x1 map says nothing


def explain_stage(model: torch.nn.Module, image_shape: tuple[int, ...]) -> tuple[str, torch.nn.Module, list[int]]:
    """The deepest of the model's feature stages (timm's feature_info) whose output is at least MIN_SIDE pixels a
    side for this input (on 16x16 digits the last stage of a stride-32 net is 1x1), measured by one forward pass;
    the largest map where none is. Returns (name, module, [h, w])."""
    info = getattr(model, "feature_info", None)
    names = [stage["module"] for stage in info] if info else []
    if not names:
        raise EdgeKDError(f"{type(model).__name__} lists no feature stages (timm's feature_info): Grad-CAM needs one")
    sizes: dict[str, list[int]] = {}
    def record(name):
        def hook(_module, _inputs, out):  # returns None: a hook's return value would replace the output
            sizes.setdefault(name, list(out.shape[-2:]))
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape))
    finally:
        for h in hooks:
            h.remove()
    fit = [n for n in names if n in sizes and min(sizes[n]) >= MIN_SIDE]
    name = fit[-1] if fit else max(sizes, key=lambda n: sizes[n][0] * sizes[n][1])
    return name, model.get_submodule(name), sizes[name]


def gradcam(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
            batch: int = 64) -> np.ndarray:
    """Grad-CAM maps [N, H, W] of `model` for `targets` on normalised `images`, ReLU'd, at the input's size."""
    LayerGradCam, LayerAttribution = _captum()  # noqa: N806
    cam = LayerGradCam(model, layer)
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].clone().requires_grad_(True)
        attr = cam.attribute(x, target=targets[i : i + batch], relu_attributions=True)
        attr = LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")
        out.append(attr.detach().sum(1).numpy())
    return np.concatenate(out)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of each row's values (average ranks are not needed: ties beyond all-zero rows are rare)."""
    return np.argsort(np.argsort(x, axis=1), axis=1).astype(np.float64)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the Spearman correlation of two maps' pixels (0 for a flat map)."""
    ra, rb = _ranks(a.reshape(len(a), -1)), _ranks(b.reshape(len(b), -1))
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    corr = np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), 0.0)
    return float(corr.mean())


def top_iou(a: np.ndarray, b: np.ndarray, share: float) -> float:
    """Mean over images of the IoU of the two maps' top `share` of pixels."""
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    k = max(1, int(round(share * flat_a.shape[1])))
    top_a = np.zeros(flat_a.shape, bool)
    top_b = np.zeros(flat_b.shape, bool)
    np.put_along_axis(top_a, np.argsort(-flat_a, 1)[:, :k], True, 1)
    np.put_along_axis(top_b, np.argsort(-flat_b, 1)[:, :k], True, 1)
    return float(((top_a & top_b).sum(1) / (top_a | top_b).sum(1)).mean())


def mass_share(maps: np.ndarray, masks: np.ndarray) -> float:
    """Mean over images of the share of a map's mass inside its mask (images whose map is all zero left out)."""
    total = maps.reshape(len(maps), -1).sum(1)
    inside = (maps * masks).reshape(len(maps), -1).sum(1)
    keep = total > 0
    return float((inside[keep] / total[keep]).mean()) if keep.any() else float("nan")


def explain_models(models: dict[str, torch.nn.Module], teacher: str, images: torch.Tensor, labels: torch.Tensor,
                   top: float, cue: tuple[torch.Tensor, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Maps of every model, each student's agreement with the teacher and (with `cue`: the bias-conflicting
    images and their cue masks) each model's share of map mass on the cue; each model's layer and map size are in
    its results. Returns (per model results, maps)."""
    stages = {name: explain_stage(model, tuple(images.shape[1:])) for name, model in models.items()}
    maps = {name: gradcam(model.eval(), stages[name][1], images, labels) for name, model in models.items()}
    results = {}
    for name in models:
        r = {"layer": stages[name][0], "map_size": stages[name][2]}
        if name != teacher:
            r.update(rank_corr=rank_correlation(maps[name], maps[teacher]),
                     top_iou=top_iou(maps[name], maps[teacher], top))
        if cue is not None:
            r["cue_share"] = mass_share(gradcam(models[name].eval(), stages[name][1], cue[0], labels), cue[1])
        results[name] = r
    return results, maps


class ExplainKind(JobKind):
    """Per dataset variant and student family: Grad-CAM of the teacher and every scratch and KD student (all
    seeds; grid candidates and pruned students stay out)."""

    name = "explain"

    def plan(self, ctx, planned):
        if not ctx.profile.explain.images:
            return []
        groups: dict[tuple[str, str, str], list[str]] = {}
        for s in planned:
            role = Role.parse(s.role)
            if s.kind == "train" and not role.is_teacher and not role.grid and not role.pruned:
                groups.setdefault((s.dataset, s.variant, role.family), [s.deps[0]]).append(s.label)
        seed0 = ctx.profile.study.teacher_seed
        jobs = []
        for (dataset, variant, family), deps in groups.items():
            role = str(Role(EXPLAIN, family))
            jobs.append(Job(dataset, variant, role, seed0, run_dir(ctx.root, dataset, variant, role, seed0),
                            kind=self.name, deps=tuple(deps), num_cpus=ctx.cpus_per_job or 1.0))
        return jobs

    def record(self, job):
        return job.run_dir / EXPLAIN_RECORD

    def key(self, ctx, job):
        inputs = {}
        for label in job.deps:
            at = Label.parse(label)
            inputs[label] = input_fingerprint(run_dir(ctx.root, at.dataset, at.variant, at.role, at.seed) / WEIGHTS,
                                              label)
        return make_key("explain", {"explain": asdict(ctx.profile.explain)},
                        data_description(ctx.profile, job.dataset, job.variant), inputs)

    def run(self, ctx, job, status):
        return run_explain(ctx.profile, ctx.root, job, status.key)


register_kind(ExplainKind())


def run_explain(profile, root: Path, job, key: dict) -> dict:
    """Grad-CAM for one (dataset, variant, family): the teacher and the student runs the job depends on."""
    from edgekd.data.sampling import cap_per_class, class_counts, random_take, stratified_take
    from edgekd.data.splits import SPLIT_SEED
    from edgekd.distill.runner import dataset_splits
    from edgekd.models import create_model, load_weights

    start = time.perf_counter()
    variant = dataset_splits(profile, job.dataset, job.variant)
    data, cfg = variant.splits, profile.explain
    test = data.test
    generator = torch.Generator().manual_seed(SPLIT_SEED + 5)
    if data.multilabel:  # one map per (image, label it has): Grad-CAM of each present class's logit
        chosen = random_take(len(test), cfg.images, generator)
        rows, targets = test.labels[chosen].nonzero().unbind(1)
        shown = test.images[chosen][rows]
    else:
        per_class = cap_per_class(class_counts(test.labels, data.num_classes), cfg.images)
        chosen = stratified_take(test.labels, per_class, generator)
        shown, targets = test.images[chosen], test.labels[chosen]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)

    def normalized(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    images, labels = normalized(shown), targets
    cue = None
    if "conflicting" in variant.extra_tests:
        conflicting = variant.extra_tests["conflicting"].images[chosen]
        mask = (conflicting != test.images[chosen]).any(1).numpy()  # where the cue patch was painted
        cue = (normalized(conflicting), mask)
    models, runs = {}, {}
    for label in job.deps:
        at = Label.parse(label)
        path = run_dir(root, at.dataset, at.variant, at.role, at.seed)
        metrics = read_json(path / METRICS)
        train = read_json(path / RUN_PROFILE)["train"]
        model = create_model(train["model"], data.num_classes, data.channels, train["small_input"])
        models[label] = load_weights(model, path / WEIGHTS)
        runs[label] = {"role": metrics["role"], "method": metrics.get("method", ""), "seed": metrics["seed"],
                       "model": metrics.get("model", "")}
    teacher = next((k for k, r in runs.items() if r["role"] == "teacher"), None)
    if teacher is None:
        raise EdgeKDError(f"{job.label}: no teacher among its inputs")
    results, maps = explain_models(models, teacher, images, labels, cfg.top, cue)
    if data.multilabel:  # agreement with the teacher per label, over the maps of that label
        for name, r in results.items():
            if name != teacher:
                r["per_label_rank_corr"] = {data.classes[c]: rank_correlation(maps[name][labels.numpy() == c],
                                                                              maps[teacher][labels.numpy() == c])
                                            for c in sorted(set(labels.tolist()))}
    record = {"dataset": job.dataset, "variant": job.variant, "family": Role.parse(job.role).family,
              "images": int(len(chosen)), "maps_per_model": int(len(labels)), "top": cfg.top,
              "target": "each label the image has" if data.multilabel else "true class", "cue": cue is not None,
              "library": "captum LayerGradCam", "models": {k: {**runs[k], **results[k]}
                                                           for k in models},
              "wall_s": round(time.perf_counter() - start, 2), "key": key,
              "fingerprint": fingerprint(key)}
    job.run_dir.mkdir(parents=True, exist_ok=True)
    grid = {"images": shown[:GRID_IMAGES].numpy(), "labels": labels[:GRID_IMAGES].numpy(),
            "targets": np.array([data.classes[c] for c in labels[:GRID_IMAGES].tolist()])}
    for k, r in runs.items():  # the teacher and the first seed's scratch and KD students
        if r["role"] == "teacher" or r["seed"] == min(x["seed"] for x in runs.values() if x["role"] != "teacher"):
            grid[f"map:{r['role']}:{r['method']}"] = maps[k][:GRID_IMAGES]
    np.savez_compressed(job.run_dir / "maps.npz", **grid)
    write_json(job.record, record)
    return record
