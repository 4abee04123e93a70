"""Comparing tensors and saved weights."""

from __future__ import annotations

from pathlib import Path

import torch


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over the tensors of ``b``'s keys taken as one vector (in fp64)."""
    diff = torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b))
    return (diff / torch.sqrt(sum((b[k].double() ** 2).sum() for k in b))).item()


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint file, or of a run folder's latest checkpoint."""
    path = Path(path)
    path = path / "checkpoints" / "latest.pt" if path.is_dir() else path
    return torch.load(path, weights_only=True)["state_dict"]
