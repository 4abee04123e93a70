"""A FIFO queue of embeddings with a nearest-neighbour look-up (DeCLIP's and NNCLR's support set).

The entries, the write pointer and the fill count are buffers, so the queue is in the objective's
``state_dict``: a checkpoint holds it and a resumed run continues from the same queue. Only
filled entries are searched: an empty queue has no neighbours (the authors' code starts from
random vectors instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Query rows per similarity block: bounds the [rows, size] similarity's memory for large batches.
SEARCH_ROWS = 1024


class FeatureQueue(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"size={size}: the queue size must be > 0")
        self.register_buffer("entries", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # the next row written
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.entries.shape[0]

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Write ``rows`` [N, dim] in order over the oldest entries (only the last ``size`` if N > size)."""
        rows = rows.detach()[-self.size :]
        count = rows.shape[0]
        index = (self.pointer + torch.arange(count, device=self.entries.device)) % self.size
        self.entries[index] = rows.to(self.entries.dtype)
        self.pointer.copy_((self.pointer + count) % self.size)
        self.filled.copy_((self.filled + count).clamp(max=self.size))

    def is_empty(self) -> bool:
        return int(self.filled) == 0

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """[N, dim]: each query's most cosine-similar filled entry (the first one on a tie)."""
        if self.is_empty():
            raise ValueError("the queue is empty: there is no nearest neighbour")
        bank = F.normalize(self.entries[: int(self.filled)], dim=-1)
        queries = F.normalize(queries.detach().to(bank.dtype), dim=-1)
        index = torch.cat([(block @ bank.T).argmax(dim=1) for block in queries.split(SEARCH_ROWS)])
        return self.entries[index]
