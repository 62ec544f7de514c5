"""`edgekd export`: each trained student becomes a self-contained bundle, checked against PyTorch.

<run_dir>/bundle/ holds model.onnx (FP32, dynamic batch), optional INT8 and TensorRT models, model.safetensors
(the PyTorch reference), eval.npz (the preprocessed test split, or a capped deterministic subset) and
manifest.json (dataset, classes, input, normalisation, distill accuracies and KD gain, hashes, versions,
and per model its parity or accuracy against FP32).

Layering: export, above edgekd.runtime, whose ONNX Runtime runner and eval-set functions score every model here
exactly as `edgekd bench` will on the device; it imports no bench. PyTorch, the models and the data are imported
inside the functions that need them.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.config import DatasetConfig
from edgekd.data.describe import NORMALIZATION_REVISION, settings_in_key
from edgekd.envinfo import package_versions
from edgekd.errors import EdgeKDError
from edgekd.export.int8 import (
    GUARD_Z,
    RULES_REVISION,
    Evaluator,
    Guard,
    make_int8,
    validation_views,
)
from edgekd.export.qdq_rules import check_tensorrt_qdq
from edgekd.export.quantize import PRESETS, Quantizer, Score
from edgekd.records import SCHEMA_VERSION, current_runs, fingerprint, group_runs, make_key, variant_label
from edgekd.runio import METRICS, RUN_PROFILE, WEIGHTS, read_json, write_json
from edgekd.runio import sha256_file as sha256
from edgekd.runtime.evalset import agreement, metric_name, normalize, predict
from edgekd.runtime.evalset import score as task_score
from edgekd.runtime.manifest import MANIFEST, write_manifest
from edgekd.runtime.runners import OrtRunner
from edgekd.runtime.tensorrt import engine_builder
from edgekd.targets import EXPORT_TARGETS, ONNX_EXPORTERS, TARGETS, exported_target, int8_target
from edgekd.timing import Stopwatch

if TYPE_CHECKING:
    from edgekd.data.types import DataSplits

OPSET = 18


@dataclass
class ExportOptions:
    targets: tuple[str, ...] = ("onnx",)
    calib_size: int = 512
    calib_method: str = "minmax"
    int8_presets: tuple[str, ...] = ("cpu", "trt")
    fp16: bool = False
    eval_limit: int = 0  # 0 = the whole test split
    # ONNX vs PyTorch, judged as numpy's allclose and ONNX Runtime's own export tests do, against the logits' scale:
    # fail where any |Δlogit| > atol + rtol * max |logit| of its image, or top-1 agreement is below min_agreement.
    # An absolute 1e-3 alone refused correct exports of confident students (logits near 500: Δ 0.08, 1.7e-4 of the
    # scale, 100% agreement); a wrong export is off by the logits' own size.
    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float = 0.999
    # INT8: "ptq" (one calibration, all INT8) or "ptq-search" (calibration and float groups chosen on the validation
    # split; edgekd.export.int8). The sensitivity analysis is recorded in the manifest as `int8_sensitivity`.
    int8_method: str = "ptq"
    # points: the most accuracy an INT8 (or FP16) model may lose against FP32 on the validation split to be deployed,
    # as an upper bound, certified by the paired accuracy drop or by the label-free share of answers changed
    # (edgekd.export.int8.Guard); ptq-search's target too. A model past it escalates through `int8_escalation`; if
    # none holds it is not deployed.
    int8_max_drop: float = 1.0
    int8_escalation: tuple[str, ...] = ("ptq-search",)
    int8_sensitivity: bool = False
    qat_epochs: int = 2  # qat-kd: fine-tune epochs with fake quantization (edgekd.export.qat)
    qat_lr: float = 0.0  # qat-kd: 0 = the student's lr / 100
    # Other INT8 methods made beside the deployed one, scored on the evaluation images and recorded in the manifest
    # (`int8_compare`), not kept: what the report's "KD gain kept after INT8" table compares methods with.
    int8_compare: tuple[str, ...] = ()
    onnx_exporter: str = ONNX_EXPORTERS[0]  # targets.ONNX_EXPORTERS says why; parity is checked either way


def find_student_runs(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise EdgeKDError(f"{str(path)!r} does not exist: pass a run directory or a study directory under runs/")
    candidates = [path] if (path / METRICS).is_file() else sorted(p.parent for p in path.rglob(METRICS))
    runs = [p for p in candidates if read_json(p / METRICS).get("role") in ("scratch", "kd")
            and (p / WEIGHTS).is_file()]
    if not runs:
        raise EdgeKDError(f"no finished student runs under {str(path)!r}: run `edgekd distill` first")
    return runs


def _distill_record(run: Path, metrics: dict) -> dict:
    """The accuracies of this student's dataset variant, from the study the run belongs to (none for a run that was
    copied out of its study: <study>/<dataset>/<variant>/<role>/seedN is where the others would be)."""
    record = {"role": metrics["role"], "method": metrics["method"], "seed": metrics["seed"],
              "test_acc": metrics["test_acc"], "val_acc": metrics["val_acc"]}
    parents = Path(run).resolve().parents
    if len(parents) < 4 or parents[1].name != metrics["variant"] or parents[2].name != metrics["dataset"]:
        return record
    study_root = parents[3]
    label = variant_label(metrics["variant"], metrics.get("family", ""))
    for g in group_runs(current_runs(study_root)):  # the runs current for the study's last plan
        if (g.dataset, g.label) == (metrics["dataset"], label):
            scratch = g.scratch_acc()
            record["teacher_acc"] = g.teacher_acc
            record["scratch_acc"] = scratch.to_dict() if scratch else None
            record["methods"] = {}
            for method in g.methods:
                gain = g.gain(method)
                record["methods"][method] = {"kd_acc": g.kd_acc(method).to_dict(),
                                             "kd_gain": gain.to_dict() if gain else None}
    return record


def export_key(run: Path, options: ExportOptions) -> dict:
    """What a bundle is a function of: the student's weights, its dataset's settings (the eval and calibration images
    come from them) and the export options that change a model; `targets`, `int8_presets` and `fp16` only say which
    models a bundle has, so exports of other targets with the same key add to one bundle."""
    name = read_json(run / METRICS)["dataset"]
    dataset = read_json(run / RUN_PROFILE)["profile"]["datasets"][name]
    config = {"deploy": {"calib_size": options.calib_size, "calib_method": options.calib_method,
                         "int8_method": options.int8_method, "int8_max_drop": options.int8_max_drop,
                         "int8_escalation": list(options.int8_escalation), "int8_rules": RULES_REVISION,
                         "eval_limit": options.eval_limit,
                         **({"qat_epochs": options.qat_epochs, "qat_lr": options.qat_lr}
                            if "qat-kd" in (options.int8_method, *options.int8_compare) else {}),
                         **({"int8_compare": sorted(options.int8_compare)} if options.int8_compare else {})},
              "export": {"atol": options.atol, "rtol": options.rtol, "min_agreement": options.min_agreement,
                         "opset": OPSET, "onnx_exporter": options.onnx_exporter}}
    # the constants every image of the bundle is normalised with (eval.npz's scoring, calibration, validation) are
    # computed from the data: a bundle made under another way of computing them is another bundle
    data = {f"datasets.{name}": settings_in_key(dataset), "normalization": NORMALIZATION_REVISION}
    inputs = {"student": sha256(run / WEIGHTS)}
    if "qat-kd" in (options.int8_method, *options.int8_compare):  # the fine-tune learns from the run's teacher and data
        inputs["training"] = read_json(run / METRICS).get("fingerprint")
    return make_key("bundle", config, data, inputs)


def refresh_distill_records(study_root: Path) -> list[Path]:
    """Rewrite the study summary (`distill`) of each bundle's manifest and bench records where it changed: an
    export runs as soon as its student is done, before the other seeds and methods are. Returns what changed."""
    changed = []
    for manifest_path in sorted(Path(study_root).glob("*/*/*/seed*/bundle/manifest.json")):
        run = manifest_path.parent.parent
        try:
            manifest, metrics = read_json(manifest_path), read_json(run / METRICS)
        except EdgeKDError:
            continue
        record = _distill_record(run, metrics)
        if manifest.get("distill") == record:
            continue
        manifest["distill"] = record
        write_json(manifest_path, manifest)
        changed.append(manifest_path)
        for bench in manifest_path.parent.glob("bench-*.json"):
            data = read_json(bench)
            if isinstance(data, dict) and data.get("distill") != record:
                write_json(bench, {**data, "distill": record})
    return changed


def _torch_model(run: Path, profile: dict, data):
    from edgekd.models import create_model, load_weights

    cfg = profile.get("train") or profile["profile"]["student"]  # the run's own student family (older runs: the one)
    model = create_model(cfg["model"], data.num_classes, data.channels, cfg["small_input"])
    return load_weights(model, run / WEIGHTS).eval(), cfg


def qdq_parity(path: Path, x: np.ndarray, reference: np.ndarray) -> dict:
    """A Q/DQ model against the PyTorch graph it was exported from (`reference`: its logits on `x`). The ONNX model's
    own meaning (every Q/DQ in float, ONNX Runtime's graph optimizations off) checks the export; ONNX Runtime's
    fused integer kernels (QLinearConv, ...) round differently, and what they change is recorded beside it: that is
    the runtime's, as with any INT8 model."""
    import onnxruntime as ort

    def logits_at(level) -> np.ndarray:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level, session_options.log_severity_level = level, 3
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"input": x[i : i + 512]})[0] for i in range(0, len(x), 512)])

    exact = logits_at(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fused = logits_at(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return {"reference": "the converted fake-quant PyTorch graph (torchao convert_pt2e)",
            "onnx": "ONNX Runtime, graph optimizations off (Q/DQ as written)",
            "top1_agreement": agreement(exact, reference, False),  # qat-kd is single-label only (edgekd check)
            "max_abs_logit_diff": float(np.abs(exact - reference).max()),
            "runtime_int8_kernels_agreement": agreement(fused, reference, False)}


def _qat_int8(run: Path, model, preset: str, path: Path, options: ExportOptions, x: np.ndarray, log, qat) -> dict:
    """qat-kd's INT8 model for one preset, made by `qat` (edgekd.distill.qat.qat_int8), checked against the
    fake-quant PyTorch graph it was exported from: it must agree on at least 99% of the evaluation images."""
    import copy

    if qat is None:
        raise EdgeKDError("int8_method 'qat-kd' trains: export_run needs qat=edgekd.distill.qat.qat_int8 from its "
                          "caller (edgekd export and edgekd study pass it)")
    info, reference = qat(run, copy.deepcopy(model), preset, path, options.qat_epochs, options.qat_lr, x,
                               OPSET, log)
    info["parity"] = qdq_parity(path, x, reference)
    agreement = info["parity"]["top1_agreement"]
    log(f"qat-kd {preset}: ONNX agrees with the fake-quant model on {agreement:.2%} of the evaluation images "
        f"({info['parity']['runtime_int8_kernels_agreement']:.2%} with ONNX Runtime's integer kernels)")
    if agreement < 0.99:
        raise EdgeKDError(f"{run}: the qat-kd {preset} ONNX model agrees with its fake-quant PyTorch model on only "
                          f"{agreement:.2%} of the images (< 99%): the export is wrong; use int8_method = 'ptq-search'")
    return info


def _export_onnx(model, path: Path, shape: tuple[int, ...], half: bool = False, exporter: str = ONNX_EXPORTERS[0]) -> None:
    """Export `model` to `path` with a dynamic batch dimension; the caller checks parity with PyTorch."""
    import torch

    class Half(torch.nn.Module):  # fp16 weights and compute, fp32 at the edges: a strongly typed FP16 graph
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.half()

        def forward(self, x):
            return self.inner(x.half()).float()

    import copy

    module = Half(copy.deepcopy(model)).eval() if half else model
    names = {"input_names": ["input"], "output_names": ["logits"], "verbose": False}
    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(module, (torch.randn(2, *shape),), str(path), opset_version=OPSET, dynamo=True,
                              external_data=False, dynamic_shapes={"x": {0: batch}}, **names)
        else:
            import warnings

            with warnings.catch_warnings():  # its deprecation notice, once per export: not news to a user
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(module, (torch.randn(2, *shape),), str(path), opset_version=OPSET, dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
            import onnx
            from onnxscript import optimizer

            # the optimizer the dynamo path runs: constants folded, timm's nn.Identity nodes gone, so the graph
            # (and the node groups INT8 works on) is the same kind whichever exporter made it. One pass: its
            # default second one found nothing more on any quickstart or Fashion-MNIST student (the same bytes)
            # and cost 0.035 of its 0.085 s
            onnx.save(optimizer.optimize(onnx.load(str(path)), num_iterations=1), str(path))
    except Exception as exc:
        raise EdgeKDError(f"ONNX export of {path.name} failed ({type(exc).__name__}: {str(exc)[:200]}): "
                          "choose an export-friendly student or report the model name") from None
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def _fp16_parity(bundle: Path, reference: np.ndarray, images: np.ndarray, labels: np.ndarray, data) -> dict:
    """FP16 against FP32 PyTorch where ONNX Runtime here has FP16 kernels; CPUs often have none for Conv."""
    try:
        logits = predict(OrtRunner(bundle / "model.fp16.onnx"), images, data.mean, data.std)
    except EdgeKDError as exc:
        return {"parity": {"checked": False, "reason": str(exc)[:200]}}
    return {"accuracy": task_score(logits, labels),
            "parity": {"checked": True, "max_abs_logit_diff": float(np.abs(logits - reference).max()),
                       "top1_agreement": agreement(logits, reference, data.multilabel)}}


# -- export_run, phase by phase -------------------------------------------------------------------------------
@dataclass
class _Export:
    """One export in progress: what every phase reads, and the manifest each adds its models to."""

    run: Path
    options: ExportOptions
    log: Callable[[str], None]
    start: float  # perf_counter at the start: the manifest's export_s
    dataset: DatasetConfig
    data: DataSplits
    model: object  # the PyTorch student, in eval mode
    shape: tuple[int, ...]  # one input image: (channels, size, size)
    bundle: Path
    images: np.ndarray  # eval.npz: the (capped) test split, uint8
    labels: np.ndarray
    manifest: dict
    x: np.ndarray | None = None  # `images` normalised, as every model takes them
    reference: np.ndarray | None = None  # the PyTorch student's logits on `x`: what each export is checked against
    val: Evaluator | None = None  # the validation split the guards score on (_validation), made on first use
    watch: Stopwatch = field(default_factory=Stopwatch)  # seconds per phase: the manifest's export_phases_s

    def accuracy_of(self, path: Path, as_written: bool = False) -> tuple[np.ndarray, float]:
        """An ONNX model's logits on the evaluation images and its accuracy, as `edgekd bench` would score it (with
        `as_written`, as its target computes it: Preset.score_as_written)."""
        return self.scored_by(OrtRunner(path, as_written=as_written))

    def scored_by(self, runner) -> tuple[np.ndarray, float]:
        """Any runner's logits on the evaluation images and its accuracy (an ExecuTorch program's too)."""
        with self.watch("test scoring"):  # parity and each model's accuracy on the evaluation images
            logits = predict(runner, self.images, self.data.mean, self.data.std)
        return logits, task_score(logits, self.labels)

    def add(self, key: str, file: str, precision: str, **info) -> None:
        """Record one model of the bundle, and write the manifest at once: nothing made is lost to a later failure."""
        path = self.bundle / file
        self.manifest["models"][key] = {"file": file, "precision": precision, "bytes": path.stat().st_size,
                                        "sha256": sha256(path), **info}
        # this export's time so far: the report's phase, and where it went
        self.manifest["export_s"] = round(time.perf_counter() - self.start, 2)
        self.manifest["export_phases_s"] = self.watch.to_dict()
        write_manifest(self.bundle, self.manifest)


def _check_targets(options: ExportOptions) -> None:
    """Unknown targets, and TensorRT with a GPU for `trt`, refused before the ONNX and INT8 work, not after it."""
    for target in options.targets:
        if target not in EXPORT_TARGETS:
            raise EdgeKDError(f"unknown export target {target!r}: use {', '.join(EXPORT_TARGETS)}")
    if "trt" in options.targets:
        engine_builder()


def _start_bundle(run: Path, options: ExportOptions, key: dict, profile: dict, metrics: dict, log,
                  start: float) -> _Export:
    """The bundle's directory with its data files (eval.npz, model.safetensors) and a manifest with no new models
    yet; those an earlier export with the same key made (other targets) are kept, so exports add to one bundle."""
    from edgekd.data.splits import SPLIT_SEED, load_splits, stratified_cap

    name = metrics["dataset"]
    dataset = DatasetConfig(**profile["profile"]["datasets"][name])
    data = load_splits(name, dataset)
    model, cfg = _torch_model(run, profile, data)
    bundle = run / "bundle"
    bundle.mkdir(exist_ok=True)
    test = stratified_cap(data.test, options.eval_limit, data.num_classes, SPLIT_SEED + 3)
    images, labels = test.images.numpy(), test.labels.numpy()
    np.savez_compressed(bundle / "eval.npz", images=images, labels=labels)
    shutil.copyfile(run / WEIGHTS, bundle / WEIGHTS)
    shape = (data.channels, data.image_size, data.image_size)
    manifest = {
        "schema_version": SCHEMA_VERSION,  # `edgekd bench` refuses a bundle newer than it reads
        "dataset": name, "variant": metrics["variant"], "classes": data.classes, "input_shape": list(shape),
        "channels": data.channels, "image_size": data.image_size,
        "normalization": {"mean": data.mean, "std": data.std, "scale": "x / 255, then (x - mean) / std"},
        "student": {"model": cfg["model"], "params": metrics["params"], "num_classes": data.num_classes,
                    "in_chans": data.channels, "small_input": cfg["small_input"]},
        "distill": _distill_record(run, metrics),
        "source": {"run_dir": str(run), "checkpoint_sha256": sha256(run / WEIGHTS)},
        # what every "accuracy" of this bundle measures: top-1 accuracy, or macro AUC on multi-label data
        "metric": metric_name(labels), "multilabel": data.multilabel,
        "eval": {"file": "eval.npz", "split": "test", "samples": int(len(labels)),
                 "subset": bool(len(labels) < len(data.test)), "of": len(data.test)},
        "packages": package_versions(), "models": {},
    }
    if (bundle / MANIFEST).is_file():
        earlier = read_json(bundle / MANIFEST)
        if isinstance(earlier, dict) and earlier.get("fingerprint") == fingerprint(key):
            manifest["models"] = earlier.get("models", {})
    return _Export(run, options, log, start, dataset, data, model, shape, bundle, images, labels, manifest)


def _pytorch_reference(ex: _Export) -> None:
    """The student's own logits on the evaluation images: every exported model is checked against them."""
    import torch

    ex.x = normalize(ex.images, ex.data.mean, ex.data.std)
    # Channels-last on the CPU: oneDNN runs these depthwise students' convolutions ~7x faster in it (measured: 17 vs
    # 125 ms for the quickstart's 359 test images, 6% of a bundle's export), with the same FP32 logits to ~1e-5. The
    # model goes back to the default layout after, so that what is exported is what was always exported.
    layout = torch.channels_last if len(ex.shape) == 3 else torch.contiguous_format
    model = ex.model.to(memory_format=layout)  # outside inference mode: the weights stay trainable (qat-kd)
    with torch.inference_mode():
        ex.reference = np.concatenate([model(torch.from_numpy(ex.x[i : i + 512]).contiguous(memory_format=layout))
                                       .numpy() for i in range(0, len(ex.x), 512)])
    ex.model = model.to(memory_format=torch.contiguous_format)
    ex.manifest["pytorch_accuracy"] = task_score(ex.reference, ex.labels)
    ex.manifest["student"].update(compute_per_image(ex.model, ex.shape))


def compute_per_image(model, shape: tuple[int, ...]) -> dict:
    """The student's multiply-accumulates and FLOPs for one image, counted by PyTorch's own FlopCounterMode
    (convolutions and matrix products, 2 FLOPs per multiply-add; element-wise ops are not counted): with its
    `params` (already in the manifest), the size figures edge users compare models by, beside the latency.
    Counted once per architecture and input shape in a process (a study's bundles share them): the count depends on
    shapes only, and counting costs ~20 ms a model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # the module tree's printout names every layer and its sizes: the architecture, whatever the weights
    key = (f"{type(model).__module__}.{type(model).__qualname__}\n{model}", tuple(shape))
    if key not in _COUNTED:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(torch.zeros((1, *shape)))
        flops = int(counter.get_total_flops())
        _COUNTED[key] = {"flops_per_image": flops, "macs_per_image": flops // 2,
                         "counted_by": f"torch.utils.flop_counter.FlopCounterMode (torch {torch.__version__})"}
    return dict(_COUNTED[key])


_COUNTED: dict[tuple[str, tuple[int, ...]], dict] = {}  # compute_per_image's counts, by architecture and shape


def _export_fp32(ex: _Export) -> None:
    """model.onnx, which the INT8 models and the engines are made from: refused unless it matches PyTorch."""
    fp32 = exported_target("fp32")
    with ex.watch("onnx export"):
        _export_onnx(ex.model, ex.bundle / fp32.file, ex.shape, exporter=ex.options.onnx_exporter)
    logits, acc = ex.accuracy_of(ex.bundle / fp32.file)
    parity = logit_parity(logits, ex.reference, ex.options, ex.data.multilabel)
    ex.add(fp32.key, fp32.file, fp32.precision, opset=OPSET, exporter=ex.options.onnx_exporter, accuracy=acc,
           parity=parity)
    ex.log(f"onnx: max |Δlogit| {parity['max_abs_logit_diff']:.2e} ({parity['max_relative_diff']:.1e} of the logits' "
           f"scale), top-1 agreement {parity['top1_agreement']:.4%}")
    if not parity["ok"]:
        raise EdgeKDError(f"{ex.run}: ONNX output differs from PyTorch (max |Δlogit| {parity['max_abs_logit_diff']:.3g}"
                          f", {parity['max_relative_diff']:.2g} of the logits' scale, agreement "
                          f"{parity['top1_agreement']:.4%}): the export is wrong for this model; do not deploy it")


def logit_parity(logits: np.ndarray, reference: np.ndarray, options: ExportOptions, multilabel: bool = False) -> dict:
    """How far an exported model's logits are from PyTorch's: the largest |Δlogit|, the largest as a share of its
    image's logit scale (max |logit|), the answers it shares with PyTorch (`top1_agreement`: top-1, or multi-label
    per image and class), and whether all hold (|Δ| <= atol + rtol * scale)."""
    diff = np.abs(logits - reference)
    scale = np.abs(reference).max(axis=1, keepdims=True)
    shared = agreement(logits, reference, multilabel)
    within = bool((diff <= options.atol + options.rtol * scale).all())
    return {"max_abs_logit_diff": float(diff.max()), "max_relative_diff": float((diff / np.maximum(scale, 1e-12)).max()),
            "top1_agreement": shared, "atol": options.atol, "rtol": options.rtol,
            "ok": within and shared >= options.min_agreement}


def _validation(ex: _Export) -> Evaluator:
    """What every deploy guard, ptq-search and the sensitivity analysis score their choices on: the validation split,
    never eval.npz (test); a small one with its training-augmentation views (see validation_views). Made once per
    export, on first use, with the FP32 ONNX model's answers as the reference."""
    if ex.val is None:
        data = ex.data
        val_x, val_y, views = validation_views(data.val.images, data.val.labels.numpy(), ex.dataset.crop_padding,
                                               ex.dataset.hflip)
        clusters = np.tile(np.arange(len(data.val)), views)  # row i is a view of validation image clusters[i]
        # a label-noise variant's validation labels are as wrong as its training labels: judged label-free only
        trusted = (read_json(ex.run / RUN_PROFILE).get("variant") or {}).get("kind") != "label_noise"
        ex.val = Evaluator(ex.bundle / exported_target("fp32").file, normalize(val_x, data.mean, data.std), val_y,
                           clusters=clusters, watch=ex.watch, labels_trusted=trusted)
        ex.manifest["validation"] = {"split": "validation", "images": len(data.val), "views": views,
                                     "scored": len(val_y), "reference": exported_target("fp32").key,
                                     "labels_trusted": trusted}
    return ex.val


def _guard_step(method: str, score: Score, val: Evaluator, guard: Guard) -> dict:
    """One model the guard scored, as the manifest keeps it."""
    resolved = guard.resolves(score)
    return {"method": method, "val_accuracy": score.accuracy, "val_drop_pts": round(score.drop(val.fp32) * 100, 3),
            "val_flips_pts": round(score.flips * 100, 3), **{f"val_{k}": v for k, v in guard.bounds(score).items()},
            "val_agreement": score.agreement, "held_by": guard.held_by(score),
            **({"val_drop_resolved": resolved} if resolved is not None else {})}


def _guard_record(val: Evaluator, limit: float, steps: list[dict], deployed: bool, reason: str | None) -> dict:
    """The manifest's `guard` of a model: the rule, the split, each step tried, the verdict."""
    by = ("the paired accuracy drop (where its margin is at most half the limit), or the share of FP32's top-1 "
          "answers changed" if val.labels_trusted else
          "the share of FP32's top-1 answers changed (the split's labels are known to be noisy)")
    return {"split": "validation", "images": val.images_scored, "scored": len(val.labels),
            "rule": f"points lost against FP32, as an upper bound (+{GUARD_Z:g} SE clustered by image) on {by}, "
                    "<= max_drop_pts", "max_drop_pts": limit, "labels_trusted": val.labels_trusted, "steps": steps,
            "deployed": deployed, "reason": reason}


def _scored(score: Score, val: Evaluator, guard: Guard) -> str:
    """A model's guard scores in a few words, for the CLI line: the drop and the answers changed, each with its
    upper bound."""
    bounds = guard.bounds(score)
    drop = (f"{-score.drop(val.fp32) * 100:+.1f} pts (down to {-bounds['drop_bound_pts']:+.1f})"
            if "drop_bound_pts" in bounds else f"{-score.drop(val.fp32) * 100:+.1f} pts on noisy labels")
    return f"{drop}, {score.flips * 100:.1f}% changed (up to {bounds['flips_bound_pts']:.1f}%)"


def _refusal(score: Score, val: Evaluator, guard: Guard, tried: str = "") -> str:
    """Why the guard did not deploy a model, for the manifest, the CLI and the report."""
    bounds = guard.bounds(score)
    if "drop_bound_pts" in bounds:
        unresolved = "" if guard.resolves(score) else ", too loose a bound for this split to certify"
        drop = f"loses {score.drop(val.fp32) * 100:+.2f} pts (up to {bounds['drop_bound_pts']:+.2f}{unresolved}) and "
    else:
        drop = f"({score.drop(val.fp32) * 100:+.2f} pts on labels known to be noisy) "
    return (f"{drop}changes {score.flips * 100:.2f}% of FP32's answers (up to {bounds['flips_bound_pts']:.2f}%) "
            f"on the validation split{tried}; the guard allows {guard.max_drop * 100:g} pts (deploy.int8_max_drop)")


# How an INT8 model's accuracy and guard scores were computed here (Preset.score_as_written)
SCORED_AS = {False: "ONNX Runtime CPU, its integer kernels (what the cpu deployment runs)",
             True: "Q/DQ as written, in float (TensorRT's int32 arithmetic), not ONNX Runtime's x86 integer kernels"}


def calibration_images(data, size: int) -> np.ndarray:
    """The training images every INT8 model of a bundle is calibrated on (ONNX presets, ptq-search, the ExecuTorch
    program): a stratified draw of `size`, the same for the same --calib-size, normalised as the models take them."""
    from edgekd.data.splits import SPLIT_SEED, stratified_cap

    calib = stratified_cap(data.train, size, data.num_classes, SPLIT_SEED + 4)
    return normalize(calib.images.numpy(), data.mean, data.std)


def _make_int8(ex: _Export, method: str, preset: str, path: Path, val: Evaluator | None, sensitivity: bool,
               qat, quantizer: Quantizer | None = None) -> tuple[dict, dict | None]:
    """One INT8 model by `method` at `path`, scored on the evaluation images like every model of the bundle.
    Returns (its manifest entry's info, the sensitivity analysis or None)."""
    options, data = ex.options, ex.data
    calibration = functools.partial(calibration_images, data)  # size -> images

    if method == "qat-kd":
        info, analysis = _qat_int8(ex.run, ex.model, preset, path, replace(options, int8_method=method), ex.x,
                                   ex.log, qat), None
    else:
        info, analysis = make_int8(ex.bundle / "model.onnx", path, preset, calibration, len(data.train), method,
                                   options.calib_method, options.calib_size, val, options.int8_max_drop / 100,
                                   sensitivity, ex.log, ex.watch, quantizer)
    as_written = PRESETS[preset].score_as_written
    _, acc = ex.accuracy_of(path, as_written)
    change = acc - ex.manifest["models"][exported_target("fp32").key]["accuracy"]
    return {"preset": preset, **info, "accuracy": acc, "accuracy_change_vs_fp32": change,
            "scored_as": SCORED_AS[as_written]}, analysis


def _export_int8(ex: _Export, qat) -> None:
    """One deployed INT8 model per preset by int8_method; int8_compare's other methods beside it, not kept."""
    options = ex.options
    val = _validation(ex)
    for preset in options.int8_presets:
        target = int8_target(preset)
        file = target.file
        info, sensitivity = _guarded_int8(ex, preset, file, val, qat)
        if preset == "trt":
            info["tensorrt_qdq_check"] = check_tensorrt_qdq(ex.bundle / file).to_dict()
        if sensitivity is not None:
            ex.manifest.setdefault("int8_sensitivity", {})[preset] = sensitivity
        ex.add(target.key, file, target.precision, **info)
        ex.log(f"int8 {preset} ({info['method']}{'' if info['deployed'] else ', NOT deployed'}): accuracy "
               f"{info['accuracy']:.4f} ({info['accuracy_change_vs_fp32'] * 100:+.2f} pts vs FP32 on the bundle's "
               "evaluation images)")
        for method in (m for m in options.int8_compare if m != options.int8_method):
            _compare_int8(ex, method, preset, file, val, qat)


def escalation(options: ExportOptions) -> list[str]:
    """The INT8 methods the guard tries, in order: the profile's, then its escalation (each once)."""
    return list(dict.fromkeys([options.int8_method, *options.int8_escalation]))


def _guarded_int8(ex: _Export, preset: str, file: str, val: Evaluator, qat) -> tuple[dict, dict | None]:
    """The preset's INT8 model, deployed only if it holds on the validation split (never test): at most
    int8_max_drop points lost against FP32, as an upper bound (edgekd.export.int8.Guard). The profile's method first, then each escalation step until one holds. When none
    does, the closest stays in the bundle marked not deployed, with its score and the reason (bench skips it unless
    asked by --model). Every step and its validation scores go in the manifest."""
    options = ex.options
    limit = options.int8_max_drop
    steps, tried, best = [], [], None
    # one Quantizer for every step: ptq's calibration and full quantization are ptq-search's first candidate's
    with tempfile.TemporaryDirectory(dir=ex.bundle) as tmp, Quantizer(ex.bundle / exported_target("fp32").file,
                                                                       preset, ex.watch) as quantizer:
        for method in escalation(options):
            if method == "qat-kd" and qat is None:
                steps.append({"method": method, "skipped": "needs the student's trainer: edgekd export and edgekd "
                                                            "study hand it over"})
                continue
            path = Path(tmp) / f"{method}-{file}"
            info, analysis = _make_int8(ex, method, preset, path, val, options.int8_sensitivity and not tried, qat,
                                        quantizer)
            score = val.score(path, PRESETS[preset].score_as_written)
            guard = Guard.on(val, limit / 100)  # made here: FP32's score is computed in the background until now
            steps.append(_guard_step(method, score, val, guard))
            floated = info.get("mixed_precision", {}).get("float_closure")
            share = (f", {info['mixed_precision']['float_weight_share']:.0%} of the weights float" if floated
                     else "")
            tried.append(f"{method} {_scored(score, val, guard)}{share}")
            if best is None or guard.better(score, best[0]):  # a holding model is better than every other
                best = (score, method, path, info, analysis)
            if guard.holds(score):
                break
        score, method, path, info, analysis = best
        shutil.move(str(path), ex.bundle / file)
    deployed = guard.holds(score)
    reason = None if deployed else _refusal(score, val, guard, " after " + ", ".join(
        s["method"] for s in steps if "skipped" not in s))
    ex.log(f"int8 {preset}: {' -> '.join(tried)} on validation -> {'deployed' if deployed else 'NOT deployed'} "
           f"({method})")
    guard = _guard_record(val, limit, steps, deployed, reason)
    return {**info, "deployed": deployed, **({"not_deployed": reason} if reason else {}), "guard": guard}, analysis


def _compare_int8(ex: _Export, method: str, preset: str, file: str, val: Evaluator | None, qat) -> None:
    """Another INT8 method for the report's "KD gain kept after INT8" rows per method: made in a scratch directory,
    scored on the same images and recorded; not kept, since a bundle deploys one INT8 model per preset."""
    with tempfile.TemporaryDirectory(dir=ex.bundle) as tmp:
        other, _ = _make_int8(ex, method, preset, Path(tmp) / file, val, False, qat)
    keep = ("accuracy", "accuracy_change_vs_fp32", "calibration", "mixed_precision", "epochs")
    compared = ex.manifest.setdefault("int8_compare", {}).setdefault(preset, {})
    compared[method] = {k: other[k] for k in keep if k in other}
    write_manifest(ex.bundle, ex.manifest)
    ex.log(f"int8 {preset} ({method}, compared, not kept): accuracy {other['accuracy']:.4f} "
           f"({other['accuracy_change_vs_fp32'] * 100:+.2f} pts vs FP32)")


def _export_fp16(ex: _Export) -> None:
    """model.fp16.onnx: what a strongly typed TensorRT network builds FP16 from. Guarded like INT8, by the same rule
    on the validation split: FP16's failure is overflow (an activation past 65504 is inf), which shows as answers
    changed, not as a small logit difference on a few test images."""
    fp16 = exported_target("fp16")
    with ex.watch("onnx export"):
        _export_onnx(ex.model, ex.bundle / fp16.file, ex.shape, half=True, exporter=ex.options.onnx_exporter)
    val, limit = _validation(ex), ex.options.int8_max_drop
    try:
        score = val.score(ex.bundle / fp16.file)
    except Exception as exc:  # ONNX Runtime here has no kernel for some FP16 op: unchecked is not deployed
        steps, reason = [], (f"could not be scored on the validation split here ({type(exc).__name__}: "
                             f"{str(exc)[:160]}); check it on the device with `edgekd bench --model {fp16.key}`")
    else:
        guard = Guard.on(val, limit / 100)
        steps = [_guard_step("fp16", score, val, guard)]
        reason = None if guard.holds(score) else _refusal(score, val, guard)
    guard = _guard_record(val, limit, steps, reason is None, reason)
    changed = f"{steps[0]['val_flips_pts']:.2f}% of FP32's answers changed on validation -> " if steps else ""
    ex.log(f"fp16: {changed}{'deployed' if reason is None else f'NOT deployed: {reason}'}")
    ex.add(fp16.key, fp16.file, fp16.precision, opset=OPSET, deployed=reason is None,
           **({"not_deployed": reason} if reason else {}), guard=guard,
           **_fp16_parity(ex.bundle, ex.reference, ex.images, ex.labels, ex.data))


def _export_pte(ex: _Export) -> None:
    """ExecuTorch programs from the PyTorch student: model.pte, refused unless it matches PyTorch like model.onnx;
    with `int8` in the targets, model.int8.pte by XNNPACK's quantizer on the same calibration images as the ONNX
    INT8 models, deployed only if it holds under the same guard on the validation split (no escalation: XNNPACK's
    quantizer has no float fallback here, so one that fails stays in the bundle, not deployed)."""
    from edgekd.export.executorch import write_pte
    from edgekd.pte import ExecuTorchRunner, executorch_version

    fp32, int8 = TARGETS["pte-fp32"], TARGETS["pte-int8"]
    version = executorch_version()
    with ex.watch("executorch export"):
        info = write_pte(ex.model, ex.shape, ex.bundle / fp32.file)
    logits, acc = ex.scored_by(ExecuTorchRunner(ex.bundle / fp32.file))
    parity = logit_parity(logits, ex.reference, ex.options, ex.data.multilabel)
    ex.add(fp32.key, fp32.file, fp32.precision, exporter=f"executorch {version}", accuracy=acc, parity=parity, **info)
    ex.log(f"pte: max |Δlogit| {parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4%}")
    if not parity["ok"]:
        raise EdgeKDError(f"{ex.run}: the ExecuTorch program differs from PyTorch (max |Δlogit| "
                          f"{parity['max_abs_logit_diff']:.3g}, agreement {parity['top1_agreement']:.4%}): do not "
                          "deploy it")
    if "int8" not in ex.options.targets:
        return
    with ex.watch("executorch int8"):  # calibrated on the ONNX INT8 models' images
        info = write_pte(ex.model, ex.shape, ex.bundle / int8.file,
                         calibration=calibration_images(ex.data, ex.options.calib_size))
    runner = ExecuTorchRunner(ex.bundle / int8.file)
    val, limit = _validation(ex), ex.options.int8_max_drop
    with ex.watch("validation scoring"):
        score = val.score_logits(np.concatenate([runner.infer(val.images[i : i + 256])
                                                 for i in range(0, len(val.images), 256)]))
    guard = Guard.on(val, limit / 100)
    reason = None if guard.holds(score) else _refusal(score, val, guard)
    _, acc8 = ex.scored_by(runner)
    ex.add(int8.key, int8.file, int8.precision, exporter=f"executorch {version}", method="ptq", accuracy=acc8,
           accuracy_change_vs_fp32=acc8 - ex.manifest["models"][exported_target("fp32").key]["accuracy"],
           deployed=reason is None, **({"not_deployed": reason} if reason else {}),
           guard=_guard_record(val, limit, [_guard_step("ptq", score, val, guard)], reason is None, reason), **info)
    ex.log(f"pte int8: {_scored(score, val, guard)} on validation -> "
           f"{'deployed' if reason is None else 'NOT deployed'}; accuracy {acc8:.4f}")


def _build_trt(ex: _Export, key: dict) -> None:
    """The bundle's TensorRT engines, built here as `edgekd build` would on the device."""
    from edgekd.export.tensorrt_build import build_engines

    options = ex.options
    precisions = ("fp32", *(["fp16"] if options.fp16 else []), *(["int8"] if "trt" in options.int8_presets else []))
    ex.manifest.update(key=key, fingerprint=fingerprint(key))  # the engines add to a finished bundle
    write_manifest(ex.bundle, ex.manifest)
    build_engines(ex.bundle, precisions, log=lambda line: ex.log(f"trt {line}"))


def _seal(bundle: Path, manifest: dict, key: dict) -> None:
    """The key last: a bundle whose export was cut short has none, so a study exports it again. The manifest is
    read back first because build_engines wrote its engines into the file, not into `manifest`."""
    written = read_json(bundle / MANIFEST) if (bundle / MANIFEST).is_file() else manifest
    write_manifest(bundle, {**written, "key": key, "fingerprint": fingerprint(key)})


def export_run(run: Path, options: ExportOptions, log=print, qat=None) -> Path:
    """Export a student run's bundle. `qat`: the quantization-aware trainer for int8_method 'qat-kd'
    (edgekd.distill.qat.qat_int8), passed in by the caller: training is distill's, and export does not import it."""
    start = time.perf_counter()
    _check_targets(options)
    profile, metrics = read_json(run / RUN_PROFILE), read_json(run / METRICS)
    key = export_key(run, options)
    watch = Stopwatch()
    with watch("data and model"):
        ex = _start_bundle(run, options, key, profile, metrics, log, start)
    ex.watch = watch
    with watch("pytorch reference"):
        _pytorch_reference(ex)
    if {"onnx", "int8", "trt", "pte"} & set(options.targets):  # the INT8 guards' reference is model.onnx
        _export_fp32(ex)
    if "int8" in options.targets or ("trt" in options.targets and "trt" in options.int8_presets):
        _export_int8(ex, qat)
    if options.fp16:
        _export_fp16(ex)
    if "pte" in options.targets:
        _export_pte(ex)
    if "trt" in options.targets:
        _build_trt(ex, key)
    _seal(ex.bundle, ex.manifest, key)
    return ex.bundle
