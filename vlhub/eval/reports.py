"""Extended classification metrics on disk: confusion matrices, per-class table, confused pairs, plot.

Written per task into ``<run dir>/eval/<task>/`` (the task's ``output_dir``):

- ``confusion_matrix.csv`` counts and ``confusion_matrix_normalized.csv`` row-normalised, both
  with class names as row and column labels (row = true class, column = predicted);
- ``per_class.csv``: one row per class, aligned with the classifier's columns;
- ``confused_pairs.csv``: the 20 largest off-diagonal cells;
- ``summary.json``: top-1, top-5, balanced accuracy, counts;
- ``confusion_matrix.png``: the heatmap (only the most-confused classes when there are many).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from vlhub.eval.metrics import (
    balanced_accuracy,
    confusion_matrix,
    most_confused_pairs,
    per_class_table,
    row_normalise,
    topk_accuracy,
)
from vlhub.eval.plots import plot_confusion_matrix

NUM_CONFUSED_PAIRS = 20
PER_CLASS_COLUMNS = ("support", "predicted", "accuracy", "top5_accuracy", "precision", "recall", "f1")


def _number(value: float) -> str:
    # Undefined entries are left empty rather than written as 0, which would read as "always wrong".
    return "" if math.isnan(value) else f"{value:.6g}"


def write_matrix_csv(path: Path, matrix: torch.Tensor, class_names: list[str], as_int: bool) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix.tolist(), strict=True):
            writer.writerow([name, *(str(int(v)) if as_int else _number(v) for v in row)])


def write_per_class_csv(path: Path, table: dict[str, torch.Tensor], class_names: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_index", "class_name", *PER_CLASS_COLUMNS])
        columns = [table[key].tolist() for key in PER_CLASS_COLUMNS]
        for index, name in enumerate(class_names):
            values = [column[index] for column in columns]
            writer.writerow([index, name, int(values[0]), int(values[1]), *(_number(v) for v in values[2:])])


def write_confused_pairs_csv(path: Path, confusion: torch.Tensor, class_names: list[str]) -> None:
    support = confusion.sum(dim=1)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["rank", "true_index", "true_name", "predicted_index", "predicted_name", "count", "fraction_of_true"]
        )
        for rank, (true, predicted, count) in enumerate(most_confused_pairs(confusion, NUM_CONFUSED_PAIRS), 1):
            writer.writerow(
                [
                    rank,
                    true,
                    class_names[true],
                    predicted,
                    class_names[predicted],
                    count,
                    f"{count / int(support[true]):.6g}",
                ]
            )


def write_classification_report(
    output_dir: Path, logits: torch.Tensor, targets: torch.Tensor, class_names: list[str], title: str
) -> dict[str, float]:
    """Write every extended-metric file for one task; returns the summary it wrote."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(predictions, targets, len(class_names))
    normalised = row_normalise(confusion)
    write_matrix_csv(output_dir / "confusion_matrix.csv", confusion, class_names, as_int=True)
    write_matrix_csv(output_dir / "confusion_matrix_normalized.csv", normalised, class_names, as_int=False)
    write_per_class_csv(output_dir / "per_class.csv", per_class_table(logits, targets), class_names)
    write_confused_pairs_csv(output_dir / "confused_pairs.csv", confusion, class_names)
    summary = {
        "top1": topk_accuracy(logits, targets, 1),
        "top5": topk_accuracy(logits, targets, 5),
        "balanced_accuracy": balanced_accuracy(predictions, targets),
        "num_samples": len(targets),
        "num_classes": len(class_names),
        "classes_with_images": int((confusion.sum(dim=1) > 0).sum()),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_confusion_matrix(output_dir / "confusion_matrix.png", confusion, class_names, title)
    return summary
