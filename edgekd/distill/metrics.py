"""Accuracy beyond top-1: balanced accuracy, head/tail accuracy, worst-group accuracy, calibration (ECE)."""

from __future__ import annotations

import torch


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    pred, labels = logits.argmax(1), labels.cpu()
    result = []
    for c in range(num_classes):
        mask = labels == c
        result.append(round((pred[mask] == c).float().mean().item(), 5) if mask.any() else None)
    return result


def balanced_accuracy(per_class: list[float | None]) -> float:
    present = [a for a in per_class if a is not None]
    return sum(present) / len(present) if present else float("nan")


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    probs = logits.float().softmax(1)
    confidence, pred = probs.max(1)
    correct = (pred == labels.cpu()).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return ece


def head_tail_accuracy(per_class: list[float | None], train_counts: list[int]) -> dict:
    """Mean accuracy over the third of classes with the most training samples (head) and the fewest (tail)."""
    order = sorted(range(len(train_counts)), key=lambda c: -train_counts[c])
    third = max(1, len(order) // 3)
    pick = lambda cs: balanced_accuracy([per_class[c] for c in cs])  # noqa: E731
    return {"head_acc": pick(order[:third]), "tail_acc": pick(order[-third:])}


def worst_group_accuracy(aligned: tuple[torch.Tensor, torch.Tensor],
                         conflicting: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> float:
    """Minimum accuracy over the groups (class, cue agrees / cue conflicts)."""
    groups = []
    for logits, labels in (aligned, conflicting):
        groups += [a for a in per_class_accuracy(logits, labels, num_classes) if a is not None]
    return min(groups)
