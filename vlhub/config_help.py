"""``python -m vlhub.train --help``: every config group with the options it really has.

Hydra's own ``$APP_CONFIG_GROUPS`` lists internal folders too (``eval/shared``, whose file only
the eval options pull in) and leaves out the launchers (``hydra/launcher``). The help template
in ``configs/train.yaml`` calls :func:`list_config_groups` through the ``vlhub_config_groups``
resolver instead, which asks Hydra's config loader, so the list follows the YAML files and
installed launcher plugins.
"""

from __future__ import annotations

import dataclasses
import importlib.resources

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from omegaconf import OmegaConf

from vlhub.engine.trainer_config import TrainerConfig

# A primary config's nodes typed by a dataclass (their ConfigStore schema), shown by --help with their keys.
SCHEMAS = {"train": {"trainer": TrainerConfig}}
# Groups chosen another way than group=option, and how.
USAGE = {"experiment": "+experiment=NAME", "hydra/launcher": "hydra/launcher=NAME, with -m"}


def list_config_groups(*only: str) -> str:
    """One line per group: ``group  option, [chosen], ...``; internal sub-folders are left out.
    ``only`` names the groups to list (``vlhub.evaluate`` shows model and eval); none: every group."""
    loader = GlobalHydra.instance().config_loader()
    chosen = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    # Naming the primary config applies its hydra.searchpath, where the presets (experiment/) live.
    primary = HydraConfig.get().job.config_name if HydraConfig.initialized() else "train"
    found = loader.get_group_options("", results_filter=ObjectType.GROUP, config_name=primary)
    groups = sorted(group for group in found if group != "hydra") + ["hydra/launcher"]
    if only:
        groups = [group for group in groups if group in only]
    width = max(len(group) for group in groups)
    lines = []
    for group in groups:
        usage = f"   ({USAGE[group]})" if group in USAGE else ""
        options = loader.get_group_options(group, config_name=primary)
        names = [f"[{name}]" if chosen.get(group) == name else name for name in options]
        lines.append(f"{group:<{width}}  {', '.join(names)}{usage}")
    return "\n".join(lines)


def plain_keys(config_name: str) -> str:
    """The primary config's own keys with their comments, as written in its YAML (``configs/<name>.yaml``
    without its defaults list and ``hydra:`` block), and the nodes typed by a dataclass (``SCHEMAS``) from
    its fields: what each key does, from the one place it is said."""
    text = importlib.resources.files("vlhub.configs").joinpath(f"{config_name}.yaml").read_text()
    lines, keep = [], False
    for line in text.splitlines():
        top_level = line[:1] not in ("", " ", "#")
        if top_level:
            keep = not line.startswith(("defaults:", "hydra:"))
        if keep and line.strip():
            lines.append(line)
    for node, schema in SCHEMAS.get(config_name, {}).items():
        lines += [f"{node}:", *schema_keys(schema, "  ")]
    return "\n".join(lines)


def schema_keys(schema: type, indent: str) -> list[str]:
    """``key: default  # help`` for each field of a dataclass (its ``help`` metadata), nested ones indented."""
    lines = []
    for item in dataclasses.fields(schema):
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines += [f"{indent}{item.name}:", *schema_keys(type(default), indent + "  ")]
            continue
        shown = OmegaConf.to_yaml({item.name: default}).strip()
        lines.append(f"{indent}{shown}  # {item.metadata.get('help', '')}".rstrip(" #"))
    return lines


OmegaConf.register_new_resolver("vlhub_config_groups", list_config_groups, replace=True)
OmegaConf.register_new_resolver("vlhub_plain_keys", plain_keys, replace=True)
