"""A second view of each caption, on its token ids: EDA's random swap or random deletion.

DeCLIP (Li et al. 2021) augments each caption with one EDA operation (Wei and Zou 2019) picked at
random: synonym replacement, random swap or random deletion. Synonym replacement needs WordNet's
data, which vlhub does not ship, so here each caption gets one of the other two, with equal
probability: ``swaps`` swaps of two content tokens (EDA's n = 1), or the deletion of each content
token with probability ``deletion_prob`` (EDA's p = 0.1), keeping at least one.

The view is made on token ids, inside the objective, not as a caption transform: the data path
and the Batch stay as they are, and every draw is a function of the sample's id
(:mod:`vlhub.objectives.draws`), so gradient-cache replays, ranks and one process make the same
views. It acts on BPE tokens (a long word may be several), not on whitespace words as EDA does.
Start and end of text and the padding are never moved relative to the content: the view is still
``[SOT, content..., EOT, 0...]``.
"""

from __future__ import annotations

import torch

from vlhub.objectives.draws import sample_uniform

# Streams 1 and 2 are MLM's masks (vlhub.objectives.mlm).
CHOICE_STREAM, SWAP_STREAM, DELETE_STREAM = 3, 4, 5


def content_tokens(text: torch.Tensor, special_ids: tuple[int, ...]) -> torch.Tensor:
    """[B, L] bool: the caption's own tokens (not padding 0, not start or end of text)."""
    content = text != 0
    for special in special_ids:
        content &= text != special
    return content


def _position_of(content: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B]: the column of each row's ``index``-th content token."""
    rank = content.long().cumsum(dim=1) - 1
    return (content & (rank == index[:, None])).long().argmax(dim=1)


def random_swap(text: torch.Tensor, content: torch.Tensor, draws: torch.Tensor, swaps: int) -> torch.Tensor:
    """``swaps`` times, swap two distinct content tokens (rows with fewer than two stay as they are);
    ``draws`` [B, 2 * swaps] uniform numbers pick them."""
    out = text.clone()
    count = content.sum(dim=1)
    rows = torch.arange(text.shape[0], device=text.device)
    can = count >= 2
    for k in range(swaps):
        first = torch.minimum((draws[:, 2 * k] * count).long(), (count - 1).clamp(min=0))
        second = torch.minimum((draws[:, 2 * k + 1] * (count - 1)).long(), (count - 2).clamp(min=0))
        second = second + (second >= first).long()  # one of the other count - 1 tokens
        a, b = _position_of(content, first), _position_of(content, second)
        a, b, r = a[can], b[can], rows[can]
        out[r, a], out[r, b] = out[r, b], out[r, a]
    return out


def random_deletion(text: torch.Tensor, content: torch.Tensor, draws: torch.Tensor, prob: float) -> torch.Tensor:
    """Delete each content token where ``draws`` [B, L] < ``prob``, keeping at least one (the one with
    the largest draw), and close the gap: the end of text and the padding move left."""
    drop = content & (draws < prob)
    emptied = content.any(dim=1) & ~(content & ~drop).any(dim=1)
    largest = draws.masked_fill(~content, -1.0).argmax(dim=1)
    drop[emptied, largest[emptied]] = False
    keep = (text != 0) & ~drop
    width = text.shape[1]
    columns = torch.arange(width, device=text.device).expand_as(text)
    order = (columns + (~keep).long() * width).argsort(dim=1)  # kept columns first, in their order
    out = text.gather(1, order)
    return out.masked_fill(columns >= keep.sum(dim=1, keepdim=True), 0)


def eda_view(
    text: torch.Tensor, sample_id: torch.Tensor, special_ids: tuple[int, ...], swaps: int, deletion_prob: float
) -> torch.Tensor:
    """[B, L] token ids: each caption with one EDA operation, swap or deletion (even odds), drawn from its id."""
    content = content_tokens(text, special_ids)
    choice = sample_uniform(sample_id, 1, CHOICE_STREAM).to(text.device)[:, 0]
    swap_draws = sample_uniform(sample_id, 2 * max(swaps, 1), SWAP_STREAM).to(text.device)
    delete_draws = sample_uniform(sample_id, text.shape[1], DELETE_STREAM).to(text.device)
    swapped = random_swap(text, content, swap_draws, swaps)
    deleted = random_deletion(text, content, delete_draws, deletion_prob)
    return torch.where((choice < 0.5)[:, None], swapped, deleted)
