"""DCL: decoupled contrastive loss, the positive pair removed from the denominator (Yeh et al. 2022).

Departs from the paper: applied image-text (both directions) with CLIP's learnable temperature, where
the paper trains SimCLR-style image views at a fixed temperature; its weighted variant (DCLW) is not offered.
"""

from __future__ import annotations

import torch
from torch import nn

from vlhub.objectives.clip import ContrastiveObjective, weighted_directions
from vlhub.objectives.tiled import tiled_softmax_loss
from vlhub.registry import OBJECTIVES


def decoupled_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -logit_ii + logsumexp_{j != i} logit_ij."""
    positives = logits.diagonal()
    negatives = logits.masked_fill(torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device), float("-inf"))
    return (negatives.logsumexp(dim=1) - positives).mean()


@OBJECTIVES.register("dcl")
class DclObjective(ContrastiveObjective):
    """CLIP's two directions, each with the decoupled loss; ``image_weight`` / ``text_weight`` as in clip."""

    supports_loss_tiles = True  # the tiled softmax leaves the pair out of each denominator (``decoupled``)

    def __init__(self, image_weight: float = 0.5, text_weight: float = 0.5, **contrastive) -> None:
        super().__init__(**contrastive)
        self.image_weight, self.text_weight = image_weight, text_weight

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = self.gather_all(reps["image_features"], reps["text_features"])
        scale = model.temperature_scale()
        if self.loss_tiles is None:
            logits_per_image = scale * image @ text.T
            image_to_text, text_to_image = decoupled_loss(logits_per_image), decoupled_loss(logits_per_image.T)
        else:
            image_to_text, text_to_image = tiled_softmax_loss(image, text, scale, self.loss_tiles, decoupled=True)
        return weighted_directions(image_to_text, text_to_image, self.image_weight, self.text_weight)
