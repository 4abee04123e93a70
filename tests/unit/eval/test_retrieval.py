"""Retrieval: recall@k against brute force and CLIP_benchmark, val metrics against open_clip, the task end to end."""

import numpy as np
import pytest
import torch

from tests.helpers.eval_folders import CAPTIONS_PER_IMAGE, write_karpathy_set
from vlhub.data import SyntheticShapes
from vlhub.eval.retrieval import (
    PairValidationTask,
    RetrievalTask,
    clip_val_metrics,
    read_karpathy_split,
    retrieval_recall,
)
from vlhub.eval.tasks import EvalContext


def _random_set(num_images=60, per_image=5, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    owners = torch.arange(num_images).repeat_interleave(per_image)
    # Captions near their image, so recall is neither 0 nor 1.
    texts = images[owners] + 0.9 * torch.randn(len(owners), dim, generator=generator)
    return torch.nn.functional.normalize(texts, dim=-1), images, owners


def _brute_force_recall(texts, images, owners, k):
    scores = (texts @ images.T).numpy()
    owners = owners.numpy()
    image_hits = [owners[t] in np.argsort(-scores[t])[:k] for t in range(len(texts))]
    text_hits = [i in owners[np.argsort(-scores[:, i])[:k]] for i in range(len(images))]
    return float(np.mean(image_hits)), float(np.mean(text_hits))


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_recall_matches_brute_force(chunk_size):
    texts, images, owners = _random_set()
    ours = retrieval_recall(texts, images, owners, chunk_size=chunk_size)
    for k in (1, 5, 10):
        image_recall, text_recall = _brute_force_recall(texts, images, owners, k)
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1


def test_recall_matches_clip_benchmark_definition():
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    texts, images, owners = _random_set(num_images=40, seed=1)
    scores = texts @ images.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(texts)), owners] = True
    ours = retrieval_recall(texts, images, owners, chunk_size=16)
    for k in (1, 5, 10):
        theirs_image = (
            zeroshot_retrieval.batchify(zeroshot_retrieval.recall_at_k, scores, positives, 32, "cpu", k=k) > 0
        )
        theirs_text = (
            zeroshot_retrieval.batchify(zeroshot_retrieval.recall_at_k, scores.T, positives.T, 32, "cpu", k=k) > 0
        )
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(theirs_image.float().mean().item())
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(theirs_text.float().mean().item())


def test_recall_on_a_hand_computed_case():
    # Two images; captions 0,1 belong to image 0, captions 2,3 to image 1.
    images = torch.eye(2)
    texts = torch.tensor([[1.0, 0.0], [0.2, 0.9], [0.1, 0.8], [0.7, 0.3]])
    owners = torch.tensor([0, 0, 1, 1])
    ours = retrieval_recall(texts, images, owners, ks=(1, 2), chunk_size=1)
    # Caption -> image at 1: captions 0 and 2 right, 1 and 3 wrong.
    assert ours["image_retrieval_recall@1"] == 0.5
    # Image 0's best caption is caption 0 (its own); image 1's best is caption 1 (image 0's).
    assert ours["text_retrieval_recall@1"] == 0.5
    # k is capped at the number of candidates: everything is found at k=2.
    assert ours["image_retrieval_recall@2"] == 1.0 and ours["text_retrieval_recall@2"] == 1.0


@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_clip_val_metrics_match_open_clip(chunk_size):
    train = pytest.importorskip("open_clip_train.train")
    texts, images, _ = _random_set(num_images=50, per_image=1, seed=2)
    ours = clip_val_metrics(images, texts, chunk_size=chunk_size)
    theirs = train.get_clip_metrics(images, texts, logit_scale=torch.tensor(100.0))
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value)), key


class IndexOracle(torch.nn.Module):
    """Encodes test image i as e_i and any caption of image j as e_perm[j]: recall@1 is known.

    Images are recognised by their pixels (a lookup built from the set), captions by the number in them.
    """

    def __init__(self, task, permutation):
        super().__init__()
        self.count = len(task.image_paths)
        self.permutation = permutation
        from vlhub.data.files import read_image

        self.lookup = {self._key(_to_tensor(read_image(p))): i for i, p in enumerate(task.image_paths)}

    @staticmethod
    def _key(tensor):
        return tensor.numpy().tobytes()

    def tokenize(self, texts):
        return torch.tensor([int(text.split(" number ")[1].split(",")[0]) for text in texts])[:, None]

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(torch.tensor(self.permutation)[tokens[:, 0]], self.count).float()

    def encode_image(self, images, normalize=True):
        indices = torch.tensor([self.lookup[self._key(image)] for image in images])
        return torch.nn.functional.one_hot(indices, self.count).float()


def _to_tensor(image):
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)


def _context(name="retrieval", batch_size=5):
    return EvalContext(name, _to_tensor, torch.device("cpu"), batch_size=batch_size)


def test_task_reads_only_the_test_split_with_subfolders(tmp_path):
    write_karpathy_set(tmp_path, num_test=6, num_train=4)
    paths, captions = read_karpathy_split(tmp_path)
    assert len(paths) == 6 and all(p.parent.name == "val2014" and p.is_file() for p in paths)
    assert [len(c) for c in captions] == [CAPTIONS_PER_IMAGE] * 6
    assert captions[3][2].endswith("number 3, caption 2")
    task = RetrievalTask(str(tmp_path), max_captions_per_image=2)
    assert [len(c) for c in task.captions] == [2] * 6


@pytest.mark.parametrize("permutation", ["identity", "swapped"])
def test_task_scores_what_the_encoder_implies(tmp_path, permutation):
    write_karpathy_set(tmp_path, num_test=12)
    task = RetrievalTask(str(tmp_path), chunk_size=4)
    perm = list(range(12)) if permutation == "identity" else [1, 0, 3, 2, *range(4, 12)]
    metrics = task.run(IndexOracle(task, perm), _context())
    expected = 1.0 if permutation == "identity" else 8 / 12  # 8 of 12 images keep their captions
    assert metrics["retrieval-image_retrieval_recall@1"] == pytest.approx(expected)
    assert metrics["retrieval-text_retrieval_recall@1"] == pytest.approx(expected)
    assert set(metrics) == {f"retrieval-{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    if permutation == "identity":
        assert all(value == 1.0 for value in metrics.values())


def test_bad_roots_fail_when_built_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="^root=None: not set"):
        RetrievalTask(None)
    with pytest.raises(FileNotFoundError, match="^root=.*no such folder"):
        RetrievalTask(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^root=.*exactly one Karpathy-format captions JSON"):
        RetrievalTask(str(tmp_path / "empty"))
    (tmp_path / "empty" / "captions.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Karpathy-format captions JSON"):
        RetrievalTask(str(tmp_path / "empty"))
    write_karpathy_set(tmp_path / "coco", num_test=3, num_train=1)
    with pytest.raises(ValueError, match="no images with split == 'val'"):
        RetrievalTask(str(tmp_path / "coco"), split="val")
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="^root=.*1 of 3 images .* missing"):
        RetrievalTask(str(tmp_path / "coco"))


def test_val_pairs_task_matches_open_clip_on_the_models_features(tiny_model):
    train = pytest.importorskip("open_clip_train.train")
    from vlhub.augment import build_plain_transforms

    source = SyntheticShapes(num_samples=24, split="val", image_size=32)
    transform = build_plain_transforms(tiny_model.image_stats).eval
    tiny_model.eval()
    metrics = PairValidationTask(source, max_samples=20, chunk_size=6).run(
        tiny_model, EvalContext("val_pairs", transform, torch.device("cpu"), batch_size=8)
    )
    with torch.no_grad():
        images = tiny_model.encode_image(torch.stack([transform(source.load(i).image) for i in range(20)]))
        texts = tiny_model.encode_text(tiny_model.tokenize([source.load(i).caption for i in range(20)]))
    theirs = train.get_clip_metrics(images, texts, logit_scale=torch.tensor(1.0))
    assert set(metrics) == {f"val_pairs-{key}" for key in theirs}
    for key, value in theirs.items():
        assert metrics[f"val_pairs-{key}"] == pytest.approx(float(value), abs=1e-6), key
