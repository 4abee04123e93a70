"""What may change when a run resumes: a resumed config is compared with the checkpoint's.

Only the keys in ``ALLOWED_ON_RESUME`` may change unless ``checkpoint.allow_config_change=true``
(the change is then recorded in ``results.jsonl``, ``run/resume.py``). ``python -m vlhub.compare``
reads configs with the same dotted keys (:func:`flatten`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

# Keys a resumed run may change without asking (the number of ranks is not in the config).
ALLOWED_ON_RESUME = (
    "trainer.max_steps",
    "trainer.device",
    "trainer.compile*",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "eval.*",
    "logger.*",
    "checkpoint.*",
    "data.workers",
    "hydra.*",
    "run.name",  # only names the folder
)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (an empty mapping is a leaf)."""
    if isinstance(config, dict) and config:
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: config}


def _allowed(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or (p.endswith(".*") and key == p[:-2]) for p in ALLOWED_ON_RESUME)


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, list[Any]]:
    """Keys whose value differs (missing on one side counts), except those allowed on resume.

    ``defaults`` (a nested config, e.g. every ``trainer`` key at its default) are keys a later vlhub may
    have added: one the stored config lacks is no change while the new config holds its default."""
    before, after, added = flatten(old), flatten(new), flatten(dict(defaults or {}))
    missing = object()
    changed = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a is missing and key in added and b == added[key]:
            continue
        if a != b and not _allowed(key):
            changed[key] = [None if a is missing else a, None if b is missing else b]
    return changed
