"""The bundle's own evaluation data (eval.npz) and the accuracy of any runner on it; numpy only.

Layering: edgekd.runtime. `edgekd export` writes eval.npz and scores each exported model with these functions,
`edgekd bench` reads it back and scores them again on the device: one normalisation, so the two agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.runtime.manifest import bundle_file


def normalize(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 NCHW images as the model takes them: x / 255, then (x - mean) / std per channel, float32."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((images.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


def load_eval(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's evaluation images (uint8 NCHW) and labels; a missing or damaged eval.npz is a one-line error."""
    path = bundle_file(bundle, "eval.npz", "the evaluation data")
    if not path.is_file():
        raise EdgeKDError(f"{path} is missing: run `edgekd export` again for this bundle")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["images"], data["labels"]
    except (OSError, ValueError, KeyError, EOFError) as exc:  # truncated zip, not an npz, arrays missing
        raise EdgeKDError(f"{path} is damaged ({type(exc).__name__}): run `edgekd export` again for this "
                          "bundle") from None


def predict(runner, images: np.ndarray, mean, std, batch_size: int = 256) -> np.ndarray:
    """Logits of any runner (its `infer`) on raw images, normalised batch by batch, in batches the runner takes
    (an engine built for batches up to 64 cannot take 256)."""
    batch_size = min(batch_size, getattr(runner, "max_batch", None) or batch_size)
    out = [runner.infer(normalize(images[i : i + batch_size], mean, std)) for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; NaN for no images."""
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")
