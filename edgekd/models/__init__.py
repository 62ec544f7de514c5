"""Teachers and students: any timm model by name, adapted to the dataset's classes, channels and image size."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.errors import EdgeKDError
from edgekd.runio import load_tensors, tensor_metadata


def _names_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekd" / "timm-models.json"


def model_names() -> frozenset[str]:
    """Every model name timm knows (with any this module registers). `import timm` costs seconds (it imports
    torchvision), which `edgekd check` should not spend on a list that changes only with timm or this file, so
    the list is kept in the user's cache keyed by both; once timm is imported anyway, it is asked directly."""
    from importlib.metadata import version

    if "timm" in sys.modules:
        return frozenset(sys.modules["timm"].list_models())
    key = f"timm {version('timm')}, {hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}"
    try:
        cached = json.loads(_names_cache().read_text())
        if cached["key"] == key:
            return frozenset(cached["names"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or of another layout: rebuild it
        pass
    import timm

    names = sorted(timm.list_models())
    try:
        _names_cache().parent.mkdir(parents=True, exist_ok=True)
        _names_cache().write_text(json.dumps({"key": key, "names": names}))
    except OSError:  # a read-only home only costs the next check the import again
        pass
    return frozenset(names)


def unknown_model(name: str) -> str | None:
    """Why `name` is no timm model (with the closest names), or None when it is one."""
    names = model_names()
    if name.split(".", 1)[0] in names:  # as timm.is_model: a pretrained tag (resnet18.a1_in1k) names its model
        return None
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for valid names"
    return f"unknown model {name!r}: {hint}"


def create_model(name: str, num_classes: int, in_chans: int, small_input: bool = True,
                 pretrained: bool = False) -> nn.Module:
    import timm

    problem = unknown_model(name)
    if problem:
        raise EdgeKDError(problem)
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
        state = load_tensors(path, fix="give a complete .safetensors file (copy it again, or retrain the run it "
                                      "comes from)")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EdgeKDError(
                f"checkpoint {str(path)!r} cannot be read with weights_only=True ({type(exc).__name__}): it is "
                "damaged, or pickles more than weights; save it as safetensors or as a plain state_dict"
            ) from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EdgeKDError(f"checkpoint {str(path)!r} holds no state_dict (names to tensors): save the model's "
                          "state_dict() there, e.g. with safetensors.torch.save_file")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into `model`; a pruned model's file (edgekd.models.pruning) first reshapes the layers."""
    state = read_state_dict(path)
    if Path(path).suffix == ".safetensors" and "pruned" in tensor_metadata(Path(path).expanduser()):
        from edgekd.models.pruning import fit_to_weights

        fit_to_weights(model, {k: list(v.shape) for k, v in state.items()})
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
