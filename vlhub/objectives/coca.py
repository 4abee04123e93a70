"""CoCa: contrastive plus captioning (Yu et al. 2022).

The captioner is open_clip's own multimodal decoder (``open_clip.transformer.MultimodalTransformer``:
causal self-attention over the caption, cross-attention to the image tokens, a vocabulary
projection), chosen over coca_pytorch's because it is built from the same blocks as the towers
vlhub already uses and needs no second text encoder; coca_pytorch's ``CoCa`` also bundles its
own (DDP-incorrect) contrastive loss. The decoder reads the text tower's token features and the
image tower's token features (patch tokens; an open_clip or timm ViT), and at position t predicts
token t+1 from the features of tokens <= t. That is causal only if the text tower's feature at t
does not see later tokens: a text tower that attends both ways (a Hugging Face encoder, an open_clip
text transformer without its causal mask) is refused at launch, found by probing the tower.

Loss: ``contrastive_weight`` x CLIP (``image_weight`` x image-to-text + ``text_weight`` x
text-to-image) + ``caption_weight`` x the mean cross-entropy over every real next token of the
global batch (open_clip's ``CoCaLoss``; its defaults 1 and 2).

``attentional_pooler=true`` adds open_clip's CoCa pooling (objective-owned): one attentional pooler of
``pooler_queries`` learned queries over the image tokens, a LayerNorm, then query 0 through a
projection is the contrastive image embedding and queries 1.. are what the decoder cross-attends to.
Zero-shot then scores with that embedding. Off by default, so that coca's image embedding is the
tower's pooled one, as in every other job of a sweep.

Where this departs from open_clip's CoCa (``coca_ViT-B-32``) and the paper:
- pooler off (the default): the contrastive image embedding is the tower's own pooled output and the
  decoder reads the tower's projected patch tokens; open_clip pools with the attentional pooler, the
  paper with two poolers (1 query contrastive, 256 generative; open_clip's ``parallel``, marked WIP).
- pooler on: it reads the tower's token outputs (patch tokens after the final norm and projection,
  no class token); open_clip's reads the transformer's output before ``ln_post``, class token
  included. One shared pooler as open_clip's default, not the paper's two.
- the text tower is the unimodal decoder and is shared with the contrastive text embedding (its
  pooled output: the EOT token for CLIP text towers); open_clip and the paper append a learned CLS
  token to the caption for it. The multimodal decoder is ``decoder_layers`` deep (default 4) on top of
  the whole text tower; the paper splits one decoder in half, open_clip stacks 12 on 12.
- the decoder reads the text tokens after ``text_projection`` (the embedding width); open_clip's reads
  them before it (the text tower's width).
- no caption generation (open_clip's ``generate``) and no captioning metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler, LayerNorm, MultimodalTransformer
from torch import nn

from vlhub.data.batch import Batch
from vlhub.eval.scoring import EmbeddingScorer, Scoring
from vlhub.objectives.base import IncompatibleObjective, check_non_negative, mean_token_nll
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


@torch.no_grad()
def text_tower_sees_ahead(tower: nn.Module, length: int) -> bool:
    """Whether the text tower's token features at a position depend on later tokens: two captions of
    ``length`` tokens that share their first half, through the tower in eval mode, must give the same
    features there."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tower.vocab_size, (2, length), generator=generator)  # no pad or special ids
    half = length // 2
    ids[1, :half] = ids[0, :half]
    was_training = tower.training
    tower.eval()
    try:
        tokens = tower(ids.to(next(tower.parameters()).device), output_tokens=True).tokens
    finally:
        tower.train(was_training)
    # Identical inputs give (nearly) identical rows; a freshly initialised bidirectional tower already
    # moves them by ~1e-3 of their size, so the bound is a few rounding errors of the tower's dtype.
    tolerance = 1e-5 if tokens.dtype in (torch.float32, torch.float64) else 10 * torch.finfo(tokens.dtype).eps
    gap = (tokens[0, :half] - tokens[1, :half]).abs().max().float()
    return bool(gap > tolerance * tokens.abs().max().float())


class PooledImageScorer(EmbeddingScorer):
    """CLIP's zero-shot with the attentional pooler's contrastive embedding as the image's."""

    def __init__(self, model: nn.Module, objective: CocaObjective) -> None:
        super().__init__(model)
        self.objective = objective

    @torch.no_grad()
    def logits(self, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.image_tower.parameters()).dtype
        out = self.model(image=images.to(dtype), output_tokens=True)
        features = self.objective.image_outputs(out)[0].float()
        return 100.0 * F.normalize(features, dim=-1) @ classifier


@OBJECTIVES.register("coca")
class CocaObjective(ContrastiveObjective):
    supports_loss_tiles = True  # its contrastive term is CLIP's

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        image_weight: float = 0.5,
        text_weight: float = 0.5,
        decoder_layers: int = 4,
        decoder_heads: int = 8,
        attentional_pooler: bool = False,
        pooler_queries: int = 256,
        pooler_heads: int = 8,
        **contrastive,
    ) -> None:
        super().__init__(**contrastive)
        check_non_negative(
            contrastive_weight=contrastive_weight,
            caption_weight=caption_weight,
            image_weight=image_weight,
            text_weight=text_weight,
        )
        if decoder_layers <= 0 or decoder_heads <= 0:
            raise ValueError(f"decoder_layers={decoder_layers} and decoder_heads={decoder_heads} must be > 0")
        if attentional_pooler and (pooler_queries < 2 or pooler_heads <= 0):
            raise ValueError(
                f"pooler_queries={pooler_queries} must be >= 2 (one contrastive, the rest for the "
                f"decoder) and pooler_heads={pooler_heads} > 0"
            )
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight
        self.image_weight, self.text_weight = image_weight, text_weight
        self.decoder_layers, self.decoder_heads = decoder_layers, decoder_heads
        self.attentional_pooler = attentional_pooler
        self.pooler_queries, self.pooler_heads = pooler_queries, pooler_heads
        self.decoder: MultimodalTransformer | None = None
        self.vocab_projection: nn.Parameter | None = None
        self.image_adapter: nn.Module = nn.Identity()
        self.pooler: AttentionalPooler | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        self.require_tokens(model)
        length = model.tokenize([""]).shape[1] if model.tokenizer is not None else model.text_tower.context_length
        if text_tower_sees_ahead(model.text_tower, length):
            raise IncompatibleObjective(
                f"the text tower ({model.text_tower.describe()}) attends both ways, so the decoder reading its "
                "token features would see each token it must predict; CoCa needs a causal text tower "
                "(open_clip's text transformer with its causal mask, as in model=vit_b32)"
            )
        width = model.text_tower.token_dim
        if width % self.decoder_heads:
            raise IncompatibleObjective(f"decoder_heads={self.decoder_heads} must divide the text token width {width}")
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
            memory_width = self._build_pooler(model) if self.attentional_pooler else model.image_tower.token_dim
            if memory_width != width:
                self.image_adapter = nn.Linear(memory_width, width, bias=False)

    def _build_pooler(self, model: nn.Module) -> int:
        """open_clip's CoCa pooler (queries at the embedding width, as its ``attn_pool``); returns that width."""
        dim = model.embed_dim
        if dim % self.pooler_heads:
            raise IncompatibleObjective(f"pooler_heads={self.pooler_heads} must divide the embedding {dim}")
        self.pooler = AttentionalPooler(dim, model.image_tower.token_dim, self.pooler_heads, self.pooler_queries)
        self.pooler_norm = LayerNorm(dim)
        self.pooler_projection = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))  # open_clip's ``proj`` init
        return dim

    def image_outputs(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the contrastive image features [B, D], what the decoder cross-attends to [B, M, W])."""
        if self.pooler is None:
            return out["image_features"], self.image_adapter(out["image_tokens"])
        queries = self.pooler_norm(self.pooler(out["image_tokens"]))
        return queries[:, 0] @ self.pooler_projection, self.image_adapter(queries[:, 1:])

    def decode(self, memory: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[B, L-1, W]: at position t the decoder's state for predicting token t+1 from the text features
        of tokens <= t (the input is shifted by one against the targets ``text[:, 1:]``)."""
        return self.decoder(memory, text_tokens[:, :-1])

    def caption_logits(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L-1, V]: the decoder's prediction of each next token."""
        return self.decode(self.image_outputs(out)[1], out["text_tokens"]) @ self.vocab_projection

    def caption_nll(self, memory: torch.Tensor, text_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, L-1]: the cross-entropy of each next token ``text[:, t+1]``, 0 where it is padding (whose
        logits are never computed)."""
        targets = text[:, 1:]
        real = targets != 0
        logits = self.decode(memory, text_tokens)[real] @ self.vocab_projection
        nll = F.cross_entropy(logits, targets[real], reduction="none")
        return torch.zeros(real.shape, dtype=nll.dtype, device=nll.device).masked_scatter(real, nll)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"], output_tokens=True)
        image_features, memory = self.image_outputs(out)
        nll = self.caption_nll(memory, out["text_tokens"], batch["text"])
        return {
            "image_features": F.normalize(image_features, dim=-1),
            "text_features": F.normalize(out["text_features"], dim=-1),
            "caption_nll": nll.sum(dim=1),
            "caption_tokens": (batch["text"][:, 1:] != 0).sum(dim=1).to(nll.dtype),
        }

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text, nll, tokens = self.gather_all(
            reps["image_features"], reps["text_features"], reps["caption_nll"], reps["caption_tokens"]
        )
        parts = self.clip_loss(image, text, model.temperature_scale(), self.image_weight, self.text_weight)
        contrastive = parts["loss"]
        caption = mean_token_nll(nll, tokens)
        return {
            **parts,
            "loss": self.contrastive_weight * contrastive + self.caption_weight * caption,
            "contrastive_loss": contrastive.detach(),
            "caption_loss": caption.detach(),
        }

    def scoring(self, model: nn.Module) -> Scoring:
        if self.pooler is None:
            return super().scoring(model)
        return Scoring(zero_shot=PooledImageScorer(model, self))
