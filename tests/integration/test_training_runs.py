"""The training loop end to end: reduced precisions train and evaluate, the evaluation cadence, and no
progress bar left open after a failed fit."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.configs import run_train


@pytest.mark.parametrize("precision", ["amp_bf16", "bf16", "amp_fp16"])
def test_reduced_precisions_train_and_evaluate(tmp_path, precision):
    metrics = run_train([f"trainer.precision={precision}", "trainer.max_steps=2"], tmp_path)
    assert 0.0 <= metrics["synthetic-zeroshot-top1"] <= 1.0
    checkpoint = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    weights = checkpoint["state_dict"]
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert weights["visual.conv1.weight"].dtype == expected
    assert bool(checkpoint["scaler"]) == (precision == "amp_fp16")  # only fp16 autocast keeps a loss scaler


def test_evaluation_runs_every_n_steps_and_once_at_the_end(tmp_path):
    run_train(["eval.every_n_steps=2", "trainer.max_steps=5"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert all(r["objective"] == "clip" and r["model"] == "tiny" for r in records)
    assert all(0.0 <= r["synthetic-zeroshot-top1"] <= 1.0 for r in records)


def test_a_fit_that_fails_leaves_no_progress_bar_open(tmp_path, monkeypatch):
    """A bar left open after an error pushes the next run's bar down a line (its log lines then follow
    cursor-up escapes): the loop's bar is closed on every exit."""
    from tqdm import tqdm

    from vlhub.engine.trainer import Trainer

    def fails(self, batch):
        raise RuntimeError("a step that fails")

    monkeypatch.setattr(Trainer, "counted_step", fails)
    with pytest.raises(RuntimeError, match="a step that fails") as failure:
        run_train(["trainer.max_steps=2"], tmp_path)
    assert failure.tb is not None  # the traceback (and the loop's frame) is still alive, as in a caller's handler
    assert not [bar for bar in list(tqdm._instances) if bar.desc == "train"]


def test_the_logical_batch_key_sets_the_batch_each_step_trains_on(tmp_path, monkeypatch):
    """trainer.global_batch_size wins over trainer.batch_size: the batches the step receives, not the config."""
    from vlhub.engine.trainer import Trainer

    real, sizes = Trainer.train_on_batch, []

    def recorded(self, batch):
        sizes.append(len(batch["image"]))
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_on_batch", recorded)
    run_train(["eval=none", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.global_batch_size=12"], tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert sizes == [12, 12] and saved["data"]["batch_size"] == 12 and saved["data"]["samples_consumed"] == 24
