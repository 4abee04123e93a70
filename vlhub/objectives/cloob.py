"""CLOOB-style projections: separate latent projections for the two directions.

As x_clip's ``extra_latent_projection``: text-to-image logits compare the towers' embeddings,
image-to-text logits compare a second pair of projections of them (here square heads the
objective owns, on the pooled embeddings, initialised to the identity so training starts as
CLIP). Zero-shot classifies an image against texts, so it scores in the image-to-text space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.eval.scoring import EmbeddingScorer, Scoring
from vlhub.objectives.clip import ContrastiveObjective, weighted_directions
from vlhub.registry import OBJECTIVES


def _identity_head(dim: int) -> nn.Linear:
    head = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim))
    return head


@OBJECTIVES.register("cloob")
class CloobObjective(ContrastiveObjective):
    supports_loss_tiles = True  # two softmax cross-entropies, one per direction, each tiled by rows

    def __init__(self, image_weight: float = 0.5, text_weight: float = 0.5, **contrastive) -> None:
        super().__init__(**contrastive)
        self.image_weight, self.text_weight = image_weight, text_weight
        self.image_extra: nn.Linear | None = None
        self.text_extra: nn.Linear | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        if self.image_extra is None:
            self.image_extra = _identity_head(model.embed_dim)
            self.text_extra = _identity_head(model.embed_dim)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"])
        image, text = out["image_features"], out["text_features"]
        return {
            "image_features": F.normalize(image, dim=-1),
            "text_features": F.normalize(text, dim=-1),
            "image_extra": F.normalize(self.image_extra(image), dim=-1),
            "text_extra": F.normalize(self.text_extra(text), dim=-1),
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text, image_extra, text_extra = self.gather_all(
            reps["image_features"], reps["text_features"], reps["image_extra"], reps["text_extra"]
        )
        scale = model.temperature_scale()
        image_to_text = self.row_cross_entropy(image_extra, text_extra, scale)
        text_to_image = self.row_cross_entropy(text, image, scale)
        return weighted_directions(image_to_text, text_to_image, self.image_weight, self.text_weight)

    def scoring(self, model: nn.Module) -> Scoring:
        return Scoring(zero_shot=EmbeddingScorer(model, text_head=self.text_extra, image_head=self.image_extra))
