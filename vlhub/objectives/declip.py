"""DeCLIP (Li et al. 2021): CLIP plus self-, multi-view and nearest-neighbour supervision.

Views: the base view ``image`` (the run's ``augment``, as every objective's image-text terms), two
strong views ``image_view2``, ``image_view3`` (``augment_views``), and per caption a text view made
on its token ids by EDA's random swap or random deletion (:mod:`vlhub.objectives.text_views`).
With CLIP(i, t) the symmetric InfoNCE (``image_weight`` x image->text + ``text_weight`` x text->image)
and v2, v3 the strong views, t, t' the caption and its view, the loss is

- ``contrastive_weight`` x CLIP(base, t);
- ``multiview_weight`` x the mean of CLIP(v, u) over v in {v2, v3}, u in {t, t'} (multi-view
  supervision: 2 image views x 2 text views, 4 terms, averaged as in the authors' code);
- ``ssl_weight`` x SimSiam(v2, v3) and ``mlm_weight`` x MLM(t) (self-supervision);
- ``nn_weight`` x the mean over v in {v2, v3}, u in {t, t'} of the image->text cross-entropy of v
  against NN(u), NN(u) the nearest neighbour of u in a FIFO queue of ``queue_size`` text
  embeddings (nearest-neighbour supervision; image->text only, as the authors' code).

The queue is filled, once per applied optimizer step (:meth:`after_step`), with the t' then t
embeddings of the whole gathered batch that the step's loss saw; a skipped (non-finite) step adds
nothing. It is a buffer of the objective: in the checkpoint, resumed bitwise, the same on every rank.

Defaults are the authors' (github.com/Sense-GVT/DeCLIP, YFCC-15M configs): multi-view 0.4,
SimSiam 0.2, MLM 0.2, nearest neighbour 0.2, queue 65,536, EDA's n = 1 swap and p = 0.1.
Where vlhub departs from them:
- a separate CLIP term on the base view (weight 0.8, the landed x_clip weight; the paper has no
  third image view): the image-text term of every objective sees the run's ``augment``;
- no synonym replacement (it needs WordNet's data): swap or deletion at even odds, on BPE tokens;
- the queue holds the gathered global batch, identical on every rank (the authors': each rank
  its own rows), starts empty rather than random, and is searched among its filled entries only;
- the contrastive text embedding comes from the unmasked caption (the authors' from the masked one);
- the SimSiam head keeps x_clip's sizes (projection 256, hidden 1,024; the authors' 1,024 / 512).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.base import check_non_negative
from vlhub.objectives.clip import ContrastiveObjective
from vlhub.objectives.feature_queue import FeatureQueue
from vlhub.objectives.mlm import MaskedLanguageModel
from vlhub.objectives.ssl import SimsiamHead
from vlhub.objectives.text_views import eda_view
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("declip")
class DeclipObjective(ContrastiveObjective):
    strong_views = 2
    supports_loss_tiles = True  # every image-text term is CLIP's or a row cross-entropy

    def __init__(
        self,
        contrastive_weight: float = 0.8,
        multiview_weight: float = 0.4,
        ssl_weight: float = 0.2,
        mlm_weight: float = 0.2,
        nn_weight: float = 0.2,
        image_weight: float = 0.5,
        text_weight: float = 0.5,
        queue_size: int = 65536,
        text_swaps: int = 1,
        text_deletion_prob: float = 0.1,
        mask_prob: float = 0.15,
        replace_prob: float = 0.9,
        mlm_attention: str = "bidirectional",
        ssl_projection_dim: int = 256,
        ssl_hidden_dim: int = 1024,
        **contrastive,
    ) -> None:
        super().__init__(**contrastive)
        check_non_negative(
            contrastive_weight=contrastive_weight,
            multiview_weight=multiview_weight,
            ssl_weight=ssl_weight,
            mlm_weight=mlm_weight,
            nn_weight=nn_weight,
            image_weight=image_weight,
            text_weight=text_weight,
            text_swaps=text_swaps,
        )
        if queue_size <= 0:
            raise ValueError(f"queue_size must be > 0, got {queue_size}")
        if not 0.0 <= text_deletion_prob <= 1.0:
            raise ValueError(f"text_deletion_prob must be in [0, 1], got {text_deletion_prob}")
        self.contrastive_weight, self.multiview_weight = contrastive_weight, multiview_weight
        self.ssl_weight, self.mlm_weight, self.nn_weight = ssl_weight, mlm_weight, nn_weight
        self.image_weight, self.text_weight = image_weight, text_weight
        self.queue_size, self.text_swaps, self.text_deletion_prob = queue_size, text_swaps, text_deletion_prob
        self.ssl_projection_dim, self.ssl_hidden_dim = ssl_projection_dim, ssl_hidden_dim
        self.mlm = MaskedLanguageModel(mask_prob, replace_prob, mlm_attention)
        self.ssl_head: SimsiamHead | None = None
        self.text_queue: FeatureQueue | None = None
        # What the last loss call would enqueue; written to the queue by after_step (an applied step).
        self._pending: torch.Tensor | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        self.mlm.apply_to_model(model)
        if self.ssl_head is None:
            self.ssl_head = SimsiamHead(model.image_tower.output_dim, self.ssl_projection_dim, self.ssl_hidden_dim)
        if self.text_queue is None:
            self.text_queue = FeatureQueue(self.queue_size, model.embed_dim)

    def text_view(self, text: torch.Tensor, sample_id: torch.Tensor) -> torch.Tensor:
        """Each caption's EDA view (swap or deletion), drawn from its sample id."""
        return eda_view(text, sample_id, self.mlm.special_ids, self.text_swaps, self.text_deletion_prob)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        text = batch["text"]
        texts = torch.cat([text, self.text_view(text, batch["sample_id"])])
        images = torch.cat([batch["image"], batch["image_view2"], batch["image_view3"]])
        out = model(image=images, text=texts)
        base, view2, view3 = out["image_features"].chunk(3)
        caption, caption_view = F.normalize(out["text_features"], dim=-1).chunk(2)
        return {
            "image_features": F.normalize(base, dim=-1),
            "text_features": caption,
            "text_view_features": caption_view,
            "view2_features": view2,
            "view3_features": view3,
            **self.mlm.represent(model, batch),
        }

    def nearest_neighbour_loss(
        self, images: list[torch.Tensor], texts: list[torch.Tensor], scale: torch.Tensor
    ) -> torch.Tensor:
        """Mean over image views and text views of CE(image -> the text's nearest neighbour in the queue)."""
        if self.text_queue.is_empty():  # the first step: no neighbours yet
            return scale.new_zeros(())
        neighbours = [self.text_queue.nearest(text).to(text.dtype) for text in texts]
        terms = [self.row_cross_entropy(image, found, scale) for image in images for found in neighbours]
        return torch.stack(terms).mean()

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        keys = ("image_features", "text_features", "text_view_features", "view2_features", "view3_features")
        image, text, text_view, view2, view3 = self.gather_all(*(reps[key] for key in keys))
        directions = (self.image_weight, self.text_weight)
        scale = model.temperature_scale()
        parts = self.clip_loss(image, text, scale, *directions)
        contrastive = parts["loss"]
        views = [F.normalize(view, dim=-1) for view in (view2, view3)]
        multiview = torch.stack(
            [self.clip_loss(v, t, scale, *directions)["loss"] for v in views for t in (text, text_view)]
        ).mean()
        nearest = self.nearest_neighbour_loss(views, [text, text_view], scale)
        mlm = self.mlm.loss(*self.gather_all(reps["mlm_nll"], reps["mlm_tokens"]))
        ssl = self.ssl_head(view2, view3)
        self._pending = torch.cat([text_view, text]).detach()
        total = (
            self.contrastive_weight * contrastive
            + self.multiview_weight * multiview
            + self.ssl_weight * ssl
            + self.mlm_weight * mlm
            + self.nn_weight * nearest
        )
        return {
            **parts,
            "loss": total,
            "contrastive_loss": contrastive.detach(),
            "multiview_loss": multiview.detach(),
            "ssl_loss": ssl.detach(),
            "mlm_loss": mlm.detach(),
            "nn_loss": nearest.detach(),
        }

    def after_step(self) -> None:
        """The step was applied: the texts its loss saw join the queue (text views, then captions)."""
        if self._pending is not None:
            self.text_queue.push(self._pending)
            self._pending = None
