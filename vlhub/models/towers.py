"""The Tower interface and its adapters for open_clip's image and text towers.

A tower maps its input to pooled features [B, D] in the shared embedding space and, when
asked, to token features [B, N, D'] with a padding mask (True where a token is real). Token
features go through the same projection as the pooled path where the tower has one (open_clip
ViT ``proj``, text ``text_projection``), so D' = D there; ``token_dim`` says which it is.
Adapters keep the wrapped open_clip module under ``.module`` so that its state_dict keys
are open_clip's own, behind a known prefix (see ``open_clip_prefix``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

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


def _pooled_and_tokens(module: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Call an open_clip tower with its ``output_tokens`` switch on, for this call only."""
    previous = module.output_tokens
    module.output_tokens = True
    try:
        return module(inputs)
    finally:
        module.output_tokens = previous


def _project(tokens: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    """Tokens through the tower's own pooled-path projection (a matrix or a Linear), if it has one."""
    if projection is None:
        return tokens
    if isinstance(projection, nn.Module):
        return projection(tokens)
    return tokens @ projection


def _timm_token_trunk(visual: nn.Module) -> nn.Module | None:
    """The timm trunk of open_clip's ``TimmModel`` when it is a ViT-like model with patch tokens
    (``num_prefix_tokens``: ViT, EVA02, DeiT, BEiT...), else None (a CNN, or an attention-pool head)."""
    trunk = getattr(visual, "trunk", None)
    head = getattr(visual, "head", None)
    if trunk is None or not isinstance(getattr(trunk, "num_prefix_tokens", None), int):
        return None
    if head is not None and hasattr(head, "pool"):  # open_clip's abs/rot attention pool is not per token
        return None
    return trunk


def _timm_pooled_and_tokens(visual: nn.Module, trunk: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """open_clip's ``TimmModel`` forward split in two: the pooled features as ``visual(inputs)`` gives
    them, and the patch tokens (prefix tokens dropped) through the layers the pooled path applies after
    its pooling (timm's ``fc_norm``, ``head_drop``, ``head``; open_clip's ``head``), one trunk pass."""
    features = trunk.forward_features(inputs)
    if features.dim() != 3:
        raise NotImplementedError(
            f"{type(trunk).__name__} (timm trunk) gives features of shape {tuple(features.shape)}, not tokens"
        )
    pooled = visual.head(trunk.forward_head(features))
    tokens = features[:, trunk.num_prefix_tokens :]
    for name in ("fc_norm", "head_drop", "head"):
        tokens = getattr(trunk, name, nn.Identity())(tokens)
    return pooled, visual.head(tokens)


class Tower(nn.Module):
    """Base of every tower. Subclasses set ``output_dim`` and implement ``forward``.

    ``has_tokens`` says whether ``forward(..., output_tokens=True)`` works; ``token_dim`` is the
    width of those tokens (``output_dim`` when they are projected like the pooled features).
    """

    output_dim: int
    has_tokens: bool = False
    token_dim: int = 0

    def forward(self, inputs: torch.Tensor, output_tokens: bool = False) -> TowerOutput:
        raise NotImplementedError

    def describe(self) -> str:
        """The wrapped module's class, with the trunk's for a timm tower (what error messages name)."""
        module = getattr(self, "module", self)
        trunk = getattr(module, "trunk", None)
        name = type(module).__name__
        return f"{name} (timm {type(trunk).__name__})" if trunk is not None else name

    def apply_lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = False) -> None:
        """Freeze all but the last ``unlocked_groups`` layer groups (LiT)."""
        raise NotImplementedError(f"{type(self).__name__} does not support locking")

    @property
    def unprojected_dim(self) -> int:
        """The width of :meth:`forward_unprojected`'s features."""
        raise NotImplementedError(f"{type(self).__name__} does not expose features before its projection")

    def forward_unprojected(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, unprojected_dim] before the projection into the shared embedding space
        (the encoder's own representation, what SLIP's SSL head reads). Called through
        :func:`unprojected_calls`, so that a wrapper (DDP, FSDP) around the tower runs it."""
        raise NotImplementedError(f"{type(self).__name__} does not expose features before its projection")


class OpenClipImageTower(Tower):
    """open_clip's ``visual`` module: VisionTransformer, ModifiedResNet or TimmModel."""

    def __init__(self, visual: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.module = visual
        self.output_dim = output_dim
        # open_clip's ViTs and timm ViT trunks expose tokens; ModifiedResNet and timm CNNs do not.
        self.has_tokens = hasattr(visual, "output_tokens") or _timm_token_trunk(visual) is not None
        if _timm_token_trunk(visual) is not None:
            self.token_dim = output_dim  # tokens take the pooled path's own layers after its pooling
        elif self.has_tokens:
            projection = getattr(visual, "proj", None)
            self.token_dim = output_dim if projection is not None else int(visual.transformer.width)

    @property
    def image_size(self) -> int:
        size = getattr(self.module, "image_size", 224)
        return int(size[0] if isinstance(size, tuple | list) else size)

    def forward(self, inputs: torch.Tensor, output_tokens: bool = False) -> TowerOutput:
        if not output_tokens:
            return TowerOutput(pooled=self.module(inputs))
        trunk = _timm_token_trunk(self.module)
        if trunk is not None:
            pooled, tokens = _timm_pooled_and_tokens(self.module, trunk, inputs)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            return TowerOutput(pooled=pooled, tokens=tokens, token_mask=mask)
        if not hasattr(self.module, "output_tokens"):
            raise NotImplementedError(f"{self.describe()} does not expose token features; {VIT_TOWERS}")
        pooled, tokens = _pooled_and_tokens(self.module, inputs)
        tokens = _project(tokens, getattr(self.module, "proj", None))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TowerOutput(pooled=pooled, tokens=tokens, token_mask=mask)

    def apply_lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = False) -> None:
        # open_clip implements group-wise locking for ViT, ModifiedResNet and timm trunks.
        self.module.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_norm_stats)

    @property
    def unprojected_dim(self) -> int:
        visual = self.module
        if hasattr(visual, "trunk"):  # open_clip's TimmModel: the trunk's pre-logits width
            return int(getattr(visual.trunk, "head_hidden_size", None) or visual.trunk.num_features)
        if hasattr(visual, "attnpool"):  # ModifiedResNet: layer4's channels
            return int(visual.attnpool.k_proj.in_features)
        projection = getattr(visual, "proj", None)
        return int(projection.shape[0]) if projection is not None else self.output_dim

    def forward_unprojected(self, inputs: torch.Tensor) -> torch.Tensor:
        """A ViT's pooled token before ``proj`` (after ``ln_post``); a timm trunk's pre-logits features
        (before open_clip's ``head``, or the trunk's classifier when that is the projection); for a
        ModifiedResNet, whose attention pool ends in its projection, layer4 averaged over space.
        Built from open_clip 3.x's own steps (``_embeds``, ``transformer``, ``_pool``), so patch dropout
        and gradient checkpointing act as in ``forward``; ``trainer.compile`` does not cover this path."""
        visual = self.module
        if hasattr(visual, "trunk"):
            features = visual.trunk.forward_head(visual.trunk.forward_features(inputs), pre_logits=True)
            return features.flatten(2).mean(-1) if features.ndim > 2 else features  # attention-pool trunks
        if hasattr(visual, "attnpool"):
            x = visual.stem(inputs)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            return x.mean(dim=(2, 3))
        pooled, _ = visual._pool(visual.transformer(visual._embeds(inputs)))
        return pooled


class OpenClipTextTower(Tower):
    """open_clip's ``TextTransformer`` (or HF text encoder) as built for CustomTextCLIP."""

    def __init__(self, text: nn.Module, output_dim: int, pad_id: int = 0) -> None:
        super().__init__()
        self.module = text
        self.output_dim = output_dim
        self.pad_id = pad_id
        self.has_tokens = hasattr(text, "output_tokens")
        projection = getattr(text, "text_projection", None)
        self.token_dim = output_dim if projection is not None else int(getattr(text, "width", output_dim))

    @property
    def vocab_size(self) -> int:
        return int(self.module.vocab_size)

    @property
    def context_length(self) -> int:
        return int(self.module.context_length)

    def forward(self, inputs: torch.Tensor, output_tokens: bool = False) -> TowerOutput:
        if not output_tokens:
            return TowerOutput(pooled=self.module(inputs))
        pooled, tokens = _pooled_and_tokens(self.module, inputs)
        tokens = _project(tokens, getattr(self.module, "text_projection", None))
        return TowerOutput(pooled=pooled, tokens=tokens, token_mask=inputs != self.pad_id)

    def apply_lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        self.module.lock(unlocked_layers=unlocked_groups, freeze_layer_norm=freeze_norm_stats)

    @property
    def can_attend_both_ways(self) -> bool:
        """Whether :meth:`attending_both_ways` works: open_clip's ``TextTransformer`` (masks it builds itself)."""
        return hasattr(self.module, "attn_mask") and hasattr(self.module, "use_pad_mask")

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
