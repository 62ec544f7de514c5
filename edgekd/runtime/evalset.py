"""The bundle's own evaluation data (eval.npz) and the score of any runner on it (top-1 accuracy; macro AUC for
multi-label data); numpy only.

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


def is_multilabel(labels) -> bool:
    """Labels [N, classes] of 0/1 (a set of classes per image: a mosaic's tile classes, an X-ray's findings), not [N]
    class indices; numpy arrays and torch tensors alike. The one place the task is read off the labels."""
    return np.ndim(labels) == 2


def metric_name(labels: np.ndarray) -> str:
    """What `score` measures for these labels, as records and the report name it."""
    return "macro AUC" if is_multilabel(labels) else "accuracy"


def score(logits: np.ndarray, labels: np.ndarray) -> float:
    """The task's figure of merit: top-1 accuracy, or for multi-label data the macro ROC AUC over the classes (the
    ChestX-ray14 / CheXpert convention): checkpoints are chosen, KD gains paired and exports compared by it."""
    return macro_auc(logits, labels) if is_multilabel(labels) else accuracy(logits, labels)


def decisions(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    """What a model answers: its top-1 class per image, or per (image, class) whether the class is present
    (logit > 0, i.e. sigmoid > 0.5). The INT8 guard and export parity count these changing."""
    return logits > 0 if multilabel else logits.argmax(1)


def agreement(logits: np.ndarray, reference: np.ndarray, multilabel: bool) -> float:
    """The share of `reference`'s answers (decisions) that `logits` gives too: top-1, or per (image, class)."""
    return float((decisions(logits, multilabel) == decisions(reference, multilabel)).mean())


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of one class (Mann-Whitney U / (n+ n-), ties counted half); None without both
    positives and negatives."""
    positive = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    return float((_ranks(np.asarray(scores, dtype=np.float64))[positive].sum() - n_pos * (n_pos + 1) / 2)
                 / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Average precision of one class, sum_n (R_n - R_n-1) P_n over the distinct score thresholds (scikit-learn's
    definition, no interpolation); None without positives."""
    positive = np.asarray(positive).astype(bool)
    if not positive.any():
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, hit = np.asarray(scores, dtype=np.float64)[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each distinct threshold
    tp = np.cumsum(hit)[last]
    precision, recall = tp / (last + 1), tp / positive.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class(metric, logits: np.ndarray, labels: np.ndarray) -> list[float | None]:
    return [metric(logits[:, c], labels[:, c]) for c in range(labels.shape[1])]


def macro_auc(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean ROC AUC over the classes that have positives and negatives; NaN if none has."""
    values = [v for v in per_class(roc_auc, logits, labels) if v is not None]
    return float(np.mean(values)) if values else float("nan")


def mean_average_precision(logits: np.ndarray, labels: np.ndarray) -> float:
    values = [v for v in per_class(average_precision, logits, labels) if v is not None]
    return float(np.mean(values)) if values else float("nan")
