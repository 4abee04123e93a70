"""VisionLanguageModel: two towers, a shared embedding space and a temperature.

Evaluation needs nothing but ``encode_image`` / ``encode_text``, so every objective is
evaluated the same way. ``forward`` is what objectives call; under data parallelism it runs each
tower through its wrapper (DDP, :meth:`wrap_tower`), evaluation's ``encode_*`` run the towers bare.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.models.towers import Tower, unprojected_calls

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class ImageStats:
    """What image transforms need to know about the model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class OpenClipLayout:
    """How this model's weights are named in open_clip, so checkpoints load there too.

    ``text_prefix`` is ``""`` for open_clip's CLIP class (text weights at top level) and
    ``"text."`` for CustomTextCLIP; ``arch`` is open_clip's model name when it has one and
    ``model_cfg`` the config open_clip needs to rebuild it.
    """

    arch: str | None
    model_cfg: dict = field(default_factory=dict)
    text_prefix: str = ""


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
        self.open_clip_layout = open_clip_layout
        # A plain dict, not submodules: a wrapper (DDP) holds its tower, and registering it here would
        # put a second copy of every weight, under other names, into state_dict and parameters().
        self.tower_wrappers: dict[str, nn.Module] = {}
        # State-dict keys whose values came from weights (model.pretrained, a tower's file, timm's, a
        # checkpoint): an objective's apply_init leaves them as loaded (vlhub.objectives.base.set_by_weights).
        self.loaded_keys: set[str] = set()

    @property
    def embed_dim(self) -> int:
        return self.image_tower.output_dim

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``max_logit_scale`` (CLIP's 100)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def wrap_tower(self, name: str, wrapper: nn.Module) -> None:
        """Run tower ``name`` ("image" or "text") through ``wrapper`` in ``forward`` when gradients are on.

        Without gradients (the gradient cache's first pass, scoring) the tower runs bare: the same
        result, and no data-parallel bookkeeping nor collective for a pass that has no backward.
        """
        if getattr(self, f"{name}_tower", None) is None:
            raise ValueError(f"this model has no {name} tower to wrap")
        self.tower_wrappers[name] = wrapper

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
            if torch.is_grad_enabled():
                tower = self.tower_wrappers.get(name, tower)
            if name == "image" and image_unprojected:
                with unprojected_calls(self.image_tower):
                    result = tower(inputs)
            else:
                result = tower(inputs, output_tokens=output_tokens)
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
        if self.open_clip_layout is None:
            return {}
        config = copy.deepcopy(self.open_clip_layout.model_cfg)
        if self.logit_bias is not None:
            config["init_logit_bias"] = float(self.logit_bias.detach())  # the weights overwrite it
        return config

    def _open_clip_key_map(self) -> dict[str, str]:
        """vlhub state_dict key -> open_clip state_dict key."""
        if self.open_clip_layout is None:
            raise ValueError("this model has no open_clip layout")
        mapping = {f"image_tower.module.{k}": f"visual.{k}" for k in self.image_tower.module.state_dict()}
        if self.text_tower is not None:
            prefix = self.open_clip_layout.text_prefix
            mapping.update({f"text_tower.module.{k}": f"{prefix}{k}" for k in self.text_tower.module.state_dict()})
        mapping["logit_scale"] = "logit_scale"
        if self.logit_bias is not None:
            mapping["logit_bias"] = "logit_bias"
        return mapping

    def open_clip_state_dict(self, own: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights under open_clip's names: what ``open_clip.create_model`` loads. ``own`` is a
        state dict of this model to rename (a sharded model's, gathered); default: ``state_dict()``."""
        own = self.state_dict() if own is None else own
        if self.open_clip_layout is None:
            return {k: v.detach().clone() for k, v in own.items()}
        return {oc_key: own[key].detach().clone() for key, oc_key in self._open_clip_key_map().items()}

    def load_open_clip_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict_from_open_clip(state_dict)
        self.load_state_dict(own)
        self.loaded_keys.update(own)

    def state_dict_from_open_clip(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights under open_clip's names renamed to this model's (``load_state_dict``'s keys)."""
        if self.open_clip_layout is None:
            return dict(state_dict)
        mapping = self._open_clip_key_map()
        missing = [oc for oc in mapping.values() if oc not in state_dict]
        unexpected = sorted(set(state_dict) - set(mapping.values()))
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match this model: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
            )
        return {key: state_dict[oc] for key, oc in mapping.items()}
