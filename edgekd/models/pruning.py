"""Structured channel pruning of a trained student with Torch-Pruning, and loading a pruned student's weights.

Torch-Pruning (`torch-pruning`) traces the model once, finds every group of coupled channels (a residual sum ties
the convolutions feeding it; a depthwise convolution ties its input and output) and removes the same channels
from every layer of a group, so the pruned model is a smaller dense model any runtime speeds up on. We use its
group magnitude importance (L2 over each group's weights) and prune the same fraction of every group, the
classifier's outputs (the classes) excepted.

A pruned model is not what `create_model` builds, and Torch-Pruning's own save format pickles whole modules. So a
pruned model's weights file says it is pruned (safetensors metadata `pruned`), and `fit_to_weights` reshapes a
freshly created model's layers to the file's tensor shapes before the weights are loaded: the shapes of a conv's,
batch norm's or linear layer's tensors determine the layer (a depthwise conv stays depthwise).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgekd.errors import EdgeKDError

PRUNED = "pruned"  # safetensors metadata key: the fraction of channels removed, as text


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise EdgeKDError("compress.prune needs Torch-Pruning: pip install 'edgekd[train]' (torch-pruning)") from None
    return torch_pruning


def prune_channels(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """Remove `ratio` of the channels of every prunable group of `model` (in place; returned), by group L2
    magnitude. The classifier keeps its outputs, the stem its inputs."""
    if not 0.0 < ratio < 1.0:
        raise EdgeKDError(f"compress.prune = {ratio}: give the fraction of channels to remove, between 0 and 1")
    tp = _torch_pruning()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None  # timm's API
    ignored = [m for m in (classifier,) if isinstance(m, nn.Module)]
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False)
    pruner.step()
    model.train(was_training)
    return model


def _replace(module: nn.Module, name: str, shape: list[int]) -> None:
    """Give `module.name` (a parameter or buffer) a new, uninitialised tensor of `shape`; values come from the file."""
    old = getattr(module, name)
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new)


def fit_to_weights(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Reshape the conv, batch-norm and linear layers of a freshly created `model` to the tensor `shapes` of a
    pruned model's weights file (names as in its state_dict). Layers whose shapes already agree are left alone."""
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        key = {name: f"{prefix}.{name}" if prefix else name for name in own}
        changed = {n: shapes[k] for n, k in key.items() if k in shapes and list(own[n].shape) != shapes[k]}
        if not changed:
            continue
        for name, shape in changed.items():
            _replace(module, name, shape)
        if isinstance(module, nn.Conv2d):
            out, per_group = module.weight.shape[:2]
            depthwise = module.groups > 1 and module.groups == module.in_channels
            module.groups = out if depthwise else module.groups
            module.out_channels, module.in_channels = out, per_group * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = module.weight.shape[0] if module.weight is not None else module.running_mean.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        else:
            raise EdgeKDError(f"pruned weights reshape {prefix or 'the model'} ({type(module).__name__}), which "
                              "edgekd cannot rebuild: prune models of convolutions, batch norms and linear layers")
    return model
