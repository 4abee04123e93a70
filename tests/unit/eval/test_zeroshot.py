"""Zero-shot evaluation: metrics against sklearn, and a fixed encoder with a known answer."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from vlhub.data import SyntheticShapes
from vlhub.eval import Evaluator, SyntheticZeroShot, classification_metrics
from vlhub.eval.tasks import EvalContext, ImageFolderZeroShot


def test_metrics_match_sklearn():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=generator)
    targets = torch.randint(0, 7, (200,), generator=generator)
    targets[targets == 6] = 5  # a class that never occurs as a target, but is predicted
    ours = classification_metrics(logits, targets, "t")
    scores, y = logits.numpy(), targets.numpy()
    assert ours["t-top1"] == pytest.approx(accuracy_score(y, scores.argmax(1)))
    assert ours["t-top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=np.arange(7)))
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-only class, and ignores it
        expected = balanced_accuracy_score(y, scores.argmax(1))
    assert ours["t-mean_per_class_recall"] == pytest.approx(expected)


class ColourShapeOracle(torch.nn.Module):
    """Maps an image and a class name to the same one-hot vector: a perfect (or permuted) encoder.

    It reads the class from a lookup keyed on the image's pixels, so the evaluation pipeline
    (loading, transforms, templates, tokenization, classifier, metrics) runs for real.
    """

    def __init__(self, task, permutation=None):
        super().__init__()
        self.names = task.class_names
        self.permutation = permutation or list(range(len(self.names)))
        self.lookup = {}
        for i in range(len(task.source)):
            sample = task.source.load(i)
            self.lookup[self._key(self._transform(sample.image))] = sample.label
        self._texts = {}

    @staticmethod
    def _transform(image):
        return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)

    @staticmethod
    def _key(tensor):
        return tensor.numpy().tobytes()

    def tokenize(self, texts):
        ids = []
        for text in texts:
            label = next(i for i, name in enumerate(self.names) if f" {name}." in f" {text}")
            ids.append(label)
        return torch.tensor(ids)[:, None]

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(tokens[:, 0], len(self.names)).float()

    def encode_image(self, images, normalize=True):
        labels = [self.permutation[self.lookup[self._key(image)]] for image in images]
        return torch.nn.functional.one_hot(torch.tensor(labels), len(self.names)).float()


def test_a_perfect_encoder_scores_one_and_a_permuted_one_what_the_permutation_implies():
    task = SyntheticZeroShot(num_samples=120)
    context = EvalContext("synthetic", ColourShapeOracle._transform, torch.device("cpu"), 32)
    perfect = task.run(ColourShapeOracle(task), context)
    assert perfect["synthetic-zeroshot-top1"] == 1.0
    assert perfect["synthetic-zeroshot-mean_per_class_recall"] == 1.0
    # Swap the first 6 classes in pairs: those 6 of 30 balanced classes are always wrong.
    permutation = list(range(30))
    for i in range(0, 6, 2):
        permutation[i], permutation[i + 1] = permutation[i + 1], permutation[i]
    permuted = task.run(ColourShapeOracle(task, permutation), context)
    assert permuted["synthetic-zeroshot-top1"] == pytest.approx(24 / 30)
    assert permuted["synthetic-zeroshot-top5"] == pytest.approx(24 / 30)


def test_imagefolder_task_with_a_class_name_file(tmp_path):
    SyntheticShapes(num_samples=60, split="val").write_imagefolder(tmp_path / "images")
    names = sorted(p.name.replace("_", " ") for p in (tmp_path / "images").iterdir())
    (tmp_path / "names.txt").write_text("\n".join(names))
    task = ImageFolderZeroShot(str(tmp_path / "images"), class_names_file=str(tmp_path / "names.txt"))
    context = EvalContext("imagefolder", ColourShapeOracle._transform, torch.device("cpu"))
    result = task.run(ColourShapeOracle(task), context)
    assert result["imagefolder-zeroshot-top1"] == 1.0
    with pytest.raises(FileNotFoundError, match="eval.imagefolder.root|no such folder"):
        ImageFolderZeroShot(str(tmp_path / "missing"))


def test_evaluator_results_do_not_depend_on_task_order(tiny_model):
    from vlhub.augment import build_plain_transforms

    transform = build_plain_transforms(tiny_model.image_stats).eval
    a, b = SyntheticZeroShot(num_samples=30), SyntheticZeroShot(num_samples=60, seed=1)
    first = Evaluator(batch_size=16, workers=0, x=a, y=b).run(tiny_model, transform, torch.device("cpu"))
    b2, a2 = SyntheticZeroShot(num_samples=60, seed=1), SyntheticZeroShot(num_samples=30)
    second = Evaluator(batch_size=16, workers=0, y=b2, x=a2).run(tiny_model, transform, torch.device("cpu"))
    assert first == second
    assert set(first) == {f"{t}-zeroshot-{m}" for t in "xy" for m in ("top1", "top5", "mean_per_class_recall")}
