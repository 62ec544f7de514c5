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

from edgekd.errors import EdgeKDError

# The files every stage agrees on, named once.
RUN_PROFILE = "profile.json"  # a run's resolved profile, job and data description, written when it starts
METRICS = "metrics.json"  # a training's (or teacher cache's) record: written last, so its presence means done
WEIGHTS = "model.safetensors"  # the weights chosen on the validation split
PREDICTIONS = "predictions.safetensors"  # test logits
CHECKPOINTS = ("checkpoint.json", "checkpoint.safetensors")  # an unfinished training's last epoch
TRAIN_LOG = "train.log"
BUNDLE = "bundle"  # a student's deployable bundle, a directory in its run directory
MANIFEST = "manifest.json"  # the bundle's record
EXPLAIN_RECORD = "explain.json"
ERROR_LOG = "error.log"  # a failed job's traceback, beside its record
RUN_DEPTH = 4  # <dataset>/<variant>/<role>/seed<k>: how far a run directory sits below its study root


def run_dir(study_root: Path, dataset: str, variant: str, role: str, seed: int) -> Path:
    return study_root / dataset / variant / role / f"seed{seed}"


def study_root_of(run: Path) -> Path:
    """The study root a run directory sits in (the inverse of run_dir); a directory too shallow is its own root."""
    run = Path(run)
    return run.parents[RUN_DEPTH - 1] if len(run.parents) >= RUN_DEPTH else run


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


class UnreadableFile(EdgeKDError):
    """A file handed in (by a user, or by an earlier run) that is missing, corrupt, truncated or of another kind.

    Callers that can recompute what the file holds (a run's outputs) catch this one; everyone else lets it reach
    the CLI as a one-line error.
    """


REMAKE = "make it again with the edgekd command that wrote it, or restore it"  # when the caller knows no better


def _opened(path: Path, fix: str):
    """`open(path, "rb")`, with a missing file or a directory in its place as one UnreadableFile line."""
    try:
        return open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise UnreadableFile(f"{path} cannot be opened ({exc.strerror}): {fix}") from None


def read_json(path: Path, fix: str = REMAKE) -> Any:
    """A JSON file; anything else there (empty, cut short, binary) is an UnreadableFile naming it and `fix`."""
    with _opened(Path(path), fix) as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        reason = "not text"
    except json.JSONDecodeError as exc:
        reason = "empty" if not raw.strip() else f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    raise UnreadableFile(f"{path} is {reason}: {fix}")


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (views, or one module under two names: a PT2E graph's shared
    # observer); contiguous copies are cheap at these sizes, and a second name gets its own copy.
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    seen: set[int] = set()
    for k, v in tensors.items():
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _safetensors_errors() -> tuple[type[Exception], ...]:
    from safetensors import SafetensorError

    return SafetensorError, OSError  # OSError: the disk failed to read it


def load_tensors(path: Path, device: str = "cpu", fix: str = REMAKE) -> dict:
    """Every tensor of a safetensors file; a damaged or foreign file is an UnreadableFile naming it and `fix`."""
    from safetensors.torch import load_file

    path = Path(path)
    _opened(path, fix).close()
    try:
        return load_file(str(path), device=device)
    except _safetensors_errors() as exc:
        raise UnreadableFile(f"{path} is not a readable safetensors file ({_first_line(exc)}): {fix}") from None


def tensor_shapes(path: Path, fix: str = REMAKE) -> dict[str, list[int]]:
    """Names and shapes from a safetensors header, without reading the tensors: a cheap check that the file is
    whole (safetensors refuses a header whose tensors run past the end of the file)."""
    from safetensors import safe_open

    path = Path(path)
    _opened(path, fix).close()
    try:
        with safe_open(str(path), "numpy") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except _safetensors_errors() as exc:
        raise UnreadableFile(f"{path} is not a readable safetensors file ({_first_line(exc)}): {fix}") from None


def tensor_metadata(path: Path, fix: str = REMAKE) -> dict[str, str]:
    """The string metadata of a safetensors header (what wrote it, e.g. a pruned model's `pruned`)."""
    from safetensors import safe_open

    path = Path(path)
    _opened(path, fix).close()
    try:
        with safe_open(str(path), "numpy") as f:
            return dict(f.metadata() or {})
    except _safetensors_errors() as exc:
        raise UnreadableFile(f"{path} is not a readable safetensors file ({_first_line(exc)}): {fix}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.removeprefix("Error while deserializing header: ")[:160]


def sha256_file(path: Path) -> str:
    """Content hash of a file, read in chunks: bundles and engines are compared by content, not by time."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
