"""Cross-entropy: a classifier head over the image tower, trained on the data's class labels.

The number of classes and their names come from the data (``apply_to_data``: ImageFolder
folders, a CSV's integer label column, the synthetic shapes) unless given. A row may carry
several classes as a multi-hot ``batch["labels"]`` [B, K]; its loss is then the mean over its
classes of -log p(class). Evaluated on its own logits (``<task>-classifier-*``) on the tasks
whose classes it was trained on; it has no zero-shot. The text tower, if any, is not used, except
with ``zeroshot_head``: the head then starts as the model's zero-shot classifier (temperature x the
class-name prompt embeddings, bias 0; ``+experiment=finetune_zeroshot_head``), so its argmax at step 0
is zero-shot classification, and WiSE-FT can rebuild that start from the zero-shot model alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.eval.prompts import simple_templates
from vlhub.eval.scoring import Scoring
from vlhub.eval.zeroshot import build_zero_shot_classifier
from vlhub.objectives.base import IncompatibleObjective, Objective
from vlhub.parallel import collectives
from vlhub.registry import OBJECTIVES


class HeadClassifier:
    """The objective's classifier as evaluation sees it: class names and logits of images."""

    def __init__(self, model: nn.Module, objective: CrossEntropyObjective) -> None:
        self.model, self.objective = model, objective
        self.class_names = list(objective.class_names)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.objective.head(self.model.encode_image(images, normalize=False))


def per_sample_cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B]: -log p(label), or the mean over a multi-hot row's classes of -log p(class)."""
    log_probs = F.log_softmax(logits, dim=-1)
    if "labels" in batch:
        targets = batch["labels"].to(log_probs.dtype)
        counts = targets.sum(dim=1)
        if (counts == 0).any():
            raise ValueError("objective=ce: a training sample has no class label")
        return -(log_probs * targets).sum(dim=1) / counts
    labels = batch["label"]
    if (labels < 0).any():
        raise ValueError("objective=ce: a training sample has no class label (label -1)")
    return -log_probs.gather(1, labels[:, None]).squeeze(1)


@OBJECTIVES.register("ce")
class CrossEntropyObjective(Objective):
    needs_text = False
    needs_labels = True

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        zeroshot_head: bool = False,
        head_templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.zeroshot_head = zeroshot_head
        self.head_templates = list(head_templates) if head_templates is not None else None
        # The head's start is a function of the model alone (WiSE-FT's zero-shot end uses this).
        self.init_from_model = zeroshot_head
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes if num_classes is not None else (len(class_names) if class_names else None)
        self.class_names = list(class_names) if class_names is not None else None
        self.head: nn.Linear | None = None

    def apply_to_data(self, source: Any) -> None:
        super().apply_to_data(source)
        found = source.num_classes
        if self.num_classes is None:
            self.num_classes = found
        elif self.num_classes < found:
            raise IncompatibleObjective(f"num_classes={self.num_classes}, but the data has {found} classes")
        if self.class_names is None:
            names = source.class_names or []
            self.class_names = list(names) + [str(i) for i in range(len(names), self.num_classes)]
        if self.zeroshot_head and self.head_templates is None:
            self.head_templates = list(getattr(source, "templates", None) or simple_templates())

    def apply_to_model(self, model: nn.Module) -> None:
        if self.num_classes is None:
            raise IncompatibleObjective("needs the number of classes: give num_classes= or labelled data")
        if self.class_names is None:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if self.head is None:
            self.head = nn.Linear(model.image_tower.output_dim, self.num_classes)

    def apply_init(self, model: nn.Module) -> None:
        if not self.zeroshot_head:
            return
        device = next(model.parameters()).device
        templates = self.head_templates or simple_templates()
        was_training = model.training
        classifier = build_zero_shot_classifier(model, list(self.class_names), templates, device)  # [D, C]
        model.train(was_training)
        with torch.no_grad():
            self.head.weight.copy_((model.temperature_scale() * classifier.T).to(self.head.weight.dtype))
            self.head.bias.zero_()

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.head(model(image=batch["image"])["image_features"])
        return {"nll": per_sample_cross_entropy(logits, batch)}

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        loss = collectives.gather_features(reps["nll"])[0].mean()
        return {"loss": loss, "cross_entropy": loss.detach()}

    def scoring(self, model: nn.Module) -> Scoring:
        return Scoring(zero_shot=None, classifier=HeadClassifier(model, self), absent=self.no_text_reason())

    def resolved_kwargs(self) -> dict[str, Any]:
        resolved = {"num_classes": self.num_classes, "class_names": list(self.class_names or [])}
        if self.zeroshot_head:
            resolved.update(zeroshot_head=True, head_templates=list(self.head_templates or simple_templates()))
        return resolved
