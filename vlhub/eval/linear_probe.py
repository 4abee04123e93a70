"""Linear probe and k-NN on frozen image features, so image-only models compare with contrastive ones.

Features follow one rule for every objective (``scoring.PROBE_FEATURES``, recorded as
``scoring.linear_probe`` with the metrics): ``encode_image``, the image tower's pooled embedding
after its projection, L2-normalised; never an objective's token or head outputs. The probe is scikit-learn's
multinomial ``LogisticRegression`` (L-BFGS, L2 penalty with inverse strength ``C``) on the
normalised features standardised with the train split's mean and variance, as in CLIP's
linear-probe protocol. Given several ``C`` values, the probe picks the one with the best
accuracy on a stratified ``val_fraction`` of the train split, then refits on all of it.
k-NN is cosine similarity, majority vote of the ``k`` nearest train features (ties go to the
smaller class index, as scikit-learn's ``KNeighborsClassifier`` does), computed in chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlhub.data.pair_source import PairSource
from vlhub.eval.context import EvalContext
from vlhub.eval.metrics import classification_metrics, mean_per_class_recall
from vlhub.eval.zeroshot import compute_image_logits
from vlhub.parallel.collectives import broadcast_object, patient_group
from vlhub.parallel.environment import rank
from vlhub.registry import EVAL_TASKS

if TYPE_CHECKING:  # sklearn is imported where a probe is fitted: training and vlhub.check never load it
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model, source: PairSource, transform, device: torch.device, batch_size: int = 256, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``encode_image`` features [N, D] (fp32, CPU) and labels [N]; unreadable images skipped.

    Under a process group each rank encodes its share and every rank returns the whole set's."""
    features, labels, _ = compute_image_logits(  # its "logits" here are the features
        lambda images: model.encode_image(images, normalize=True), source, transform, device, batch_size, workers
    )
    if (labels < 0).any():
        raise ValueError("linear probe and k-NN need a labelled source (labels >= 0)")
    return features, labels


def _fit(
    features: np.ndarray,
    labels: np.ndarray,
    C: float,
    max_iter: int,
) -> tuple[StandardScaler, LogisticRegression]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    probe = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(features), labels)
    return scaler, probe


def _select_C(
    features: np.ndarray, labels: np.ndarray, Cs: Sequence[float], val_fraction: float, max_iter: int, seed: int
) -> float:
    """The C with the best accuracy on a stratified held-out part of the train split."""
    from sklearn.model_selection import train_test_split

    stratify = labels if np.bincount(labels).min(initial=0) >= 2 else None
    fit_x, val_x, fit_y, val_y = train_test_split(
        features, labels, test_size=val_fraction, random_state=seed, stratify=stratify
    )
    scores = []
    for C in Cs:
        scaler, probe = _fit(fit_x, fit_y, C, max_iter)
        scores.append(probe.score(scaler.transform(val_x), val_y))
    best = Cs[int(np.argmax(scores))]
    log.info("linear probe: validation accuracy per C %s; using C=%s", dict(zip(Cs, scores)), best)
    return best


def linear_probe_logits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    C: float | Sequence[float] = 1.0,
    max_iter: int = 1000,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> torch.Tensor:
    """Log-probabilities [N_test, num_classes] of the fitted probe (-inf for classes absent from train)."""
    x, y = train_features.numpy().astype(np.float64), train_labels.numpy()
    Cs = [float(C)] if isinstance(C, int | float) else [float(c) for c in C]
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"linear probe C must be > 0 (one value or a list), got {C}")
    best = Cs[0] if len(Cs) == 1 else _select_C(x, y, Cs, val_fraction, max_iter, seed)
    scaler, probe = _fit(x, y, best, max_iter)
    log_proba = probe.predict_log_proba(scaler.transform(test_features.numpy().astype(np.float64)))
    logits = torch.full((test_features.shape[0], num_classes), float("-inf"), dtype=torch.float64)
    logits[:, torch.from_numpy(probe.classes_)] = torch.from_numpy(log_proba)
    return logits


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Majority vote of the ``k`` most cosine-similar train features, per test feature [N_test]."""
    k = min(k, train_features.shape[0])
    train = torch.nn.functional.normalize(train_features.float(), dim=-1)
    test = torch.nn.functional.normalize(test_features.float(), dim=-1)
    predictions = []
    for start in range(0, test.shape[0], chunk_size):
        neighbours = (test[start : start + chunk_size] @ train.T).topk(k, dim=1).indices
        votes = torch.nn.functional.one_hot(train_labels[neighbours], num_classes).sum(dim=1)
        predictions.append(votes.argmax(dim=1))  # argmax returns the first maximum: the smaller class wins ties
    return torch.cat(predictions)


@dataclass(frozen=True)
class ProbeSettings:
    """How the probe is fit: inverse L2 strength ``C`` (several: the best on ``val_fraction`` of the
    train split), L-BFGS ``max_iter``, k-NN's ``k`` neighbours, and the ``seed`` of that split."""

    C: float | Sequence[float] = 1.0
    max_iter: int = 1000
    val_fraction: float = 0.2
    k: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"linear probe k (k-NN neighbours) must be > 0, got {self.k}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"linear probe val_fraction must be in (0, 1), got {self.val_fraction}")


@EVAL_TASKS.register("linear_probe")
class LinearProbeTask:
    """Linear probe and k-NN on a labelled task: features of ``train`` fit, ``test`` scores.

    ``settings`` are :class:`ProbeSettings`' fields (``C``, ``max_iter``, ``val_fraction``, ``k``, ``seed``).
    Keys ``<task>-linear_probe-top1`` / ``-top5`` / ``-mean_per_class_recall`` and
    ``<task>-knn-top1`` / ``-mean_per_class_recall``, where ``<task>`` is the task's key in ``eval``.
    """

    def __init__(self, train: PairSource, test: PairSource, **settings: Any) -> None:
        self.train, self.test = train, test
        self.settings = ProbeSettings(**settings)

    def run(self, model, context: EvalContext) -> dict[str, float]:
        return probe_metrics(model, self.train, self.test, context, context.name, self.settings)


@EVAL_TASKS.register("probe")
class FolderProbeTask(LinearProbeTask):
    """Linear probe and k-NN on your own ImageFolder pair: ``train`` and ``test`` are folders of
    class sub-folders (the same classes). Keys are named after the data, ``<name>-linear_probe-top1``
    etc.: ``name`` when given, else the folders' parent (``pets`` for ``pets/train``, ``pets/val``)."""

    def __init__(self, train: str, test: str, name: str | None = None, **settings: Any) -> None:
        from vlhub.data import ImageFolderPairs

        if not train or not test:
            raise ValueError(f"train={train} and test={test}: both folders are needed (train=DIR/train test=DIR/val)")
        train_set = ImageFolderPairs(root=train)
        test_set = ImageFolderPairs(root=test)
        if train_set.class_names != test_set.class_names:
            only = sorted(set(train_set.class_names) ^ set(test_set.class_names))[:5]
            raise ValueError(
                f"train={train} and test={test} must hold the same class folders (in one but not the other: {only})"
            )
        super().__init__(train_set, test_set, **settings)
        self.name = name or Path(train).resolve().parent.name or Path(train).name

    def run(self, model, context: EvalContext) -> dict[str, float]:
        return probe_metrics(model, self.train, self.test, context, self.name, self.settings)


def probe_metrics(
    model,
    train: PairSource,
    test: PairSource,
    context: EvalContext,
    prefix: str,
    settings: ProbeSettings = ProbeSettings(),
) -> dict[str, float]:
    """``<prefix>-linear_probe-*`` and ``<prefix>-knn-*``: features of ``train`` fit, ``test`` scores.

    Under a process group every rank encodes its share of both splits; rank 0 alone fits the
    probe on the gathered features (one CPU-heavy fit, not one per rank) and hands out the metrics.
    """
    (train_x, train_y), (test_x, test_y) = (
        extract_features(model, source, context.transform, context.device, context.batch_size, context.workers)
        for source in (train, test)
    )
    patient_group()  # made while every rank is here; the others wait in it through rank 0's fit
    outcome: dict[str, float] | str = ""
    if rank() == 0:
        try:
            names = train.class_names or test.class_names
            outcome = _fit_and_score(train_x, train_y, test_x, test_y, names, prefix, settings)
        except Exception as error:
            # The others fail with it, not hang.
            broadcast_object(f"{prefix}: the probe failed on rank 0: {error}", patient=True)
            raise
    outcome = broadcast_object(outcome, patient=True)  # the fit may outlast the process-group timeout
    if isinstance(outcome, str):
        raise RuntimeError(outcome)
    return outcome


def _fit_and_score(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    class_names: list[str] | None,
    prefix: str,
    settings: ProbeSettings,
) -> dict[str, float]:
    num_classes = max(len(class_names) if class_names else 0, int(max(train_y.max(), test_y.max())) + 1)
    C, max_iter, val_fraction, seed = settings.C, settings.max_iter, settings.val_fraction, settings.seed
    logits = linear_probe_logits(train_x, train_y, test_x, num_classes, C, max_iter, val_fraction, seed)
    metrics = classification_metrics(logits, test_y, f"{prefix}-linear_probe")
    predicted = knn_predict(train_x, train_y, test_x, num_classes, settings.k)
    metrics[f"{prefix}-knn-top1"] = (predicted == test_y).float().mean().item()
    metrics[f"{prefix}-knn-mean_per_class_recall"] = mean_per_class_recall(predicted, test_y)
    return metrics
