"""The Objective interface: ``represent`` per sample, ``loss`` on the whole batch.

The split is what makes gradient caching generic: the engine may run ``represent`` chunk by
chunk (without gradients, then replayed with them) and call ``loss`` once on the
concatenated representations. ``represent`` returns only per-sample tensors (dim 0 = batch);
everything that is not per-sample (the temperature, heads on whole-batch statistics) is read
in ``loss``. An objective never calls ``backward``.

Under data parallelism ``loss`` gathers every per-sample tensor it needs from all ranks
(``distributed.gather_features``, with gradient) and computes the loss of the global batch, the
same on every rank; averaging gradients over ranks then gives the single-process gradient at the
global batch. Per-sample random draws (MLM masks) come from ``batch["sample_id"]``
(:mod:`vlhub.objectives.draws`), so chunks, ranks and one process all draw the same numbers.

Before training, ``apply_to_data`` sees the data source (``ce`` reads its classes) and
``apply_to_model`` the model (heads sized from the towers, locks), and on a fresh run
``apply_init`` sets initial values the objective prescribes, but never on a model value that
pretrained weights or a checkpoint set (:func:`set_by_weights`). The first two raise
:class:`IncompatibleObjective` with the reason when the pair cannot work; the launcher names the
config choices. ``spec()`` is what a checkpoint stores to rebuild the objective through the
registry; ``scoring(model)`` says how evaluation scores images for it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlhub.data.batch import Batch
from vlhub.eval.scoring import EmbeddingScorer, Scoring
from vlhub.registry import OBJECTIVES

log = logging.getLogger(__name__)


def set_by_weights(model: nn.Module, key: str, setting: str) -> bool:
    """Whether the model's ``key`` (a state-dict key) came from loaded weights (``model.loaded_keys``);
    if so ``apply_init`` must keep it, and this says that the objective's ``setting`` is not applied."""
    if key not in getattr(model, "loaded_keys", ()):
        return False
    log.info("objective.%s not applied: %s keeps the value the loaded weights gave it", setting, key)
    return True


def token_nll_per_sample(nll: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level losses as per-sample tensors (what ``represent`` may return): each row's summed
    ``nll`` and its token count, from ``nll`` [T] at the True positions of ``positions`` [B, L]."""
    rows = positions.nonzero()[:, 0]
    summed = torch.zeros(positions.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return summed, positions.sum(dim=1).to(nll.dtype)


def mean_token_nll(summed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The mean over every token of the (gathered) batch, from :func:`token_nll_per_sample`'s two tensors."""
    return summed.sum() / tokens.sum().clamp(min=1)


def check_non_negative(**values: float) -> None:
    """Each named value >= 0 (loss weights, counts), else an error naming it."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


class IncompatibleObjective(ValueError):
    """This objective cannot work with the chosen model, data or augmentation (the message says why)."""


class Objective(nn.Module):
    #: Whether batches must carry tokenized text.
    needs_text: bool = True
    #: How many extra, strongly augmented views of each image its self-supervised terms need (0, 1 or
    #: 2): drawn with ``augment_views`` after the base view ``image`` (the run's ``augment``, the one
    #: every image-text term sees), they reach ``represent`` as ``image_view2`` and ``image_view3``.
    strong_views: int = 0
    #: Whether batches must carry class labels (``batch["label"]`` >= 0).
    needs_labels: bool = False
    #: The smallest global batch the loss means something at: 2 for an objective whose negatives are
    #: the batch's other samples (at 1 its contrastive loss is a constant), checked at launch.
    min_global_batch: int = 1

    #: Whether the loss trains the model's temperature (``logit_scale``) where it reads it; cloob holds it fixed.
    trains_temperature: bool = True

    #: Whether ``apply_init`` sets this objective's own parameters from the model alone (a zero-shot
    #: head), so a fresh one on a zero-shot model is the start of its fine-tune (WiSE-FT's alpha = 0).
    init_from_model: bool = False

    @property
    def image_views(self) -> int:
        """How many views of each image the batches carry: the base view and the strong ones."""
        return 1 + self.strong_views

    def apply_to_data(self, source: Any) -> None:
        """Check (and read what is needed from) the training source; default: labels if needed."""
        if self.needs_labels and source.num_classes is None:
            raise IncompatibleObjective(
                f"needs class labels, and this {type(source).__name__} has none "
                "(give data.label_key for a CSV, or use data=imagefolder)"
            )

    def apply_to_model(self, model: nn.Module) -> None:
        """Prepare the model for this objective in place (lock towers, build heads); default: nothing."""

    def apply_init(self, model: nn.Module) -> None:
        """Set the initial values this objective starts from (SigLIP's temperature), on a fresh run
        only: never on resume, and never on a model value that loaded weights set (check each with
        :func:`set_by_weights`). Default: nothing."""

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"loss": total, <named parts>...}``; ``model`` gives the temperature and bias."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called once after each applied optimizer step (never after a skipped one), for the
        objective's own state that follows training (DeCLIP's queue of text embeddings). Default: nothing."""

    def scoring(self, model: nn.Module) -> Scoring:
        """How evaluation scores images: CLIP's zero-shot for text-bearing objectives, else a probe."""
        if self.needs_text:
            return Scoring(zero_shot=EmbeddingScorer(model))
        return Scoring(zero_shot=None, probe=True, absent=self.no_text_reason())

    def no_text_reason(self) -> str:
        """Why an image-only objective has no zero-shot or retrieval (one line, for skip messages)."""
        name = next((n for n, cls in OBJECTIVES.items() if cls is type(self)), type(self).__name__)
        return f"objective {name} trains no text tower, so image-text scores would read an untrained one"

    def resolved_kwargs(self) -> dict[str, Any]:
        """Constructor arguments resolved from the data (``ce``'s classes), stored to rebuild it."""
        return {}

    def spec(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``{"name", "kwargs"}``: the registry name and constructor arguments that rebuild this objective."""
        name = next((n for n, cls in OBJECTIVES.items() if cls is type(self)), None)
        if name is None:
            raise KeyError(f"{type(self).__name__} is not a registered objective")
        return {"name": name, "kwargs": {**kwargs, **self.resolved_kwargs()}}


def build_objective(spec: dict[str, Any], model: nn.Module) -> Objective:
    """An objective rebuilt from a checkpoint's ``spec`` through the registry, heads sized for ``model``."""
    objective = OBJECTIVES.build(spec["name"], **spec["kwargs"])
    objective.apply_to_model(model)
    return objective
