"""The tiled contrastive losses (objective.loss_tiles) equal the untiled ones: values and gradients,
for the loss functions against plain references, for every objective that takes tiles through a
tiny model (all parameters, temperature and bias included) and under the gradient cache (the
2-process gloo gather: tests/distributed/test_objectives_ddp.py); and a tile size that is not positive fails
at launch naming the key."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.configs import compose_train, run_train
from tests.helpers.objectives import objective_batch, prepared_objective
from tests.helpers.tensors import relative_error
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.launch import errors_reported
from vlhub.objectives import ClipObjective, CloobObjective, FilipObjective, SiglipObjective
from vlhub.objectives.tiled import tiled_row_cross_entropy, tiled_sigmoid_loss, tiled_softmax_loss
from vlhub.registry import OBJECTIVES

CPU = torch.device("cpu")
TILED = [name for name in OBJECTIVES.names() if getattr(OBJECTIVES.get(name), "supports_loss_tiles", False)]


def _features(count: int, dim: int = 6, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(count, dim, generator=generator), dim=-1).requires_grad_() for _ in range(2)]


def _check(tiled: torch.Tensor, reference: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.testing.assert_close(tiled, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(torch.autograd.grad(tiled, inputs), torch.autograd.grad(reference, inputs), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- the loss functions against plain references -----------------------------------------------------


@pytest.mark.parametrize("tile_rows", [1, 3, 16, 64])
@pytest.mark.parametrize(
    ("count", "decoupled"), [(1, False), (7, False), (16, False), (7, True), (16, True)]
)  # DCL needs a negative: B > 1
def test_tiled_softmax_is_the_symmetric_cross_entropy(count, tile_rows, decoupled):
    image, text = _features(count)
    logit_scale = torch.tensor(2.5, requires_grad=True)
    inputs = [image, text, logit_scale]
    i2t, t2i = tiled_softmax_loss(image, text, logit_scale.exp(), tile_rows, decoupled)
    logits = logit_scale.exp() * image @ text.T
    if decoupled:  # the pair stays in the numerator only
        eye = torch.eye(count, dtype=torch.bool)
        ref_i2t = (logits.masked_fill(eye, float("-inf")).logsumexp(1) - logits.diagonal()).mean()
        ref_t2i = (logits.T.masked_fill(eye, float("-inf")).logsumexp(1) - logits.diagonal()).mean()
    else:
        labels = torch.arange(count)
        ref_i2t, ref_t2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    _check(0.3 * i2t + 0.7 * t2i, 0.3 * ref_i2t + 0.7 * ref_t2i, inputs)  # unequal weights: both directions seen
    torch.testing.assert_close(i2t.detach(), ref_i2t.detach())
    torch.testing.assert_close(t2i.detach(), ref_t2i.detach())


@pytest.mark.parametrize(("rows", "offset", "tile_rows"), [(4, 0, 3), (4, 5, 3), (4, 6, 8), (10, 0, 1)])
def test_tiled_row_cross_entropy_is_local_rows_against_gathered_columns(rows, offset, tile_rows):
    local, _ = _features(rows, seed=1)
    columns, _ = _features(10, seed=2)
    logit_scale = torch.tensor(1.7, requires_grad=True)
    tiled = tiled_row_cross_entropy(local, columns, logit_scale.exp(), tile_rows, offset)
    reference = F.cross_entropy(logit_scale.exp() * local @ columns.T, torch.arange(rows) + offset)
    _check(tiled, reference, [local, columns, logit_scale])


@pytest.mark.parametrize("count", [1, 9, 16])
@pytest.mark.parametrize("tile_rows", [2, 16, 40])
def test_tiled_sigmoid_is_siglips_pairwise_sum(count, tile_rows):
    image, text = _features(count)
    logit_scale, bias = torch.tensor(2.3, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    tiled = tiled_sigmoid_loss(image, text, logit_scale.exp(), bias, tile_rows)
    # Written out pair by pair: +1 on pairs, -1 elsewhere, summed and divided by the batch.
    reference = (
        sum(
            -F.logsigmoid((1.0 if i == j else -1.0) * (logit_scale.exp() * image[i] @ text[j] + bias))
            for i in range(count)
            for j in range(count)
        )
        / count
    )
    _check(tiled, reference, [image, text, logit_scale, bias])


def test_under_autocast_the_tiles_follow_the_untiled_precision():
    image, text = _features(64, dim=16)
    scale = torch.tensor(20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        untiled = F.cross_entropy(scale * image @ text.T, torch.arange(64))
        i2t, _ = tiled_softmax_loss(image, text, scale, 16)
    exact = F.cross_entropy(scale * image @ text.T, torch.arange(64))
    assert i2t.dtype == torch.float32 and untiled.dtype == torch.float32
    # bf16 matmuls in both; the fp32 loss differs from both by bf16 rounding, from each other by less
    assert abs(i2t.item() - untiled.item()) <= 0.02 * exact.item()
    assert 0 < abs(i2t.item() - exact.item()) <= 0.05 * exact.item()
    (grad,) = torch.autograd.grad(i2t, image)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


# -- objectives through a tiny model ----------------------------------------------------------------


def _step(name: str, strategy, batch_size: int = 8, **kwargs) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    model, objective = prepared_objective(name, **kwargs)
    batch = objective_batch(model, objective, size=batch_size)
    parts = strategy(model, objective, batch, Precision("fp32", CPU))
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}, {k: float(v) for k, v in parts.items()}


def _assert_same_step(tiled, untiled) -> None:
    (grads, parts), (reference, reference_parts) = tiled, untiled
    assert parts.keys() == reference_parts.keys()
    for key, value in reference_parts.items():
        assert parts[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert grads.keys() == reference.keys()
    assert "logit_scale" in reference and relative_error(grads, reference) <= 1e-5


@pytest.mark.parametrize("name", TILED)
def test_every_objective_that_takes_tiles_gets_the_untiled_step(name):
    _assert_same_step(_step(name, PlainGradients(), loss_tiles=3), _step(name, PlainGradients()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_weight": 0.8, "text_weight": 0.2, "loss_tiles": 16},  # B < R: one tile
        {"image_weight": 0.0, "text_weight": 1.0, "loss_tiles": 8},  # one direction only
        {"local_loss": True, "loss_tiles": 3},
    ],
)
def test_clip_tiles_with_its_weights_and_local_loss(kwargs):
    untiled = {k: v for k, v in kwargs.items() if k != "loss_tiles"}
    _assert_same_step(_step("clip", PlainGradients(), **kwargs), _step("clip", PlainGradients(), **untiled))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_the_gradient_cache_with_tiles_is_the_plain_untiled_step(name):
    _assert_same_step(_step(name, GradCache(4), loss_tiles=3), _step(name, PlainGradients()))


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiles", [0, -4, 2.5, True, "8"])
def test_a_tile_size_that_is_not_a_positive_int_is_refused_naming_the_key(tiles):
    for objective in (ClipObjective, SiglipObjective):
        with pytest.raises(ValueError, match="^loss_tiles must be a positive int"):
            objective(loss_tiles=tiles)
    with pytest.raises(ValueError, match="loss_tiles must be a positive int"):
        tiled_softmax_loss(*_features(4), torch.tensor(1.0), tiles)


def test_filip_refuses_tiles_and_says_why():
    with pytest.raises(ValueError, match="^loss_tiles=.* is not supported by objective=filip: .*token-wise"):
        FilipObjective(loss_tiles=8)
    assert FilipObjective().loss_tiles is None


def test_cloob_refuses_tiles_and_says_why():
    with pytest.raises(ValueError, match="^loss_tiles=.* is not supported by objective=cloob: .*Hopfield"):
        CloobObjective(loss_tiles=8)
    assert CloobObjective().loss_tiles is None


def test_loss_tiles_zero_fails_at_launch_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit), errors_reported():
        run_train(["objective.loss_tiles=0"], tmp_path)
    err = capsys.readouterr().err
    assert err.startswith("error: objective.loss_tiles must be a positive int (rows per tile) or null, got 0")
    with pytest.raises(SystemExit), errors_reported():
        run_train(["objective=filip", "objective.loss_tiles=64"], tmp_path / "filip")
    assert "error: objective.loss_tiles=64 is not supported by objective=filip" in capsys.readouterr().err


def test_the_key_has_one_home_and_reaches_every_contrastive_objective():
    from hydra.utils import instantiate

    for name in ["clip", "lit", "siglip", "coca", "declip", "dcl", "slip", "mlm"]:
        cfg = compose_train([f"objective={name}", "objective.loss_tiles=32"])
        assert instantiate(cfg.objective).loss_tiles == 32, name
    assert compose_train().objective.loss_tiles is None
