"""Parameter groups by tower: per-tower lr and weight decay, and layer-wise lr decay (BEiT / EVA-CLIP).

Each group is a dict with a ``name`` (what TensorBoard shows as ``train/lr/<name>``), its ``lr``,
its ``weight_decay`` and its ``params``; decayed matrices and undecayed 1-d parameters of one name
are two groups with the same lr. The model's towers are found as its ``image_tower`` and
``text_tower``; every other trainable parameter (the temperature, the logit bias, the objective's
heads) is in the ``heads`` group at ``optim.lr`` / ``optim.weight_decay``.

Layer decay: a tower of depth L has layer ids 0 (embeddings), i + 1 (block i) and L + 1 (final
norm, projection, pooling); a parameter of layer id k gets lr x decay^(L + 1 - k), so block i gets
decay^(L - i), embeddings decay^(L + 1), the tower's end and the heads decay^0. timm's
``param_groups_layer_decay`` does not fit here: open_clip's towers have no ``group_matcher``, and on
a timm trunk it ranks the final norm and the unmatched head as two layers (norm at decay^1).
timm trunks still give their own embedding names (``group_matcher()['stem']``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

TOWERS = ("image", "text")
# open_clip VisionTransformer / TextTransformer: what comes before ``transformer.resblocks``.
OPEN_CLIP_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding", "cls_emb")


def _block_layout(module: nn.Module) -> tuple[str, int, Callable[[str], bool]] | None:
    """(blocks' name prefix, depth, is-embedding test on parameter names) of a transformer tower."""
    resblocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if isinstance(resblocks, nn.ModuleList):
        return "transformer.resblocks.", len(resblocks), lambda name: name.split(".")[0] in OPEN_CLIP_EMBEDDINGS
    trunk = getattr(module, "trunk", None)  # open_clip's TimmModel around a timm ViT / EVA
    blocks = getattr(trunk, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and hasattr(trunk, "group_matcher"):
        stem = re.compile(trunk.group_matcher(coarse=False)["stem"])
        return "trunk.blocks.", len(blocks), lambda name: name.startswith("trunk.") and bool(stem.match(name[6:]))
    return None


def tower_layer_ids(tower: nn.Module, tower_name: str = "tower") -> tuple[int, dict[str, int]]:
    """(depth L, parameter name -> layer id) of a tower's wrapped module (``tower.module``).

    A tower without transformer blocks (RN50's ModifiedResNet, a timm CNN trunk) is an error.
    """
    module = getattr(tower, "module", tower)
    layout = _block_layout(module)
    if layout is None:
        raise ValueError(
            f"optim.layer_decay: the {tower_name} tower ({type(module).__name__}) has no transformer blocks; "
            f"drop it from optim.layer_decay_towers"
        )
    prefix, depth, is_embedding = layout
    ids = {}
    for name, _ in module.named_parameters():
        if name.startswith(prefix):
            ids[name] = int(name[len(prefix) :].split(".")[0]) + 1
        else:
            ids[name] = 0 if is_embedding(name) else depth + 1
    return depth, ids


def _layer_group_name(tower_name: str, layer_id: int, depth: int) -> str:
    if layer_id == 0:
        return f"{tower_name}_embeddings"
    return f"{tower_name}_block_{layer_id - 1}" if layer_id <= depth else f"{tower_name}_final"


def build_tower_param_groups(
    modules: Iterable[nn.Module],
    lr: float,
    weight_decay: float,
    towers: Mapping[str, tuple[float, float]],
    layer_decay: float | None = None,
    layer_decay_towers: Sequence[str] = (),
) -> list[dict]:
    """Named groups of the trainable parameters of ``modules`` (see the module docstring).

    ``towers`` maps ``image`` / ``text`` to that tower's (lr, weight decay); the towers named in
    ``layer_decay_towers`` are split per layer when ``layer_decay`` is set.
    """
    groups: dict[tuple[str, bool], dict] = {}
    seen: set[int] = set()

    def add(name: str, group_lr: float, group_wd: float, param: nn.Parameter) -> None:
        if not param.requires_grad or id(param) in seen:
            return
        seen.add(id(param))
        decayed = param.ndim >= 2  # gains, biases, the temperature: no weight decay (CLIP's rule)
        key = (name, decayed)
        if key not in groups:
            groups[key] = {"name": name, "lr": group_lr, "weight_decay": group_wd if decayed else 0.0, "params": []}
        groups[key]["params"].append(param)

    for module in modules:
        for tower_name in TOWERS:
            tower = getattr(module, f"{tower_name}_tower", None)
            if tower is None:
                continue
            tower_lr, tower_wd = towers[tower_name]
            tower_module = getattr(tower, "module", tower)
            if layer_decay is not None and tower_name in layer_decay_towers:
                depth, ids = tower_layer_ids(tower, tower_name)
                for name, param in tower_module.named_parameters():
                    scale = layer_decay ** (depth + 1 - ids[name])
                    add(_layer_group_name(tower_name, ids[name], depth), tower_lr * scale, tower_wd, param)
            for param in tower.parameters():  # the rest (or all) of the tower at its own lr
                add(tower_name, tower_lr, tower_wd, param)
        for param in module.parameters():
            add("heads", lr, weight_decay, param)
    return list(groups.values())
