"""Zero-shot classification: class prompts to a classifier, images to logits, through a scorer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlhub.data.pair_source import PairSource
from vlhub.eval.image_batches import iter_labelled_batches
from vlhub.eval.scoring import EmbeddingScorer
from vlhub.eval.sharding import gather_rows, sum_over_ranks


def build_zero_shot_classifier(
    model, class_names: list[str], templates: list[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """[D, C]: CLIP's classifier, per class the mean of the normalised template embeddings."""
    return EmbeddingScorer(model).build_classifier(class_names, templates, device, batch_size)


@torch.no_grad()
def compute_image_logits(
    score: Callable[[torch.Tensor], torch.Tensor],
    source: PairSource,
    transform,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``score(images)`` logits [N, C] (fp32, CPU), targets [N], and how many unreadable images were skipped.

    Under a process group each rank scores its share and every rank returns the whole set's."""
    logits, targets, skipped = [], [], 0
    for images, labels, bad in iter_labelled_batches(source, transform, batch_size, workers):
        skipped += bad
        if len(labels) == 0:
            continue
        logits.append(score(images.to(device)).float().cpu())
        targets.append(labels)
    all_logits, all_targets, skipped = gather_rows(logits), gather_rows(targets), sum_over_ranks(skipped)
    if all_logits is None:
        raise ValueError(f"no readable images to evaluate ({skipped} unreadable)")
    return all_logits, all_targets, skipped
