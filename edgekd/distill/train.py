"""One training run (teacher, scratch student or KD student): a flat loop, resumable at every epoch.

Everything the run needs is in its arguments and its run directory, so it can run as its own job (a Ray task,
a torchrun worker) as well as inside `edgekd distill`.

Several processes can train one run together (`edgekd.distill.worker` under torchrun sets `Ranks` for the
job): every rank draws the epoch's global sample order and views from the same (seed, epoch), takes its
contiguous part of each global batch (so teacher-cache lookups hit the same (image, view) pairs as one process
would), gradients are averaged by DistributedDataParallel, BatchNorm statistics are those of the global batch,
and rank 0 alone validates, writes checkpoints and returns; the others raise `FollowerDone` when their part is
done. Without `Ranks` (the default) nothing of this is touched.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.config import TrainConfig
from edgekd.data.augment import ViewAugment, mix_batch, step_seed
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
from edgekd.distill.plan import snapshot_path
from edgekd.distill.teacher import Normalize
from edgekd.errors import EdgeKDError
from edgekd.runio import UnreadableFile, load_tensors, read_json, save_tensors, tensor_shapes, write_json
from edgekd.runtime.evalset import (
    agreement,
    average_precision,
    is_multilabel,
    mean_average_precision,
    metric_name,
    per_class,
    roc_auc,
    score,
)

CHECKPOINT = "checkpoint"  # .safetensors (model, optimizer, best weights) + .json (epoch, history)
# A checkpoint is written after the first epoch and then once at least this many seconds of training went by since
# the last one: at most this much is redone after an interruption, and the redone epochs give the same numbers (each
# epoch's randomness is seeded by its index). Written after every epoch, checkpoints (model, best weights and
# optimizer state: ~135 MB for resnet18) took ~20 s of the quickstart's ~113 s of training: 10 of a 22 s teacher's
# epochs, ~1.3 s of a quarter-data student's 5 s (40 epochs of 0.13 s).
CHECKPOINT_EVERY_S = 30.0


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None  # the last finished epoch's mean loss (None in the first): read mid-epoch it would sync
    images_per_s: float


@dataclass
class Ranks:
    """This process's place in a group of processes that train one run together (torch.distributed is set up)."""

    rank: int
    world: int
    global_bn: bool = True  # BatchNorm statistics over the global batch, as one process computes them
    # Called by rank 0 with the run's numerics as its training starts: the other ranks build their copy then.
    on_start: Callable[[Execution], None] | None = None


class FollowerDone(Exception):  # noqa: N818 - a signal, not an error
    """Raised by `train` on every rank but 0 once its share of the training is done: what follows (choosing the
    best epoch, evaluation, records) is rank 0's."""


_RANKS: Ranks | None = None


def process_group_size() -> int:
    """The processes training together in this one (torchrun's group; 1 outside one)."""
    return _RANKS.world if _RANKS else 1


@contextmanager
def ranks(group: Ranks) -> Iterator[Ranks]:
    """`train` calls inside this block train together with the other ranks of `group`."""
    global _RANKS
    previous, _RANKS = _RANKS, group
    try:
        yield group
    finally:
        _RANKS = previous


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch of sample indices (parts differ by at most one sample)."""
    return batch.tensor_split(world)[rank] if world > 1 else batch


def from_rank0(obj, rank: int):
    """Rank 0's `obj` on every rank (pickled; tensors in it must be on the CPU)."""
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


class _GatherRanks(torch.autograd.Function):
    """Every rank's tensor, stacked [world, ...]; the backward pass sums the gradient over ranks (every rank's loss
    depends on every rank's part) and keeps this rank's row. One collective each way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, group, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode with the mean and variance of the global batch: each rank's exact (two-pass)
    mean and sum of squared deviations, gathered and combined (Chan et al.), differentiably, as torch's
    SyncBatchNorm does on GPUs (it has no CPU kernels)."""
    if not bn.training:
        return type(bn).forward(bn, x)
    c, dims = x.shape[1], [0, *range(2, x.ndim)]
    shape = (1, c) + (1,) * (x.ndim - 2)
    xf = x.float()
    mean_r = xf.mean(dims)
    m2_r = ((xf - mean_r.view(shape)) ** 2).sum(dims)
    stats = _GatherRanks.apply(torch.cat([mean_r, m2_r, xf.new_full((1,), x.numel() // c)]), group)
    counts = stats[:, -1:]
    count = counts.sum()
    mean = (stats[:, :c] * counts).sum(0) / count
    var = (stats[:, c : 2 * c] + counts * (stats[:, :c] - mean) ** 2).sum(0) / count
    centred = xf - mean.view(shape)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
            unbiased = var.detach() * count / (count - 1).clamp_min(1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    y = y.to(x.dtype)
    if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm's BatchNormAct2d: norm, then dropout and activation
        y = bn.act(bn.drop(y))
    return y


def _globalise_batch_norm(model: nn.Module, group) -> tuple[list[nn.Module], int]:
    """Make the model's BatchNorm layers normalise with global-batch statistics while training; returns the
    layers changed (undo with `del layer.forward`) and how many BatchNorm layers of unknown kind were left as
    they are (they normalise with this rank's part of the batch)."""
    known = {nn.modules.batchnorm._BatchNorm.forward}
    try:
        from timm.layers import BatchNormAct2d

        known.add(BatchNormAct2d.forward)
    except ImportError:  # pragma: no cover - timm is part of the training install
        pass
    changed, unknown = [], 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            if type(m).forward in known:
                m.forward = functools.partial(_global_batch_norm, m, group)
                changed.append(m)
            else:
                unknown += 1
    return changed, unknown


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of parameters DistributedDataParallel does not hold (trainable loss parts)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = part.view_as(p).clone()


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
    """The task's score (edgekd.runtime.evalset.score): top-1 accuracy, or macro AUC on multi-label data."""
    if is_multilabel(labels):
        return score(logits.float().numpy(), labels.cpu().numpy())
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
          augment: ViewAugment, *, seed: int, run_dir: Path, teacher=None, eval_batch_size: int = 512,
          on_step: Callable[[EpochReport], None] | None = None, log: Callable[[str], None] = print,
          snapshots: tuple[int, ...] = ()) -> dict:
    """Train, keep the best weights by validation accuracy, and return the history. Resumes from run_dir.

    `snapshots`: epochs after which the weights are saved as they are (snapshots/epoch<k>.safetensors), the
    early-stopped teachers made from this run.

    Inside `ranks(...)`, trains together with the other ranks (see the module's docstring); rank 0 reads and
    writes run_dir, the others never touch it and raise `FollowerDone` at the end.

    Over 80 lines on purpose: the training loop on one screen (as nanoGPT's and airbench's), so the order of
    seeding, drawing views, the step, the epoch's one host sync, validation and checkpointing reads top to bottom;
    split into helpers, that order (which resuming and the ranks' lockstep depend on) would be spread out."""
    group = _RANKS
    rank, world = (group.rank, group.world) if group else (0, 1)
    lead = rank == 0
    for split, images in (("training", data.train), ("validation", data.val)):
        if len(images) == 0:  # an empty validation split never picks a best epoch: refuse before the first step
            raise EdgeKDError(f"{run_dir}: the {split} split of {data.name!r} is empty: add images, or change "
                              f"datasets.{data.name}.val_fraction or the variant")
    if cfg.batch_size < world:
        raise EdgeKDError(f"{run_dir}: batch_size {cfg.batch_size} is smaller than the {world} processes training "
                          "it: every process needs at least one image of each batch")
    if group and lead and group.on_start:
        group.on_start(ex)
    if not lead:
        log = _quiet
    if world > 1:
        ex = from_rank0(ex, rank)  # rank 0's numerics on every rank (a resumed run keeps its own)
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
    steps, epochs = cfg.steps_per_epoch(n), cfg.epochs_for(n)
    total, warmup = steps * epochs, int(round(cfg.warmup_epochs * steps))

    ckpt = {"epoch": 0, "best_val": -1.0, "best_epoch": -1, "history": [], "train_s": 0.0, "images": 0}
    best: dict[str, torch.Tensor] = {}
    if lead:
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
    forward, undo_bn, extra = model, [], [p for p in criterion.parameters() if p.requires_grad]
    if world > 1:
        forward, undo_bn, ckpt = _join(group, model, criterion, optimizer, ckpt, ex, log)
        stats = "the global batch" if group.global_bn else "each process's part of it"
        log(f"{world} processes ({_backend()}): global batch {bs}, {-(-bs // world)} or fewer per process; "
            f"BatchNorm statistics over {stats}")
    ckpt["compile"] = ex.compile if world == 1 else ""  # what trained, for the run's record
    if ckpt["compile"]:
        # dynamo would reuse an earlier training's compiled code for this architecture, whatever threads it was
        # compiled for; compiling again from the on-disk caches is the compile_s the choice counted
        torch._dynamo.reset()
        forward = ex.compiled(model)
    elif ex.compile:  # DDP under torch.compile was never measured here: eager, and the record says so
        log(f"torch.compile ({ex.compile}) is measured for one-process trainings: {world} processes train eagerly")

    last_loss = ckpt["history"][-1]["loss"] if ckpt["history"] else None
    saved_at = None  # time.monotonic() of this process's last checkpoint
    try:
        for epoch in range(ckpt["epoch"], epochs):
            torch.manual_seed(seed * 1000 + epoch)  # dropout and stochastic depth, replayable on resume
            order, views = augment.draw_epoch(n, seed, epoch)  # the global draw: the same on every rank
            order, views = order.to(device), views.to(device)
            model.train()
            sums: dict[str, torch.Tensor] = {}
            start = time.perf_counter()
            for i in range(steps):
                batch = order[i * bs : (i + 1) * bs]
                idx = shard(batch, rank, world)
                v = views[idx]
                x = normalize(augment.apply(train_x[idx], v))
                y, mixed, lam = train_y[idx], None, 1.0
                if cfg.mix:  # the student and an online teacher see this mixed batch, both of them
                    x, partner, lam = mix_batch(x, cfg.mix, cfg.mix_alpha, step_seed(seed, epoch, i * world + rank))
                    mixed = y[partner]
                x = x.contiguous(memory_format=ex.memory_format())
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr * lr_factor(epoch * steps + i, total, warmup)
                with ex.autocast():
                    logits = forward(x)
                teacher_logits = teacher.outputs(idx, v, x) if teacher is not None else None
                parts = criterion(StepOutputs(logits, y, teacher_logits, tap.outputs if tap else {},
                                              getattr(teacher, "features", {}), (epoch * steps + i) / total,
                                              mixed, lam))
                optimizer.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients: weighting each rank's mean loss by its share of the batch
                # makes that average the gradient of the global batch's mean loss, parts of unequal size too.
                loss = parts["loss"] if world == 1 else parts["loss"] * (len(idx) * world / len(batch))
                loss.backward()
                if world > 1 and extra:
                    _average_gradients(extra, world)
                optimizer.step()
                for k, value in parts.items():  # summed on device: no host sync per step
                    sums[k] = sums.get(k, 0) + value.detach() * len(idx)
                if on_step and lead and (i % 10 == 9 or i == steps - 1):
                    elapsed = time.perf_counter() - start
                    on_step(EpochReport(epoch, epochs, i + 1, steps, last_loss, (i + 1) * bs / max(elapsed, 1e-9)))
            if world > 1:
                sums = _sum_over_ranks(sums)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            epoch_s = time.perf_counter() - start
            seen = min(n, steps * bs)
            losses = {k: round(v.item() / seen, 5) for k, v in sums.items()}
            if not math.isfinite(losses["loss"]):  # once an epoch, on every rank: a per-step check syncs the GPU
                raise EdgeKDError(f"{run_dir}: training diverged in epoch {epoch + 1} (loss {losses['loss']}); "
                                  "lower the learning rate or the loss weights, or ramp the distillation term in, "
                                  "e.g. dkd = { weight = 1.0, ramp = 0.1 }")
            ckpt["epoch"], last_loss = epoch + 1, losses["loss"]
            if not lead:
                continue
            val_acc = accuracy(predict(model, data.val.images.to(device), normalize, ex, eval_batch_size),
                               data.val.labels)
            record = {"epoch": epoch + 1, "val_acc": round(val_acc, 5), "epoch_s": round(epoch_s, 2),
                      "images_per_s": round(seen / epoch_s, 1), **losses,
                      **({"processes": world} if world > 1 else {})}
            ckpt["history"].append(record)
            ckpt["train_s"] += epoch_s
            ckpt["images"] += seen
            if val_acc > ckpt["best_val"]:
                ckpt["best_val"], ckpt["best_epoch"] = val_acc, epoch + 1
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if epoch + 1 in snapshots:  # before the checkpoint: a run resumed after it has its snapshot
                save_tensors(snapshot_path(run_dir, epoch + 1), model.state_dict())
            if saved_at is None or time.monotonic() - saved_at >= CHECKPOINT_EVERY_S:
                opt_tensors, ckpt["optimizer"] = _flatten_optimizer(optimizer)
                save_tensors(run_dir / f"{CHECKPOINT}.safetensors",
                             {**{f"model.{k}": v for k, v in model.state_dict().items()},
                              **{f"criterion.{k}": v for k, v in criterion.state_dict().items()},
                              **{f"best.{k}": v for k, v in best.items()}, **opt_tensors})
                write_json(run_dir / f"{CHECKPOINT}.json", {**ckpt, "execution": asdict(ex)})
                saved_at = time.monotonic()
            log(" ".join(f"{k}={v}" for k, v in record.items()))
    finally:
        for layer in undo_bn:
            del layer.forward
        if tap:
            tap.remove()
    fills = getattr(teacher, "fills", None)  # a teacher cache: outputs it had to compute on the spot
    if fills is not None:
        if world > 1:
            fills = int(_sum_over_ranks({"fills": torch.tensor(float(fills), device=device)})["fills"])
        if fills:
            log(f"{fills:,} teacher outputs computed live: (image, view) pairs the cache's plan did not foresee")
    if not lead:
        raise FollowerDone
    model.load_state_dict(best)
    return ckpt


def _quiet(line: str) -> None:
    pass


def _backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())


def _join(group: Ranks, model: nn.Module, criterion: ComposedLoss, optimizer: torch.optim.Optimizer, ckpt: dict,
          ex: Execution, log: Callable[[str], None]):
    """Start every rank from rank 0's state (fresh or resumed) and wrap the model for DistributedDataParallel;
    returns the wrapper, the BatchNorm layers to restore afterwards, and rank 0's checkpoint dict."""
    from torch.nn.parallel import DistributedDataParallel

    rank, state = group.rank, None
    if rank == 0:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        state = {"ckpt": ckpt, "model": _cpu(model.state_dict()), "criterion": _cpu(criterion.state_dict()),
                 "optimizer": _cpu(opt_tensors), "optimizer_meta": opt_meta}
    state = from_rank0(state, rank)
    if rank != 0:
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        _restore_optimizer(optimizer, state["optimizer"], state["optimizer_meta"])
    undo_bn: list[nn.Module] = []
    if group.global_bn:
        undo_bn, unknown = _globalise_batch_norm(model, None)  # None: the default process group
        if unknown:
            log(f"{unknown} BatchNorm layers of a kind edgekd does not know normalise with each process's part")
    device_ids = None
    if ex.device.startswith("cuda"):  # the worker makes each rank's GPU the current one
        index = torch.device(ex.device).index
        device_ids = [torch.cuda.current_device() if index is None else index]
    wrapped = DistributedDataParallel(model, device_ids=device_ids)  # buffers: rank 0's, at every forward
    return wrapped, undo_bn, state["ckpt"]


def _sum_over_ranks(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    keys = list(sums)  # the same order on every rank: the same loss terms, added in the same order
    flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).reshape(()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind(), strict=True))


def multilabel_metrics(test: torch.Tensor, val: torch.Tensor, data: DataSplits,
                       teacher_test_logits: torch.Tensor | None) -> dict:
    """A multi-label model's record: macro AUC in the places top-1 accuracy has (test_acc, val_acc: what checkpoints,
    KD gains and the report use, named by `metric`), mAP, and each class's AUC and AP."""
    t, y = test.float().numpy(), data.test.labels.numpy()
    metrics = {"metric": metric_name(y), "test_acc": round(score(t, y), 5),
               "val_acc": round(score(val.float().numpy(), data.val.labels.numpy()), 5),
               "test_map": round(mean_average_precision(t, y), 5),
               "per_class_test_auc": {c: None if v is None else round(v, 5)
                                      for c, v in zip(data.classes, per_class(roc_auc, t, y), strict=True)},
               "per_class_test_ap": {c: None if v is None else round(v, 5)
                                     for c, v in zip(data.classes, per_class(average_precision, t, y), strict=True)},
               "label_cardinality": round(float(y.sum(1).mean()), 3)}
    if teacher_test_logits is not None and teacher_test_logits.shape == test.shape:
        # per (image, class) decision
        metrics["teacher_agreement"] = round(agreement(t, teacher_test_logits.float().numpy(), True), 5)
    return metrics


def evaluate(model: nn.Module, data: DataSplits, ex: Execution, batch_size: int,
             teacher_test_logits: torch.Tensor | None = None, extra_tests: dict | None = None,
             variant_stats: dict | None = None) -> tuple[dict, torch.Tensor]:
    """Test and validation metrics of a trained model (and on a variant's extra test sets), and its test logits."""
    normalize = Normalize(data.mean, data.std, ex.device)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return predict(model, images.to(ex.device), normalize, ex, batch_size)

    test, val = logits_of(data.test.images), logits_of(data.val.images)
    if data.multilabel:
        return multilabel_metrics(test, val, data, teacher_test_logits), test
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
