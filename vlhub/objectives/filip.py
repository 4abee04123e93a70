"""FILIP: token-wise late interaction (Yao et al. 2021).

The similarity of image i and text j, image to text, is the mean over i's patch tokens of the
max over j's real text tokens of the cosine; text to image is the mean over j's real tokens of
the max over i's patches. Padding never enters a max or a mean. Tokens are the towers' token
outputs in the embedding space (projected like the pooled path; a head the objective owns where
a tower has no projection), L2-normalised.

All B x B similarities of a global batch are computed in blocks of ``block_size`` images by
``block_size`` texts, each block under activation checkpointing, so the peak memory of the
loss grows with B^2 (the similarity matrices) plus one block's b^2 N L, never with B^2 N L.

Evaluation scores the same way (:class:`TokenScorer`): zero-shot scores a class by the mean over its
templates of the image-to-text similarity; retrieval and val pairs use each query's direction.

Departs from the paper: every token enters the loss. FILIP keeps, per worker, the 25% of image
tokens with the highest token-wise similarity and gathers them in fp16 at width 256 to cut communication;
vlhub gathers all tokens at the model's width and precision (memory is bounded by the blocks instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlhub.data.batch import Batch
from vlhub.eval.scoring import Scoring
from vlhub.objectives.clip import ContrastiveObjective, weighted_directions
from vlhub.registry import OBJECTIVES


def _block_similarity(
    image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: ([b_i, b_t] image-to-text, [b_i, b_t] text-to-image) token-wise similarities."""
    sim = torch.einsum("and,bld->abnl", image_tokens, text_tokens)  # [b_i, b_t, N, L]
    real = text_mask[None, :, None, :]
    image_to_text = sim.masked_fill(~real, float("-inf")).amax(dim=3).mean(dim=2)
    best_patch = sim.amax(dim=2)  # [b_i, b_t, L]
    mask = text_mask[None].to(sim.dtype)
    text_to_image = (best_patch * mask).sum(dim=2) / mask.sum(dim=2).clamp(min=1)
    return image_to_text, text_to_image


def token_similarity(
    image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B_i, B_t] image-to-text and text-to-image similarities of normalised tokens, in blocks.

    ``image_tokens`` [B_i, N, D], ``text_tokens`` [B_t, L, D], ``text_mask`` [B_t, L] (True = real).
    """
    recompute = torch.is_grad_enabled() and (image_tokens.requires_grad or text_tokens.requires_grad)
    rows_i2t, rows_t2i = [], []
    for i in range(0, image_tokens.shape[0], block_size):
        cols_i2t, cols_t2i = [], []
        for j in range(0, text_tokens.shape[0], block_size):
            args = (image_tokens[i : i + block_size], text_tokens[j : j + block_size], text_mask[j : j + block_size])
            if recompute:
                i2t, t2i = checkpoint(_block_similarity, *args, use_reentrant=False)
            else:
                i2t, t2i = _block_similarity(*args)
            cols_i2t.append(i2t)
            cols_t2i.append(t2i)
        rows_i2t.append(torch.cat(cols_i2t, dim=1))
        rows_t2i.append(torch.cat(cols_t2i, dim=1))
    return torch.cat(rows_i2t), torch.cat(rows_t2i)


class TokenScorer:
    """FILIP's scoring: token-wise similarity, image to text and text to image (the objective's own).

    Zero-shot scores a class by the mean over its templates of the image-to-text similarity;
    pairs (retrieval, val pairs) by the similarity of the query's direction. Blocks of
    ``block_size`` bound the memory of one score block.
    """

    name = "token-wise (FILIP): mean over one side's tokens of the max over the other's"

    def __init__(self, model: nn.Module, objective: FilipObjective) -> None:
        self.model, self.objective = model, objective

    @torch.no_grad()
    def build_classifier(
        self, class_names: list[str], templates: list[str], device: torch.device, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        texts = [template.format(name) for name in class_names for template in templates]
        parts = [
            self.text_reps(self.model.tokenize(texts[start : start + batch_size]).to(device))
            for start in range(0, len(texts), batch_size)
        ]
        return torch.cat([p["tokens"] for p in parts]), torch.cat([p["mask"] for p in parts]), len(templates)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, classifier: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        text_tokens, text_mask, templates = classifier
        image_tokens = self.image_reps(images)["tokens"]
        image_to_text, _ = token_similarity(image_tokens, text_tokens, text_mask, self.objective.block_size)
        return 100.0 * image_to_text.view(images.shape[0], -1, templates).mean(dim=2)

    @torch.no_grad()
    def image_reps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.objective.image_tokens(self.model, images).float()}

    @torch.no_grad()
    def text_reps(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        features, mask = self.objective.text_tokens(self.model, tokens)
        return {"tokens": features.float(), "mask": mask}

    @torch.no_grad()
    def image_to_text(self, images: dict[str, torch.Tensor], texts: dict[str, torch.Tensor]) -> torch.Tensor:
        block = self.objective.block_size
        return token_similarity(images["tokens"], texts["tokens"], texts["mask"], block)[0]

    @torch.no_grad()
    def text_to_image(self, texts: dict[str, torch.Tensor], images: dict[str, torch.Tensor]) -> torch.Tensor:
        block = self.objective.block_size
        return token_similarity(images["tokens"], texts["tokens"], texts["mask"], block)[1].T


@OBJECTIVES.register("filip")
class FilipObjective(ContrastiveObjective):
    loss_tiles_refusal = (
        "its similarity is token-wise (max over tokens, mean over patches), not a dot product of pooled "
        "features; objective.block_size bounds its memory instead"
    )

    def __init__(
        self, image_weight: float = 0.5, text_weight: float = 0.5, block_size: int = 64, **contrastive
    ) -> None:
        super().__init__(**contrastive)
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.image_weight, self.text_weight, self.block_size = image_weight, text_weight, block_size
        self.image_head: nn.Module = nn.Identity()
        self.text_head: nn.Module = nn.Identity()

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        self.require_tokens(model)
        # A tower without a projection gives tokens at its own width: the objective projects them.
        for name, tower in (("image_head", model.image_tower), ("text_head", model.text_tower)):
            if tower.token_dim != model.embed_dim and isinstance(getattr(self, name), nn.Identity):
                setattr(self, name, nn.Linear(tower.token_dim, model.embed_dim, bias=False))

    def image_tokens(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        out = model(image=images, output_tokens=True)
        return F.normalize(self.image_head(out["image_tokens"]), dim=-1)

    def text_tokens(self, model: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(text=text, output_tokens=True)
        return F.normalize(self.text_head(out["text_tokens"]), dim=-1), out["text_token_mask"]

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"], output_tokens=True)
        return {
            "image_tokens": F.normalize(self.image_head(out["image_tokens"]), dim=-1),
            "text_tokens": F.normalize(self.text_head(out["text_tokens"]), dim=-1),
            "text_mask": out["text_token_mask"],
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = self.gather_all(reps["image_tokens"], reps["text_tokens"])
        mask = self.gather_all(reps["text_mask"].to(image.dtype))[0] > 0.5
        image_to_text, text_to_image = token_similarity(image, text, mask, self.block_size)
        scale = model.temperature_scale()
        labels = torch.arange(image.shape[0], device=image.device)
        i2t_loss = F.cross_entropy(scale * image_to_text, labels)
        t2i_loss = F.cross_entropy(scale * text_to_image.T, labels)
        return weighted_directions(i2t_loss, t2i_loss, self.image_weight, self.text_weight)

    def scoring(self, model: nn.Module) -> Scoring:
        return Scoring(zero_shot=TokenScorer(model, self))
