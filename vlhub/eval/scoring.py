"""How a trained model is scored at evaluation: the objective decides, the data decides what.

Every task scores images the same way for a given objective, through a :class:`Scoring`:
- ``zero_shot``: a :class:`ZeroShotScorer` that turns class prompts into a classifier and images
  into logits over it (CLIP's cosine of pooled embeddings by default; FILIP's token-wise
  similarity). None: the objective has no zero-shot.
- ``classifier``: an :class:`ImageClassifier` whose own logits are scored (``ce``), on the tasks
  whose class names it was trained on.
- ``probe``: image-only objectives are scored by linear probe and k-NN on tasks that carry a
  labelled train split (the synthetic shapes), never by reading features as logits.

An objective returns its scoring from ``Objective.scoring(model)``; ``default_scoring`` is CLIP's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class ZeroShotScorer(Protocol):
    def build_classifier(
        self, class_names: list[str], templates: list[str], device: torch.device, batch_size: int
    ) -> Any:
        """Whatever ``logits`` needs to score images against these classes."""

    def logits(self, images: torch.Tensor, classifier: Any) -> torch.Tensor:
        """[N, C] scores of ``images`` (on the device) against every class."""


class ImageClassifier(Protocol):
    class_names: list[str]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, len(class_names)] logits of the objective's own classifier head."""


@dataclass(frozen=True)
class Scoring:
    zero_shot: ZeroShotScorer | None
    classifier: ImageClassifier | None = None
    probe: bool = False


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


class EmbeddingScorer:
    """CLIP's zero-shot: 100 x cosine of the image embedding and the mean template embedding.

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

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_text(tokens, normalize=False)
        return F.normalize(self.text_head(features) if self.text_head else features, dim=-1)

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
        features = self.model.encode_image(images, normalize=False).float()
        features = F.normalize(self.image_head(features) if self.image_head else features, dim=-1)
        return 100.0 * features @ classifier


def default_scoring(model) -> Scoring:
    """CLIP's scoring, for a model evaluated without an objective (plain open_clip checkpoints)."""
    return Scoring(zero_shot=EmbeddingScorer(model))
