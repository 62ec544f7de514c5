"""Run directories: atomic JSON and safetensors writes, and the layout every stage agrees on.

`<out>/<study>/<dataset>/<variant>/<role>/seed<k>/` holds profile.json, metrics.json, model.safetensors and
train.log. A file is written to a temporary name and renamed, so a killed job never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def run_dir(study_root: Path, dataset: str, variant: str, role: str, seed: int) -> Path:
    return study_root / dataset / variant / role / f"seed{seed}"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    _atomic(Path(path), write)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses views that share storage; contiguous copies are cheap at these sizes.
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)
