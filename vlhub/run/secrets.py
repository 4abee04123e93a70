"""Keeping credentials out of what a run stores and logs: the composed config, the command-line
overrides, and the files Hydra wrote into ``.hydra/`` before vlhub ran. Every value under
``checkpoint.remote_options`` and the credentials of a URL (``s3://KEY:SECRET@bucket``, refused at
launch by ``run/remote_store.py``) are written as ``***``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MASK = "***"
SECRET_OVERRIDE = re.compile(r"(checkpoint\.remote_options[\w.]*=)(\{[^}]*\}|[^,\s]*)")
URL_CREDENTIALS = re.compile(r"([a-zA-Z][\w+.-]*://)[^/@\s'\"]*@")  # s3://KEY:SECRET@bucket -> s3://***@bucket


# -- keeping credentials out of configs, logs and results ------------------------------------------
def _mask_values(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _mask_values(item) for key, item in value.items()}
    return MASK if value not in (None, "") else value


def mask_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the composed config with every value under ``checkpoint.remote_options`` masked."""
    checkpoint = config.get("checkpoint")
    if not isinstance(checkpoint, dict) or not checkpoint.get("remote_options"):
        return config
    return {**config, "checkpoint": {**checkpoint, "remote_options": _mask_values(checkpoint["remote_options"])}}


def mask_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with the value of any ``checkpoint.remote_options`` one masked."""
    return [_mask_text(override) for override in overrides]


def _mask_text(text: str) -> str:
    """``checkpoint.remote_options...=VALUE`` (a word, or a ``{...}`` dict) -> ``...=***``, and the
    credentials of a URL (``s3://KEY:SECRET@bucket``, refused at launch) -> ``s3://***@bucket``, anywhere
    in text (Hydra also joins the overrides into ``hydra.job.override_dirname``)."""
    text = URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return SECRET_OVERRIDE.sub(lambda m: f"{m.group(1)}{MASK}", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_values(v) if k == "remote_options" else _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return _mask_text(value) if isinstance(value, str) else value


def scrub_hydra_files(run_dir: Path) -> None:
    """Hydra wrote the launch's config and overrides into ``.hydra/`` before vlhub ran: mask them."""
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        path = run_dir / ".hydra" / name
        if path.is_file() and ("remote_options" in path.read_text() or URL_CREDENTIALS.search(path.read_text())):
            path.write_text(yaml.safe_dump(_scrub(yaml.safe_load(path.read_text())), sort_keys=False))
