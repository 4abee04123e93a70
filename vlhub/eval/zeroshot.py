"""Zero-shot classification through ``encode_image`` / ``encode_text`` only."""

from __future__ import annotations

import torch

from vlhub.data.sources import PairSource
from vlhub.eval.images import iter_labelled_batches


@torch.no_grad()
def build_zero_shot_classifier(
    model, class_names: list[str], templates: list[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """[D, C]: per class, the mean of the normalised template embeddings, renormalised."""
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(texts[start : start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens, normalize=True).float())
    per_template = torch.cat(embeddings).view(len(class_names), len(templates), -1)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1).T


@torch.no_grad()
def compute_image_logits(
    model,
    classifier: torch.Tensor,
    source: PairSource,
    transform,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """100 x cosine logits [N, C], targets [N], and how many unreadable images were skipped."""
    logits, targets, skipped = [], [], 0
    for images, labels, bad in iter_labelled_batches(source, transform, batch_size, workers):
        skipped += bad
        if len(labels) == 0:
            continue
        features = model.encode_image(images.to(device), normalize=True).float()
        logits.append(100.0 * features @ classifier)
        targets.append(labels)
    return torch.cat(logits).cpu(), torch.cat(targets), skipped
