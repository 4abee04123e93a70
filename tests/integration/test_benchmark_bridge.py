"""The CLIP_benchmark bridge: each of its tasks on a vlhub checkpoint against vlhub's own evaluator, and the shim.

The data are generated shapes written as CLIP_benchmark's ``imagenet1k-unverified`` layout
(``root/{train,val}/<class>/``) with class names and templates given as its custom JSON files:
how a local ImageFolder-style dataset goes through the bridge.
"""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

import vlhub
from tests.helpers.configs import run_train
from tests.helpers.eval_folders import write_karpathy_set
from vlhub import benchmark_bridge
from vlhub.data import ImageFolderPairs, SyntheticShapes
from vlhub.eval import EvalContext, ImageFolderZeroShot, LinearProbeTask, RetrievalTask, topk_accuracy
from vlhub.eval.linear_probe import extract_features
from vlhub.eval.scoring import PROBE_FEATURES
from vlhub.objectives.filip import TokenScorer

pytest.importorskip("clip_benchmark")  # the optional extra (in .[dev])
from clip_benchmark.metrics import linear_probe, zeroshot_classification  # noqa: E402

CLASSES = ["red circle", "red square", "green triangle", "blue star", "yellow cross", "purple circle"]  # sorted below
TEMPLATES = ["a photo of a {}.", "an image of a {}."]
TRAIN_PER_CLASS, VAL_PER_CLASS, MISFILED_PER_CLASS = 8, 4, 1
COMMON = ["--model_type", "vlhub", "--model", "vlhub", "--no_amp", "--num_workers", "0", "--quiet"]


@pytest.fixture
def checkpoint(trained_checkpoint):
    return trained_checkpoint  # one 2-step run for the session (conftest.py)


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory):
    """``train``: distinct shapes per class. ``val``: copies of train images, one per class filed under the next class.

    A probe that fits its train set exactly predicts each copy's train class, so its test top-1
    and mean per-class recall are both ``1 - MISFILED_PER_CLASS / VAL_PER_CLASS`` = 0.75.
    """
    root = tmp_path_factory.mktemp("folders")
    names = sorted(CLASSES)  # ImageFolder's label order is the sorted folder order
    folders = [name.replace(" ", "_") for name in names]
    labels = [SyntheticShapes().class_names.index(name) for name in names]
    source = SyntheticShapes(num_samples=30 * TRAIN_PER_CLASS, split="val", image_size=32)  # label = index % 30
    for c, label in enumerate(labels):
        for j in range(TRAIN_PER_CLASS):
            train_path = root / "train" / folders[c] / f"{j:03d}.png"
            train_path.parent.mkdir(parents=True, exist_ok=True)
            source.load(label + 30 * j).image.save(train_path)
            if j < VAL_PER_CLASS:
                filed_under = (c + 1) % len(names) if j < MISFILED_PER_CLASS else c
                val_path = root / "val" / folders[filed_under] / f"{folders[c]}_{j:03d}.png"
                val_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(train_path, val_path)
    key = "imagenet1k-unverified"
    (root / "classnames.json").write_text(json.dumps({key: names}))
    (root / "templates.json").write_text(json.dumps({key: [t.replace("{}", "{c}") for t in TEMPLATES]}))
    return root


def _run_cli(args: str, output):
    """``python -m vlhub.benchmark_bridge eval ...`` from Python (tmp paths have no spaces)."""
    benchmark_bridge.main(["eval", *COMMON, *args.split(), "--output", str(output)])
    return json.loads(output.read_text())["metrics"]


def test_zeroshot_classification_equals_vlhub_zeroshot(checkpoint, folder_set, tmp_path):
    names, templates = folder_set / "classnames.json", folder_set / "templates.json"
    theirs = _run_cli(
        f"--pretrained {checkpoint} --dataset imagenet1k-unverified --dataset_root {folder_set} "
        f"--custom_classname_file {names} --custom_template_file {templates} "
        "--task zeroshot_classification --batch_size 7",
        tmp_path / "zeroshot.json",
    )
    model, preprocess, _ = vlhub.load(checkpoint)
    task = ImageFolderZeroShot(str(folder_set / "val"), templates=TEMPLATES)
    ours = task.run(model, EvalContext("folder", preprocess, torch.device("cpu"), batch_size=5))
    assert theirs["acc1"] == pytest.approx(ours["folder-zeroshot-top1"])
    assert theirs["acc5"] == pytest.approx(ours["folder-zeroshot-top5"])
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["folder-zeroshot-mean_per_class_recall"])
    assert 0 < theirs["acc1"] < 1 and theirs["acc5"] > theirs["acc1"]  # a real comparison, not two trivial scores
    assert theirs["scoring"] == "cosine of pooled embeddings"


def _write_flickr_layout(root, paths, captions):
    """CLIP_benchmark's flickr30k layout: images in root, flickr30k_test_karpathy.txt of 'image.jpg,caption'."""
    lines = ["image,caption"]
    for path, image_captions in zip(paths, captions):
        (root / path.name).write_bytes(path.read_bytes())
        lines += [f"{path.name},{caption}" for caption in image_captions]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("objective", ["clip", "filip"])
def test_zeroshot_retrieval_equals_vlhub_retrieval(objective, request, tmp_path):
    if objective == "clip":
        checkpoint = request.getfixturevalue("checkpoint")
    else:
        checkpoint = request.getfixturevalue("trained")[objective] / "checkpoints" / "latest.pt"
    task = RetrievalTask(str(write_karpathy_set(tmp_path / "coco", num_test=12, image_size=32)))
    flickr = tmp_path / "flickr"
    flickr.mkdir()
    _write_flickr_layout(flickr, task.image_paths, task.captions)
    theirs = _run_cli(
        f"--pretrained {checkpoint} --dataset flickr30k --dataset_root {flickr} "
        "--task zeroshot_retrieval --recall_k 1 5 10 --batch_size 5",
        tmp_path / "retrieval.json",
    )
    loaded = vlhub.load(checkpoint)
    context = EvalContext("retrieval", loaded.preprocess, torch.device("cpu"), batch_size=5, scoring=loaded.scoring)
    ours = task.run(loaded.model, context)
    expected = "cosine of pooled embeddings" if objective == "clip" else TokenScorer.name
    assert theirs.pop("scoring") == expected
    assert set(theirs) == {key.removeprefix("retrieval-") for key in ours}
    for key, value in theirs.items():
        assert ours[f"retrieval-{key}"] == pytest.approx(value), key
    assert 0 < theirs["image_retrieval_recall@1"] < 1  # a real comparison, not two trivial scores


class _CpuPassingAsCuda(str):
    """``"cpu"`` to torch, yet ``== "cuda"`` for CLIP_benchmark 1.6.2's linear probe (``assert device == 'cuda'``)."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_linear_probe_equals_vlhub_linear_probe(checkpoint, folder_set, tmp_path, monkeypatch):
    """Full-shot, no validation sweep, normalised features, on both sides.

    CLIP_benchmark's probe is AdamW on a linear layer, vlhub's is L-BFGS logistic regression, so
    the data (see ``folder_set``) make the answer independent of the optimiser: both must give 0.75.
    CLIP_benchmark's probe runs on CUDA only; without a GPU, its ``.cuda()`` calls are no-ops here.
    """
    device = "cuda" if torch.cuda.is_available() else _CpuPassingAsCuda("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    benchmark_bridge.register()  # the Python route: the loader, then CLIP_benchmark's own functions
    model, transform, _ = benchmark_bridge.load_vlhub(pretrained=str(checkpoint), device=str(device))
    loaders = {
        split: torch.utils.data.DataLoader(
            ImageFolder(str(folder_set / split), transform=transform), batch_size=64, shuffle=False, num_workers=0
        )
        for split in ("train", "val")
    }
    # Full batch, large lr, many epochs: the probe fits its 48 train features exactly.
    settings = dict(fewshot_k=-1, batch_size=64, num_workers=0, lr=3.0, epochs=1000, seed=0, amp=False)
    feature_root = tmp_path / "features"
    theirs = linear_probe.evaluate(
        model,
        loaders["train"],
        loaders["val"],
        model_id="tiny",
        feature_root=str(feature_root),
        device=device,
        **settings,
    )

    model, preprocess, _ = vlhub.load(checkpoint)
    task = LinearProbeTask(
        ImageFolderPairs(str(folder_set / "train")), ImageFolderPairs(str(folder_set / "val")), C=100
    )
    ours = task.run(model, EvalContext("folder", preprocess, torch.device("cpu"), batch_size=16))
    expected = 1 - MISFILED_PER_CLASS / VAL_PER_CLASS
    assert theirs["lp_acc1"] == pytest.approx(ours["folder-linear_probe-top1"])
    assert theirs["lp_mean_per_class_recall"] == pytest.approx(ours["folder-linear_probe-mean_per_class_recall"])
    assert theirs["lp_acc1"] == pytest.approx(expected) and theirs["lp_mean_per_class_recall"] == pytest.approx(
        expected
    )
    # The bridge fed CLIP_benchmark the features vlhub's evaluator uses.
    cached = torch.load(feature_root / "tiny" / "features_train.pt")
    ours_x, _ = extract_features(model, ImageFolderPairs(str(folder_set / "train")), preprocess, torch.device("cpu"))
    on_gpu = {"atol": 2e-3, "rtol": 0} if torch.cuda.is_available() else {}  # TF32 convolutions there
    torch.testing.assert_close(cached.cpu(), ours_x, **on_gpu)


# -- scoring as the objective does ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run folder per objective: one step, then the default evaluation (60 generated shapes)."""
    runs = {}
    for name in ("filip", "ce", "simclr"):
        runs[name] = tmp_path_factory.mktemp(name)
        run_train([f"objective={name}", "trainer.max_steps=1"], runs[name], {"model": "tiny", "objective": name})
    return runs


def _zeroshot_args(checkpoint, folder_set):
    return (
        f"--pretrained {checkpoint} --dataset imagenet1k-unverified --dataset_root {folder_set} "
        f"--custom_classname_file {folder_set / 'classnames.json'} "
        f"--custom_template_file {folder_set / 'templates.json'} --task zeroshot_classification --batch_size 7"
    )


def test_filip_zero_shot_through_the_bridge_equals_vlhub_evaluate(trained, folder_set, tmp_path):
    from tests.helpers.configs import compose_evaluate
    from vlhub.evaluate import evaluate

    checkpoint = trained["filip"] / "checkpoints" / "latest.pt"
    theirs = _run_cli(_zeroshot_args(checkpoint, folder_set), tmp_path / "zeroshot.json")
    templates = "[" + ",".join(f'"{t}"' for t in TEMPLATES) + "]"
    cfg = compose_evaluate(
        [f"checkpoint={checkpoint}", "eval=imagefolder", f"eval.imagefolder.root={folder_set / 'val'}",
         f"eval.imagefolder.templates={templates}", "eval.batch_size=5", "eval.workers=0", "device=cpu"]
    )  # fmt: skip
    ours = evaluate(cfg, tmp_path / "evaluate", model_given=False)
    assert theirs["acc1"] == pytest.approx(ours["imagefolder-zeroshot-top1"])
    assert theirs["acc5"] == pytest.approx(ours["imagefolder-zeroshot-top5"])
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["imagefolder-zeroshot-mean_per_class_recall"])
    assert f"zeroshot={theirs['scoring']};" in ours["scoring"] and theirs["scoring"].startswith("token-wise (FILIP)")


@pytest.mark.parametrize("name", ["ce", "simclr"])
def test_bridge_refuses_zero_shot_for_image_only_objectives_in_one_line(name, trained, folder_set, tmp_path):
    with pytest.raises(SystemExit) as refused:
        _run_cli(_zeroshot_args(trained[name] / "checkpoints" / "latest.pt", folder_set), tmp_path / "out.json")
    assert str(refused.value) == (
        f"vlhub.benchmark_bridge: zero-shot classification refused: objective {name} trains no text tower, "
        "so image-text scores would read an untrained one"
    )
    assert not (tmp_path / "out.json").exists()


def test_every_training_record_says_which_scoring_produced_it(trained):
    records = {name: json.loads((run / "results.jsonl").read_text().splitlines()[-1]) for name, run in trained.items()}
    for record in records.values():  # one flat string: kind=scoring; ...
        record["scoring"] = dict(part.split("=", 1) for part in record["scoring"].split("; "))
    assert records["filip"]["scoring"]["zeroshot"].startswith("token-wise (FILIP)")
    assert records["filip"]["scoring"]["retrieval"] == records["filip"]["scoring"]["zeroshot"]
    assert "synthetic-zeroshot-top1" in records["filip"]
    for name in ("ce", "simclr"):
        assert records[name]["scoring"]["zeroshot"] == f"none: objective {name} trains no text tower, " + (
            "so image-text scores would read an untrained one"
        )
        assert not any("zeroshot" in key for key in records[name])
    assert "synthetic-classifier-top1" in records["ce"] and "classifier" in records["ce"]["scoring"]
    assert "synthetic-linear_probe-top1" in records["simclr"]
    assert records["simclr"]["scoring"]["linear_probe"] == PROBE_FEATURES


def test_caption_selection_through_the_scorer_equals_clip_benchmarks_own_for_clip(checkpoint):
    from clip_benchmark.metrics import image_caption_selection

    benchmark_bridge.register()
    scored, preprocess, tokenizer = benchmark_bridge.load_vlhub(pretrained=str(checkpoint))
    # SugarCrepe's shape: one image, its caption and a wrong one, per instance.
    source = SyntheticShapes(num_samples=24, split="val", image_size=32)
    samples = [source.load(i) for i in range(24)]
    images = torch.stack([preprocess(s.image) for s in samples])
    captions = [[s.caption, samples[(i + 7) % 24].caption] for i, s in enumerate(samples)]
    batches = [(images[i : i + 8], captions[i : i + 8]) for i in range(0, 24, 8)]
    theirs = benchmark_bridge._ORIGINAL["caption_selection_evaluate"](
        scored.model, batches, tokenizer, "cpu", amp=False
    )
    ours = image_caption_selection.evaluate(scored, batches, tokenizer, "cpu", amp=False)
    assert ours.pop("scoring") == "cosine of pooled embeddings"
    assert ours == pytest.approx(theirs)
    assert 0 < theirs["text_acc"] < 1  # a real comparison


# -- the accuracy shim --------------------------------------------------------------------------
def _pristine_zeroshot_module():
    """A private copy of CLIP_benchmark's zeroshot_classification, untouched by any register() call."""
    spec = importlib.util.find_spec("clip_benchmark.metrics.zeroshot_classification")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _float_as_before_numpy_2_4(value):
    """``float()`` as numpy < 2.4 did it: a one-element array converts to its element."""
    return float(value.item()) if isinstance(value, np.ndarray) else float(value)


def _logits(num=50, classes=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num, classes, generator=generator), torch.randint(0, classes, (num,), generator=generator)


def test_shim_gives_clip_benchmarks_own_numbers(monkeypatch):
    pristine = _pristine_zeroshot_module()
    if not benchmark_bridge.accuracy_needs_shim(pristine.accuracy):
        pytest.skip("this CLIP_benchmark's accuracy works under this numpy: nothing to shim")
    monkeypatch.setattr(zeroshot_classification, "accuracy", pristine.accuracy)
    monkeypatch.setattr(linear_probe, "accuracy", pristine.accuracy)
    assert benchmark_bridge.apply_accuracy_shim()
    assert zeroshot_classification.accuracy is linear_probe.accuracy is benchmark_bridge._accuracy
    assert not benchmark_bridge.apply_accuracy_shim()  # applied once

    logits, targets = _logits()
    pristine.float = _float_as_before_numpy_2_4  # the original code, run as under an older numpy
    expected = pristine.accuracy(logits, targets, topk=(1, 5))
    assert benchmark_bridge._accuracy(logits, targets, topk=(1, 5)) == expected  # exactly
    assert expected == pytest.approx([topk_accuracy(logits, targets, 1), topk_accuracy(logits, targets, 5)])


def test_shim_is_not_applied_when_accuracy_already_works(monkeypatch):
    pristine = _pristine_zeroshot_module()
    pristine.float = _float_as_before_numpy_2_4  # a CLIP_benchmark whose accuracy works
    monkeypatch.setattr(zeroshot_classification, "accuracy", pristine.accuracy)
    monkeypatch.setattr(linear_probe, "accuracy", pristine.accuracy)
    assert not benchmark_bridge.accuracy_needs_shim(pristine.accuracy)
    benchmark_bridge.register()
    assert zeroshot_classification.accuracy is linear_probe.accuracy is pristine.accuracy
    logits, targets = _logits(seed=1)
    assert zeroshot_classification.accuracy(logits, targets, topk=(1, 5)) == pytest.approx(
        [topk_accuracy(logits, targets, 1), topk_accuracy(logits, targets, 5)]
    )
