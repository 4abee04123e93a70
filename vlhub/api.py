"""Load a trained model outside the CLI: ``model, preprocess, tokenizer = vlhub.load(path)``.

    import vlhub, torch
    model, preprocess, tokenizer = vlhub.load("runs/my_run/checkpoints/latest.pt")
    with torch.no_grad():
        image = model.encode_image(preprocess(pil_image)[None])       # normalised [1, D]
        text = model.encode_text(tokenizer(["a photo of a dog"]))      # normalised [1, D]

A vlhub checkpoint carries its training config, which says how to build the model. A plain
open_clip checkpoint (a state dict, or open_clip's ``{"state_dict": ...}``) needs the model
config too: ``vlhub.load(path, model={"_target_": "vlhub.models.build_open_clip_model", "arch": "ViT-B-32"})``.

A checkpoint is data: its model is rebuilt only through a registered builder (``vlhub.registry.MODELS``)
called with plain arguments, never by instantiating a ``_target_`` stored in the file
(:func:`build_model_from_config`). Every command that reads a checkpoint goes through here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlhub.augment import build_plain_transforms
from vlhub.eval.scoring import Scoring, default_scoring
from vlhub.models import VisionLanguageModel
from vlhub.objectives import Objective, build_objective
from vlhub.parallel.sharded_checkpoint import MARKER as SHARDED_MARKER
from vlhub.registry import MODELS, UnsafeConfigError, check_plain_data
from vlhub.run.checkpoint import read_checkpoint_file, weights_from

log = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    """What :func:`load` returns; unpacks as ``model, preprocess, tokenizer``.

    ``objective`` is the trained objective with its heads (None for a plain open_clip checkpoint
    or one saved before objectives were stored); ``scoring`` is how it scores images at evaluation.
    """

    model: VisionLanguageModel
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W]: resize, centre crop, normalise
    tokenizer: Callable[[list[str]], torch.Tensor]
    objective: Objective | None = None

    def __iter__(self):  # ``model, preprocess, tokenizer = vlhub.load(...)``
        return iter((self.model, self.preprocess, self.tokenizer))

    @property
    def scoring(self) -> Scoring:
        return self.objective.scoring(self.model) if self.objective is not None else default_scoring(self.model)


def read_checkpoint(path: str | Path, key: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint as plain containers (``weights_only``, on CPU); a missing, truncated or
    garbage file is an error naming ``key`` and the path, and so is a sharded directory."""
    checkpoint = read_checkpoint_file(path, key)
    if SHARDED_MARKER in checkpoint:  # its weights are per-rank shards, read back only by training's resume
        raise ValueError(
            f"{key}={path} is a sharded checkpoint directory (trainer.strategy=fsdp), for resuming training: "
            "give the step_<N>.pt beside it, which holds the full weights"
        )
    return checkpoint


def build_model_from_config(node: Mapping[str, Any], key: str = "model", **overrides: Any) -> VisionLanguageModel:
    """The safe loader: a model config node built by the registered builder its ``_target_``
    names, with plain-data arguments; anything else (another target, a nested ``_target_``)
    is refused naming ``key``. Nothing named in the node is imported or instantiated."""
    return MODELS.build_node(node, key, **overrides)


def stored_model_config(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``model`` group of a vlhub checkpoint's training config; None for other checkpoints."""
    config = checkpoint.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping):
        return dict(config["model"])
    return None


def build_model(
    checkpoint_path: str | Path | None,
    model: Mapping[str, Any] | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> VisionLanguageModel:
    """The model with the checkpoint's weights (or as ``model`` builds it when there is no checkpoint).

    ``model`` is a model group config (a ``_target_`` node, as in ``configs/model/``); a vlhub
    checkpoint's stored one is used when ``model`` is None. ``checkpoint`` is the already read file.
    """
    if checkpoint_path is None:
        if model is None:
            raise ValueError("give a checkpoint, a model config, or both")
        return build_model_from_config(model)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint is None else checkpoint
    stored = stored_model_config(checkpoint)
    if stored is not None:
        # A vlhub checkpoint: build as trained (never re-fetching its initial weights), then load
        # its open_clip-named state_dict exactly.
        node, key = (stored, f"config.model of checkpoint={checkpoint_path}") if model is None else (model, "model")
        built = build_model_from_config(node, key, pretrained=None, image_pretrained=None, text_pretrained=None)
        with weights_from(f"checkpoint={checkpoint_path}"):  # a wrong shape names the file
            built.load_open_clip_state_dict(checkpoint["state_dict"])
        return built
    if model is None:
        raise ValueError(
            f"checkpoint={checkpoint_path} is a plain open_clip checkpoint (no stored vlhub config): "
            "say which architecture it is with model=... (e.g. model=vit_b32)"
        )
    # open_clip's own loader converts its older layouts ("module." prefixes, CLIP vs CustomTextCLIP).
    return build_model_from_config(model, pretrained=str(checkpoint_path), image_pretrained=None, text_pretrained=None)


def build_trained_objective(checkpoint: Mapping[str, Any], model: VisionLanguageModel) -> Objective | None:
    """The checkpoint's objective, heads included, rebuilt through the registry (never from a stored
    ``_target_``) for ``model``; None when the checkpoint stores none (a plain open_clip checkpoint)."""
    spec = checkpoint.get("objective_spec")
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise UnsafeConfigError("objective_spec must be {'name': registered objective, 'kwargs': {...}}")
    check_plain_data(spec.get("kwargs", {}), "objective_spec.kwargs")
    objective = build_objective(spec, model)
    objective.load_state_dict(checkpoint["objective"])
    return objective.to(next(model.parameters()).device).eval()


def eval_transform(model: VisionLanguageModel) -> Callable[[Any], torch.Tensor]:
    """Resize, centre crop and normalise with the model's own image size and statistics."""
    return build_plain_transforms(model.image_stats).eval


def load(path: str | Path, model: Mapping[str, Any] | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Model (in eval mode, on ``device``), its eval preprocessing and its tokenizer, from a checkpoint."""
    checkpoint = read_checkpoint(path)
    built = build_model(path, model, checkpoint).to(device).eval()
    return LoadedModel(built, eval_transform(built), built.tokenize, build_trained_objective(checkpoint, built))
