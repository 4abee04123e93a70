"""Run CLIP_benchmark's datasets and tasks on a vlhub checkpoint (optional extra: ``pip install vlhub[benchmark]``).

CLIP_benchmark loads models through a table of loader functions, each
``loader(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)``.
:func:`load_vlhub` is that loader for vlhub checkpoints; :func:`register` adds it under
``--model_type vlhub``. From the shell, this module is CLIP_benchmark's CLI with the loader
registered, for every task (``zeroshot_classification``, ``zeroshot_retrieval``; ``linear_probe``, which
CLIP_benchmark runs on a CUDA GPU only)::

    python -m vlhub.benchmark_bridge eval --model_type vlhub --model vlhub \\
        --pretrained runs/my_run/checkpoints/latest.pt --dataset cifar10 --dataset_root /data/cifar10

``--pretrained`` is the checkpoint. ``--model`` is ignored for a vlhub checkpoint (its stored
config gives the model) and names the open_clip architecture of a plain open_clip one. From
Python, ``main(["eval", ...])`` takes the same arguments; or call :func:`register` and then
CLIP_benchmark's own functions (``clip_benchmark.metrics.zeroshot_classification.evaluate``...).

**The accuracy shim.** CLIP_benchmark 1.6.2's ``accuracy`` (zero-shot classification and the
linear probe both call it) ends in ``float()`` of a one-element 1-D numpy array: deprecated since
numpy 1.25 and a ``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars")
under numpy 2.4, which vlhub's install brings. :func:`register` calls that function on a two-class
example and, only if it raises or warns, puts :func:`_accuracy` in its place: the same top-k count
read with ``.item()``, so every number is unchanged. Once the installed CLIP_benchmark's own
function works, the example passes and nothing is replaced. A shim rather than a numpy pin
(``numpy<2.4``): a pin would hold every vlhub user, bridge or not, on an old numpy and clash with
any package needing a current one, all for one line in an optional extra.

**Scoring as the objective does.** CLIP_benchmark scores ``encode_image @ classifier`` and
``encode_text`` dot products, which is CLIP's scoring only. :func:`load_vlhub` hands it a
:class:`ScoredModel` (the model and its objective's :class:`~vlhub.eval.scoring.Scoring`), and
:func:`register` replaces, for such a model only, its zero-shot classifier and classification run
(``zero_shot_classifier``, ``run_classification``), its retrieval evaluation and its
image-caption selection with the objective's scorers (FILIP: token-wise), so the bridge reports
what ``vlhub.evaluate`` does. Its linear probe reads ``encode_image``: vlhub's probe features
(:data:`~vlhub.eval.scoring.PROBE_FEATURES`). Every task's metrics carry ``scoring``, saying which
scoring produced them. An objective with no image-text score (``ce``, ``simclr``) is refused
zero-shot, retrieval and caption selection in one line, never scored on its untrained text tower.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vlhub.api import build_model, build_trained_objective, eval_transform, read_checkpoint, stored_model_config
from vlhub.eval.retrieval import retrieval_recall
from vlhub.eval.scoring import PROBE_FEATURES, PairScorer, Reps, Scoring, ZeroShotScorer, default_scoring, reps_slice

MODEL_TYPE = "vlhub"


class BridgeRefusal(ValueError):
    """A task this checkpoint's objective cannot score (one line: what, and why)."""


class ScoredModel(torch.nn.Module):
    """What :func:`load_vlhub` hands CLIP_benchmark: the model and how its objective scores.

    ``encode_image`` / ``encode_text`` are the model's pooled embeddings, which CLIP_benchmark's
    linear probe reads; its zero-shot, retrieval and caption selection go through ``scoring``."""

    def __init__(self, model: torch.nn.Module, scoring: Scoring) -> None:
        super().__init__()
        self.model, self.scoring = model, scoring

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.pair_scorer("encode_text")  # an untrained text tower is never read
        return self.model.encode_text(tokens)

    def zero_shot_scorer(self) -> ZeroShotScorer:
        if self.scoring.zero_shot is None:
            raise BridgeRefusal(f"zero-shot classification refused: {self.scoring.absent}")
        return self.scoring.zero_shot

    def pair_scorer(self, task: str) -> PairScorer:
        if self.scoring.pairs is None:
            raise BridgeRefusal(f"{task} refused: {self.scoring.absent}")
        return self.scoring.pairs


def load_vlhub(
    model_name: str = MODEL_TYPE, pretrained: str = "", cache_dir: str | None = None, device: str | torch.device = "cpu"
) -> tuple[ScoredModel, Any, Any]:
    """CLIP_benchmark's loader contract: the model (eval mode, on ``device``) with its objective's
    scoring, its eval transform, its tokenizer."""
    checkpoint = read_checkpoint(pretrained)
    model_config = None
    if stored_model_config(checkpoint) is None:  # a plain open_clip checkpoint: model_name is its arch
        model_config = {"_target_": "vlhub.models.build_open_clip_model", "arch": model_name}
    model = build_model(pretrained, model_config, checkpoint).to(device).eval()
    objective = build_trained_objective(checkpoint, model)
    scoring = objective.scoring(model) if objective is not None else default_scoring(model)
    return ScoredModel(model, scoring).eval(), eval_transform(model), model.tokenize


# -- CLIP_benchmark's scoring, replaced for a ScoredModel ---------------------------------------------
def _cpu(reps: Reps) -> Reps:
    return {key: value.cpu() for key, value in reps.items()}


def _cat(parts: list[Reps]) -> Reps:
    """Batches of reps joined (CLIP_benchmark's --distributed gives each rank whole runs: nothing to gather)."""
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _autocast(device: str | torch.device, amp: bool):
    return torch.autocast(torch.device(device).type, enabled=amp)


def _positional(templates: Any) -> list[str]:
    """CLIP_benchmark's ``{c}`` templates as vlhub's ``{}`` ones (other braces kept literally)."""
    if not isinstance(templates, list):
        raise BridgeRefusal("class-specific prompts (a dict of templates) are not supported for vlhub checkpoints")
    return [t.replace("{", "{{").replace("}", "}}").replace("{{c}}", "{}") for t in templates]


def _zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=True):
    if not isinstance(model, ScoredModel):
        return _ORIGINAL["zero_shot_classifier"](model, tokenizer, classnames, templates, device, amp=amp)
    with torch.no_grad(), _autocast(device, amp):
        return model.zero_shot_scorer().build_classifier(
            list(classnames), _positional(templates), torch.device(device), 256
        )


def _run_classification(model, classifier, dataloader, device, amp=True):
    if not isinstance(model, ScoredModel):
        return _ORIGINAL["run_classification"](model, classifier, dataloader, device, amp=amp)
    scorer, logits, targets = model.zero_shot_scorer(), [], []
    with torch.no_grad(), _autocast(device, amp):
        for images, target in dataloader:
            logits.append(scorer.logits(images.to(device), classifier).float().cpu())
            targets.append(target.cpu())
    return torch.cat(logits), torch.cat(targets)


def _zeroshot_evaluate(model, *args, **kwargs):
    if not isinstance(model, ScoredModel):
        return _ORIGINAL["zeroshot_evaluate"](model, *args, **kwargs)
    model.zero_shot_scorer()  # refused before any compute
    if kwargs.get("load_clfs"):
        raise BridgeRefusal("--load_clfs is not supported for vlhub checkpoints (their classifiers are the scorer's)")
    metrics = _ORIGINAL["zeroshot_evaluate"](model, *args, **kwargs)
    return {**metrics, "scoring": model.scoring.describe()["zeroshot"]}


def _retrieval_evaluate(model, dataloader, tokenizer, device, amp=True, recall_k_list=(5,)):
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate`` with the objective's pair scorer (vlhub's recall@k)."""
    if not isinstance(model, ScoredModel):
        return _ORIGINAL["retrieval_evaluate"](
            model, dataloader, tokenizer, device, amp=amp, recall_k_list=recall_k_list
        )
    scorer = model.pair_scorer("zero-shot retrieval")
    images, texts, owners, seen = [], [], [], 0
    with torch.no_grad(), _autocast(device, amp):
        for batch_images, batch_texts in dataloader:
            images.append(_cpu(scorer.image_reps(batch_images.to(device))))
            flat = [text for captions in batch_texts for text in captions]
            texts.append(_cpu(scorer.text_reps(tokenizer(flat).to(device))))
            owners += [seen + i for i, captions in enumerate(batch_texts) for _ in captions]
            seen += len(batch_images)
    metrics = retrieval_recall(
        _cat(texts), _cat(images), torch.tensor(owners), recall_k_list, scorer=scorer, device=torch.device(device)
    )
    return {**metrics, "scoring": model.scoring.describe()["retrieval"]}


def _caption_selection_evaluate(model, dataloader, tokenizer, device, amp=True):
    """CLIP_benchmark's ``image_caption_selection.evaluate`` (Winoground, SugarCrepe) with the pair scorer."""
    if not isinstance(model, ScoredModel):
        return _ORIGINAL["caption_selection_evaluate"](model, dataloader, tokenizer, device, amp=amp)
    scorer, image_ok, text_ok = model.pair_scorer("image-caption selection"), [], []
    with torch.no_grad(), _autocast(device, amp):
        for batch_images, batch_texts in dataloader:
            if batch_images.dim() == 4:  # one image per instance
                batch_images = batch_images[:, None]
            per_image, per_text = batch_images.shape[1], len(batch_texts[0])
            image_reps = scorer.image_reps(batch_images.flatten(0, 1).to(device))
            text_reps = scorer.text_reps(tokenizer([t for texts in batch_texts for t in texts]).to(device))
            truth = torch.arange(min(per_image, per_text), device=device)
            for i in range(batch_images.shape[0]):
                images = reps_slice(image_reps, i * per_image, (i + 1) * per_image)
                texts = reps_slice(text_reps, i * per_text, (i + 1) * per_text)
                text_ok.append(bool((scorer.image_to_text(images, texts).argmax(dim=1)[: len(truth)] == truth).all()))
                image_ok.append(bool((scorer.text_to_image(texts, images).argmax(dim=1)[: len(truth)] == truth).all()))
    both = [a and b for a, b in zip(image_ok, text_ok, strict=True)]
    mean = lambda flags: torch.tensor(flags, dtype=torch.float).mean().item()  # noqa: E731
    scoring = model.scoring.describe()["retrieval"]
    return {"image_acc": mean(image_ok), "text_acc": mean(text_ok), "acc": mean(both), "scoring": scoring}


def _linear_probe_evaluate(model, *args, **kwargs):
    metrics = _ORIGINAL["linear_probe_evaluate"](model, *args, **kwargs)
    return {**metrics, "scoring": PROBE_FEATURES} if isinstance(model, ScoredModel) else metrics


_ORIGINAL: dict[str, Callable[..., Any]] = {}


def apply_scoring_patches() -> None:
    """Route CLIP_benchmark's scoring functions through the objective's scorers for a :class:`ScoredModel`
    (every other model keeps CLIP_benchmark's own; idempotent)."""
    from clip_benchmark.metrics import (
        image_caption_selection,
        linear_probe,
        zeroshot_classification,
        zeroshot_retrieval,
    )

    targets = {
        "zero_shot_classifier": (zeroshot_classification, "zero_shot_classifier", _zero_shot_classifier),
        "run_classification": (zeroshot_classification, "run_classification", _run_classification),
        "zeroshot_evaluate": (zeroshot_classification, "evaluate", _zeroshot_evaluate),
        "retrieval_evaluate": (zeroshot_retrieval, "evaluate", _retrieval_evaluate),
        "caption_selection_evaluate": (image_caption_selection, "evaluate", _caption_selection_evaluate),
        "linear_probe_evaluate": (linear_probe, "evaluate", _linear_probe_evaluate),
    }
    for key, (module, name, replacement) in targets.items():
        current = getattr(module, name)
        if current is not replacement:
            _ORIGINAL[key] = current
            setattr(module, name, replacement)


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy`` (top-k accuracy of logits [N, C] against targets [N]), numpy-2.4 safe."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def accuracy_needs_shim(accuracy: Callable[..., list[float]]) -> bool:
    """Whether CLIP_benchmark's ``accuracy`` fails (or warns) on a tiny input under this numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy 1.25-2.3 only warn
        try:
            accuracy(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        except (TypeError, DeprecationWarning):
            return True
    return False


def apply_accuracy_shim() -> bool:
    """Replace CLIP_benchmark's broken ``accuracy`` where its metrics look it up; True if it was replaced."""
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    original = zeroshot_classification.accuracy
    if original is _accuracy or not accuracy_needs_shim(original):
        return False
    for module in (zeroshot_classification, linear_probe):  # linear_probe imported it by name
        if module.accuracy is original:
            module.accuracy = _accuracy
    return True


def register() -> None:
    """Make ``--model_type vlhub`` known to CLIP_benchmark, score vlhub models as their objectives do, and
    fix its ``accuracy`` if needed (idempotent)."""
    from clip_benchmark import models  # the optional extra; imported only when asked for

    models.TYPE2FUNC[MODEL_TYPE] = load_vlhub
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # in place: the CLI's --model_type choices are this list
    apply_accuracy_shim()
    apply_scoring_patches()


def main(argv: Sequence[str] | None = None) -> None:
    """CLIP_benchmark's CLI with the vlhub loader; ``argv`` (without the program name) defaults to ``sys.argv``."""
    register()
    from clip_benchmark import cli

    saved = sys.argv
    if argv is not None:
        sys.argv = ["clip_benchmark", *argv]  # CLIP_benchmark's parser reads sys.argv only
    try:
        cli.main()
    except BridgeRefusal as refusal:  # one line, no traceback: the task does not apply to this objective
        raise SystemExit(f"vlhub.benchmark_bridge: {refusal}") from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
