"""The Tower interface and its adapters for open_clip's image and text towers.

A tower maps its input to pooled features [B, D] in the shared embedding space and, when
asked, to token features [B, N, D'] with a padding mask (True where a token is real). Token
features go through the same projection as the pooled path where the tower has one (open_clip
ViT ``proj``, text ``text_projection``), so D' = D there; ``token_dim`` says which it is.
Adapters keep the wrapped open_clip module under ``.module`` so that its state_dict keys
are open_clip's own, behind a known prefix (``vlhub.models.vision_language.OpenClipLayout``).
What differs between wrapped module kinds is in ``vlhub.models.tower_kinds``, once per kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vlhub.models.tower_kinds import ModuleKind, OpenClipText, kind_of

#: What gives image token features (said wherever a tower without them is refused).
VIT_TOWERS = (
    "token features need a ViT image tower: an open_clip ViT (model=vit_b32), a timm ViT trunk "
    "(model=timm model.timm_backbone=vit_base_patch16_224) or model=eva02_b16"
)


@dataclass
class TowerOutput:
    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


class Tower(nn.Module):
    """Base of every tower: ``forward`` and what the engine needs to know about the tower.

    Subclasses set ``output_dim``, hold the wrapped module as ``module`` (its state_dict keys are
    the library's own, behind that prefix) and its kind (:mod:`vlhub.models.tower_kinds`), which
    answers every question below once per kind of wrapped module:

    - :meth:`blocks`, :meth:`embedding_parameters`, :meth:`head_parameters`: the tower in layers, in
      forward order (FSDP shards each block, layer decay gives each layer its lr);
    - :meth:`compile_units`: what ``torch.compile`` compiles in place;
    - :meth:`set_grad_checkpointing` / :attr:`grad_checkpointing`; :attr:`patch_dropout`;
    - ``forward(..., output_tokens=True)`` when :attr:`has_tokens`, of width :attr:`token_dim`
      (``output_dim`` when tokens are projected like the pooled features); :attr:`token_embedding`.
    """

    output_dim: int
    module: nn.Module
    kind: type[ModuleKind] = ModuleKind
    pad_id: int = 0
    no_tokens_hint: str = ""  # what gives token features instead, said when they are asked of this tower

    def forward(self, inputs: torch.Tensor, output_tokens: bool = False) -> TowerOutput:
        if not output_tokens:
            return TowerOutput(pooled=self.module(inputs))
        if not self.has_tokens:
            raise NotImplementedError(f"{self.describe()} does not expose token features{self.no_tokens_hint}")
        pooled, tokens = self.kind.tokens(self.module, inputs)
        mask = self.kind.token_mask(self.module, inputs, tokens, self.pad_id)
        return TowerOutput(pooled=pooled, tokens=tokens, token_mask=mask)

    # -- what the engine needs -------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in the order the forward runs them; empty for a convolutional tower
        (open_clip's ModifiedResNet, a timm CNN), which FSDP and layer decay refuse."""
        return self.kind.blocks(self.module)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The parameters before the first block: patch or token embeddings, positions, a pre-norm."""
        return self.kind.embedding_parameters(self.module)

    def head_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: what comes after the blocks (final norm, pooling, projection)."""
        before_or_in = {id(p) for p in self.embedding_parameters()}
        before_or_in.update(id(p) for block in self.blocks() for p in block.parameters())
        return [p for p in self.parameters() if id(p) not in before_or_in]

    def compile_units(self, per_block: bool = False) -> list[nn.Module]:
        """What ``torch.compile`` compiles in place: the wrapped module, whose forward holds all the
        tower's compute (the tower's own forward has Python switches), or each block (FSDP's pattern)."""
        return self.blocks() if per_block else [self.module]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of storing its activations; a ValueError when
        the wrapped module cannot (open_clip's ModifiedResNet, whose own call would do nothing)."""
        self.kind.set_grad_checkpointing(self.module, enable)
        if self.grad_checkpointing != enable:
            raise ValueError(f"{self.describe()} does not support activation checkpointing")

    @property
    def grad_checkpointing(self) -> bool:
        return self.kind.grad_checkpointing(self.module)

    @property
    def patch_dropout(self) -> float:
        """The fraction of image patches dropped in training (0 when none are)."""
        return self.kind.patch_dropout(self.module)

    @property
    def has_tokens(self) -> bool:
        """Whether ``forward(..., output_tokens=True)`` works."""
        return self.kind.has_tokens(self.module)

    @property
    def token_dim(self) -> int:
        """The width of the token features (``output_dim`` when projected like the pooled ones)."""
        return self.kind.token_dim(self.module, self.output_dim) if self.has_tokens else 0

    @property
    def token_embedding(self) -> nn.Embedding | None:
        """The lookup of input token ids (text towers), or None."""
        return self.kind.token_embedding(self.module)

    def describe(self) -> str:
        """The wrapped module's class, with the trunk's for a timm tower (what error messages name)."""
        return self.kind.describe(self.module)

    def apply_lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = False) -> None:
        """Freeze all but the last ``unlocked_groups`` layer groups (LiT)."""
        raise NotImplementedError(f"{type(self).__name__} does not support locking")

    @property
    def unprojected_dim(self) -> int:
        """The width of :meth:`forward_unprojected`'s features."""
        return self.kind.unprojected_dim(self.module, self.output_dim)

    def forward_unprojected(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, unprojected_dim] before the projection into the shared embedding space
        (the encoder's own representation, what SLIP's SSL head reads). Called through
        :func:`unprojected_calls`, so that a wrapper (DDP, FSDP) around the tower runs it;
        ``trainer.compile`` does not cover this path."""
        return self.kind.unprojected(self.module, inputs)


class OpenClipImageTower(Tower):
    """open_clip's ``visual`` module: VisionTransformer, ModifiedResNet or TimmModel."""

    no_tokens_hint = f"; {VIT_TOWERS}"

    def __init__(self, visual: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.module = visual
        self.kind = kind_of(visual)
        self.output_dim = output_dim

    @property
    def image_size(self) -> int:
        size = getattr(self.module, "image_size", 224)
        return int(size[0] if isinstance(size, tuple | list) else size)

    def apply_lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = False) -> None:
        # open_clip implements group-wise locking for ViT, ModifiedResNet and timm trunks.
        self.module.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_norm_stats)


class OpenClipTextTower(Tower):
    """open_clip's ``TextTransformer`` (or HF text encoder) as built for CustomTextCLIP."""

    def __init__(self, text: nn.Module, output_dim: int, pad_id: int = 0) -> None:
        super().__init__()
        self.module = text
        self.kind = kind_of(text)
        self.output_dim = output_dim
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return int(self.module.vocab_size)

    @property
    def context_length(self) -> int:
        return int(self.module.context_length)

    def apply_lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        self.module.lock(unlocked_layers=unlocked_groups, freeze_layer_norm=freeze_norm_stats)

    @property
    def can_attend_both_ways(self) -> bool:
        """Whether :meth:`attending_both_ways` works: open_clip's ``TextTransformer`` (masks it builds itself)."""
        return self.kind is OpenClipText

    @contextlib.contextmanager
    def attending_both_ways(self) -> Iterator[None]:
        """Inside, this tower's calls attend in both directions: no causal mask, and padding
        (``pad_id``) masked as an attention key, which the causal mask hid until now.

        open_clip's ``TextTransformer`` builds its mask from these two attributes at every call
        (what its own ``no_causal_mask=True, use_pad_mask=True`` build does), so the switch holds
        for the calls inside only, through any wrapper around the tower (DDP) and with activation
        checkpointing (the mask is an argument of each block); the weights are untouched.
        """
        if not self.can_attend_both_ways:
            raise NotImplementedError(f"{type(self.module).__name__} has no causal mask to lift")
        saved = self.module.attn_mask, self.module.use_pad_mask
        self.module.attn_mask, self.module.use_pad_mask = None, True
        try:
            yield
        finally:
            self.module.attn_mask, self.module.use_pad_mask = saved


@contextlib.contextmanager
def unprojected_calls(tower: Tower) -> Iterator[None]:
    """Within the block, calling ``tower`` (or a DDP / FSDP wrapper around it, which calls the tower's
    ``forward``) returns ``TowerOutput(pooled=tower.forward_unprojected(inputs))``. Going through the
    wrapper's own call is what keeps its gradient hooks and parameter gathering in effect."""

    def forward(inputs: torch.Tensor, output_tokens: bool = False) -> TowerOutput:
        if output_tokens:
            raise ValueError("unprojected features are pooled only: output_tokens must be False")
        return TowerOutput(pooled=tower.forward_unprojected(inputs))

    tower.forward = forward  # an instance attribute, found before the class's forward
    try:
        yield
    finally:
        del tower.forward
