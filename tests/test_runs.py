"""Run folders, loggers and pretrained weights: what a run leaves behind."""

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import compose_train, run_train
from vlhub.models import build_open_clip_model


def _run_dir(overrides):
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.run, resolve=False), cfg


def test_a_named_run_has_a_stable_folder_and_an_unnamed_one_a_dated_one():
    from vlhub.train import run_dir_for

    assert run_dir_for("my_run", "2026-01-01_00-00-00") == "runs/my_run"
    assert run_dir_for(None, "2026-01-01_00-00-00") == "runs/2026-01-01_00-00-00"
    assert run_dir_for(None, "stamp", kind="sweep") == "runs/multirun/stamp"
    _, cfg = _run_dir(["run.name=my_run"])
    assert OmegaConf.select(cfg, "hydra.run.dir") == "runs/my_run"


def test_tensorboard_gets_the_training_scalars(tmp_path):
    run_train(["logger.tensorboard=true", "eval=none"], tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/logit_scale", "train/samples_per_second", "data/bad_samples"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.slow
def test_wandb_offline_mode_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_train(["logger.wandb.enabled=true", "logger.wandb.mode=offline", "eval=none"], tmp_path)
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))


def test_pretrained_accepts_a_local_vlhub_checkpoint(tmp_path):
    run_train(["eval=none", "trainer.max_steps=2"], tmp_path)
    saved = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)["state_dict"]
    config = dict(compose_train().model.config)
    loaded = build_open_clip_model(config=config, pretrained=str(tmp_path / "checkpoints/latest.pt"))
    for key, value in loaded.open_clip_state_dict().items():
        assert torch.equal(value, saved[key].reshape(value.shape)), key
    with pytest.raises(FileNotFoundError, match="neither a file nor an open_clip tag"):
        build_open_clip_model(config=config, pretrained=str(tmp_path / "missing.pt"))


def test_a_chunk_size_that_does_not_divide_the_batch_fails_at_launch(tmp_path):
    with pytest.raises(ValueError, match="chunk_size=3 must be a positive divisor of trainer.batch_size=8"):
        run_train(["trainer.grad_cache.enabled=true", "trainer.grad_cache.chunk_size=3"], tmp_path)


def test_a_resumed_run_may_raise_max_steps(tmp_path):
    run_train(["eval=none", "trainer.max_steps=2"], tmp_path)
    run_train(["eval=none", "trainer.max_steps=4"], tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["scheduler"]["last_epoch"] == 4
