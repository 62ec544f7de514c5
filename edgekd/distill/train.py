"""One training run (teacher, scratch student or KD student): a flat loop, resumable at every epoch.

Everything the run needs is in its arguments and its run directory, so it can run as its own job (a Ray task,
a torchrun worker) as well as inside `edgekd distill`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.config import TrainConfig
from edgekd.data.augment import ViewAugment
from edgekd.data.types import DataSplits
from edgekd.distill.execution import Execution
from edgekd.distill.features import FeatureTap
from edgekd.distill.losses import ComposedLoss, StepOutputs
from edgekd.distill.metrics import (
    balanced_accuracy,
    expected_calibration_error,
    head_tail_accuracy,
    per_class_accuracy,
    worst_group_accuracy,
)
from edgekd.distill.teacher import Normalize
from edgekd.errors import EdgeKDError
from edgekd.runio import UnreadableFile, load_tensors, read_json, save_tensors, tensor_shapes, write_json

CHECKPOINT = "checkpoint"  # .safetensors (model, optimizer, best weights) + .json (epoch, history)


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    images_per_s: float


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    # No weight decay on norms and biases: standard practice, and it matters for tiny students.
    # `extra` holds trainable loss parts (feature adapters), trained with the student and dropped after.
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, normalize: Normalize, ex: Execution,
            batch_size: int) -> torch.Tensor:
    """Logits (fp32, on CPU) for uint8 images, in order."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size]).contiguous(memory_format=ex.memory_format())
        with ex.autocast():
            out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels.cpu()).float().mean().item() if len(labels) else float("nan")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def discard_unusable_checkpoint(run_dir: Path) -> str | None:
    """Delete a checkpoint that cannot be resumed from (half of it missing, or either file damaged), so the run
    starts over instead of failing; returns why, or None when there is none or it is whole."""
    meta, blob = run_dir / f"{CHECKPOINT}.json", run_dir / f"{CHECKPOINT}.safetensors"
    if not meta.exists() and not blob.exists():
        return None
    try:
        saved = read_json(meta)
        tensor_shapes(blob)
        if not isinstance(saved, dict) or not {"epoch", "history", "optimizer"} <= set(saved):
            raise UnreadableFile(f"{meta} is not an edgekd checkpoint")
        return None
    except UnreadableFile as exc:
        meta.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        return str(exc)


def train(model: nn.Module, data: DataSplits, cfg: TrainConfig, criterion: ComposedLoss, ex: Execution,
          augment: ViewAugment, seed: int, run_dir: Path, teacher=None, eval_batch_size: int = 512,
          on_step: Callable[[EpochReport], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train, keep the best weights by validation accuracy, and return the history. Resumes from run_dir."""
    for split, images in (("training", data.train), ("validation", data.val)):
        if len(images) == 0:  # an empty validation split never picks a best epoch: refuse before the first step
            raise EdgeKDError(f"{run_dir}: the {split} split of {data.name!r} is empty: add images, or change "
                              f"datasets.{data.name}.val_fraction or the variant")
    device = ex.device
    train_x, train_y = data.train.images.to(device), data.train.labels.to(device)
    normalize = Normalize(data.mean, data.std, device)
    model = ex.prepare(model)
    criterion = criterion.to(device)
    optimizer = make_optimizer(model, cfg, criterion)
    tap = FeatureTap(model, criterion.stages()[0]) if criterion.needs_features else None
    n, bs = len(train_y), cfg.batch_size
    # The last partial batch is dropped (each epoch reshuffles, so every sample still gets its turn): a batch of a
    # few images gives BatchNorm noisy statistics, which destabilises small students on small datasets.
    steps, epochs = max(1, n // bs), cfg.epochs_for(n)
    total, warmup = steps * epochs, int(round(cfg.warmup_epochs * steps))

    ckpt = {"epoch": 0, "best_val": -1.0, "best_epoch": -1, "history": [], "train_s": 0.0, "images": 0}
    damaged = discard_unusable_checkpoint(run_dir)
    if damaged:
        log(f"checkpoint discarded, training from the start: {damaged}")
    if (run_dir / f"{CHECKPOINT}.json").is_file():
        ckpt = read_json(run_dir / f"{CHECKPOINT}.json")
        tensors = load_tensors(run_dir / f"{CHECKPOINT}.safetensors", device)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        criterion.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("criterion.")})
        _restore_optimizer(optimizer, tensors, ckpt["optimizer"])
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        ckpt["prior_s"] = ckpt["train_s"]  # time spent before the interruption, for the run's wall time
        log(f"resumed at epoch {ckpt['epoch']}/{epochs}")
    else:
        best = {}

    for epoch in range(ckpt["epoch"], epochs):
        torch.manual_seed(seed * 1000 + epoch)  # dropout and stochastic depth, replayable on resume
        order, views = augment.draw_epoch(n, seed, epoch)
        order, views = order.to(device), views.to(device)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        for i in range(steps):
            idx = order[i * bs : (i + 1) * bs]
            v = views[idx]
            x = normalize(augment.apply(train_x[idx], v)).contiguous(memory_format=ex.memory_format())
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(epoch * steps + i, total, warmup)
            with ex.autocast():
                logits = model(x)
            teacher_logits = teacher.outputs(idx, v, x) if teacher is not None else None
            parts = criterion(StepOutputs(logits, train_y[idx], teacher_logits, tap.outputs if tap else {},
                                          getattr(teacher, "features", {}), (epoch * steps + i) / total))
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            for k, value in parts.items():  # summed on device: no host sync per step
                sums[k] = sums.get(k, 0) + value.detach() * len(idx)
            if on_step and (i % 10 == 9 or i == steps - 1):
                elapsed = time.perf_counter() - start
                on_step(EpochReport(epoch, epochs, i + 1, steps, parts["loss"].item(),
                                    (i + 1) * bs / max(elapsed, 1e-9)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        epoch_s = time.perf_counter() - start
        val_acc = accuracy(predict(model, data.val.images.to(device), normalize, ex, eval_batch_size),
                           data.val.labels)
        seen = min(n, steps * bs)
        record = {"epoch": epoch + 1, "val_acc": round(val_acc, 5), "epoch_s": round(epoch_s, 2),
                  "images_per_s": round(seen / epoch_s, 1), **{k: round(v.item() / seen, 5) for k, v in sums.items()}}
        if not math.isfinite(record["loss"]):  # checked once an epoch: a per-step check would sync the GPU
            raise EdgeKDError(f"{run_dir}: training diverged in epoch {epoch + 1} (loss {record['loss']}); lower "
                              "the learning rate or the loss weights, or ramp the distillation term in, e.g. "
                              "dkd = { weight = 1.0, ramp = 0.1 }")
        ckpt["history"].append(record)
        ckpt["train_s"] += epoch_s
        ckpt["images"] += seen
        if val_acc > ckpt["best_val"]:
            ckpt["best_val"], ckpt["best_epoch"] = val_acc, epoch + 1
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ckpt["epoch"] = epoch + 1
        opt_tensors, ckpt["optimizer"] = _flatten_optimizer(optimizer)
        save_tensors(run_dir / f"{CHECKPOINT}.safetensors",
                     {**{f"model.{k}": v for k, v in model.state_dict().items()},
                      **{f"criterion.{k}": v for k, v in criterion.state_dict().items()},
                      **{f"best.{k}": v for k, v in best.items()}, **opt_tensors})
        write_json(run_dir / f"{CHECKPOINT}.json", {**ckpt, "execution": asdict(ex)})
        log(" ".join(f"{k}={v}" for k, v in record.items()))
    if tap:
        tap.remove()
    model.load_state_dict(best)
    return ckpt


def evaluate(model: nn.Module, data: DataSplits, ex: Execution, batch_size: int,
             teacher_test_logits: torch.Tensor | None = None, extra_tests: dict | None = None,
             variant_stats: dict | None = None) -> tuple[dict, torch.Tensor]:
    """Test and validation metrics of a trained model (and on a variant's extra test sets), and its test logits."""
    normalize = Normalize(data.mean, data.std, ex.device)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return predict(model, images.to(ex.device), normalize, ex, batch_size)

    test, val = logits_of(data.test.images), logits_of(data.val.images)
    per_class = per_class_accuracy(test, data.test.labels, data.num_classes)
    metrics = {
        "test_acc": round(accuracy(test, data.test.labels), 5),
        "val_acc": round(accuracy(val, data.val.labels), 5),
        "balanced_test_acc": round(balanced_accuracy(per_class), 5),
        "ece": round(expected_calibration_error(test, data.test.labels), 5),
        "per_class_test_acc": dict(zip(data.classes, per_class, strict=True)),
    }
    if variant_stats and variant_stats.get("kind") == "imbalance":
        metrics.update(head_tail_accuracy(per_class, variant_stats["train_per_class"]))
    if teacher_test_logits is not None and teacher_test_logits.shape == test.shape:
        metrics["teacher_agreement"] = round((test.argmax(1) == teacher_test_logits.argmax(1)).float().mean().item(), 5)
    extra = {name: (logits_of(s.images), s.labels) for name, s in (extra_tests or {}).items()}
    if extra:
        metrics["extra_test_acc"] = {name: round(accuracy(lg, lb), 5) for name, (lg, lb) in extra.items()}
    if "aligned" in extra and "conflicting" in extra:
        metrics["worst_group_acc"] = round(worst_group_accuracy(extra["aligned"], extra["conflicting"],
                                                                data.num_classes), 5)
    return metrics, test
