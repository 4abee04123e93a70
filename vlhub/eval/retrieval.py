"""Image-text retrieval: recall@k as CLIP_benchmark defines it, and open_clip's in-batch val metrics.

Accepted retrieval set (``root``): a folder holding the images and one JSON
file in Karpathy's split format (``dataset_coco.json`` / ``dataset_flickr30k.json``)::

    {"images": [
        {"filepath": "val2014",                 # optional sub-folder of root (COCO has it)
         "filename": "COCO_val2014_000000391895.jpg",
         "split": "test",                        # only entries of eval.retrieval.split are used
         "sentences": [{"raw": "A man riding a bike."}, ...]},   # or plain strings
        ...]}

Every caption of a test image is a query, so COCO's 5,000 test images give about 25,000
captions. Image ``i``'s path is ``root/filepath/filename``. The file is found as the only
``*.json`` in root unless ``annotations`` names it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlhub.data.batch import BadSample
from vlhub.data.files import read_image
from vlhub.data.images import DECODE_ERRORS
from vlhub.data.pair_source import PairSource
from vlhub.eval.context import EvalContext
from vlhub.eval.labelled_files import RootNotSet
from vlhub.eval.scoring import (
    DotProduct,
    PairScorer,
    Reps,
    Scoring,
    default_scoring,
    encode_prompts,
    reps_count,
    score_blocks,
)
from vlhub.eval.sharding import dataset_share, gather_reps, gather_rows, list_share
from vlhub.parallel.environment import rank
from vlhub.registry import EVAL_TASKS

log = logging.getLogger(__name__)
RECALL_KS = (1, 5, 10)


# -- metrics ----------------------------------------------------------------------------------
def _as_reps(features: torch.Tensor | Reps) -> Reps:
    return {"embedding": features} if isinstance(features, torch.Tensor) else features


@torch.no_grad()
def retrieval_recall(
    text_features: torch.Tensor | Reps,
    image_features: torch.Tensor | Reps,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
    scorer: PairScorer | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """CLIP_benchmark's ``image_retrieval_recall@k`` and ``text_retrieval_recall@k``.

    ``image_retrieval``: each caption queries the images; a hit when its image is in the top k,
    averaged over captions. ``text_retrieval``: each image queries the captions; a hit when any
    of its captions is in the top k, averaged over images. Scores are ``scorer``'s (its reps as
    features); without one, dot products of feature tensors (pass normalised ones for cosine).
    Scores are made ``chunk_size`` queries by ``chunk_size`` keys at a time on ``device``
    (:func:`~vlhub.eval.scoring.score_blocks`), never the whole ``#texts x #images`` matrix at once.
    """
    scorer = scorer or DotProduct()
    texts, images = _as_reps(text_features), _as_reps(image_features)
    device = device or torch.device("cpu")
    text_to_image = text_to_image.to(torch.long).cpu()
    max_k = max(ks)
    # Per query, the owner of its top-max_k results: hits for every k come from one topk call.
    image_hits = _topk_hits(
        score_blocks(scorer.text_to_image, texts, images, device, chunk_size),
        max_k,
        lambda rows, top: top == text_to_image[rows, None],
    )
    text_hits = _topk_hits(
        score_blocks(scorer.image_to_text, images, texts, device, chunk_size),
        max_k,
        lambda rows, top: text_to_image[top] == rows[:, None],
    )
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits[:, :k].any(dim=1).float().mean().item()
    return metrics


def _topk_hits(blocks, k: int, is_hit) -> torch.Tensor:
    """[#queries, k] bool: whether each query's j-th best key is a positive (k capped at #keys)."""
    hits = []
    for start, scores in blocks:
        rows = torch.arange(start, start + scores.shape[0])
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu()
        hits.append(is_hit(rows, top))
    return torch.cat(hits)


@torch.no_grad()
def clip_val_metrics(
    image_features: torch.Tensor | Reps,
    text_features: torch.Tensor | Reps,
    chunk_size: int = 1024,
    scorer: PairScorer | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """open_clip's ``get_clip_metrics`` on paired features (row i of each is a pair), in blocks.

    Keys ``image_to_text_mean_rank``, ``_median_rank``, ``_R@{1,5,10}`` and the same for
    ``text_to_image``. A rank is 1 + the number of candidates scoring strictly higher than the
    true pair (open_clip's argsort position, up to the order of exact ties). Scores are
    ``scorer``'s, each direction its own (dot products of feature tensors without one).
    """
    scorer = scorer or DotProduct()
    images, texts = _as_reps(image_features), _as_reps(text_features)
    if reps_count(images) != reps_count(texts):
        raise ValueError(f"paired features differ in length: {reps_count(images)} vs {reps_count(texts)}")
    device = device or torch.device("cpu")
    metrics: dict[str, float] = {}
    for name, score, queries, keys in (
        ("image_to_text", scorer.image_to_text, images, texts),
        ("text_to_image", scorer.text_to_image, texts, images),
    ):
        positions = []
        for start, scores in score_blocks(score, queries, keys, device, chunk_size):
            rows = torch.arange(scores.shape[0], device=scores.device)
            true_scores = scores[rows, rows + start]
            positions.append((scores > true_scores[:, None]).sum(dim=1).cpu())
        preds = torch.cat(positions).numpy()  # 0-based rank of the true pair
        metrics[f"{name}_mean_rank"] = float(preds.mean() + 1)
        metrics[f"{name}_median_rank"] = float(np.floor(np.median(preds)) + 1)
        for k in RECALL_KS:
            metrics[f"{name}_R@{k}"] = float(np.mean(preds < k))
    return metrics


# -- the retrieval set ----------------------------------------------------------------------------
def _find_annotations(root: Path, annotations: str | None) -> Path:
    if annotations is not None:
        path = Path(annotations) if Path(annotations).is_absolute() else root / annotations
        if not path.is_file():
            raise FileNotFoundError(f"annotations={annotations}: no such file (looked at {path})")
        return path
    found = sorted(root.glob("*.json"))
    if len(found) != 1:
        raise ValueError(
            f"root={root}: expected exactly one Karpathy-format captions JSON "
            f"(e.g. dataset_coco.json) in the folder, found {[p.name for p in found] or 'none'}; "
            "name it with annotations="
        )
    return found[0]


def _captions_of(entry: dict, where: str) -> list[str]:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{where}: 'sentences' must be a non-empty list")
    captions = [s["raw"] if isinstance(s, dict) and "raw" in s else s for s in sentences]
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"{where}: every sentence must be a non-empty string or a {{'raw': string}} object")
    return captions


def read_karpathy_split(
    root: str | Path, annotations: str | None = None, split: str = "test"
) -> tuple[list[Path], list[list[str]]]:
    """Image paths and their captions for one split of a Karpathy-format JSON (see the module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"root={root}: no such folder (expected the images plus a Karpathy-format captions JSON)"
        )
    path = _find_annotations(root, annotations)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a Karpathy-format captions JSON ({{'images': [...]}}): {error!r}") from error
    images, captions = [], []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("split") != split:
            continue
        where = f"{path} images[{number}]"
        if not isinstance(entry.get("filename"), str):
            raise ValueError(f"{where}: missing 'filename'")
        images.append(root / entry.get("filepath", "") / entry["filename"])
        captions.append(_captions_of(entry, where))
    if not images:
        raise ValueError(f"{path}: no images with split == {split!r} (split={split})")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"root={root}: {len(missing)} of {len(images)} images listed in {path.name} are missing, e.g. {missing[:3]}"
        )
    return images, captions


class _Images(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return self.transform(read_image(self.paths[index]))
        except (BadSample, *DECODE_ERRORS) as error:  # the transform decodes JPEGs: a corrupt one fails there
            # Dropping an image would silently change the benchmark: stop instead.
            raise RuntimeError(f"retrieval set image {self.paths[index]} cannot be read: {error}") from error


def _on_cpu(reps: Reps) -> Reps:
    return {key: value.cpu() for key, value in reps.items()}


@torch.no_grad()
def encode_image_set(
    scorer: PairScorer, images: Dataset, device: torch.device, batch_size: int, workers: int = 0
) -> Reps:
    """``scorer``'s image reps (on CPU) of a dataset of image tensors.

    Under a process group each rank encodes its share and every rank returns all of them."""
    loader = DataLoader(dataset_share(images, batch_size), batch_size=batch_size, num_workers=workers)
    return gather_reps([_on_cpu(scorer.image_reps(batch.to(device))) for batch in loader])


@torch.no_grad()
def encode_text_set(scorer: PairScorer, tokenize, texts: list[str], device: torch.device, batch_size: int) -> Reps:
    """``scorer``'s text reps (on CPU) of ``texts``, each rank encoding its share (every rank returns all)."""
    share = list_share(texts, batch_size)
    parts = [
        _on_cpu(scorer.text_reps(tokenize(list(share[start : start + batch_size])).to(device)))
        for start in range(0, len(share), batch_size)
    ]
    return gather_reps(parts)


@torch.no_grad()
def encode_texts(model, texts: list[str], device: torch.device, batch_size: int) -> torch.Tensor:
    """Normalised ``encode_text`` features [N, D] (fp32, on CPU)."""
    encode = functools.partial(model.encode_text, normalize=True)
    return encode_prompts(encode, model.tokenize, texts, device, batch_size).cpu()


def encode_texts_sharded(model, texts: list[str], device: torch.device, batch_size: int) -> torch.Tensor:
    """:func:`encode_texts` of all ``texts``, each rank encoding its share (every rank returns all)."""
    share = list(list_share(texts, batch_size))
    return gather_rows([encode_texts(model, share, device, batch_size)] if share else [])


def pair_scorer(model, context: EvalContext) -> PairScorer | None:
    """The objective's pair scorer; None (logged once, with the reason) when it has none."""
    scoring: Scoring = context.scoring or default_scoring(model)
    if scoring.pairs is None and rank() == 0:
        log.info("eval %s: skipped: %s", context.name, scoring.absent)
    return scoring.pairs


@EVAL_TASKS.register("retrieval")
class RetrievalTask:
    """Zero-shot image-text retrieval on a Karpathy-split test set (COCO 5k, Flickr30k 1k)."""

    def __init__(
        self,
        root: str | None,
        annotations: str | None = None,
        split: str = "test",
        max_captions_per_image: int | None = None,
        chunk_size: int = 1024,
        name: str = "retrieval",
    ) -> None:
        if root is None:  # RootNotSet: the suite preset leaves the task out instead of failing
            raise RootNotSet("root=None: not set; give the folder of images plus a Karpathy-format captions JSON")
        if chunk_size <= 0 or (max_captions_per_image is not None and max_captions_per_image <= 0):
            raise ValueError(f"chunk_size={chunk_size} and max_captions_per_image={max_captions_per_image} must be > 0")
        self.image_paths, captions = read_karpathy_split(root, annotations, split)
        self.captions = [c[:max_captions_per_image] for c in captions]
        self.chunk_size = chunk_size

    def run(self, model, context: EvalContext) -> dict[str, float]:
        """Metrics keyed ``<context.name>-image_retrieval_recall@k`` / ``-text_retrieval_recall@k``,
        scored as the objective scores pairs (nothing, with one log line, when it has no such score)."""
        scorer = pair_scorer(model, context)
        if scorer is None:
            return {}
        device, batch_size = context.device, context.batch_size
        images = encode_image_set(
            scorer, _Images(self.image_paths, context.transform), device, batch_size, context.workers
        )
        texts = [caption for captions in self.captions for caption in captions]
        owners = torch.tensor([i for i, captions in enumerate(self.captions) for _ in captions])
        text_reps = encode_text_set(scorer, model.tokenize, texts, device, batch_size)
        metrics = retrieval_recall(text_reps, images, owners, chunk_size=self.chunk_size, scorer=scorer, device=device)
        return {f"{context.name}-{key}": value for key, value in metrics.items()}


class _Pairs(Dataset):
    def __init__(self, source: PairSource, transform, count: int) -> None:
        self.source, self.transform, self.count = source, transform, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        sample = self.source.load(index)  # a BadSample stops the run: pairs must stay aligned
        try:
            return self.transform(sample.image), sample.caption
        except DECODE_ERRORS as error:  # the transform decodes JPEGs: a corrupt one fails there
            raise BadSample(f"undecodable image of pair {index}: {error}") from error


@EVAL_TASKS.register("val_pairs")
class PairValidationTask:
    """open_clip's validation metrics (ranks and R@k both ways) on held-out (image, caption) pairs."""

    def __init__(self, source: PairSource, max_samples: int | None = None, chunk_size: int = 1024) -> None:
        count = len(source) if max_samples is None else min(max_samples, len(source))
        if count < 2:
            raise ValueError(f"source needs at least 2 pairs, got {count}")
        self.source, self.count, self.chunk_size = source, count, chunk_size

    @torch.no_grad()
    def run(self, model, context: EvalContext) -> dict[str, float]:
        """Metrics keyed ``<context.name>-image_to_text_R@1``, ``-text_to_image_mean_rank`` etc., scored
        as the objective scores pairs (nothing, with one log line, when it has no such score)."""
        scorer = pair_scorer(model, context)
        if scorer is None:
            return {}
        loader = DataLoader(  # this rank's share of the pairs; the reps are gathered below
            dataset_share(_Pairs(self.source, context.transform, self.count), context.batch_size),
            batch_size=context.batch_size,
            num_workers=context.workers,
        )
        images, texts = [], []
        for batch_images, captions in loader:
            images.append(_on_cpu(scorer.image_reps(batch_images.to(context.device))))
            texts.append(_on_cpu(scorer.text_reps(model.tokenize(list(captions)).to(context.device))))
        image_reps, text_reps = gather_reps(images), gather_reps(texts)
        metrics = clip_val_metrics(image_reps, text_reps, self.chunk_size, scorer, context.device)
        return {f"{context.name}-{key}": value for key, value in metrics.items()}
