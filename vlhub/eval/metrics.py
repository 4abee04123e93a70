"""Classification metrics on logits, as CLIP_benchmark defines them."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the ``k`` highest logits (k capped at #classes)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    return hits.float().mean().item()


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Balanced accuracy: the mean over classes that occur in ``targets`` of their recall."""
    classes = targets.unique()
    recalls = [(predictions[targets == c] == c).float().mean() for c in classes]
    return torch.stack(recalls).mean().item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}-top1": topk_accuracy(logits, targets, 1),
        f"{prefix}-top5": topk_accuracy(logits, targets, 5),
        f"{prefix}-mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), targets),
    }
