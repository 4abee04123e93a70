"""SLIP: CLIP plus SimCLR on two augmented views of the image (Mu et al. 2021).

CLIP's term uses the first view; SimCLR's projector (BatchNorm, on the gathered batch) and
NT-Xent at ``ssl_temperature`` (0.1) use both. ``clip_weight`` and ``ssl_weight`` weight them.
"""

from __future__ import annotations

import torch
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.clip import ClipObjective
from vlhub.objectives.ssl import SimclrHead
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("slip")
class SlipObjective(ClipObjective):
    image_views = 2

    def __init__(
        self,
        clip_weight: float = 1.0,
        ssl_weight: float = 1.0,
        ssl_projection_dim: int = 256,
        ssl_hidden_dim: int | None = None,
        ssl_temperature: float = 0.1,
        **clip,
    ) -> None:
        super().__init__(**clip)
        self.clip_weight, self.ssl_weight = clip_weight, ssl_weight
        self.ssl_projection_dim, self.ssl_hidden_dim, self.ssl_temperature = (
            ssl_projection_dim,
            ssl_hidden_dim,
            ssl_temperature,
        )
        self.ssl_head: SimclrHead | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        if self.ssl_head is None:
            self.ssl_head = SimclrHead(
                model.image_tower.output_dim, self.ssl_projection_dim, self.ssl_hidden_dim, self.ssl_temperature
            )

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=torch.cat([batch["image"], batch["image_view2"]]), text=batch["text"])
        view1, view2 = out["image_features"].chunk(2)
        reps = {"image_features": view1, "text_features": out["text_features"]}
        normalized = {k: torch.nn.functional.normalize(v, dim=-1) for k, v in reps.items()}
        return {**normalized, "view1_features": view1, "view2_features": view2}

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        parts = super().loss(reps, model)
        ssl = self.ssl_head(*self.gather_all(reps["view1_features"], reps["view2_features"]))
        contrastive = parts["loss"]
        return {
            **parts,
            "loss": self.clip_weight * contrastive + self.ssl_weight * ssl,
            "contrastive_loss": contrastive.detach(),
            "ssl_loss": ssl.detach(),
        }
