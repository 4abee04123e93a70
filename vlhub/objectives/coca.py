"""CoCa: contrastive plus captioning (Yu et al. 2022).

The captioner is open_clip's own multimodal decoder (``open_clip.transformer.MultimodalTransformer``:
causal self-attention over the caption, cross-attention to the image tokens, a vocabulary
projection), chosen over coca_pytorch's because it is built from the same blocks as the towers
vlhub already uses and needs no second text encoder; coca_pytorch's ``CoCa`` also bundles its
own (DDP-incorrect) contrastive loss. The decoder reads the text tower's token features (causal,
so position t sees tokens <= t) and the image tower's token features, and predicts token t+1.

Loss: ``contrastive_weight`` x CLIP + ``caption_weight`` x the mean cross-entropy over every
real next token of the global batch (open_clip's ``CoCaLoss``; its defaults 1 and 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.base import IncompatibleObjective, mean_token_nll, token_nll_per_sample
from vlhub.objectives.clip import ContrastiveObjective
from vlhub.registry import OBJECTIVES


def _init_decoder(decoder: MultimodalTransformer) -> None:
    """open_clip's CoCa initialisation (its ``init_parameters`` fails on this class; the projection starts empty)."""
    attn_std, fc_std = decoder.width**-0.5, (2 * decoder.width) ** -0.5
    proj_std = attn_std * (2 * decoder.layers) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(decoder.text_projection, std=attn_std)


@OBJECTIVES.register("coca")
class CocaObjective(ContrastiveObjective):
    supports_loss_tiles = True  # its contrastive term is CLIP's

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        decoder_layers: int = 4,
        decoder_heads: int = 8,
        **contrastive,
    ) -> None:
        super().__init__(**contrastive)
        if decoder_layers <= 0 or decoder_heads <= 0:
            raise ValueError("objective.decoder_layers and objective.decoder_heads must be > 0")
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight
        self.decoder_layers, self.decoder_heads = decoder_layers, decoder_heads
        self.decoder: MultimodalTransformer | None = None
        self.vocab_projection: nn.Parameter | None = None
        self.image_adapter: nn.Module = nn.Identity()

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        self.require_tokens(model)
        width = model.text_tower.token_dim
        if width % self.decoder_heads:
            raise IncompatibleObjective(
                f"objective.decoder_heads={self.decoder_heads} must divide the text token width {width}"
            )
        if self.decoder is None:
            self.decoder = MultimodalTransformer(
                width=width,
                layers=self.decoder_layers,
                heads=self.decoder_heads,
                context_length=model.text_tower.context_length,
                output_dim=model.text_tower.vocab_size,
            )
            _init_decoder(self.decoder)
            # The decoder's vocabulary projection, applied by the objective: only at real tokens in training.
            self.vocab_projection = nn.Parameter(self.decoder.text_projection.detach().clone())
            self.decoder.text_projection = None
            if model.image_tower.token_dim != width:
                self.image_adapter = nn.Linear(model.image_tower.token_dim, width, bias=False)

    def decoded(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L-1, W]: the decoder's hidden state at each position, from the towers' token outputs."""
        return self.decoder(self.image_adapter(out["image_tokens"]), out["text_tokens"][:, :-1])

    def caption_logits(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L-1, V]: the decoder's prediction of each next token."""
        return self.decoded(out) @ self.vocab_projection

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"], output_tokens=True)
        targets = batch["text"][:, 1:]
        real = targets != 0  # padding is never a target; its logits are not computed
        logits = self.decoded(out)[real] @ self.vocab_projection
        per_sample, tokens = token_nll_per_sample(F.cross_entropy(logits, targets[real], reduction="none"), real)
        return {
            "image_features": F.normalize(out["image_features"], dim=-1),
            "text_features": F.normalize(out["text_features"], dim=-1),
            "caption_nll": per_sample,
            "caption_tokens": tokens,
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text, nll, tokens = self.gather_all(
            reps["image_features"], reps["text_features"], reps["caption_nll"], reps["caption_tokens"]
        )
        parts = self.clip_loss(image, text, model.temperature_scale(), 0.5, 0.5)
        contrastive = parts["loss"]
        caption = mean_token_nll(nll, tokens)
        return {
            **parts,
            "loss": self.contrastive_weight * contrastive + self.caption_weight * caption,
            "contrastive_loss": contrastive.detach(),
            "caption_loss": caption.detach(),
        }
