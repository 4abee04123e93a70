"""VisionLanguageModel: two towers, a shared embedding space and a temperature.

Evaluation needs nothing but ``encode_image`` / ``encode_text``, so every objective is
evaluated the same way. ``forward`` is what objectives call: it runs each tower through the call a
parallel strategy routed it to (:meth:`route_tower`; DDP's choice lives in ``vlhub.parallel.ddp``),
evaluation's ``encode_*`` run the towers bare. :meth:`checkpoint_layout` says how the weights are
named in checkpoints (open_clip's names).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.models.towers import Tower, TowerOutput, unprojected_calls

Tokenizer = Callable[[list[str]], torch.Tensor]
TowerCall = Callable[..., TowerOutput]  # a tower's signature: (inputs, output_tokens=False)
TOWER_PREFIXES = {"image": "image_tower.module.", "text": "text_tower.module."}
SCALARS = ("logit_scale", "logit_bias")  # the model's own parameters, named alike in open_clip


@dataclass(frozen=True)
class ImageStats:
    """What image transforms need to know about the model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class OpenClipLayout:
    """How this model's weights are named in open_clip, so checkpoints load there too: the
    conversion between the model's state_dict keys and open_clip's, both ways.

    ``text_prefix`` is ``""`` for open_clip's CLIP class (text weights at top level) and
    ``"text."`` for CustomTextCLIP; ``arch`` is open_clip's model name when it has one and
    ``model_cfg`` the config open_clip needs to rebuild it. ``renames=False`` keeps the model's own
    names (a model not built from open_clip).
    """

    arch: str | None
    model_cfg: dict = field(default_factory=dict)
    text_prefix: str = ""
    renames: bool = True

    def open_clip_key(self, key: str) -> str:
        """The open_clip name of the model's state_dict key ``key``."""
        if not self.renames or key in SCALARS:
            return key
        if key.startswith(TOWER_PREFIXES["image"]):
            return "visual." + key.removeprefix(TOWER_PREFIXES["image"])
        if key.startswith(TOWER_PREFIXES["text"]):
            return self.text_prefix + key.removeprefix(TOWER_PREFIXES["text"])
        raise KeyError(f"{key!r} is neither a tower's weight nor {' nor '.join(SCALARS)}")

    def to_open_clip(self, own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state dict (``own``, whole: a sharded model's gathered) under open_clip's names,
        detached copies: what a checkpoint stores and ``open_clip.create_model`` loads. The towers' weights
        come first and the temperature last, the order checkpoints have always had."""
        ordered = sorted(own.items(), key=lambda item: item[0] in SCALARS)  # stable: towers keep their order
        return {self.open_clip_key(key): value.detach().clone() for key, value in ordered}

    def from_open_clip(self, weights: Mapping[str, torch.Tensor], own_keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Weights under open_clip's names renamed to the model's (``own_keys``, its state_dict's keys);
        a KeyError naming what is missing or extra when they do not match."""
        mapping = {key: self.open_clip_key(key) for key in own_keys}
        missing = [oc for oc in mapping.values() if oc not in weights]
        unexpected = sorted(set(weights) - set(mapping.values()))
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match this model: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
            )
        return {key: weights[oc] for key, oc in mapping.items()}


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        image_tower: Tower,
        text_tower: Tower | None,
        tokenizer: Tokenizer | None,
        image_stats: ImageStats,
        init_logit_scale: float,
        init_logit_bias: float | None = None,
        max_logit_scale: float = 100.0,
        open_clip_layout: OpenClipLayout | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.tokenizer = tokenizer
        self.image_stats = image_stats
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        self.max_logit_scale = max_logit_scale
        self.open_clip_layout = open_clip_layout or OpenClipLayout(arch=None, renames=False)
        # A plain dict, not submodules: a call may hold a wrapper (DDP) around its tower, and registering
        # it here would put a second copy of every weight, under other names, into state_dict.
        self.tower_calls: dict[str, TowerCall] = {}
        # State-dict keys whose values came from weights (model.pretrained, a tower's file, timm's, a
        # checkpoint): an objective's apply_init leaves them as loaded (vlhub.objectives.base.set_by_weights).
        self.loaded_keys: set[str] = set()

    @property
    def embed_dim(self) -> int:
        return self.image_tower.output_dim

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``max_logit_scale`` (CLIP's 100)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def towers(self) -> dict[str, Tower]:
        """The towers this model has, by name ("image", then "text")."""
        found = {"image": self.image_tower, "text": self.text_tower}
        return {name: tower for name, tower in found.items() if tower is not None}

    def compile_units(self, per_block: bool = False) -> list[nn.Module]:
        """What ``trainer.compile`` compiles in place: each tower's units (its wrapped module, or each
        block when ``per_block``, FSDP's pattern)."""
        return [unit for tower in self.towers().values() for unit in tower.compile_units(per_block)]

    def route_tower(self, name: str, call: TowerCall) -> None:
        """``forward`` calls tower ``name`` ("image" or "text") as ``call(inputs, output_tokens=...)``
        from now on. A parallel strategy routes a tower through its wrapper this way; the model does not
        know what the call does, and the call is not a submodule (no weight is named twice)."""
        if name not in self.towers():
            raise ValueError(f"this model has no {name} tower to route")
        self.tower_calls[name] = call

    def checkpoint_layout(self) -> OpenClipLayout:
        """How this model's weights are named in checkpoints (open_clip's names): what a parallel
        strategy converts the state dict with, and what the trainer records to rebuild the model."""
        return self.open_clip_layout

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        output_tokens: bool = False,
        image_unprojected: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Raw (unnormalised) tower outputs, keyed ``image_*`` and ``text_*``. ``image_unprojected``:
        ``image_features`` are the image tower's features before its projection
        (:meth:`~vlhub.models.towers.Tower.forward_unprojected`), for heads on the encoder's own
        features (SLIP's SSL head)."""
        out: dict[str, torch.Tensor] = {}
        for name, tower, inputs in (("image", self.image_tower, image), ("text", self.text_tower, text)):
            if inputs is None:
                continue
            if tower is None:
                raise ValueError(f"this model has no {name} tower")
            call = self.tower_calls.get(name, tower)
            if name == "image" and image_unprojected:
                with unprojected_calls(self.image_tower):
                    result = call(inputs)
            else:
                result = call(inputs, output_tokens=output_tokens)
            out[f"{name}_features"] = result.pooled
            if result.tokens is not None:
                out[f"{name}_tokens"] = result.tokens
                out[f"{name}_token_mask"] = result.token_mask
        return out

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        # Inputs follow the tower's weights (a bf16 model gets bf16 images), so callers need not know.
        dtype = next(self.image_tower.parameters()).dtype
        features = self.image_tower(images.to(dtype) if images.is_floating_point() else images).pooled
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.text_tower is None:
            raise ValueError("this model has no text tower; it cannot encode text")
        features = self.text_tower(tokens).pooled
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.tokenizer(texts)

    # -- open_clip key layout -------------------------------------------------------------
    def open_clip_config(self) -> dict:
        """The config ``open_clip.create_model`` rebuilds this model from (stored in checkpoints as
        ``open_clip_model_cfg``), with ``init_logit_bias`` when the model carries a bias (siglip)."""
        config = copy.deepcopy(self.open_clip_layout.model_cfg)
        if config and self.logit_bias is not None:
            config["init_logit_bias"] = float(self.logit_bias.detach())  # the weights overwrite it
        return config

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under open_clip's names: what ``open_clip.create_model`` loads."""
        return self.open_clip_layout.to_open_clip(self.state_dict())

    def load_open_clip_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Weights under open_clip's names (a checkpoint's ``state_dict``) into this model, all of them."""
        own = self.open_clip_layout.from_open_clip(state_dict, self.state_dict())
        self.load_state_dict(own)
        self.loaded_keys.update(own)
