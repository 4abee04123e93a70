"""CLIP: symmetric InfoNCE with a learnable, clamped temperature; LiT is CLIP with locks.

Departs from the papers (Radford et al. 2021; Zhai et al. 2022 for LiT): nothing in the loss. The two
directions' weights are keys (``image_weight``, ``text_weight``), defaulting to the paper's equal mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.models.towers import VIT_TOWERS
from vlhub.objectives.base import IncompatibleObjective, Objective, check_non_negative
from vlhub.objectives.tiled import check_tile_rows, tiled_row_cross_entropy, tiled_softmax_loss
from vlhub.parallel import collectives
from vlhub.registry import OBJECTIVES


class ContrastiveObjective(Objective):
    """Base of the image-text contrastive family: tower locking and the feature gather.

    ``lock_image`` with ``unlocked_groups=n`` leaves the image tower's last n layer groups
    trainable (LiT); ``freeze_bn_stats`` also freezes its BatchNorm statistics. The text
    tower can be locked the same way with ``lock_text`` / ``text_unlocked_layers``.
    ``local_loss`` and ``gather_with_grad`` mean what they mean in open_clip; objectives whose loss
    has no local form leave ``supports_local_loss`` False and refuse ``local_loss=true``.

    ``loss_tiles=R`` computes the B x B similarity's loss R rows at a time with a recomputing
    backward (:mod:`vlhub.objectives.tiled`): the same loss and gradients, memory O(B D + R B)
    instead of O(B^2). Objectives whose loss is not built from :meth:`clip_loss`,
    :meth:`row_cross_entropy` or the tiled functions leave ``supports_loss_tiles`` False and refuse it.
    """

    #: Whether this objective's loss can be computed in tiles (``loss_tiles``).
    supports_loss_tiles: bool = False
    min_global_batch = 2  # the other samples of the batch are the negatives
    #: Why not, when it cannot (said in the error).
    loss_tiles_refusal: str = "its loss is not a softmax or sigmoid over a B x B dot-product similarity"
    #: Whether ``loss`` reads ``local_loss`` (local rows against global columns); the others refuse it
    #: rather than silently computing the global loss.
    supports_local_loss: bool = False

    def __init__(
        self,
        lock_image: bool = False,
        unlocked_groups: int = 0,
        freeze_bn_stats: bool = False,
        lock_text: bool = False,
        text_unlocked_layers: int = 0,
        text_freeze_layer_norm: bool = True,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        loss_tiles: int | None = None,
    ) -> None:
        super().__init__()
        check_non_negative(unlocked_groups=unlocked_groups, text_unlocked_layers=text_unlocked_layers)
        name = next((n for n, cls in OBJECTIVES.items() if cls is type(self)), type(self).__name__)
        if loss_tiles is not None:
            check_tile_rows(loss_tiles)
            if not self.supports_loss_tiles:
                refusal = self.loss_tiles_refusal
                raise ValueError(f"loss_tiles={loss_tiles} is not supported by objective={name}: {refusal}")
        if local_loss and not self.supports_local_loss:
            local = [n for n, cls in OBJECTIVES.items() if getattr(cls, "supports_local_loss", False)]
            raise ValueError(
                f"local_loss=True is not supported by objective={name}: its loss is computed on the global batch "
                f"(only {', '.join(local)} have a local form)"
            )
        self.loss_tiles = loss_tiles
        self.lock_image = lock_image
        self.unlocked_groups = unlocked_groups
        self.freeze_bn_stats = freeze_bn_stats
        self.lock_text = lock_text
        self.text_unlocked_layers = text_unlocked_layers
        self.text_freeze_layer_norm = text_freeze_layer_norm
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def apply_to_model(self, model: nn.Module) -> None:
        if self.needs_text and model.text_tower is None:
            raise IncompatibleObjective("needs a text tower, and this model has none")
        if self.lock_image:
            model.image_tower.apply_lock(self.unlocked_groups, self.freeze_bn_stats)
        if self.lock_text:
            if model.text_tower is None:
                raise ValueError("lock_text=True but the model has no text tower")
            model.text_tower.apply_lock(self.text_unlocked_layers, self.text_freeze_layer_norm)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"])
        return {
            "image_features": F.normalize(out["image_features"], dim=-1),
            "text_features": F.normalize(out["text_features"], dim=-1),
        }

    def gather(self, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Features of every rank, and the offset of this rank's rows among them."""
        return collectives.gather_features(features, with_grad=self.gather_with_grad)

    def gather_all(self, *features: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's rows from every rank (the global batch, in rank order)."""
        return [self.gather(f)[0] for f in features]

    def clip_loss(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, image_weight: float, text_weight: float
    ) -> dict[str, torch.Tensor]:
        """CLIP's symmetric InfoNCE on [B, D] features whose row i of each is a pair (tiled if asked)."""
        if self.loss_tiles is None:
            return symmetric_cross_entropy(scale * image @ text.T, image_weight, text_weight)
        image_to_text, text_to_image = tiled_softmax_loss(image, text, scale, self.loss_tiles)
        return weighted_directions(image_to_text, text_to_image, image_weight, text_weight)

    def row_cross_entropy(
        self, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, offset: int = 0
    ) -> torch.Tensor:
        """Cross-entropy of ``scale * rows @ cols.T``, row i's positive at column i + ``offset`` (tiled if asked)."""
        if self.loss_tiles is None:
            labels = torch.arange(rows.shape[0], device=rows.device) + offset
            return F.cross_entropy(scale * rows @ cols.T, labels)
        return tiled_row_cross_entropy(rows, cols, scale, self.loss_tiles, offset)

    def require_tokens(self, model: nn.Module) -> None:
        """Token-level objectives need token features from both towers: say so now, not mid-forward."""
        if model.text_tower is None:
            raise IncompatibleObjective("needs a text tower, and this model has none")
        for name, tower, works in (
            ("image", model.image_tower, VIT_TOWERS),
            ("text", model.text_tower, "use open_clip's text transformer or a Hugging Face text encoder"),
        ):
            if not tower.has_tokens:
                raise IncompatibleObjective(
                    f"needs token features, and this model's {name} tower ({tower.describe()}) has none: {works}"
                )


def symmetric_cross_entropy(
    logits_per_image: torch.Tensor, image_weight: float, text_weight: float
) -> dict[str, torch.Tensor]:
    """CLIP's loss on a square [images, texts] logit matrix whose diagonal holds the pairs."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, labels)
    text_to_image = F.cross_entropy(logits_per_image.T, labels)
    return weighted_directions(image_to_text, text_to_image, image_weight, text_weight)


def weighted_directions(
    image_to_text: torch.Tensor, text_to_image: torch.Tensor, image_weight: float, text_weight: float
) -> dict[str, torch.Tensor]:
    """The weighted sum of the two directions as ``"loss"``, each direction as a logged part."""
    return {
        "loss": image_weight * image_to_text + text_weight * text_to_image,
        "image_to_text_loss": image_to_text.detach(),
        "text_to_image_loss": text_to_image.detach(),
    }


@OBJECTIVES.register("clip")
class ClipObjective(ContrastiveObjective):
    """Symmetric InfoNCE: ``image_weight`` * CE(image->text) + ``text_weight`` * CE(text->image)."""

    supports_loss_tiles = True
    supports_local_loss = True

    def __init__(self, image_weight: float = 0.5, text_weight: float = 0.5, **contrastive) -> None:
        super().__init__(**contrastive)
        self.image_weight = image_weight
        self.text_weight = text_weight

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = reps["image_features"], reps["text_features"]
        scale = model.temperature_scale()
        (all_image, offset), (all_text, _) = self.gather(image), self.gather(text)
        if not self.local_loss:
            return self.clip_loss(all_image, all_text, scale, self.image_weight, self.text_weight)
        # Local rows against global columns; labels offset by this rank's slice.
        image_to_text = self.row_cross_entropy(image, all_text, scale, offset)
        text_to_image = self.row_cross_entropy(text, all_image, scale, offset)
        return weighted_directions(image_to_text, text_to_image, self.image_weight, self.text_weight)
