"""Extended metrics against sklearn or a direct loop; subsets on a hand-built case; names and templates."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from vlhub.eval import ClassNameTransform, EvalContext, ZeroShotTask, load_subset, mask_logits, restrict_logits
from vlhub.eval.labelled_files import LabelledFiles
from vlhub.eval.metrics import balanced_accuracy, confusion_matrix, most_confused_pairs, per_class_table
from vlhub.eval.plots import MAX_SHOWN, select_classes
from vlhub.eval.prompts import caesar_shift, read_index_list, resolve_templates
from vlhub.eval.reports import write_classification_report
from vlhub.eval.subsets import ClassSubset, subset_classes


def random_case(num_samples=300, num_classes=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=generator)
    targets = torch.randint(0, num_classes - 2, (num_samples,), generator=generator)
    logits[:40, num_classes - 1] += 10  # the last class is predicted but never a target; the one before, neither
    logits[:, num_classes - 2] -= 100
    return logits, targets


def test_confusion_matrix_and_balanced_accuracy_match_sklearn():
    logits, targets = random_case()
    predictions = logits.argmax(1)
    ours = confusion_matrix(predictions, targets, 9)
    assert ours.tolist() == skm.confusion_matrix(targets.numpy(), predictions.numpy(), labels=range(9)).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the predicted-only class
        expected = skm.balanced_accuracy_score(targets.numpy(), predictions.numpy())
    assert balanced_accuracy(predictions, targets) == pytest.approx(expected)


def test_per_class_table_matches_sklearn_including_classes_never_targeted():
    logits, targets = random_case()
    table = per_class_table(logits, targets)
    y, p = targets.numpy(), logits.argmax(1).numpy()
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, p, labels=range(9), zero_division=np.nan)
    np.testing.assert_allclose(table["precision"].numpy(), precision, equal_nan=True)
    np.testing.assert_allclose(table["recall"].numpy(), recall, equal_nan=True)
    np.testing.assert_allclose(table["f1"].numpy(), f1, equal_nan=True)
    assert table["support"].tolist() == support.tolist()
    assert table["predicted"][8] > 0 and table["support"][8] == 0
    assert table["precision"][8] == 0 and table["f1"][8] == 0 and torch.isnan(table["recall"][8])
    assert torch.isnan(table["precision"][7]) and torch.isnan(table["f1"][7])  # never predicted, never a target
    for c in range(7):  # per-class top-5 accuracy by a direct loop
        rows = [i for i in range(len(y)) if y[i] == c]
        hits = sum(c in logits[i].topk(5).indices.tolist() for i in rows)
        assert table["top5_accuracy"][c].item() == pytest.approx(hits / len(rows))


def test_most_confused_pairs_match_a_direct_loop():
    logits, targets = random_case(num_samples=500, num_classes=12, seed=3)
    confusion = confusion_matrix(logits.argmax(1), targets, 12)
    cells = sorted(
        (-int(confusion[t, p]), t, p) for t in range(12) for p in range(12) if t != p and confusion[t, p] > 0
    )[:20]
    assert most_confused_pairs(confusion, 20) == [(t, p, -negative) for negative, t, p in cells]


def test_report_files_are_aligned_with_class_names(tmp_path):
    logits, targets = random_case()
    names = [f"class {chr(65 + c)}" for c in range(9)]
    summary = write_classification_report(tmp_path, logits, targets, names, "toy")
    with (tmp_path / "confusion_matrix.csv").open() as handle:
        rows = list(csv.reader(handle))
    predictions = logits.argmax(1)
    assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == confusion_matrix(predictions, targets, 9).tolist()
    with (tmp_path / "confusion_matrix_normalized.csv").open() as handle:
        normalised = list(csv.reader(handle))
    assert sum(float(v) for v in normalised[1][1:]) == pytest.approx(1.0, abs=1e-5)
    with (tmp_path / "per_class.csv").open() as handle:
        per_class = list(csv.DictReader(handle))
    assert [r["class_name"] for r in per_class] == names
    assert per_class[8]["recall"] == "" and per_class[8]["precision"] == "0" and int(per_class[8]["support"]) == 0
    c = 2
    expected_recall = ((predictions == c) & (targets == c)).sum().item() / (targets == c).sum().item()
    assert float(per_class[c]["accuracy"]) == pytest.approx(expected_recall, abs=1e-6)
    with (tmp_path / "confused_pairs.csv").open() as handle:
        pairs = list(csv.DictReader(handle))
    assert len(pairs) == 20 and int(pairs[0]["count"]) >= int(pairs[-1]["count"])
    assert pairs[0]["true_name"] == names[int(pairs[0]["true_index"])]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["top1"] == pytest.approx((predictions == targets).float().mean().item())
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 300


def test_a_1000_class_heatmap_shows_the_most_confused_classes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(1000).repeat(3)
    predictions = targets.clone()
    predictions[:1000] = torch.randint(0, 1000, (1000,), generator=generator)  # a third of images wrong at random
    predictions[1000:1030] = torch.tensor([(c + 500) for c in range(30)])  # classes 0..29 -> 500..529, twice each
    predictions[2000:2030] = torch.tensor([(c + 500) for c in range(30)])
    confusion = confusion_matrix(predictions, targets, 1000)
    shown = select_classes(confusion)
    assert len(shown) == MAX_SHOWN and shown[:2] in ([0, 500], [500, 0])
    assert {0, 500, 1, 501} <= set(shown[:4])
    logits = torch.nn.functional.one_hot(predictions, 1000).float()
    names = [f"a rather long class name number {i}" for i in range(1000)]
    write_classification_report(tmp_path, logits, targets, names, "imagenet")
    image = Image.open(tmp_path / "confusion_matrix.png")
    assert min(image.size) > 1000  # big enough for 40 readable labels


def test_subset_remapping_on_a_hand_built_case():
    # Task classes 0..3 are ImageNet classes 5, 3, 9, 1; the subset is (9, 5, 7): columns 9 -> 0, 5 -> 1.
    assert subset_classes([5, 3, 9, 1], ClassSubset("mine", (9, 5, 7))) == [2, 0]
    source = LabelledFiles([(f"p{i}", label) for i, label in enumerate([0, 1, 2, 3, 0, 2])], list("abcd"))
    task = ZeroShotTask("toy", source, list("abcd"), ["{}"], imagenet_indices=[5, 3, 9, 1])
    view = task.view(EvalContext("toy", None, torch.device("cpu"), subset=ClassSubset("mine", (9, 5, 7))))
    assert view.class_names == ["c", "a"] and view.prefix == "toy-mine"
    assert view.source.samples == [("p0", 1), ("p2", 0), ("p4", 1), ("p5", 0)]
    assert task.view(EvalContext("toy", None, torch.device("cpu"))).source is source  # no subset: untouched


def test_in100_keeps_37_classes_of_imagenet_a_and_36_of_imagenet_r():
    in100 = load_subset("in100")
    assert len(in100.indices) == 100
    a, r = read_index_list("imagenet_a_indices.txt"), read_index_list("imagenet_r_indices.txt")
    kept_a, kept_r = subset_classes(a, in100), subset_classes(r, in100)
    assert (len(kept_a), len(kept_r)) == (37, 36)
    positions = [in100.indices.index(a[c]) for c in kept_a]
    assert positions == sorted(positions)  # column order follows the subset list


def test_subset_masks_the_logits_of_a_1000_way_head():
    in100 = load_subset("in100")
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    restricted, masked = restrict_logits(logits, in100), mask_logits(logits, in100)
    assert restricted.shape == (64, 100)
    chosen = [in100.indices[c] for c in restricted.argmax(1).tolist()]
    assert masked.argmax(1).tolist() == chosen
    assert torch.isinf(masked[:, [i for i in range(1000) if i not in in100.indices]]).all()


def test_subset_choices_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^subset=in1000: not one of in100"):
        load_subset("in1000")
    (tmp_path / "mine.txt").write_text("3\n1\n3\n")
    with pytest.raises(ValueError, match="repeated"):
        load_subset(str(tmp_path / "mine.txt"))
    (tmp_path / "ok.txt").write_text("3\n1\n")
    assert load_subset(str(tmp_path / "ok.txt")) == ClassSubset("ok", (3, 1))


def test_class_name_transforms_and_template_choices(tmp_path):
    assert caesar_shift("Abc, xyz!", 3) == "Def, abc!" and caesar_shift("Def", -3) == "Abc"
    assert ClassNameTransform("upper", 1).apply(["tench", "Great white"]) == ["UFODI", "HSFBU XIJUF"]
    assert ClassNameTransform("lower").apply(["Tench"]) == ["tench"] and ClassNameTransform().apply(["A"]) == ["A"]
    with pytest.raises(ValueError, match="^case must be"):
        ClassNameTransform("title")
    assert resolve_templates("openai", ["x {}"]) == ["x {}"] and len(resolve_templates("simple", [])) == 7
    (tmp_path / "t.txt").write_text("a {}\n\nthe {}!\n")
    assert resolve_templates(str(tmp_path / "t.txt"), []) == ["a {}", "the {}!"]
    with pytest.raises(FileNotFoundError, match=r"^templates=openia: not one of openai\|simple"):
        resolve_templates("openia", [])


class RecordingModel(torch.nn.Module):
    """Records the texts it is asked to encode; every image and text maps to the same vector."""

    def __init__(self):
        super().__init__()
        self.texts = []

    def tokenize(self, texts):
        self.texts += texts
        return torch.zeros(len(texts), 1)

    def encode_text(self, tokens, normalize=True):
        return torch.ones(len(tokens), 4) / 2

    def encode_image(self, images, normalize=True):
        return torch.ones(len(images), 4) / 2


def test_shared_names_and_templates_reach_the_text_encoder(tmp_path):
    from tests.helpers.eval_folders import write_image

    write_image(tmp_path / "x.png", 0, 0)
    source = LabelledFiles([(tmp_path / "x.png", 0)], ["Tench", "Goldfish"])
    task = ZeroShotTask("toy", source, ["Tench", "Goldfish"], ["a {}.", "the {}!"])
    model = RecordingModel()
    context = EvalContext(
        "toy",
        lambda image: torch.zeros(3, 8, 8),
        torch.device("cpu"),
        templates="openai",
        class_names=ClassNameTransform("upper", 1),
    )
    metrics = task.run(model, context)
    assert model.texts == ["a UFODI.", "the UFODI!", "a HPMEGJTI.", "the HPMEGJTI!"]
    assert set(metrics) == {"toy-zeroshot-top1", "toy-zeroshot-top5", "toy-zeroshot-mean_per_class_recall"}
    model.texts.clear()
    overridden = ZeroShotTask("toy", source, ["Tench", "Goldfish"], ["a {}."], override=["my {}"])
    overridden.run(model, EvalContext("toy", context.transform, torch.device("cpu"), templates="simple"))
    assert model.texts == ["my Tench", "my Goldfish"]  # a task's own templates win over eval.templates
