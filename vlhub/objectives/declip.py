"""DeCLIP: CLIP plus MLM, SimSiam on two image views, and multi-view contrast (Li et al. 2021).

Three views of each image: the base view ``image`` (the run's ``augment``, as every objective's
image-text terms) and two strong views ``image_view2``, ``image_view3`` (``augment_views``). As x_clip's
``CLIP(use_mlm=True, use_visual_ssl=True, visual_ssl_type="simsiam")`` called with ``aug_image``, the
total is ``contrastive_weight`` x CLIP(text, base) + ``mlm_weight`` x MLM(on the base pass's captions)
+ ``ssl_weight`` x SimSiam(view 2, view 3) + ``multiview_weight`` x the mean of CLIP(text, view 2) and
CLIP(text, view 3) (the paper's image views x text, with one text view). The defaults are x_clip's
effective weights (0.8, 0.05, 0.05, 0.1). Captions are not augmented (DeCLIP's EDA text views and its
nearest-neighbour supervision are not part of this objective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.clip import ContrastiveObjective
from vlhub.objectives.mlm import MaskedLanguageModel
from vlhub.objectives.ssl import SimsiamHead
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("declip")
class DeclipObjective(ContrastiveObjective):
    strong_views = 2
    supports_loss_tiles = True  # both image-text terms are CLIP's

    def __init__(
        self,
        contrastive_weight: float = 0.8,
        mlm_weight: float = 0.05,
        ssl_weight: float = 0.05,
        multiview_weight: float = 0.1,
        mask_prob: float = 0.15,
        replace_prob: float = 0.9,
        ssl_projection_dim: int = 256,
        ssl_hidden_dim: int = 1024,
        **contrastive,
    ) -> None:
        super().__init__(**contrastive)
        self.contrastive_weight, self.mlm_weight = contrastive_weight, mlm_weight
        self.ssl_weight, self.multiview_weight = ssl_weight, multiview_weight
        self.ssl_projection_dim, self.ssl_hidden_dim = ssl_projection_dim, ssl_hidden_dim
        self.mlm = MaskedLanguageModel(mask_prob, replace_prob)
        self.ssl_head: SimsiamHead | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        self.mlm.apply_to_model(model)
        if self.ssl_head is None:
            self.ssl_head = SimsiamHead(model.image_tower.output_dim, self.ssl_projection_dim, self.ssl_hidden_dim)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        images = torch.cat([batch["image"], batch["image_view2"], batch["image_view3"]])
        out = model(image=images, text=batch["text"])
        base, view2, view3 = out["image_features"].chunk(3)
        return {
            "image_features": F.normalize(base, dim=-1),
            "text_features": F.normalize(out["text_features"], dim=-1),
            "view2_features": view2,
            "view3_features": view3,
            **self.mlm.represent(model, batch),
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text, view2, view3, nll, tokens = self.gather_all(
            reps["image_features"],
            reps["text_features"],
            reps["view2_features"],
            reps["view3_features"],
            reps["mlm_nll"],
            reps["mlm_tokens"],
        )
        scale = model.temperature_scale()
        parts = self.clip_loss(image, text, scale, 0.5, 0.5)
        contrastive = parts["loss"]
        per_view = [self.clip_loss(F.normalize(v, dim=-1), text, scale, 0.5, 0.5)["loss"] for v in (view2, view3)]
        multiview = (per_view[0] + per_view[1]) / 2
        mlm = self.mlm.loss(nll, tokens)
        ssl = self.ssl_head(view2, view3)
        total = (
            self.contrastive_weight * contrastive
            + self.mlm_weight * mlm
            + self.ssl_weight * ssl
            + self.multiview_weight * multiview
        )
        return {
            **parts,
            "loss": total,
            "contrastive_loss": contrastive.detach(),
            "mlm_loss": mlm.detach(),
            "ssl_loss": ssl.detach(),
            "multiview_loss": multiview.detach(),
        }
