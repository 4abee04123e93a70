"""trainer.compile: compiled towers train like eager ones, with the gradient cache and patch dropout; a failed
compile falls back (or fails when strict); bad speed settings fail at launch naming the key (optim.fused:
unit/optim/test_fused.py; grad checkpointing and patch dropout: unit/models/test_tower_options.py).

Compiling with inductor on CPU costs tens of seconds per graph on a cold cache (the first
forward + backward of the tiny model: about 45 s here; warm: 2 s), so the compiled runs are
shared: one module-scoped compiled model trains the trajectory and serves the gradient-cache
checks, and the trainer run reuses its graphs. The throughput smoke run is behind VLHUB_LONG_TESTS=1.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import run_train
from tests.helpers.models import micro_model
from tests.helpers.objectives import (
    RecordingClip,  # records each chunk's first pass, then each replay
    gradients,
    objective_batch,
)
from tests.helpers.tensors import relative_error
from vlhub.engine.compile import CompiledTowers, compile_towers
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.launch import errors_reported
from vlhub.objectives import ClipObjective
from vlhub.optim import OptimRecipe

CPU = torch.device("cpu")
FP32 = Precision("fp32", CPU)
LONG = os.environ.get("VLHUB_LONG_TESTS") == "1"
TEXT_CFG = "{context_length:16,vocab_size:49408,width:32,heads:2,layers:1}"


def _trajectory(model, objective, batches):
    optimizer, scheduler = OptimRecipe(
        torch.optim.AdamW, lr=1e-3, weight_decay=0.1, scheduler="constant", warmup_steps=0
    ).build([model, objective], 100)
    return [
        float(train_step(model, objective, b, optimizer, scheduler, FP32, PlainGradients(), 1.0)["loss"])
        for b in batches
    ]


@pytest.fixture(scope="module")
def compiled_pair():
    """(eager model, compiled model) after the same three training steps, their losses, and the batches.

    Patch dropout is on (0.5) in every compiled check: compiled random ops draw from the same generators
    as eager ones (vlhub/engine/compile.py), so the same seed gives the same masks. Every call uses
    batches (or chunks) of 8, so the towers compile twice in all (with gradients, and without).
    """
    objective = ClipObjective()
    eager = micro_model(seed=0, patch_dropout=0.5)
    compiled = copy.deepcopy(eager)
    compile_towers(compiled)
    batches = [objective_batch(eager, objective, 8, seed=s) for s in range(3)]
    torch.manual_seed(5)
    eager_losses = _trajectory(eager, objective, batches)
    torch.manual_seed(5)
    compiled_losses = _trajectory(compiled, ClipObjective(), batches)
    return eager, compiled, eager_losses, compiled_losses, batches


def test_compiled_towers_train_like_eager_ones(compiled_pair):
    eager, compiled, eager_losses, compiled_losses, _ = compiled_pair
    assert all(m._compiled_call_impl is not None for m in compiled.compile_units())
    assert eager_losses[-1] != eager_losses[0]  # the steps did something
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    # Weights over all parameters: Adam turns rounding noise in gradients that are zero in exact
    # arithmetic (the attention's key bias) into full lr-sized steps, so no per-element bound holds there.
    weights = dict(eager.named_parameters())
    assert relative_error(dict(compiled.named_parameters()), weights) <= 1e-3
    # Compiled in place: the same keys as eager, never torch.compile's _orig_mod. prefix.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert list(compiled.open_clip_state_dict()) == list(eager.open_clip_state_dict())


def test_gradient_cache_with_compile_equals_the_plain_compiled_step(compiled_pair):
    # One chunk of the whole batch: the first pass and the plain step start from the same random state,
    # so they draw the same patch-dropout masks and the SPEC section 4 bound applies.
    _, compiled, _, _, batches = compiled_pair
    objective = ClipObjective()
    torch.manual_seed(7)
    plain, plain_parts = gradients(compiled, objective, batches[0], PlainGradients())
    torch.manual_seed(7)
    cached, cached_parts = gradients(compiled, objective, batches[0], GradCache(8))
    assert cached.keys() == plain.keys() and "logit_scale" in plain
    assert relative_error(cached, plain) <= 1e-5
    torch.testing.assert_close(cached_parts["loss"], plain_parts["loss"])


def test_compiled_replay_reproduces_the_first_pass_with_patch_dropout(compiled_pair):
    _, compiled, _, _, batches = compiled_pair
    batch = {k: torch.cat([batches[1][k], batches[2][k]]) for k in ("image", "text")}  # 16 in chunks of 8
    objective = RecordingClip()
    torch.manual_seed(11)
    cached, _ = gradients(compiled, objective, batch, GradCache(8))
    first, replay = objective.seen[:2], objective.seen[2:]
    for a, b in zip(first, replay, strict=True):  # the no-grad graph and the grad graph, same masks
        torch.testing.assert_close(b["image_features"], a["image_features"], rtol=1e-5, atol=1e-6)
    # The masks are random: the same images under another random state give other features.
    torch.manual_seed(12)
    with torch.no_grad():
        other = ClipObjective().represent(compiled, {k: v[:8] for k, v in batch.items()})["image_features"]
    assert not torch.allclose(other, first[0]["image_features"], atol=1e-4)
    # And the cached gradient is the eager one: same weights, same random state, same masks.
    eager = micro_model(seed=0, patch_dropout=0.5)
    eager.load_state_dict(compiled.state_dict())
    torch.manual_seed(11)
    expected, _ = gradients(eager, ClipObjective(), batch, GradCache(8))
    assert relative_error(cached, expected) <= 1e-5


# -- trainer.compile through the trainer ------------------------------------------------------------


def test_trainer_compile_logs_once_and_checkpoints_open_clip_keys(tmp_path, caplog, compiled_pair):
    eager = compiled_pair[0]
    with caplog.at_level(logging.INFO, logger="vlhub.engine.compile"):
        run_train(["trainer.compile=true", "model.patch_dropout=0.5", "eval=none"], tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name == "vlhub.engine.compile"]
    assert len(lines) == 1 and lines[0].startswith("compiled the towers: the first step took")
    checkpoint = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert list(checkpoint["state_dict"]) == list(eager.open_clip_state_dict())
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
    assert checkpoint["step"] == 3


def _failing_backend(graph, example_inputs):
    raise RuntimeError("no compiler on this platform")


def test_a_failed_compile_falls_back_to_eager_with_one_warning(caplog):
    objective = ClipObjective()
    reference, model = micro_model(seed=0), micro_model(seed=0)
    batch = objective_batch(model, objective, 8)
    compiled = CompiledTowers(model, strict=False, backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="vlhub.engine.compile"):
        grads_after_fallback, _ = compiled.run(
            lambda: gradients(model, objective, batch, PlainGradients()),
            reset=lambda: model.zero_grad(set_to_none=True),
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler on this platform" in warnings[0]
    assert not compiled.active
    expected, _ = gradients(reference, objective, batch, PlainGradients())
    assert relative_error(grads_after_fallback, expected) <= 1e-6


def test_compile_strict_makes_a_failed_compile_an_error():
    model, objective = micro_model(seed=0), ClipObjective()
    batch = objective_batch(model, objective, 8)
    compiled = CompiledTowers(model, strict=True, backend=_failing_backend)
    with pytest.raises(RuntimeError, match="trainer.compile_strict=true.*no compiler on this platform"):
        compiled.run(lambda: gradients(model, objective, batch, PlainGradients()), reset=lambda: None)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=rn50", "model.patch_dropout=0.5"], "model.patch_dropout"),
        (["model=timm", "model.timm_backbone=test_convnext", "model.patch_dropout=0.5"], "model.patch_dropout"),
        (["model=rn50", "model.grad_checkpointing=true"], "model.grad_checkpointing"),
        (["model.patch_dropout=1.0"], "model.patch_dropout"),
        (["optim.fused=3"], "optim.fused"),
    ],
)
def test_bad_speed_settings_fail_at_launch_naming_the_key(overrides, key, tmp_path, capsys):
    # (a trainer.compile value that is not a bool fails before Hydra composes: tests/unit/engine/test_trainer_config.py)
    if overrides[0] == "model=rn50":  # a small RN50-shaped tower: the check does not depend on size
        small = "{embed_dim:32,vision_cfg:{image_size:32,layers:[1,1,1,1],width:16},text_cfg:" + TEXT_CFG + "}"
        overrides = [*overrides, f"+model.config={small}", "model.arch=null"]
    with pytest.raises(SystemExit), errors_reported():
        run_train(overrides, tmp_path / "run")
    assert key in capsys.readouterr().err.splitlines()[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- benchmarks/throughput.py ----------------------------------------------------------------------


@pytest.mark.skipif(not LONG, reason="about 1-2 min of compiling on CPU: VLHUB_LONG_TESTS=1")
def test_throughput_smoke_prints_every_row():
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "throughput.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert len(rows) == 11
    for line in rows[:5] + [rows[5], rows[7], rows[9]]:
        samples_per_s = line.split("|")[3].strip().replace(",", "")
        assert float(samples_per_s) > 0, line


@pytest.mark.skipif(not LONG, reason="two ranks compiling on CPU take minutes: VLHUB_LONG_TESTS=1")
@pytest.mark.parametrize("strategy", ["ddp", "manual", "fsdp"])
def test_compiled_towers_under_the_data_parallel_path(tmp_path, strategy):
    """Two gloo ranks at batch 16 with compiled towers train like one eager process at batch 32,
    under every data-parallel strategy (ddp wraps compiled towers; fsdp compiles each block before
    sharding it; compile leaves the parameters where they were)."""

    from tests.helpers.configs import COMPARABLE
    from tests.helpers.ranks import start_ranks, train_as_rank
    from tests.helpers.tensors import relative_error, saved_weights

    run_train([*COMPARABLE, "trainer.batch_size=32"], tmp_path / "single")
    ranks = [*COMPARABLE, "trainer.batch_size=16", "trainer.compile=true", "trainer.compile_strict=true"]
    ranks.append(f"trainer.strategy={strategy}")
    start_ranks(train_as_rank, ranks, str(tmp_path / "ddp"))
    single, ddp = saved_weights(tmp_path / "single"), saved_weights(tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    # Adam and compiled rounding: see test_compiled_towers_train_like_eager_ones.
    assert relative_error(ddp, single) <= 1e-3


@pytest.mark.skipif(not LONG, reason="a compile per setting on CPU (tens of seconds each): VLHUB_LONG_TESTS=1")
def test_compiled_grad_checkpointing_gives_the_eager_gradients():
    objective = ClipObjective()
    eager, checkpointed = micro_model(seed=0), micro_model(seed=0, grad_checkpointing=True)
    compile_towers(checkpointed)
    batch = objective_batch(eager, objective, 8)
    expected, _ = gradients(eager, objective, batch, PlainGradients())
    assert relative_error(gradients(checkpointed, objective, batch, PlainGradients())[0], expected) <= 1e-5
    assert relative_error(gradients(checkpointed, objective, batch, GradCache(4))[0], expected) <= 1e-5


@pytest.mark.skipif(not LONG, reason="a compile per precision on CPU (tens of seconds each): VLHUB_LONG_TESTS=1")
@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16", "bf16"])
def test_compiled_towers_train_under_every_precision(precision):
    prec = Precision(precision, CPU)
    objective = ClipObjective()
    eager = micro_model(seed=0).to(dtype=prec.param_dtype)
    compiled = copy.deepcopy(eager)
    compile_towers(compiled)
    batch = {k: v for k, v in objective_batch(eager, objective, 8).items() if k in ("image", "text")}
    batch["image"] = batch["image"].to(prec.param_dtype)
    losses = []
    for model in (eager, compiled):
        optimizer, scheduler = OptimRecipe(
            torch.optim.AdamW, lr=1e-3, weight_decay=0.1, scheduler="constant", warmup_steps=0
        ).build([model], 10)
        before = model.image_tower.module.proj.detach().clone()
        parts = train_step(model, objective, batch, optimizer, scheduler, prec, PlainGradients(), 1.0)
        assert parts is not None and torch.isfinite(parts["loss"])
        assert not torch.equal(model.image_tower.module.proj.detach(), before)  # a step was taken
        losses.append(float(parts["loss"]))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16/fp16 rounding
