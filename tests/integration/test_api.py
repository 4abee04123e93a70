"""``vlhub.load`` against open_clip's own loader (the CLIP_benchmark bridge: integration/test_benchmark_bridge.py)."""

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch

import vlhub
from vlhub.data import SyntheticShapes


@pytest.fixture
def checkpoint(trained_checkpoint):
    return trained_checkpoint  # one 2-step run for the session (conftest.py)


def _open_clip_reference(path, tmp_path):
    """open_clip's own model and preprocessing from the checkpoint: an independent loader."""
    stored = torch.load(path, weights_only=True)
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "vlhub-tiny-api.json").write_text(json.dumps(stored["open_clip_model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfg")
    model, _, preprocess = open_clip.create_model_and_transforms("vlhub-tiny-api", pretrained=str(path))
    return model.eval(), preprocess


def test_load_gives_the_checkpoints_model_preprocessing_and_tokenizer(checkpoint, tmp_path):
    model, preprocess, tokenizer = vlhub.load(checkpoint)
    assert not model.training
    reference, reference_preprocess = _open_clip_reference(checkpoint, tmp_path)
    image = SyntheticShapes(num_samples=2, split="val", image_size=48).load(1).image  # not the model's size
    pixels = preprocess(image)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, reference_preprocess(image))
    tokens = tokenizer(["a red circle", "a blue star"])
    torch.testing.assert_close(tokens, open_clip.SimpleTokenizer(context_length=24)(["a red circle", "a blue star"]))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels[None]), reference.encode_image(pixels[None], normalize=True)
        )
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens, normalize=True))


def test_load_takes_a_plain_open_clip_checkpoint_with_a_model_config(checkpoint, tmp_path):
    plain = tmp_path / "plain.pt"
    weights = torch.load(checkpoint, weights_only=True)
    torch.save(weights["state_dict"], plain)  # a bare state dict, as open_clip's released weights are
    with pytest.raises(ValueError, match="plain open_clip checkpoint"):
        vlhub.load(plain)
    model_cfg = {"_target_": "vlhub.models.build_open_clip_model", "config": weights["config"]["model"]["config"]}
    model, _, tokenizer = vlhub.load(plain, model=model_cfg)
    ours, _, _ = vlhub.load(checkpoint)
    tokens = tokenizer(["a green cross"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), ours.encode_text(tokens), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="checkpoint=.*no such file"):
        vlhub.load(tmp_path / "missing.pt")


def test_import_vlhub_is_cheap():
    code = "import sys, vlhub; heavy = {'torch', 'hydra', 'open_clip'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_sharded_checkpoint_directory_is_refused_naming_the_file_to_give(tmp_path):
    from vlhub.api import read_checkpoint

    shards = tmp_path / "step_3.dcp"  # as training writes it under trainer.strategy=fsdp
    shards.mkdir()
    torch.save({"step": 3}, shards / "trainer.pt")
    (shards / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint=.*step_3\.dcp is a sharded checkpoint directory.*step_<N>\.pt"):
        read_checkpoint(shards)
