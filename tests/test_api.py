"""``vlhub.load`` and the CLIP_benchmark bridge, against open_clip and CLIP_benchmark's own code."""

import json
import os
import shlex
import subprocess
import sys

import open_clip
import pytest
import torch

import vlhub
from tests.conftest import run_train
from tests.test_eval_retrieval import write_karpathy_set
from vlhub.data import SyntheticShapes
from vlhub.eval.retrieval import RetrievalTask
from vlhub.eval.tasks import EvalContext


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train")
    run_train(["eval=none", "trainer.max_steps=2"], run_dir)
    return run_dir / "checkpoints" / "latest.pt"


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


def _write_flickr_layout(root, paths, captions):
    """CLIP_benchmark's flickr30k layout: images in root, flickr30k_test_karpathy.txt of 'image.jpg,caption'."""
    lines = ["image,caption"]
    for path, image_captions in zip(paths, captions):
        target = root / path.name
        target.write_bytes(path.read_bytes())
        lines += [f"{path.name},{caption}" for caption in image_captions]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_clip_benchmark_runs_a_vlhub_checkpoint_and_agrees_with_vlhub_retrieval(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("clip_benchmark")
    from vlhub import benchmark_bridge

    task = RetrievalTask(str(write_karpathy_set(tmp_path / "coco", num_test=12, image_size=32)))
    flickr = tmp_path / "flickr"
    flickr.mkdir()
    _write_flickr_layout(flickr, task.image_paths, task.captions)
    output = tmp_path / "clip_benchmark.json"
    argv = shlex.split(
        "clip_benchmark eval --model_type vlhub --model vlhub --dataset flickr30k --task zeroshot_retrieval "
        "--recall_k 1 5 10 --no_amp --num_workers 0 --batch_size 5 --quiet"
    ) + ["--pretrained", str(checkpoint), "--dataset_root", str(flickr), "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    benchmark_bridge.main()
    theirs = json.loads(output.read_text())["metrics"]

    model, preprocess, _ = vlhub.load(checkpoint)
    ours = task.run(model, EvalContext("retrieval", preprocess, torch.device("cpu"), batch_size=5))
    assert set(theirs) == {key.removeprefix("retrieval-") for key in ours}
    for key, value in theirs.items():
        assert ours[f"retrieval-{key}"] == pytest.approx(value), key

    from clip_benchmark.models import load_clip

    loaded, transform, tokenizer = load_clip("vlhub", "vlhub", str(checkpoint), cache_dir=None, device="cpu")
    assert isinstance(loaded, type(model)) and tokenizer(["a dog"]).shape == (1, 24)
    assert 0 < theirs["image_retrieval_recall@1"] < 1  # a real comparison, not two trivial scores
