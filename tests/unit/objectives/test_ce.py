"""CE: the loss against torch's cross-entropy (multi-hot rows averaged), scoring by class name, and its
need for labels at launch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.configs import run_train
from tests.helpers.objectives import evaluate_on_shapes, prepared_objective
from tests.helpers.references import IdentityTowers, assert_close, randn
from vlhub.api import eval_transform
from vlhub.data import SyntheticShapes
from vlhub.objectives import IncompatibleObjective


def test_ce_single_labels_match_torch_cross_entropy_and_multi_hot_rows_average_their_classes():
    model, objective = prepared_objective("ce")
    classes, dim = objective.num_classes, model.image_tower.output_dim
    assert classes >= 4
    features, towers = randn(6, dim), IdentityTowers(1.0)
    logits = objective.head(features)

    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    parts = objective.loss(objective.represent(towers, {"image": features, "label": labels}), towers)
    assert_close(parts["loss"], F.cross_entropy(logits, labels))

    multi_hot = torch.zeros(6, classes)
    for row, hot in enumerate([[0], [1, 3], [0, 1, 2], [2], [3, 0], list(range(classes))]):
        multi_hot[row, hot] = 1.0
    parts = objective.loss(objective.represent(towers, {"image": features, "labels": multi_hot}), towers)
    probs = logits.softmax(dim=-1)
    rows = [
        -sum(math.log(probs[row, k].item()) for k in hot.nonzero().flatten()) / hot.sum().item()
        for row, hot in enumerate(multi_hot)
    ]
    assert_close(parts["loss"], torch.tensor(sum(rows) / len(rows)))


def test_ce_classifier_is_scored_on_the_task_classes_by_name():
    model, objective = prepared_objective("ce")
    model.eval()
    classifier = objective.scoring(model).classifier
    assert classifier.class_names == SyntheticShapes(num_samples=1).class_names
    metrics = evaluate_on_shapes(model, objective)
    images = torch.stack([eval_transform(model)(SyntheticShapes(30, split="val").load(i).image) for i in range(30)])
    labels = torch.tensor([SyntheticShapes(30, split="val").load(i).label for i in range(30)])
    top1 = (classifier.logits(images).argmax(1) == labels).float().mean().item()
    assert metrics["synthetic-classifier-top1"] == pytest.approx(top1)


def test_ce_without_labels_fails_at_launch(tmp_path):
    root = SyntheticShapes(num_samples=4).write_csv(tmp_path / "csv")
    choices = {"model": "tiny", "objective": "ce", "data": "csv"}
    with pytest.raises(IncompatibleObjective, match="objective=ce with model=tiny, data=csv.*needs class labels"):
        run_train(["objective=ce", "data=csv", f"data.root={root}"], tmp_path / "run", choices)


def test_ce_runs_on_an_imagefolder_with_no_other_key(tmp_path):
    root = SyntheticShapes(num_samples=30, split="val").write_imagefolder(tmp_path / "folder")
    shapes_eval = ["eval=synthetic", "eval.synthetic.num_samples=60"]  # the folder holds the shapes' classes
    metrics = run_train(["objective=ce", "data=imagefolder", f"data.root={root}", *shapes_eval], tmp_path / "run")
    assert "synthetic-classifier-top1" in metrics and "synthetic-zeroshot-top1" not in metrics  # classes by name
    checkpoint = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert checkpoint["objective_spec"]["kwargs"]["num_classes"] == 30
