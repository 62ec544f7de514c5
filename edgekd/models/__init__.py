"""Teachers and students: any timm model by name, adapted to the dataset's classes, channels and image size."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.errors import EdgeKDError


def create_model(name: str, num_classes: int, in_chans: int, small_input: bool = True,
                 pretrained: bool = False) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for valid names"
        raise EdgeKDError(f"unknown model {name!r}: {hint}")
    try:
        # exportable: timm picks ONNX-friendly layer variants (no in-place tricks, static padding)
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                  exportable=True)
    except Exception as exc:  # timm's download and cache errors come in many types
        if pretrained:
            raise EdgeKDError(
                f"pretrained weights for {name!r} are not available here ({type(exc).__name__}): put them in the "
                f"Hugging Face cache, or set pretrained = false, or give a local checkpoint"
            ) from None
        raise
    if small_input and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file, or a .pth/.pt read with weights_only=True: nothing is unpickled."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgeKDError(f"checkpoint {str(path)!r} not found: fix the path in teacher.checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EdgeKDError(
                f"checkpoint {str(path)!r} cannot be read with weights_only=True ({type(exc).__name__}): "
                "save it as safetensors or as a plain state_dict"
            ) from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise EdgeKDError(
            f"checkpoint {str(path)!r} does not fit the model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} mis-shaped keys): check teacher.model, the dataset's classes and "
            "channels, and small_input"
        )
    model.load_state_dict(state)
    return model
