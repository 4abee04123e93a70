"""Contrastive losses computed in tiles of the similarity matrix (the idea of Inf-CL, Cheng et al. 2024).

The untiled CLIP loss materialises the B x B logits, their softmax and their gradient: memory
grows as B^2 and caps the batch. Here each loss is an autograd ``Function`` that walks the rows
``tile_rows`` at a time: a tile holds R x N logits (R rows of the batch against all N columns),
and only the features (O(B D)) and per-row statistics (log-sum-exps, O(B)) are kept for the
backward, which recomputes each tile from the features and accumulates the gradients of both
feature matrices, of the logit scale and (sigmoid form) of the bias. At most two tiles are
alive at a time, so peak memory is O(B D + R N) instead of O(B^2); the price is one extra
matmul per tile in the backward (the recomputed logits). Unlike Inf-CL's kernels, a tile spans
every column: one large matmul per tile keeps the GPU busy, and R N is already linear in B.

The losses are exactly the untiled ones (to fp32 rounding):
- :func:`tiled_softmax_loss`: CLIP's two directions of one square logit matrix (images x texts,
  the pairs on its diagonal), each the mean cross-entropy of a row (image -> text) or a column
  (text -> image). Column log-sum-exps are accumulated online across row tiles (log-add-exp), so
  one pass gives both directions. ``decoupled`` drops the positive pair from each denominator (DCL).
- :func:`tiled_row_cross_entropy`: one direction, rows against other columns, row i's positive at
  column i + ``offset`` (open_clip's ``local_loss``: local rows against gathered columns).
- :func:`tiled_sigmoid_loss`: SigLIP's sum over all pairs of -log sigmoid(z_ij (t x_i.y_j + b)),
  z = +1 on the diagonal, -1 elsewhere, divided by the number of rows.

Inputs are already-gathered features, so autograd flows through the (differentiable) gather as for
the untiled loss. Precision follows the untiled path: under autocast the tile matmuls run in the
autocast dtype and everything after them (log-sum-exps, gradients' accumulation) in fp32
(fp64 for fp64 features); otherwise they run in the features' dtype. Devices come from the inputs (CPU or CUDA alike).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable


def check_tile_rows(tile_rows: object) -> int:
    """``tile_rows`` as an int, or ValueError naming the config key."""
    if isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows <= 0:
        raise ValueError(f"loss_tiles must be a positive int (rows per tile) or null, got {tile_rows!r}")
    return tile_rows


def _matmul_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype the untiled ``a @ b.T`` would run in here: autocast's if it is on, else the features'."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return features.dtype


def _tiles(rows: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, tile_rows):
        yield start, min(start + tile_rows, rows)


class _Tiles:
    """The operands of a walk over tiles, in the matmul dtype, and the scale in the accumulation dtype.

    In a backward (:meth:`for_backward`) it also holds the gradients being accumulated, for the
    inputs (rows, cols, scale) that need one.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.rows, self.cols, self.dtype = rows.to(dtype), cols.to(dtype), dtype
        self.acc = torch.promote_types(rows.dtype, torch.float32)  # fp32, or fp64 for fp64 features
        self.scale = scale.to(self.acc)
        self.input_dtypes = (rows.dtype, cols.dtype, scale.dtype)
        self.scale_shape = scale.shape
        self.needs: tuple[bool, ...] = (False, False, False)
        self.grads: dict[str, torch.Tensor | None] = {}

    @classmethod
    def for_backward(cls, ctx, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor) -> _Tiles:
        """The forward's tiles, with zeroed gradients for the inputs ``ctx`` says need one (call under
        autocast disabled)."""
        tiles = cls(rows, cols, scale, ctx.dtype)
        tiles.needs = tuple(ctx.needs_input_grad[:3])
        acc = {"dtype": tiles.acc, "device": rows.device}
        tiles.grads = {
            "rows": torch.zeros(rows.shape, **acc) if tiles.needs[0] else None,
            "cols": torch.zeros(cols.shape, **acc) if tiles.needs[1] else None,
            "scale": torch.zeros((), **acc),
        }
        return tiles

    def vector(self, size: int, fill: float = 0.0) -> torch.Tensor:
        return torch.full((size,), fill, dtype=self.acc, device=self.rows.device)

    def raw(self, start: int, stop: int) -> torch.Tensor:
        """[R, N]: rows[start:stop] . cols, before the scale."""
        return (self.rows[start:stop] @ self.cols.T).to(self.acc)

    def accumulate(self, grad: torch.Tensor, start: int, stop: int) -> None:
        """Add a tile's d loss / d logits [R, N] (overwritten) to the gradients.

        d rows = scale * grad @ cols and d cols = scale * grad.T @ rows; d scale = sum(grad * raw)
        is read off the rows' gradient, sum(d rows * rows) / scale, so no second [R, N] tile is kept.
        """
        needs, out = self.needs, self.grads
        scaled = grad.mul_(self.scale).to(self.dtype)
        tile_rows = self.rows[start:stop]
        if needs[0] or needs[2]:
            rows_grad = (scaled @ self.cols).to(self.acc)
            if needs[2]:
                out["scale"] += torch.dot(rows_grad.reshape(-1), tile_rows.to(self.acc).reshape(-1)) / self.scale
            if needs[0]:
                out["rows"][start:stop] = rows_grad
        if needs[1] and self.dtype == self.acc:
            out["cols"].addmm_(scaled.T, tile_rows)  # in place: no [N, D] temporary per tile
        elif needs[1]:
            out["cols"] += (scaled.T @ tile_rows).to(self.acc)

    def gradients(self) -> tuple[torch.Tensor | None, ...]:
        """(d rows, d cols, d scale) in the inputs' dtypes, None where not needed."""
        needs, out, (rows_dtype, cols_dtype, scale_dtype) = self.needs, self.grads, self.input_dtypes
        return (
            out["rows"].to(rows_dtype) if needs[0] else None,
            out["cols"].to(cols_dtype) if needs[1] else None,
            out["scale"].to(scale_dtype).reshape(self.scale_shape) if needs[2] else None,
        )


def _softmax_grad(tiles: _Tiles, start: int, stop: int, row_lse, col_lse, weight_rows, weight_cols, decoupled):
    """d loss / d logits of one tile: each direction's softmax minus one at the pair, times its weight."""
    logits = tiles.raw(start, stop).mul_(tiles.scale)
    if decoupled:
        logits.diagonal(start).fill_(float("-inf"))
    grad = (logits - col_lse).exp_().mul_(weight_cols)
    grad += logits.sub_(row_lse[start:stop, None]).exp_().mul_(weight_rows)
    grad.diagonal(start).sub_(weight_rows + weight_cols)
    return grad


class _SoftmaxLoss(Function):
    """(image -> text, text -> image) mean cross-entropies of the square logits scale * image . text."""

    @staticmethod
    def forward(ctx, image, text, scale, tile_rows, decoupled):
        dtype = _matmul_dtype(image)
        with torch.autocast(image.device.type, enabled=False):
            tiles = _Tiles(image, text, scale, dtype)
            count = image.shape[0]
            row_lse, col_lse, positives = tiles.vector(count), tiles.vector(count, float("-inf")), tiles.vector(count)
            for start, stop in _tiles(count, tile_rows):
                logits = tiles.raw(start, stop).mul_(tiles.scale)
                diagonal = logits.diagonal(start)
                positives[start:stop] = diagonal
                if decoupled:
                    diagonal.fill_(float("-inf"))
                row_lse[start:stop] = logits.logsumexp(dim=1)
                col_lse = torch.logaddexp(col_lse, logits.logsumexp(dim=0))
                del logits, diagonal  # before the next tile is allocated
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.tile_rows, ctx.decoupled, ctx.dtype = tile_rows, decoupled, dtype
        return (row_lse - positives).mean(), (col_lse - positives).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image_to_text, grad_text_to_image):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        count = image.shape[0]
        with torch.autocast(image.device.type, enabled=False):
            tiles = _Tiles.for_backward(ctx, image, text, scale)
            weight_rows = grad_image_to_text.to(tiles.acc) / count
            weight_cols = grad_text_to_image.to(tiles.acc) / count
            for start, stop in _tiles(count, ctx.tile_rows):
                grad = _softmax_grad(tiles, start, stop, row_lse, col_lse, weight_rows, weight_cols, ctx.decoupled)
                tiles.accumulate(grad, start, stop)
                del grad  # before the next tile is allocated
        return (*tiles.gradients(), None, None)


class _RowCrossEntropy(Function):
    """Mean over rows i of cross-entropy(scale * rows_i . cols, label i + offset)."""

    @staticmethod
    def forward(ctx, rows, cols, scale, tile_rows, offset):
        dtype = _matmul_dtype(rows)
        with torch.autocast(rows.device.type, enabled=False):
            tiles = _Tiles(rows, cols, scale, dtype)
            lse, positives = tiles.vector(rows.shape[0]), tiles.vector(rows.shape[0])
            for start, stop in _tiles(rows.shape[0], tile_rows):
                logits = tiles.raw(start, stop).mul_(tiles.scale)
                positives[start:stop] = logits.diagonal(start + offset)
                lse[start:stop] = logits.logsumexp(dim=1)
                del logits
        ctx.save_for_backward(rows, cols, scale, lse)
        ctx.tile_rows, ctx.offset, ctx.dtype = tile_rows, offset, dtype
        return (lse - positives).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        rows, cols, scale, lse = ctx.saved_tensors
        with torch.autocast(rows.device.type, enabled=False):
            tiles = _Tiles.for_backward(ctx, rows, cols, scale)
            weight = grad_loss.to(tiles.acc) / rows.shape[0]
            for start, stop in _tiles(rows.shape[0], ctx.tile_rows):
                grad = tiles.raw(start, stop).mul_(tiles.scale).sub_(lse[start:stop, None]).exp_().mul_(weight)
                grad.diagonal(start + ctx.offset).sub_(weight)
                tiles.accumulate(grad, start, stop)
                del grad  # before the next tile is allocated
        return (*tiles.gradients(), None, None)


class _SigmoidLoss(Function):
    """sum_ij -log sigmoid(z_ij (scale * image_i . text_j + bias)) / B, z = +1 on the diagonal, else -1."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, tile_rows):
        dtype = _matmul_dtype(image)
        with torch.autocast(image.device.type, enabled=False):
            tiles = _Tiles(image, text, scale, dtype)
            total = tiles.vector(1)
            for start, stop in _tiles(image.shape[0], tile_rows):
                signed = tiles.raw(start, stop).mul_(tiles.scale).add_(bias.to(tiles.acc))
                signed.diagonal(start).neg_()  # -z * logits (z = +1 on the diagonal, -1 elsewhere)
                total += F.logsigmoid(signed.neg_()).sum()
                del signed
        ctx.save_for_backward(image, text, scale, bias)
        ctx.tile_rows, ctx.dtype = tile_rows, dtype
        return -total[0] / image.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        image, text, scale, bias = ctx.saved_tensors
        with torch.autocast(image.device.type, enabled=False):
            tiles = _Tiles.for_backward(ctx, image, text, scale)
            weight = grad_loss.to(tiles.acc) / image.shape[0]
            grad_bias = tiles.vector(1)
            for start, stop in _tiles(image.shape[0], ctx.tile_rows):
                signed = tiles.raw(start, stop).mul_(tiles.scale).add_(bias.to(tiles.acc))
                signed.diagonal(start).neg_()  # -z * logits
                # d/dlogits of -log sigmoid(z x) = -z sigmoid(-z x)
                grad = signed.sigmoid_().mul_(weight)
                grad.diagonal(start).neg_()
                if ctx.needs_input_grad[3]:
                    grad_bias += grad.sum()
                tiles.accumulate(grad, start, stop)
                del signed, grad  # before the next tile is allocated
        grad_bias = grad_bias.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None
        return (*tiles.gradients(), grad_bias, None)


def _check_pairs(image: torch.Tensor, text: torch.Tensor, tile_rows: int) -> None:
    check_tile_rows(tile_rows)
    if image.shape != text.shape:
        raise ValueError(f"image and text features must have one shape, got {tuple(image.shape)}, {tuple(text.shape)}")


def tiled_softmax_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, tile_rows: int, decoupled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text, text -> image) losses of the logits ``scale * image @ text.T`` [B, B], pairs on
    the diagonal: each the mean cross-entropy (``decoupled``: the pair left out of the denominator)."""
    _check_pairs(image, text, tile_rows)
    return _SoftmaxLoss.apply(image, text, scale, tile_rows, decoupled)


def tiled_row_cross_entropy(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, tile_rows: int, offset: int = 0
) -> torch.Tensor:
    """``F.cross_entropy(scale * rows @ cols.T, arange(len(rows)) + offset)``, in tiles of rows."""
    check_tile_rows(tile_rows)
    if offset < 0 or offset + rows.shape[0] > cols.shape[0]:
        raise ValueError(f"rows [{offset}, {offset + rows.shape[0]}) are not all among the {cols.shape[0]} columns")
    return _RowCrossEntropy.apply(rows, cols, scale, tile_rows, offset)


def tiled_sigmoid_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tile_rows: int
) -> torch.Tensor:
    """SigLIP's loss on ``scale * image @ text.T + bias`` [B, B]: the pairwise -log sigmoid summed, over B."""
    _check_pairs(image, text, tile_rows)
    return _SigmoidLoss.apply(image, text, scale, bias, tile_rows)
