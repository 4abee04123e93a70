"""vlhub: train and evaluate vision-language models side by side."""

from __future__ import annotations

from typing import Any

from vlhub.torch_pair import check_torch_pair

__version__ = "0.1.0"
__all__ = ["load"]

check_torch_pair()  # a mismatched torch/torchvision pair: one line naming both, not torchvision's traceback


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import vlhub`` stays cheap (no torch, open_clip or hydra until asked).
    if name == "load":
        from vlhub.api import load

        return load
    raise AttributeError(f"module 'vlhub' has no attribute {name!r}")
