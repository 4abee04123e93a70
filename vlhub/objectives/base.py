"""The Objective interface: ``represent`` per sample, ``loss`` on the whole batch.

The split is what makes gradient caching generic: the engine may run ``represent`` chunk by
chunk (without gradients, then replayed with them) and call ``loss`` once on the
concatenated representations. ``represent`` returns only per-sample tensors (dim 0 = batch);
everything that is not per-sample (the temperature, heads on whole-batch statistics) is read
in ``loss``. An objective never calls ``backward``.
"""

from __future__ import annotations

import torch
from torch import nn

from vlhub.data.batch import Batch


class Objective(nn.Module):
    #: Whether batches must carry tokenized text.
    needs_text: bool = True
    #: How many augmented views of each image the batches must carry (1 or 2).
    image_views: int = 1

    def apply_to_model(self, model: nn.Module) -> None:
        """Prepare the model for this objective in place (lock towers); default: nothing."""

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"loss": total, <named parts>...}``; ``model`` gives the temperature and bias."""
        raise NotImplementedError
