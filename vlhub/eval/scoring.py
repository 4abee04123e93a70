"""How a trained model is scored at evaluation: the objective decides, the data decides what.

Every task scores images the same way for a given objective, through a :class:`Scoring`:
- ``zero_shot``: a :class:`ZeroShotScorer` that turns class prompts into a classifier and images
  into logits over it (CLIP's cosine of pooled embeddings by default; FILIP's token-wise
  similarity). None: the objective has no zero-shot.
- ``pairs``: a :class:`PairScorer` that scores a set of images against a set of texts, both ways
  (retrieval, ``data.val`` pairs, the CLIP_benchmark bridge). By default the zero-shot scorer,
  when it is also a pair scorer (both of vlhub's are). None: no image-text scores.
- ``classifier``: an :class:`ImageClassifier` whose own logits are scored (``ce``), on the tasks
  whose class names it was trained on.
- ``probe``: image-only objectives are scored by linear probe and k-NN on tasks that carry a
  labelled train split (the synthetic shapes), never by reading features as logits.
- ``absent``: why there is no zero-shot nor pair scorer (one line, logged when a task is skipped).

Probe features follow one rule for every objective (:data:`PROBE_FEATURES`). ``record()`` (``describe()``
as one string) is what each metric record stores as ``scoring``. An objective returns its scoring from
``Objective.scoring(model)``; ``default_scoring`` is CLIP's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

#: The linear probe's and k-NN's features, for every objective: what ``describe()`` records.
PROBE_FEATURES = "encode_image: the image tower's pooled embedding after its projection, L2-normalised"

#: Per-sample tensors (dim 0 = sample) that a :class:`PairScorer` compares: its own choice of keys.
Reps = dict[str, torch.Tensor]


class ZeroShotScorer(Protocol):
    name: str  # what ``describe()`` records, e.g. "cosine of pooled embeddings"

    def build_classifier(
        self, class_names: list[str], templates: list[str], device: torch.device, batch_size: int
    ) -> Any:
        """Whatever ``logits`` needs to score images against these classes."""

    def logits(self, images: torch.Tensor, classifier: Any) -> torch.Tensor:
        """[N, C] scores of ``images`` (on the device) against every class."""


@runtime_checkable
class PairScorer(Protocol):
    """An image set against a text set. The eval code encodes each set in batches (``image_reps``,
    ``text_reps``), keeps the reps on the CPU, and asks for scores block by block on the device
    (:func:`score_blocks`), so memory stays bounded whatever the sets' sizes."""

    name: str

    def image_reps(self, images: torch.Tensor) -> Reps: ...

    def text_reps(self, tokens: torch.Tensor) -> Reps: ...

    def image_to_text(self, images: Reps, texts: Reps) -> torch.Tensor:
        """[I, T]: how each image scores each text when images query texts."""

    def text_to_image(self, texts: Reps, images: Reps) -> torch.Tensor:
        """[T, I]: how each text scores each image when texts query images."""


class ImageClassifier(Protocol):
    class_names: list[str]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, len(class_names)] logits of the objective's own classifier head."""


@dataclass(frozen=True)
class Scoring:
    zero_shot: ZeroShotScorer | None
    classifier: ImageClassifier | None = None
    probe: bool = False
    pairs: PairScorer | None = None  # None: the zero-shot scorer, when it scores pairs too
    absent: str = "the objective defines no image-text score"

    def __post_init__(self) -> None:
        if self.pairs is None and isinstance(self.zero_shot, PairScorer):
            object.__setattr__(self, "pairs", self.zero_shot)

    def describe(self) -> dict[str, str]:
        """Which scoring produced each kind of metric: ``zeroshot``, ``retrieval`` (retrieval and
        ``data.val`` pairs), ``classifier`` (when the objective has one), ``linear_probe`` (and k-NN)."""
        described = {
            "zeroshot": _name(self.zero_shot) if self.zero_shot is not None else f"none: {self.absent}",
            "retrieval": _name(self.pairs) if self.pairs is not None else f"none: {self.absent}",
        }
        if self.classifier is not None:
            described["classifier"] = "the objective's classifier head on encode_image"
        described["linear_probe"] = PROBE_FEATURES
        return described

    def record(self) -> str:
        """:meth:`describe` as one flat string (``kind=scoring; ...``): a metric record's ``scoring`` field."""
        return "; ".join(f"{kind}={how}" for kind, how in self.describe().items())


def _name(scorer: object) -> str:
    return getattr(scorer, "name", type(scorer).__name__)


def encode_prompts(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    texts: list[str],
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """``encode`` applied to the tokenized ``texts`` in batches, concatenated (fp32)."""
    outputs = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(texts[start : start + batch_size]).to(device)
        outputs.append(encode(tokens).float())
    return torch.cat(outputs)


# -- reps and blocks ------------------------------------------------------------------------------
def reps_count(reps: Reps) -> int:
    return next(iter(reps.values())).shape[0]


def reps_slice(reps: Reps, start: int, stop: int, device: torch.device | None = None) -> Reps:
    return {key: value[start:stop] if device is None else value[start:stop].to(device) for key, value in reps.items()}


def score_blocks(
    score: Callable[[Reps, Reps], torch.Tensor],
    queries: Reps,
    keys: Reps,
    device: torch.device,
    block_size: int = 1024,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first query, [b, #keys] scores on ``device``) for each block of ``block_size`` queries.

    Queries and keys travel to the device one block at a time, so the device holds one block of
    each plus one row of scores, whatever the sizes of the sets (reps stay where they were made).
    """
    num_keys = reps_count(keys)
    for start in range(0, reps_count(queries), block_size):
        rows = reps_slice(queries, start, start + block_size, device)
        columns = [
            score(rows, reps_slice(keys, first, first + block_size, device)).float()
            for first in range(0, num_keys, block_size)
        ]
        yield start, torch.cat(columns, dim=1)


class DotProduct:
    """Pairs scored by the dot product of their ``embedding`` reps (the cosine, for normalised ones)."""

    name = "cosine of pooled embeddings"

    def image_to_text(self, images: Reps, texts: Reps) -> torch.Tensor:
        return images["embedding"] @ texts["embedding"].T

    def text_to_image(self, texts: Reps, images: Reps) -> torch.Tensor:
        return texts["embedding"] @ images["embedding"].T


class EmbeddingScorer(DotProduct):
    """CLIP's scoring: the cosine of pooled embeddings; zero-shot against the mean template embedding.

    ``text_head`` maps the text tower's pooled features before normalisation (an objective's own
    head); ``image_head`` likewise for images.
    """

    def __init__(
        self,
        model,
        text_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.text_head, self.image_head = model, text_head, image_head
        if text_head is not None or image_head is not None:
            self.name = "cosine of pooled embeddings through the objective's heads"

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_text(tokens, normalize=False)
        return F.normalize(self.text_head(features) if self.text_head else features, dim=-1)

    def _image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images, normalize=False).float()
        return F.normalize(self.image_head(features) if self.image_head else features, dim=-1)

    @torch.no_grad()
    def build_classifier(
        self, class_names: list[str], templates: list[str], device: torch.device, batch_size: int
    ) -> torch.Tensor:
        """[D, C]: per class, the mean of the normalised template embeddings, renormalised."""
        texts = [template.format(name) for name in class_names for template in templates]
        embeddings = encode_prompts(self._text, self.model.tokenize, texts, device, batch_size)
        per_template = embeddings.view(len(class_names), len(templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1).T

    @torch.no_grad()
    def logits(self, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        return 100.0 * self._image(images) @ classifier

    @torch.no_grad()
    def image_reps(self, images: torch.Tensor) -> Reps:
        return {"embedding": self._image(images)}

    @torch.no_grad()
    def text_reps(self, tokens: torch.Tensor) -> Reps:
        return {"embedding": self._text(tokens).float()}


def default_scoring(model) -> Scoring:
    """CLIP's scoring, for a model evaluated without an objective (plain open_clip checkpoints)."""
    return Scoring(zero_shot=EmbeddingScorer(model))
