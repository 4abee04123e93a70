"""Linear probe and k-NN: against scikit-learn on fixed features, and end to end with a known answer."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from vlhub.data import SyntheticShapes
from vlhub.eval.linear_probe import LinearProbeTask, knn_predict, linear_probe_logits
from vlhub.eval.tasks import EvalContext


def _features(n, num_classes=4, dim=8, spread=1.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


@pytest.mark.parametrize(("k", "chunk_size"), [(1, 1024), (7, 13)])
def test_knn_matches_sklearn_cosine_knn(k, chunk_size):
    train_x, train_y = _features(120)
    test_x, test_y = _features(50, seed=1)
    ours = knn_predict(train_x, train_y, test_x, num_classes=4, k=k, chunk_size=chunk_size)
    theirs = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train_x, train_y)
    np.testing.assert_array_equal(ours.numpy(), theirs.predict(test_x.numpy()))
    assert 0.3 < (ours == test_y).float().mean() < 1.0  # a real, non-trivial comparison


def test_knn_breaks_vote_ties_towards_the_smaller_class():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([2, 2, 1, 1])
    # Equidistant-ish query with k=4: two votes each, class 1 wins the tie.
    assert knn_predict(train, labels, torch.tensor([[1.0, 1.0]]), num_classes=3, k=4).tolist() == [1]
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), num_classes=3, k=1).tolist() == [2]


def test_linear_probe_matches_sklearn_pipeline():
    train_x, train_y = _features(200, spread=2.5)
    test_x, test_y = _features(80, spread=2.5, seed=1)
    logits = linear_probe_logits(train_x, train_y, test_x, num_classes=4, C=0.5)
    scaler = StandardScaler().fit(train_x.double().numpy())
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(scaler.transform(train_x.double().numpy()), train_y)
    expected = reference.predict_proba(scaler.transform(test_x.double().numpy()))
    np.testing.assert_allclose(logits.exp().numpy(), expected, atol=1e-6)
    accuracy = (logits.argmax(1) == test_y).double().mean().item()
    assert 0.5 < accuracy < 1.0


def test_linear_probe_columns_follow_class_indices_when_a_class_is_absent_from_train():
    train_x, train_y = _features(100, num_classes=3, spread=0.1)
    train_y = torch.where(train_y == 1, torch.tensor(2), train_y)  # only classes 0 and 2 (binary) are trained
    logits = linear_probe_logits(train_x, train_y, train_x[:10], num_classes=4, C=[0.1, 1.0, 10.0])
    assert logits.shape == (10, 4)
    assert torch.isinf(logits[:, [1, 3]]).all() and torch.isfinite(logits[:, [0, 2]]).all()
    assert torch.equal(logits.argmax(1), train_y[:10])  # well separated: the probe is exact


class LabelOracle(torch.nn.Module):
    """Maps every image of the synthetic set to its class's one-hot vector (looked up from its pixels)."""

    def __init__(self, sources, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.lookup = {}
        for source in sources:
            for i in range(len(source)):
                sample = source.load(i)
                self.lookup[_to_tensor(sample.image).numpy().tobytes()] = sample.label

    def encode_image(self, images, normalize=True):
        labels = torch.tensor([self.lookup[image.numpy().tobytes()] for image in images])
        return torch.nn.functional.one_hot(labels, self.num_classes).float()

    def encode_text(self, tokens, normalize=True):  # never used: probes see images only
        raise AssertionError("the linear probe must not encode text")


def _to_tensor(image):
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)


def test_task_with_a_perfect_image_encoder_scores_one_and_names_its_keys():
    train = SyntheticShapes(num_samples=240, split="train", image_size=12)
    test = SyntheticShapes(num_samples=60, split="val", image_size=12)
    task = LinearProbeTask(train, test, C=1.0, k=1)
    oracle = LabelOracle([train, test], num_classes=30)
    metrics = task.run(oracle, EvalContext("synthetic", _to_tensor, torch.device("cpu"), batch_size=64))
    assert set(metrics) == {
        "synthetic-linear_probe-top1",
        "synthetic-linear_probe-top5",
        "synthetic-linear_probe-mean_per_class_recall",
        "synthetic-knn-top1",
        "synthetic-knn-mean_per_class_recall",
    }
    train_classes = {train.load(i).label for i in range(len(train))}
    assert len(train_classes) == 30  # every class is seen in training, so a perfect encoder is perfect
    assert all(value == 1.0 for value in metrics.values()), metrics


def test_task_rejects_bad_settings_and_unlabelled_sources(tmp_path):
    source = SyntheticShapes(num_samples=4, split="val", image_size=8)
    with pytest.raises(ValueError, match="k .* must be > 0"):
        LinearProbeTask(source, source, k=0)
    with pytest.raises(ValueError, match="C must be > 0"):
        linear_probe_logits(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(2, 2), 2, C=[0.0])
    from vlhub.data import CsvPairs

    csv = CsvPairs(str(source.write_csv(tmp_path)))  # no label column: labels are -1
    task = LinearProbeTask(csv, csv)
    with pytest.raises(ValueError, match="labelled source"):
        task.run(LabelOracle([source], 30), EvalContext("csv", _to_tensor, torch.device("cpu")))


def test_a_folder_probe_is_the_linear_probe_on_those_folders_named_after_the_data(tmp_path, tiny_model):
    import shutil

    from vlhub.api import eval_transform
    from vlhub.data import ImageFolderPairs
    from vlhub.eval.linear_probe import FolderProbeTask

    for split in ("train", "val"):  # 150 samples: every one of the 30 classes in both splits
        SyntheticShapes(num_samples=150, split=split, image_size=16).write_imagefolder(tmp_path / "pets" / split)
    train, val = str(tmp_path / "pets/train"), str(tmp_path / "pets/val")

    def context(name):
        return EvalContext(name, eval_transform(tiny_model), torch.device("cpu"), batch_size=32)

    folder = FolderProbeTask(train, val, k=3).run(tiny_model, context("probe"))
    reference = LinearProbeTask(ImageFolderPairs(train), ImageFolderPairs(val), k=3).run(tiny_model, context("pets"))
    assert folder == reference and "pets-linear_probe-top1" in folder  # the folders' parent names the keys
    named = FolderProbeTask(train, val, name="mine", k=3).run(tiny_model, context("probe"))
    assert named == {key.replace("pets-", "mine-"): value for key, value in reference.items()}
    shutil.rmtree(next(p for p in (tmp_path / "pets/val").iterdir()))  # a class missing from the test folder
    with pytest.raises(ValueError, match="^train=.* and test=.* must hold the same class"):
        FolderProbeTask(train, val)
