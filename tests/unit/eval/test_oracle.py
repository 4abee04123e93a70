"""A fixed encoder with a known answer on every task: perfect, permuted, in any task order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.eval_folders import DATASET_TASKS
from vlhub.eval import Evaluator
from vlhub.eval.prompts import resolve_templates
from vlhub.registry import EVAL_TASKS


def pixels(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)


class NameOracle(torch.nn.Module):
    """Each image -> the vector of its class's name (or of ``permutation[class]``); each text -> its name's.

    Vectors are fixed random unit vectors (dim 64), one per distinct name, so a class name
    shared by two classes (OpenAI's ImageNet list repeats 'missile' and 'sunglasses') ties.
    """

    def __init__(self, task, templates: list[str], permutation: list[int] | None = None) -> None:
        super().__init__()
        names = task.class_names
        distinct = sorted(set(names))
        generator = torch.Generator().manual_seed(0)
        table = torch.nn.functional.normalize(torch.randn(len(distinct), 64, generator=generator), dim=1)
        self.vector = {name: table[i] for i, name in enumerate(distinct)}
        self.text_name = {t.format(name): name for name in names for t in templates}
        permutation = permutation or list(range(len(names)))
        self.image_name = {}
        for index, (_, label) in enumerate(task.source.samples):
            key = pixels(task.source.load(index).image).numpy().tobytes()
            self.image_name[key] = names[permutation[label]]
        self.texts: list[str] = []

    def tokenize(self, texts):
        start = len(self.texts)
        self.texts += texts
        return torch.arange(start, start + len(texts))[:, None]

    def encode_text(self, tokens, normalize=True):
        return torch.stack([self.vector[self.text_name[self.texts[i]]] for i in tokens[:, 0].tolist()])

    def encode_image(self, images, normalize=True):
        return torch.stack([self.vector[self.image_name[image.numpy().tobytes()]] for image in images])


@pytest.fixture(scope="module")
def tasks(eval_layouts):
    return {name: EVAL_TASKS.build(name, root=str(root)) for name, root in eval_layouts.items()}


def evaluate(task, name, permutation=None, templates="simple", subset=None):
    evaluator = Evaluator(batch_size=512, workers=0, templates=templates, subset=subset, **{name: task})
    model = NameOracle(task, resolve_templates(templates, task.templates), permutation)
    return evaluator.run(model, pixels, torch.device("cpu"))


IMAGENET_1K = ("imagenet", "imagenet_v2", "imagenet_sketch")


@pytest.mark.parametrize("name", DATASET_TASKS)
def test_a_perfect_encoder_scores_one_on_every_task(tasks, name):
    metrics = evaluate(tasks[name], name, templates="openai" if name in ("imagenet_a", "cars") else "simple")
    assert metrics[f"{name}-zeroshot-top5"] == 1.0
    if name in IMAGENET_1K:
        # Two pairs of OpenAI's names are identical: those classes tie, so at most 2 of 1000 classes miss.
        assert metrics[f"{name}-zeroshot-top1"] >= 0.998
    else:
        assert metrics[f"{name}-zeroshot-top1"] == 1.0
        assert metrics[f"{name}-zeroshot-mean_per_class_recall"] == 1.0


def test_the_in100_subset_scores_one_under_its_own_keys(tasks):
    for name, classes in (("imagenet", 100), ("imagenet_a", 37), ("imagenet_r", 36)):
        metrics = evaluate(tasks[name], name, subset="in100")
        assert set(metrics) == {f"{name}-in100-zeroshot-{m}" for m in ("top1", "top5", "mean_per_class_recall")}
        assert metrics[f"{name}-in100-zeroshot-top1"] == 1.0, classes
    food = evaluate(tasks["food101"], "food101", subset="in100")
    assert food["food101-zeroshot-top1"] == 1.0  # no ImageNet classes: evaluated whole, keys unchanged


@pytest.mark.parametrize("name", ["aircraft", "imagenet_r", "inat2021"])
def test_a_permuted_encoder_scores_what_the_permutation_implies(tasks, name):
    task = tasks[name]
    num_classes = len(task.class_names)
    permutation = list(range(num_classes))
    moved = list(range(0, num_classes // 2, 2)) if num_classes > 4 else [0]
    for c in moved:  # swap classes c and c+1: their images are always wrong, everything else right
        permutation[c], permutation[c + 1] = permutation[c + 1], permutation[c]
    metrics = evaluate(task, name, permutation)
    wrong = 2 * len(moved)
    labels = [label for _, label in task.source.samples]
    expected = sum(label >= wrong for label in labels) / len(labels)  # classes 0..wrong-1 are the swapped ones
    assert metrics[f"{name}-zeroshot-top1"] == pytest.approx(expected)
    assert metrics[f"{name}-zeroshot-mean_per_class_recall"] == pytest.approx(1 - wrong / num_classes)


def test_the_in100_subset_with_a_permutation_counts_only_its_classes(tasks):
    from vlhub.eval import load_subset

    in100 = load_subset("in100")
    permutation = list(range(1000))
    a, b = in100.indices[0], in100.indices[1]
    permutation[a], permutation[b] = b, a  # both in the subset: 2 of its 100 classes wrong
    c = next(i for i in range(1000) if i not in in100.indices)
    permutation[c] = a  # outside the subset: its images are dropped, so no effect
    metrics = evaluate(tasks["imagenet_sketch"], "imagenet_sketch", permutation, subset="in100")
    assert metrics["imagenet_sketch-in100-zeroshot-top1"] == pytest.approx(98 / 100)


def test_results_do_not_depend_on_task_order_or_on_earlier_runs(tasks, tmp_path):
    chosen = ("imagenet_a", "aircraft", "inat2021", "imagenet")
    model = NameOracle(tasks["imagenet"], resolve_templates("simple", []), permutation=list(range(999, -1, -1)))
    for name in chosen[:-1]:  # one model that knows every task's images, with a class permutation on imagenet
        reverse = list(range(len(tasks[name].class_names)))[::-1]
        other = NameOracle(tasks[name], resolve_templates("simple", []), permutation=reverse)
        model.vector.update(other.vector)
        model.text_name.update(other.text_name)
        model.image_name.update(other.image_name)
    forward = Evaluator(batch_size=256, workers=0, templates="simple", subset="in100", **{n: tasks[n] for n in chosen})
    backward = Evaluator(
        batch_size=256, workers=0, templates="simple", subset="in100", **{n: tasks[n] for n in reversed(chosen)}
    )
    first = forward.run(model, pixels, torch.device("cpu"))
    second = backward.run(model, pixels, torch.device("cpu"))
    alone = {}
    for name in chosen:
        alone |= Evaluator(batch_size=256, workers=0, templates="simple", subset="in100", **{name: tasks[name]}).run(
            model, pixels, torch.device("cpu")
        )
    assert first == second == alone == forward.run(model, pixels, torch.device("cpu"))
    assert "aircraft-zeroshot-top1" in first and "imagenet-in100-zeroshot-top1" in first


def test_extended_metrics_land_in_each_tasks_folder(tasks, tmp_path):
    evaluator = Evaluator(
        workers=0,
        templates="simple",
        subset="in100",
        extended_metrics=True,
        imagenet_a=tasks["imagenet_a"],
        inat2021=tasks["inat2021"],
    )
    model = NameOracle(tasks["imagenet_a"], resolve_templates("simple", []))
    other = NameOracle(tasks["inat2021"], resolve_templates("simple", []))
    for table in ("vector", "text_name", "image_name"):
        getattr(model, table).update(getattr(other, table))
    evaluator.run(model, pixels, torch.device("cpu"), output_dir=tmp_path / "eval")
    for name, classes in (("imagenet_a", 37), ("inat2021", 4)):
        folder = tmp_path / "eval" / name
        assert {p.name for p in folder.iterdir()} == {
            "confusion_matrix.csv",
            "confusion_matrix_normalized.csv",
            "per_class.csv",
            "confused_pairs.csv",
            "summary.json",
            "confusion_matrix.png",
        }
        assert len((folder / "per_class.csv").read_text().splitlines()) == classes + 1
