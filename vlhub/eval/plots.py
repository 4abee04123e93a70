"""The confusion-matrix heatmap, readable from 2 to 1000+ classes.

Up to ``MAX_SHOWN`` classes, every class is drawn. Beyond that, a 1000x1000 image is unreadable,
so only the classes involved in the most confusions are drawn, each confused pair next to each
other, with the full row's normalisation (a cell is still "fraction of this class's images").
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlhub.eval.metrics import most_confused_pairs, row_normalise

MAX_SHOWN = 40
ANNOTATE_UP_TO = MAX_SHOWN  # write counts in cells whenever every drawn class fits
LABEL_CHARS = 28


def select_classes(confusion: torch.Tensor, limit: int = MAX_SHOWN) -> list[int]:
    """All classes when few; else those of the most-confused pairs (pairs adjacent), then the least accurate."""
    num_classes = confusion.shape[0]
    if num_classes <= limit:
        return list(range(num_classes))
    chosen: list[int] = []
    for true, predicted, _ in most_confused_pairs(confusion, k=limit * limit):
        for c in (true, predicted):
            if c not in chosen and len(chosen) < limit:
                chosen.append(c)
        if len(chosen) >= limit:
            return chosen
    # Too few confusions to fill the plot: add the classes with the lowest recall (with images first).
    recall = row_normalise(confusion).diagonal()
    has_images = confusion.sum(dim=1) > 0
    order = sorted(range(num_classes), key=lambda c: (not bool(has_images[c]), float(recall[c]), c))
    chosen += [c for c in order if c not in chosen][: limit - len(chosen)]
    return chosen


def _label(name: str, index: int) -> str:
    short = name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"
    return f"{short} ({index})"


def plot_confusion_matrix(path: Path, confusion: torch.Tensor, class_names: list[str], title: str) -> list[int]:
    """Write the heatmap to ``path``; returns the class indices drawn, in drawing order."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    shown = select_classes(confusion)
    values = row_normalise(confusion)[shown][:, shown].numpy()
    counts = confusion[shown][:, shown].numpy()
    side = max(4.0, 0.3 * len(shown) + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=110)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [_label(class_names[c], c) for c in shown]
    ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(shown) <= ANNOTATE_UP_TO:
        for row in range(len(shown)):
            for col in range(len(shown)):
                if counts[row, col]:
                    colour = "white" if values[row, col] > 0.5 else "black"
                    ax.text(col, row, str(counts[row, col]), ha="center", va="center", fontsize=6, color=colour)
    subtitle = (
        f"all {len(class_names)} classes"
        if len(shown) == len(class_names)
        else f"the {len(shown)} most-confused of {len(class_names)} classes"
    )
    ax.set_title(f"{title}: {subtitle}\n(cell = fraction of the true class's images; numbers = counts)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return shown
