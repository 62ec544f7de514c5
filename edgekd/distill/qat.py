"""Quantization-aware distillation: INT8 by quantization-aware training with the student's own losses (`int8_method = "qat-kd"`).

The trained student is fine-tuned for a few epochs with fake quantization inserted where the preset will run INT8,
learning from the same teacher with the same losses it was distilled with (a scratch student: cross-entropy, so
the KD gain after INT8 compares like with like); then the fake-quant graph is converted and exported as Q/DQ ONNX
whose scales are the ones it learned.

The fake quantization and the conversion are PyTorch 2 Export quantization (PT2E) from torchao: `torch.export`
captures the student, `prepare_qat_pt2e` with torchao's X86 quantizer inserts the fake quantizers (Conv+BN folded
the way it will run), `convert_pt2e` makes Q/DQ operators, and `torch.onnx.export` writes them as
QuantizeLinear/DequantizeLinear. Only the quantization specs are ours, one per preset:
- cpu: uint8 asymmetric activations, int8 symmetric per-channel weights (what ONNX Runtime's x86 kernels fuse
  into QLinearConv);
- trt: int8 symmetric activations (zero point 0) and weights in [-127, 127] per channel, as TensorRT requires.
We use plain `FakeQuantize` with moving-average observers rather than the default fused observer-fake-quant op,
which failed on this machine's torch 2.14 / torchao 0.18 ("zero_point must be between quant_min and quant_max").

The checkpoint is chosen on validation accuracy of the fake-quant model (the trainer's rule), never on test.
`edgekd export` / `edgekd study` hand `qat_int8` to `edgekd.export.bundle.export_run` (export does not import
distill): `qat_trainer(options)`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError


def qat_trainer(options):
    """The trainer export_run needs for `options` (None unless it may make a qat-kd model: deployed, as an escalation
    step of the INT8 guard, or compared)."""
    return qat_int8 if "qat-kd" in (options.int8_method, *options.int8_compare, *options.int8_escalation) else None


def _torchao():
    try:
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.fake_quantize import FakeQuantize
        from torchao.quantization.pt2e.observer import (
            MovingAverageMinMaxObserver,
            MovingAveragePerChannelMinMaxObserver,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer
    except ImportError:
        raise EdgeKDError("int8_method = 'qat-kd' needs torchao (PyTorch 2 Export quantization): "
                          "pip install 'edgekd[train]'") from None
    return (allow_exported_model_train_eval, FakeQuantize, MovingAverageMinMaxObserver,
            MovingAveragePerChannelMinMaxObserver, convert_pt2e, prepare_qat_pt2e, QuantizationConfig,
            QuantizationSpec, X86InductorQuantizer)


def quantizer(preset: str):
    """torchao's X86 quantizer (which ops get Q/DQ, and Conv+BN folding) with the preset's number formats."""
    import torch

    (_, FakeQuantize, ActObserver, WeightObserver, _, _, QuantizationConfig, QuantizationSpec,  # noqa: N806
     X86InductorQuantizer) = _torchao()
    symmetric = preset == "trt"
    act = QuantizationSpec(
        dtype=torch.int8 if symmetric else torch.uint8, quant_min=-128 if symmetric else 0,
        quant_max=127 if symmetric else 255,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine, is_dynamic=False,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=ActObserver, eps=2**-12))
    # cpu: 7-bit weights, as export's cpu preset (reduce_range): ONNX Runtime's x86 U8S8 kernels saturate on
    # full-range per-channel weights (edgekd.export.quantize.Preset.reduce_range)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127 if symmetric else -64, quant_max=127 if symmetric else 63,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0, is_dynamic=False,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=WeightObserver, eps=2**-12))
    return X86InductorQuantizer().set_global(QuantizationConfig(act, act, weight, None, True))


def _batch_dim(torch):
    return {0: torch.export.Dim("batch", min=1, max=4096)}


def prepare(model, example, preset: str):
    """The float student as a PT2E graph with the preset's fake quantizers, in training mode."""
    import torch

    allow_train_eval, *_, prepare_qat_pt2e, _, _, _ = _torchao()
    model.train()
    try:
        graph = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(torch),)).module()
    except Exception as exc:
        raise EdgeKDError(f"qat-kd: torch.export could not capture the student ({type(exc).__name__}: "
                          f"{str(exc)[:160]}): use int8_method = 'ptq-search' for this model") from None
    prepared = prepare_qat_pt2e(graph, quantizer(preset))
    allow_train_eval(prepared)
    return prepared


def export_qdq(prepared, example, path: Path, opset: int):
    """The fine-tuned fake-quant graph converted to Q/DQ operators (torchao's reference representation: quantize
    and dequantize in float) and written as ONNX with a dynamic batch; returns the converted PyTorch graph."""
    import torch

    allow_train_eval, *_, convert_pt2e, _, _, _, _ = _torchao()
    prepared.eval()  # torchao's train/eval switch for exported graphs returns nothing
    converted = convert_pt2e(prepared)
    allow_train_eval(converted)
    converted.eval()
    converted.training = False  # torchao's eval() swaps the ops but leaves the flag, which torch.onnx warns about
    try:
        torch.onnx.export(converted, (example,), str(path), opset_version=opset, dynamo=True, external_data=False,
                          input_names=["input"], output_names=["logits"], dynamic_shapes=(_batch_dim(torch),),
                          verbose=False)
    except Exception as exc:
        raise EdgeKDError(f"qat-kd: ONNX export of {path.name} failed ({type(exc).__name__}: {str(exc)[:200]})") from None
    return converted


def _logits(model, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[i : i + 512])).numpy() for i in range(0, len(images), 512)])


def student_losses(profile, metrics: dict) -> tuple[dict, str]:
    """The losses the run was trained with (its record's: a tuned method's chosen values, a pruned run's fine-tune
    method) and their profile key; cross-entropy for a scratch student."""
    from edgekd.distill.plan import loss_method

    if metrics["role"] != "kd":
        return {"ce": {"weight": 1.0}}, "scratch"
    method = loss_method(profile, metrics["method"])
    return metrics.get("losses") or profile.methods[method], f"methods.{method}"


def qat_int8(run: Path, model, preset: str, out: Path, epochs: int, lr: float, images: np.ndarray,
             opset: int, log=print) -> tuple[dict, np.ndarray]:
    """Fine-tune `model` (the run's trained student) with fake quantization for `preset` against its own teacher and
    losses, write the Q/DQ ONNX to `out`, and return what was done with the logits of the converted fake-quant
    PyTorch graph (Q/DQ in float, exactly what was exported) on `images` (the bundle's normalised evaluation
    images): the parity reference for the ONNX model."""
    import torch

    from edgekd.config import method_losses, saved_profile
    from edgekd.distill.execution import Execution, resolve_device
    from edgekd.distill.losses import ComposedLoss
    from edgekd.distill.plan import train_config
    from edgekd.distill.runner import augment_for, dataset_splits, job_from_data, trained_teacher
    from edgekd.distill.train import train
    from edgekd.runio import BUNDLE, METRICS, RUN_PROFILE, read_json, study_root_of

    start = time.perf_counter()
    saved, metrics = read_json(run / RUN_PROFILE), read_json(run / METRICS)
    profile = saved_profile(saved["profile"])
    spec, where = student_losses(profile, metrics)
    criterion = ComposedLoss(method_losses(spec), where)
    if criterion.needs_features:
        raise EdgeKDError(f"qat-kd fine-tunes with logit losses; {where} has feature terms: export this run with "
                          "int8_method = 'ptq-search'")
    job = job_from_data(saved["job"], run)
    variant = dataset_splits(profile, job.dataset, job.variant)
    data = variant.splits
    teacher = trained_teacher(profile, study_root_of(run), job, data)[0] if criterion.needs_teacher else None
    student = train_config(profile, job.role)
    cfg = replace(student, epochs=epochs, min_steps=0, warmup_epochs=0.0, lr=lr or student.lr / 100)
    device = resolve_device(profile.study.device)
    # fake quantization emulates INT8 on FP32: no autocast on top; the student's threads (they change the numbers,
    # and the bundle job runs it with 1 or all of them depending on the executor)
    ex = Execution("fp32", False, device, int((metrics.get("execution") or {}).get("threads") or 0))
    example = torch.zeros(2, data.channels, data.image_size, data.image_size)
    prepared = prepare(model, example, preset)
    criterion = criterion.to(device)
    workdir = run / BUNDLE / f"qat-{preset}"  # the fine-tune's checkpoints; never resumed from an older export
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with ex.cpu_threads():
        history = train(prepared, data, cfg, criterion, ex, augment_for(profile.datasets[job.dataset]),
                        seed=job.seed, run_dir=workdir, teacher=teacher, eval_batch_size=profile.study.eval_batch_size,
                        log=lambda line: log(f"qat-kd {preset}: {line}"))
        prepared = prepared.to("cpu")
        prepared.eval()
        fake_quant = _logits(prepared, images)  # as trained: BatchNorm beside the conv, fake quantizers on its output
        converted = _logits(export_qdq(prepared, example, out, opset), images)  # BN folded, Q/DQ as exported
    shutil.rmtree(workdir, ignore_errors=True)
    info = {"method": "qat-kd", "losses": spec, "teacher": criterion.needs_teacher, "epochs": history["epoch"],
            "best_epoch": history["best_epoch"], "lr": cfg.lr, "fake_quant_val_acc": max(
                (h.get("val_acc", 0.0) for h in history["history"]), default=None),
            "library": "torchao PT2E (prepare_qat_pt2e, convert_pt2e), X86InductorQuantizer",
            "seconds": round(time.perf_counter() - start, 1),
            # how far PT2E's conversion (BN folded into the conv, its weights quantized again) moves the model
            "converted_vs_trained_agreement": float((converted.argmax(1) == fake_quant.argmax(1)).mean())}
    return info, converted
