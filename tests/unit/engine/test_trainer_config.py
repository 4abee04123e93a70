"""The Trainer built from a typed config: without the CLI, its keys typed at launch, the logical batch,
the automatic chunk size, its counters in one state, and resumes of runs written before the keys existed."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from tests.helpers.configs import compose_train
from tests.helpers.models import micro_model
from vlhub.data import SyntheticShapes
from vlhub.engine.guard import StepGuard, Verdict
from vlhub.engine.prepare import choose_chunk_size, prepare, probe_fits
from vlhub.engine.state import TrainerState
from vlhub.engine.step import PlainGradients
from vlhub.engine.trainer import Trainer
from vlhub.engine.trainer_config import GradCacheConfig, TrainerConfig
from vlhub.errors import ConfigError
from vlhub.launch import check_typed_overrides
from vlhub.objectives import ClipObjective
from vlhub.optim import OptimRecipe
from vlhub.run.checkpoint import Checkpointer
from vlhub.run.config_changes import config_changes

PREVIOUS = Path(__file__).parents[2] / "fixtures" / "run_before_the_house_move" / "checkpoints" / "step_2.pt"


def test_a_trainer_built_in_a_few_lines_trains_two_steps_and_saves_them(tmp_path, caplog):
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    auto = GradCacheConfig(enabled=True, chunk_size="auto")  # on CPU: no cache, said in one line
    config = TrainerConfig(max_steps=2, global_batch_size=8, log_every_n_steps=1, device="cpu", grad_cache=auto)
    config = config.per_rank(world_size=1)
    prepared = prepare(model, objective, OptimRecipe(torch.optim.AdamW, 1e-3, 0.0, "constant", 0), config)
    loader = partial(
        SyntheticShapes(num_samples=64, workers=0).build_loader, lambda i: torch.zeros(3, 32, 32), model.tokenizer, 8, 0
    )
    trainer = Trainer(prepared, config, loader)
    with caplog.at_level(logging.INFO, logger="vlhub.engine.prepare"):
        trainer.fit(Checkpointer(tmp_path, every_n_steps=1, keep=2, resume=None))
    assert [r.message for r in caplog.records if "chunk_size=auto" in r.message] == [
        "trainer.grad_cache.chunk_size=auto: no gradient cache (on cpu, memory is not probed): batches of 8 per rank"
    ]
    assert isinstance(trainer.prepared.gradients, PlainGradients)
    saved = torch.load(tmp_path / "step_2.pt", weights_only=True)
    assert (saved["step"], saved["data"]["samples_consumed"], saved["data"]["batch_size"]) == (2, 16, 8)
    assert trainer.state.step == 2 and (tmp_path / "step_1.pt").is_file()
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_logical_batch_sets_the_per_rank_batch_or_names_both_keys():
    assert TrainerConfig(global_batch_size=96).per_rank(4).batch_size == 24
    assert TrainerConfig(batch_size=5).per_rank(4).batch_size == 5  # no global batch: batch_size is per rank
    with pytest.raises(
        ValueError, match=r"trainer.global_batch_size=96 does not divide over 5 ranks.*trainer.batch_size"
    ):
        TrainerConfig(global_batch_size=96).per_rank(5)


def test_the_chunk_size_probe_takes_the_largest_divisor_that_fits():
    probed: list[int] = []

    def fits_up_to(limit):
        return lambda size: probed.append(size) or size <= limit

    gpu = torch.device("cuda", 0)  # only its type is read: the probe is the fake
    assert choose_chunk_size(96, gpu, fits_up_to(30)) == 24 and probed[0] == 96
    assert len(probed) <= 1 + 4  # the batch, then a binary search over 96's 11 smaller divisors
    assert choose_chunk_size(96, gpu, fits_up_to(96)) is None  # the whole batch fits: no cache
    assert choose_chunk_size(7, gpu, fits_up_to(6)) == 1
    for limit in range(1, 96):  # against every divisor tried in turn
        assert choose_chunk_size(96, gpu, fits_up_to(limit)) == max(d for d in range(1, limit + 1) if 96 % d == 0)
    probed.clear()
    assert choose_chunk_size(96, torch.device("cpu"), fits_up_to(1)) is None and probed == []  # CPU: no probe
    with pytest.raises(RuntimeError, match="chunk_size=auto: not even one sample"):
        choose_chunk_size(96, gpu, fits_up_to(0))


def test_the_probe_step_leaves_no_trace_and_says_when_memory_ran_out(monkeypatch):
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    prepared = prepare(
        model, objective, OptimRecipe(torch.optim.SGD, 1.0, 0.0, "constant", 0), TrainerConfig(device="cpu")
    )
    batch = {"image": torch.rand(8, 3, 32, 32), "text": model.tokenize(["a red circle"] * 8)}
    represent = objective.represent

    def runs_out_above_4(model, batch):  # what a GPU does with a chunk too large for its memory
        torch.rand(1)  # a dropout's draw: the probe must leave the random stream where it was
        if len(batch["image"]) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return represent(model, batch)

    monkeypatch.setattr(objective, "represent", runs_out_above_4)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    fits, rng = probe_fits(prepared, batch), torch.get_rng_state()
    assert choose_chunk_size(8, torch.device("cuda"), fits) == 4  # 8 ran out, 4 (two chunks) fit
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None and torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_a_trainer_value_of_the_wrong_type_fails_in_one_line_naming_the_key():
    with pytest.raises(ConfigCompositionException) as composed:
        compose_train(["trainer.max_steps=abc"])
    assert "trainer.max_steps" in str(composed.value.__cause__)
    schemas = {"trainer": TrainerConfig}
    for word, key in [("trainer.max_steps=abc", "trainer.max_steps"), ("trainer.batch_size=4,x", "trainer.batch_size")]:
        with pytest.raises(ConfigError, match=rf"^{key}='\w+': .*Integer$"):
            check_typed_overrides([word], schemas)
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=2.5: .*Integer$"):  # ran 3 steps once
        check_typed_overrides(["trainer.max_steps=2.5"], schemas)
    with pytest.raises(ConfigError, match=r"^trainer.compile='maybe': .*bool"):
        check_typed_overrides(["trainer.compile=maybe"], schemas)
    check_typed_overrides(["trainer.max_steps=3", "trainer.grad_cache.chunk_size=auto", "optim.lr=x"], schemas)
    with pytest.raises(ValueError, match="trainer.grad_cache.chunk_size=3 must be a positive divisor"):
        TrainerConfig(batch_size=8, grad_cache=GradCacheConfig(True, 3)).check()


def test_the_counters_load_from_a_checkpoint_of_the_previous_layout_and_round_trip():
    stored = torch.load(PREVIOUS, weights_only=True)
    state = TrainerState()
    state.load_state_dict(stored)
    assert (state.step, state.samples_consumed, state.samples_read) == (2, 16, 16)
    again = TrainerState()
    again.load_state_dict(state.state_dict())
    assert again == state


def test_trainer_keys_added_since_a_run_was_written_are_no_change_at_their_default():
    old = {"trainer": {"max_steps": 2, "batch_size": 8}}
    new = {"trainer": {"max_steps": 2, "batch_size": 8, "global_batch_size": None}}
    defaults = {"trainer": dataclasses.asdict(TrainerConfig())}  # what vlhub.train hands the run session
    assert config_changes(old, new, defaults) == {}
    assert config_changes(old, new) == {"trainer.global_batch_size": [None, None]}  # without them: a change
    assert config_changes(old, {"trainer": {**new["trainer"], "global_batch_size": 16}}, defaults) == {
        "trainer.global_batch_size": [None, 16]
    }
    removed = config_changes({"trainer": {**new["trainer"]}}, {"trainer": {"max_steps": 2, "batch_size": 8}}, defaults)
    assert removed != {}


def test_the_guard_trains_skips_or_stops():
    from vlhub.data.batch import LoadedBatch

    guard, state = StepGuard(max_bad_fraction=1.0, max_empty_batches=1, max_nonfinite_steps=2), TrainerState()
    good = LoadedBatch({"image": torch.zeros(2, 3, 4, 4)}, samples_read=3, bad_samples=1, filtered=2)
    assert guard.admit(state, good, min_samples=1, stop=False) is Verdict.TRAIN
    assert (state.samples_read, state.bad_samples, state.filtered_samples) == (3, 1, 2)
    assert guard.admit(state, LoadedBatch({}, 2, 2), min_samples=1, stop=False) is Verdict.SKIP
    with pytest.raises(RuntimeError, match="2 batches in a row held no good sample"):
        guard.admit(state, LoadedBatch({}, 2, 2), min_samples=1, stop=False)
    assert guard.admit(state, good, min_samples=1, stop=True) is Verdict.STOP
    assert guard.after_loss(state, finite=False) is Verdict.SKIP and state.nonfinite_steps == 1
    with pytest.raises(RuntimeError, match="trainer.max_nonfinite_steps=2"):
        guard.after_loss(state, finite=False)
