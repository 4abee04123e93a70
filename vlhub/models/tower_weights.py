"""One tower's weights from a file or an open_clip tag (``model.image_pretrained`` / ``text_pretrained``).

A source holds an open_clip checkpoint (a state dict, or one under ``state_dict``, with or without
DDP's ``module.`` prefix), a vlhub checkpoint (its ``state_dict`` is in open_clip's layout), timm
weights of a timm image trunk, or a tower's own state dict. Only the tower's keys are taken:
``visual.*`` for the image tower; ``text.*``, or the top-level keys that are not ``visual.*``, for
the text tower; a timm trunk's keys go under ``trunk.`` (the projection head then stays freshly
initialised, as with ``timm_pretrained``). Files are read with ``weights_only`` (or safetensors),
never unpickled. Keys matching a ``pretrained_skip`` glob are not loaded; anything else the tower
lacks is an error naming the keys, and what the source has beyond the tower is logged.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import torch
from torch import nn

from vlhub.run.checkpoint import CheckpointError, read_checkpoint_file

log = logging.getLogger(__name__)
STRIP = ("module.",)  # DDP's wrapper prefix
NOT_TEXT = ("visual.", "logit_scale", "logit_bias")
SHOWN = 8  # keys shown per list in messages


def _shown(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return f"{keys[:SHOWN]}{more}"


def resolve_source(source: str, key: str, arch: str | None) -> str:
    """A local path as is; an open_clip tag of ``arch`` downloaded (needs the network) like ``pretrained``."""
    if os.path.isfile(source):
        return source
    if arch is None or open_clip.get_pretrained_cfg(arch, source) == {}:
        tags = open_clip.list_pretrained_tags_by_model(arch) if arch else []
        raise FileNotFoundError(f"{key}={source}: neither a file nor an open_clip tag of {arch!r} (tags: {tags})")
    return open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, source))


def read_state_dict(path: str, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (torch ``weights_only`` or safetensors), outer wrappers removed."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{key}={path}: reading .safetensors needs the safetensors package") from None
        try:
            loaded: Any = load_file(path, device="cpu")
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"{key}={path} is not a readable safetensors file ({type(error).__name__})") from None
    else:
        try:
            loaded = read_checkpoint_file(path, key)
        except CheckpointError as error:
            raise ValueError(str(error)) from None
    if isinstance(loaded.get("state_dict"), Mapping):  # open_clip's training checkpoints, vlhub's
        loaded = loaded["state_dict"]
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    for prefix in STRIP:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _image_keys(source: dict[str, torch.Tensor], tower: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The source's image-tower tensors under the tower's names, and the prefix of what it must cover."""
    if any(k.startswith("visual.") for k in source):
        return {k.removeprefix("visual."): v for k, v in source.items() if k.startswith("visual.")}, ""
    trunk = getattr(tower, "trunk", None)
    if isinstance(trunk, nn.Module) and set(source) & set(trunk.state_dict()):  # timm weights of the trunk
        return {f"trunk.{k}": v for k, v in source.items()}, "trunk."
    return source, ""


def _text_keys(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("text.") for k in source):
        return {k.removeprefix("text."): v for k, v in source.items() if k.startswith("text.")}
    return {k: v for k, v in source.items() if not k.startswith(NOT_TEXT)}


def apply_tower_weights(
    tower: nn.Module, source: dict[str, torch.Tensor], which: str, key: str, path: str, skip: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Load ``source`` into ``tower`` (``which`` is ``image`` or ``text``); returns the report
    (``loaded``, ``skipped``, ``unexpected``). Missing unskipped keys or other shapes raise, naming them."""
    candidates, covers = _image_keys(source, tower) if which == "image" else (_text_keys(source), "")
    own = tower.state_dict()
    if not set(candidates) & set(own):
        raise ValueError(
            f"{key}={path}: no key of the file matches the {which} tower "
            f"(file keys {_shown(list(source))}, tower keys {_shown(list(own))})"
        )
    skipped = [k for k in own if any(fnmatch.fnmatchcase(k, pattern) for pattern in skip)]
    wanted = [k for k in own if k.startswith(covers) and k not in skipped]
    missing = [k for k in wanted if k not in candidates]
    if missing:
        raise ValueError(
            f"{key}={path}: the {which} tower's keys {_shown(missing)} are not in the file "
            f"({len(missing)} in all); list them in model.pretrained_skip to keep their fresh values"
        )
    other_shape = [k for k in wanted if candidates[k].shape != own[k].shape]
    if other_shape:
        shapes = ", ".join(f"{k}: {tuple(candidates[k].shape)} vs {tuple(own[k].shape)}" for k in other_shape[:SHOWN])
        raise ValueError(f"{key}={path}: shapes differ ({shapes}); list them in model.pretrained_skip")
    tower.load_state_dict({k: candidates[k] for k in wanted}, strict=False)
    report = {"loaded": wanted, "skipped": skipped, "unexpected": sorted(set(candidates) - set(own))}
    log.info(
        "%s=%s: loaded %d %s-tower tensors; skipped (kept fresh) %s; missing %s; unexpected (not loaded) %s",
        key,
        path,
        len(wanted),
        which,
        _shown(skipped),
        _shown([k for k in own if k not in wanted and k not in skipped]),
        _shown(report["unexpected"]),
    )
    return report


def load_tower_pretrained(
    tower: nn.Module, source: str, which: str, arch: str | None, skip: Sequence[str] = ()
) -> dict[str, list[str]]:
    """``model.<which>_pretrained=source`` (a path or an open_clip tag of ``arch``) into ``tower``."""
    key = f"model.{which}_pretrained"
    path = resolve_source(source, key, arch)
    return apply_tower_weights(tower, read_state_dict(path, key), which, key, path, skip)
