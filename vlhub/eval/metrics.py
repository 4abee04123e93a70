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


def balanced_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Same as :func:`mean_per_class_recall` (sklearn's ``balanced_accuracy_score``)."""
    return mean_per_class_recall(predictions, targets)


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def row_normalise(confusion: torch.Tensor) -> torch.Tensor:
    """Each row divided by its support (rows of classes with no images stay 0)."""
    support = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    return confusion.double() / support


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # Undefined (0/0) is NaN, not 0: a class that never occurs has no recall, one never predicted no precision.
    ratio = numerator.double() / denominator.double()
    return torch.where(denominator > 0, ratio, torch.full_like(ratio, float("nan")))


def per_class_table(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per class (aligned with the logits' columns): support, predicted, top-1/top-5 accuracy, P, R, F1.

    ``accuracy`` is top-1 accuracy on the class's own images (equal to its recall), ``top5_accuracy``
    the same for top-5. Undefined values (0/0) are NaN, as sklearn's ``zero_division=nan``.
    """
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(predictions, targets, num_classes)
    true_positive = confusion.diagonal()
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    top5 = (logits.topk(min(5, num_classes), dim=1).indices == targets[:, None]).any(dim=1)
    top5_hits = torch.bincount(targets[top5].long(), minlength=num_classes)
    precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
    # F1 = 2TP / (2TP + FP + FN): defined (0) for a class that is predicted but never a target.
    f1 = _ratio(2 * true_positive, support + predicted)
    return {
        "support": support,
        "predicted": predicted,
        "accuracy": recall,
        "top5_accuracy": _ratio(top5_hits, support),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def most_confused_pairs(confusion: torch.Tensor, k: int = 20) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal cells as (true, predicted, count), largest first; ties by index."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    cells = [(int(off[t, p]), t, p) for t, p in off.nonzero().tolist()]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [(t, p, count) for count, t, p in cells[:k]]
