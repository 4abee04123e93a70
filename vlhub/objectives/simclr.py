"""SimCLR: image-only contrastive learning between two strong views (Chen et al. 2020).

Its only term sees the strong views ``image_view2`` and ``image_view3`` (``augment_views``); the
batch's base view ``image`` is drawn first as in every job (so these are the very views SLIP's SSL
term gets from the same seed) and not used.

Evaluated by linear probe and k-NN (``Scoring.probe``), never by reading features as logits.

Departs from the paper: the projector reads the image tower's projected embedding (the paper's reads
the encoder's features, as SLIP's does here); it trains with the run's optimizer (AdamW by default), not LARS.
"""

from __future__ import annotations

import torch
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.base import Objective
from vlhub.objectives.ssl import SimclrHead
from vlhub.parallel import collectives
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("simclr")
class SimclrObjective(Objective):
    """NT-Xent over the global batch's 2N views, on the image tower's embeddings through a projector.

    ``projection_dim`` is the projector's output; its input width is the image tower's, and its
    hidden width ``hidden_dim`` (null: the input width). The text tower, if any, is not used.
    """

    needs_text = False
    strong_views = 2
    min_global_batch = 2  # the other samples of the batch are the negatives

    def __init__(self, projection_dim: int = 128, hidden_dim: int | None = None, temperature: float = 0.1) -> None:
        super().__init__()
        self.projection_dim, self.hidden_dim, self.temperature = projection_dim, hidden_dim, temperature
        self.head: SimclrHead | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        if self.head is None:
            width = model.image_tower.output_dim
            self.head = SimclrHead(width, self.projection_dim, self.hidden_dim, self.temperature)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {
            "view2_features": model(image=batch["image_view2"])["image_features"],
            "view3_features": model(image=batch["image_view3"])["image_features"],
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        first = collectives.gather_features(reps["view2_features"])[0]
        second = collectives.gather_features(reps["view3_features"])[0]
        ssl = self.head(first, second)
        return {"loss": ssl, "ssl_loss": ssl.detach()}
