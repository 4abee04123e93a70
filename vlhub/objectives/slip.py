"""SLIP: CLIP on the base view plus SimCLR on two strong views of the image (Mu et al. 2021).

As the paper (and facebookresearch/SLIP): three views of each image. CLIP's term sees the base
view ``image`` (the run's ``augment``, as in every other objective); SimCLR's term sees the two
strong views ``image_view2`` and ``image_view3`` (``augment_views``), through the image tower
without its projection (the encoder's own features, ``Tower.forward_unprojected``), then a projector
of ``ssl_layers`` Linear layers (BatchNorm and ReLU between them; ``ssl_hidden_dim`` wide, ``ssl_projection_dim``
out; on the gathered batch) and NT-Xent at ``ssl_temperature``. The defaults are the paper's: 3 layers,
4,096 hidden, 256 out, temperature 0.1; ``clip_weight`` and ``ssl_weight`` (the paper's ssl_scale) 1.0.

Departs from the paper: the base view is the run's ``augment`` (the paper's is a RandomResizedCrop of
scale 0.5-1), so that every objective of a sweep sees the same image-text view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.clip import ClipObjective
from vlhub.objectives.ssl import SimclrHead
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("slip")
class SlipObjective(ClipObjective):
    strong_views = 2

    def __init__(
        self,
        clip_weight: float = 1.0,
        ssl_weight: float = 1.0,
        ssl_projection_dim: int = 256,
        ssl_hidden_dim: int | None = 4096,
        ssl_layers: int = 3,
        ssl_temperature: float = 0.1,
        **clip,
    ) -> None:
        super().__init__(**clip)
        self.clip_weight, self.ssl_weight = clip_weight, ssl_weight
        self.ssl_head_args = (ssl_projection_dim, ssl_hidden_dim, ssl_temperature, ssl_layers)
        self.ssl_head: SimclrHead | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        if self.ssl_head is None:  # on the encoder's features, so as wide as they are
            self.ssl_head = SimclrHead(model.image_tower.unprojected_dim, *self.ssl_head_args, prefix="ssl_")

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"])
        strong = model(image=torch.cat([batch["image_view2"], batch["image_view3"]]), image_unprojected=True)
        view2, view3 = strong["image_features"].chunk(2)
        return {
            "image_features": F.normalize(out["image_features"], dim=-1),
            "text_features": F.normalize(out["text_features"], dim=-1),
            "view2_features": view2,
            "view3_features": view3,
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        parts = super().loss(reps, model)
        ssl = self.ssl_head(*self.gather_all(reps["view2_features"], reps["view3_features"]))
        contrastive = parts["loss"]
        return {
            **parts,
            "loss": self.clip_weight * contrastive + self.ssl_weight * ssl,
            "contrastive_loss": contrastive.detach(),
            "ssl_loss": ssl.detach(),
        }
