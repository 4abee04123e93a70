"""Parameter groups by tower: per-tower lr and weight decay, and layer-wise lr decay (BEiT / EVA-CLIP).

Each group is a dict with a ``name`` (what TensorBoard shows as ``train/lr/<name>``), its ``lr``,
its ``weight_decay`` and its ``params``; decayed matrices and undecayed 1-d parameters of one name
are two groups with the same lr. The model's towers are ``VisionLanguageModel.towers()``;
every other trainable parameter (the temperature, the logit bias, the objective's
heads) is in the ``heads`` group at ``optim.lr`` / ``optim.weight_decay``.

Layer decay: a tower of depth L has layer ids 0 (embeddings), i + 1 (block i) and L + 1 (final
norm, projection, pooling); a parameter of layer id k gets lr x decay^(L + 1 - k), so block i gets
decay^(L - i), embeddings decay^(L + 1), the tower's end and the heads decay^0. The tower says which
parameters are which (``Tower.embedding_parameters``, ``blocks``, ``head_parameters``; a timm trunk's
embeddings are its ``group_matcher()['stem']``). timm's ``param_groups_layer_decay`` does not fit
here: open_clip's towers have no ``group_matcher``, and on a timm trunk it ranks the final norm and
the unmatched head as two layers (norm at decay^1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from vlhub.models.towers import Tower
from vlhub.models.vision_language import VisionLanguageModel

TOWERS = ("image", "text")


def tower_layer_ids(tower: Tower, tower_name: str = "tower") -> tuple[int, dict[int, int]]:
    """(depth L, id(parameter) -> layer id) of a tower's parameters.

    A tower without transformer blocks (RN50's ModifiedResNet, a timm CNN trunk) is an error.
    """
    blocks = tower.blocks()
    if not blocks:
        raise ValueError(
            f"optim.layer_decay: the {tower_name} tower ({tower.describe()}) has no transformer blocks; "
            f"drop it from optim.layer_decay_towers"
        )
    depth = len(blocks)
    ids = {id(p): 0 for p in tower.embedding_parameters()}
    for i, block in enumerate(blocks):
        ids.update({id(p): i + 1 for p in block.parameters()})
    ids.update({id(p): depth + 1 for p in tower.head_parameters()})
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
        model_towers = module.towers() if isinstance(module, VisionLanguageModel) else {}
        for tower_name, tower in model_towers.items():
            tower_lr, tower_wd = towers[tower_name]
            if layer_decay is not None and tower_name in layer_decay_towers:
                depth, ids = tower_layer_ids(tower, tower_name)
                for param in tower.parameters():  # in the tower's order, so groups appear block by block
                    scale = layer_decay ** (depth + 1 - ids[id(param)])
                    add(_layer_group_name(tower_name, ids[id(param)], depth), tower_lr * scale, tower_wd, param)
            for param in tower.parameters():  # the rest (or all) of the tower at its own lr
                add(tower_name, tower_lr, tower_wd, param)
        for param in module.parameters():
            add("heads", lr, weight_decay, param)
    return list(groups.values())
