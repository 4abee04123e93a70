"""Checkpoints: exact resume, atomic writes, pruning, and loading into open_clip."""

import json

import open_clip
import pytest
import torch

from tests.helpers.configs import RESUME, run_train
from tests.helpers.tensors import saved_weights as _weights
from vlhub.run.checkpoint import Checkpointer


@pytest.mark.slow
@pytest.mark.parametrize("stochastic", [False, True], ids=["deterministic", "patch_dropout"])
def test_three_plus_three_steps_equal_six_bit_for_bit(tmp_path, stochastic):
    extra = ["+model.config.vision_cfg.patch_dropout=0.5"] if stochastic else []
    run_train([*RESUME, *extra, "trainer.max_steps=6"], tmp_path / "straight")
    run_train([*RESUME, *extra, "trainer.max_steps=3"], tmp_path / "resumed")
    halfway = torch.load(tmp_path / "resumed/checkpoints/latest.pt", weights_only=True)
    assert halfway["step"] == 3
    run_train([*RESUME, *extra, "trainer.max_steps=6"], tmp_path / "resumed")
    final = torch.load(tmp_path / "resumed/checkpoints/latest.pt", weights_only=True)
    assert final["step"] == 6
    straight, resumed = _weights(tmp_path / "straight/checkpoints/latest.pt"), final["state_dict"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert not torch.equal(straight["visual.conv1.weight"], halfway["state_dict"]["visual.conv1.weight"])


def test_checkpoint_contents_load_weights_only_and_into_open_clip(tmp_path):
    run_train(["eval=none", "trainer.max_steps=2"], tmp_path)
    path = tmp_path / "checkpoints/latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    for key in (
        "state_dict",
        "objective",
        "optimizer",
        "scheduler",
        "scaler",
        "step",
        "epoch",
        "data",
        "rng",
        "config",
    ):
        assert key in checkpoint
    assert checkpoint["step"] == 2 and isinstance(checkpoint["config"], dict)
    assert all(not k.startswith(("image_tower", "text_tower")) for k in checkpoint["state_dict"])
    # Register the tiny architecture with open_clip (its config travels in the checkpoint).
    config_dir = tmp_path / "open_clip_configs"
    config_dir.mkdir()
    (config_dir / "vlhub-tiny.json").write_text(json.dumps(checkpoint["open_clip_model_cfg"]))
    open_clip.add_model_config(config_dir)
    model = open_clip.create_model("vlhub-tiny", pretrained=str(path))
    loaded = model.state_dict()
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(loaded[key], value.reshape(loaded[key].shape), rtol=0, atol=0)


@pytest.mark.slow
def test_a_named_arch_checkpoint_loads_with_open_clip_create_model(tmp_path):
    from vlhub.models import build_open_clip_model
    from vlhub.run.checkpoint import save_atomic

    torch.manual_seed(0)
    # A small named ViT: ViT-B-32's layout (patch embedding, blocks, projections) at a third of its size.
    ours = build_open_clip_model(arch="ViT-S-32-alt")
    save_atomic({"state_dict": ours.open_clip_state_dict()}, tmp_path / "latest.pt")
    theirs = open_clip.create_model("ViT-S-32-alt", pretrained=str(tmp_path / "latest.pt"))
    image = torch.randn(1, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-S-32-alt")(["a dog"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(image), theirs.encode_image(image, normalize=True))
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens, normalize=True))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path, every_n_steps=1, keep=3, resume="auto")
    checkpointer.save({"step": 1, "value": torch.ones(3)})

    def crash(payload, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save({"step": 2, "value": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step_1.pt"]
    assert checkpointer.load_for_resume()["step"] == 1
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 1


def test_keep_prunes_old_checkpoints_and_resume_takes_the_newest_complete(tmp_path):
    checkpointer = Checkpointer(tmp_path, every_n_steps=1, keep=2, resume="auto")
    for step in (1, 2, 3):
        checkpointer.save({"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step_2.pt", "step_3.pt"]
    (tmp_path / "step_4.pt").write_bytes(b"torn file from a crashed writer")
    assert checkpointer.load_for_resume()["step"] == 3


@pytest.mark.slow
def test_resume_after_a_skipped_step_continues_the_data_stream(tmp_path):
    from vlhub.data import CsvPairs, SyntheticShapes, build_train_loader

    csv = SyntheticShapes(num_samples=64).write_csv(tmp_path / "data")
    stream = build_train_loader(CsvPairs(str(csv)), None, None, batch_size=8, seed=0).dataset
    for slot in range(8, 16):  # the whole second batch of 8 is unreadable: that step is skipped
        index = stream.position(slot)[1]
        (tmp_path / "data" / "images" / f"{index:06d}.png").write_bytes(b"broken")
    data = ["data=csv", f"data.root={csv}", "data.workers=0", "data.max_bad_fraction=0.5"]
    run_train([*RESUME, *data, "trainer.max_steps=6"], tmp_path / "straight")
    run_train([*RESUME, *data, "trainer.max_steps=3"], tmp_path / "resumed")
    halfway = torch.load(tmp_path / "resumed/checkpoints/latest.pt", weights_only=True)
    assert halfway["data"]["samples_consumed"] == 4 * 8 and halfway["data"]["bad_samples"] == 8
    run_train([*RESUME, *data, "trainer.max_steps=6"], tmp_path / "resumed")
    straight, resumed = (
        _weights(tmp_path / "straight/checkpoints/latest.pt"),
        _weights(tmp_path / "resumed/checkpoints/latest.pt"),
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_an_unreadable_named_resume_file_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    checkpointer = Checkpointer(tmp_path, every_n_steps=1, keep=1, resume=str(tmp_path / "torn.pt"))
    with pytest.raises(Exception):  # noqa: B017  (torch's unpickling error)
        checkpointer.load_for_resume()


def test_resume_auto_starts_fresh_without_checkpoints(tmp_path):
    assert Checkpointer(tmp_path / "none", every_n_steps=1, keep=1, resume="auto").load_for_resume() is None
    with pytest.raises(FileNotFoundError, match="checkpoint.resume="):
        Checkpointer(tmp_path, every_n_steps=1, keep=1, resume=str(tmp_path / "missing.pt"))
