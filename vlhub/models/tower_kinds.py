"""What vlhub needs to know about each kind of module a tower wraps, written once per kind.

A tower (``vlhub.models.towers``) holds an open_clip or timm or Hugging Face module and answers the
engine's questions about it (its blocks, embeddings, gradient checkpointing, patch dropout, token
features) through one of these kinds, chosen by the module's class when the tower is built:

- :class:`OpenClipViT`: open_clip's ``VisionTransformer``;
- :class:`OpenClipResNet`: open_clip's ``ModifiedResNet`` (RN50), convolutional;
- :class:`TimmTrunk`: open_clip's ``TimmModel`` around any timm trunk (a ViT, EVA02, a CNN);
- :class:`OpenClipText`: open_clip's ``TextTransformer``;
- :class:`HfText`: open_clip's ``HFTextEncoder`` around a Hugging Face encoder.

Each kind is a namespace of functions of the wrapped module (no state), so a tower deep-copied,
compiled or sharded still answers for the module it holds. This is the only place that knows the
attribute paths inside those modules (``transformer.resblocks``, ``trunk.blocks``, ...).
"""

from __future__ import annotations

import re

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import PatchDropout as OpenClipPatchDropout
from open_clip.transformer import TextTransformer, VisionTransformer
from timm.layers import PatchDropout as TimmPatchDropout
from torch import nn

Pair = tuple[torch.Tensor, torch.Tensor]


def _switch_tokens_on(module: nn.Module, inputs: torch.Tensor) -> Pair:
    """Call an open_clip tower with its ``output_tokens`` switch on, for this call only."""
    previous = module.output_tokens
    module.output_tokens = True
    try:
        return module(inputs)
    finally:
        module.output_tokens = previous


def _project(tokens: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    """Tokens through the tower's own pooled-path projection (a matrix or a module), if it has one."""
    if projection is None:
        return tokens
    return projection(tokens) if isinstance(projection, nn.Module) else tokens @ projection


def _parameters(items: list[nn.Module | nn.Parameter | None]) -> list[nn.Parameter]:
    found: list[nn.Parameter] = []
    for item in items:
        if isinstance(item, nn.Parameter):
            found.append(item)
        elif isinstance(item, nn.Module):
            found.extend(item.parameters())
    return found


def _checkpointing_flag(module: nn.Module) -> bool:
    """Whether a module below ``module`` checkpoints: open_clip and timm set ``grad_checkpointing``,
    Hugging Face models ``gradient_checkpointing``."""
    flags = ("grad_checkpointing", "gradient_checkpointing")
    return any(getattr(m, flag, False) is True for m in module.modules() for flag in flags)


class ModuleKind:
    """The answers for a module without blocks, tokens or checkpointing; kinds override what they have."""

    @staticmethod
    def blocks(module: nn.Module) -> list[nn.Module]:
        """The transformer blocks in the order the forward runs them; none for a convolutional tower."""
        return []

    @staticmethod
    def embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
        """The parameters before the first block (patch or token embeddings, positions, a pre-norm)."""
        return []

    @staticmethod
    def set_grad_checkpointing(module: nn.Module, enable: bool) -> None:
        """Recompute each block in the backward instead of storing its activations (raises if unsupported)."""
        if enable:
            raise ValueError(f"{type(module).__name__} does not support activation checkpointing")

    @staticmethod
    def grad_checkpointing(module: nn.Module) -> bool:
        return _checkpointing_flag(module)

    @staticmethod
    def patch_dropout(module: nn.Module) -> float:
        """The fraction of patches dropped in training (0 when the module drops none)."""
        drops = [m.prob for m in module.modules() if isinstance(m, OpenClipPatchDropout | TimmPatchDropout)]
        return float(max(drops, default=0.0))

    @staticmethod
    def has_tokens(module: nn.Module) -> bool:
        return False

    @staticmethod
    def tokens(module: nn.Module, inputs: torch.Tensor) -> Pair:
        """(pooled features, token features through the pooled path's projection), one pass."""
        raise NotImplementedError(f"{type(module).__name__} does not expose token features")

    @staticmethod
    def token_dim(module: nn.Module, output_dim: int) -> int:
        return 0

    @staticmethod
    def token_mask(module: nn.Module, inputs: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        """True where a token is real: every patch of an image."""
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    @staticmethod
    def token_embedding(module: nn.Module) -> nn.Embedding | None:
        """The lookup table of input token ids (text), which MLM overwrites at masked positions."""
        return None

    @staticmethod
    def unprojected(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features before the projection into the shared space (the encoder's own features)."""
        raise NotImplementedError(f"{type(module).__name__} does not expose features before its projection")

    @staticmethod
    def unprojected_dim(module: nn.Module, output_dim: int) -> int:
        raise NotImplementedError(f"{type(module).__name__} does not expose features before its projection")

    @staticmethod
    def describe(module: nn.Module) -> str:
        """The module's class (what error messages name)."""
        return type(module).__name__


class OpenClipTransformer(ModuleKind):
    """open_clip's transformer towers (its VisionTransformer and TextTransformer): blocks in
    ``transformer.resblocks``, open_clip's own checkpointing switch, token features."""

    @staticmethod
    def blocks(module: nn.Module) -> list[nn.Module]:
        return list(module.transformer.resblocks)

    @staticmethod
    def set_grad_checkpointing(module: nn.Module, enable: bool) -> None:
        module.set_grad_checkpointing(enable)

    @staticmethod
    def has_tokens(module: nn.Module) -> bool:
        return True

    @staticmethod
    def projection(module: nn.Module) -> torch.Tensor | None:
        """The matrix into the shared embedding space (None: the tower's width is the embedding)."""
        raise NotImplementedError

    @classmethod
    def tokens(cls, module: nn.Module, inputs: torch.Tensor) -> Pair:
        pooled, tokens = _switch_tokens_on(module, inputs)
        return pooled, _project(tokens, cls.projection(module))

    @classmethod
    def token_dim(cls, module: nn.Module, output_dim: int) -> int:
        return output_dim if cls.projection(module) is not None else int(module.transformer.width)


class OpenClipViT(OpenClipTransformer):
    @staticmethod
    def embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
        return _parameters([module.conv1, module.class_embedding, module.positional_embedding, module.ln_pre])

    @staticmethod
    def projection(module: nn.Module) -> torch.Tensor | None:
        return module.proj

    @staticmethod
    def unprojected(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The pooled token before ``proj`` (after ``ln_post``), from open_clip 3.x's own steps
        (``_embeds``, ``transformer``, ``_pool``), so patch dropout and checkpointing act as in ``forward``."""
        pooled, _ = module._pool(module.transformer(module._embeds(inputs)))
        return pooled

    @staticmethod
    def unprojected_dim(module: nn.Module, output_dim: int) -> int:
        return int(module.proj.shape[0]) if module.proj is not None else output_dim


class OpenClipResNet(ModuleKind):
    """Convolutional: no transformer blocks (FSDP and layer decay refuse it), no tokens, and open_clip's
    ``set_grad_checkpointing`` accepts the call and does nothing, so checkpointing is refused here."""

    @staticmethod
    def unprojected(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """layer4 averaged over space: the attention pool ends in the projection, so it is left out."""
        x = module.stem(inputs)
        x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
        return x.mean(dim=(2, 3))

    @staticmethod
    def unprojected_dim(module: nn.Module, output_dim: int) -> int:
        return int(module.attnpool.k_proj.in_features)  # layer4's channels


def _timm_token_trunk(visual: nn.Module) -> nn.Module | None:
    """The trunk of open_clip's ``TimmModel`` when it is ViT-like with patch tokens (``num_prefix_tokens``:
    ViT, EVA02, DeiT, BEiT...), else None (a CNN, or an attention-pool head, which is not per token)."""
    trunk = visual.trunk
    if not isinstance(getattr(trunk, "num_prefix_tokens", None), int):
        return None
    return None if hasattr(visual.head, "pool") else trunk


class TimmTrunk(ModuleKind):
    @staticmethod
    def blocks(module: nn.Module) -> list[nn.Module]:
        blocks = getattr(module.trunk, "blocks", None)  # ViT-like trunks; CNNs have stages instead
        return list(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else []

    @staticmethod
    def embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
        """timm's own answer: the ``stem`` of the trunk's ``group_matcher``."""
        trunk = module.trunk
        if not hasattr(trunk, "group_matcher"):
            return []
        stem = re.compile(trunk.group_matcher(coarse=False)["stem"])
        return [p for name, p in trunk.named_parameters() if stem.match(name)]

    @staticmethod
    def set_grad_checkpointing(module: nn.Module, enable: bool) -> None:
        # The trunk directly: open_clip's adapter only warns when the trunk refuses (timm asserts).
        try:
            module.trunk.set_grad_checkpointing(enable)
        except Exception as error:  # noqa: BLE001 (timm asserts, others raise their own kinds)
            raise ValueError(f"timm {type(module.trunk).__name__} cannot checkpoint ({error})") from None

    @staticmethod
    def has_tokens(module: nn.Module) -> bool:
        return _timm_token_trunk(module) is not None

    @staticmethod
    def tokens(module: nn.Module, inputs: torch.Tensor) -> Pair:
        """open_clip's ``TimmModel`` forward split in two: the pooled features as ``module(inputs)`` gives
        them, and the patch tokens (prefix tokens dropped) through the layers the pooled path applies
        after its pooling (timm's ``fc_norm``, ``head_drop``, ``head``; open_clip's ``head``)."""
        trunk = _timm_token_trunk(module)
        if trunk is None:
            raise NotImplementedError(f"timm {type(module.trunk).__name__} does not expose token features")
        features = trunk.forward_features(inputs)
        if features.dim() != 3:
            raise NotImplementedError(
                f"{type(trunk).__name__} (timm trunk) gives features of shape {tuple(features.shape)}, not tokens"
            )
        pooled = module.head(trunk.forward_head(features))
        tokens = features[:, trunk.num_prefix_tokens :]
        for name in ("fc_norm", "head_drop", "head"):
            tokens = getattr(trunk, name, nn.Identity())(tokens)
        return pooled, module.head(tokens)

    @staticmethod
    def token_dim(module: nn.Module, output_dim: int) -> int:
        return output_dim  # tokens take the pooled path's own layers after its pooling

    @staticmethod
    def unprojected(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The trunk's pre-logits features (before open_clip's ``head``, or the trunk's classifier when
        that is the projection); attention-pool trunks averaged over space."""
        features = module.trunk.forward_head(module.trunk.forward_features(inputs), pre_logits=True)
        return features.flatten(2).mean(-1) if features.ndim > 2 else features

    @staticmethod
    def unprojected_dim(module: nn.Module, output_dim: int) -> int:
        return int(getattr(module.trunk, "head_hidden_size", None) or module.trunk.num_features)

    @staticmethod
    def describe(module: nn.Module) -> str:
        return f"{type(module).__name__} (timm {type(module.trunk).__name__})"


class OpenClipText(OpenClipTransformer):
    @staticmethod
    def embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
        return _parameters([module.token_embedding, module.positional_embedding, module.cls_emb])

    @staticmethod
    def projection(module: nn.Module) -> torch.Tensor | None:
        return module.text_projection

    @staticmethod
    def token_mask(module: nn.Module, inputs: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        return inputs != pad_id

    @staticmethod
    def token_embedding(module: nn.Module) -> nn.Embedding | None:
        return module.token_embedding


class HfText(ModuleKind):
    """open_clip's ``HFTextEncoder``: ``transformer`` is the Hugging Face model (BERT, RoBERTa, T5's encoder)."""

    @staticmethod
    def blocks(module: nn.Module) -> list[nn.Module]:
        model = module.transformer
        encoder = getattr(model, "encoder", model)
        for name in ("layer", "block"):  # BERT / RoBERTa / XLM-R; T5's encoder stack
            layers = getattr(encoder, name, None)
            if isinstance(layers, nn.ModuleList):
                return list(layers)
        return []

    @staticmethod
    def embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
        model = module.transformer
        embeddings = getattr(model, "embeddings", None)  # BERT-like; T5 has its shared lookup only
        return _parameters([embeddings if embeddings is not None else model.get_input_embeddings()])

    @staticmethod
    def set_grad_checkpointing(module: nn.Module, enable: bool) -> None:
        model = module.transformer  # transformers 5 renames the calls to activation_checkpointing_*
        renamed = hasattr(model, "activation_checkpointing_enable")
        if enable:
            model.activation_checkpointing_enable() if renamed else model.gradient_checkpointing_enable()
        else:
            model.activation_checkpointing_disable() if renamed else model.gradient_checkpointing_disable()

    @staticmethod
    def has_tokens(module: nn.Module) -> bool:
        return True

    @staticmethod
    def tokens(module: nn.Module, inputs: torch.Tensor) -> Pair:
        """``HFTextEncoder.forward`` in one pass, keeping a token at every input position: open_clip drops
        the position a CLS pooler reads, which would leave the tokens one short of the captions (MLM's
        masks, FILIP's padding mask are per input position)."""
        attention = (inputs != module.config.pad_token_id).long()
        out = module.transformer(input_ids=inputs, attention_mask=attention)
        pooled = module.proj(module.pooler(out, attention))
        return pooled, module.proj(out.last_hidden_state)

    @staticmethod
    def token_dim(module: nn.Module, output_dim: int) -> int:
        return output_dim

    @staticmethod
    def token_mask(module: nn.Module, inputs: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        return inputs != module.config.pad_token_id

    @staticmethod
    def token_embedding(module: nn.Module) -> nn.Embedding | None:
        return module.transformer.get_input_embeddings()


KINDS: tuple[tuple[type[nn.Module], type[ModuleKind]], ...] = (
    (VisionTransformer, OpenClipViT),
    (ModifiedResNet, OpenClipResNet),
    (TimmModel, TimmTrunk),
    (TextTransformer, OpenClipText),
    (HFTextEncoder, HfText),
)


def kind_of(module: nn.Module) -> type[ModuleKind]:
    """The kind of ``module`` by its class; a module of another class gets the base's plain answers."""
    for cls, kind in KINDS:
        if isinstance(module, cls):
            return kind
    return ModuleKind
