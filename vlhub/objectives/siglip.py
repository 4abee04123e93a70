"""SigLIP: the sigmoid pairwise loss, with a learnable temperature and bias (Zhai et al. 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.objectives.clip import ContrastiveObjective
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("siglip")
class SiglipObjective(ContrastiveObjective):
    """-sum log sigmoid(z_ij * (t * <x_i, y_j> + b)) / N over the global N x N batch; z = +1 on pairs.

    The paper's start, temperature t = 10 and bias b = -10, is the objective's config:
    ``init_logit_scale`` (log t) is written into the model's temperature on a fresh run
    (``apply_init``), and the bias is the objective's own parameter, unless the model already
    carries one (an open_clip SigLIP checkpoint, ``model.init_logit_bias``), which is then trained.
    """

    def __init__(self, init_logit_scale: float | None = math.log(10.0), init_logit_bias: float = -10.0, **contrastive):
        super().__init__(**contrastive)
        self.init_logit_scale = init_logit_scale
        self.init_logit_bias = init_logit_bias
        self.logit_bias: nn.Parameter | None = None

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        if model.logit_bias is None and self.logit_bias is None:
            self.logit_bias = nn.Parameter(torch.tensor(float(self.init_logit_bias)))

    def apply_init(self, model: nn.Module) -> None:
        if self.init_logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(self.init_logit_scale)

    def bias(self, model: nn.Module) -> torch.Tensor:
        return model.logit_bias if model.logit_bias is not None else self.logit_bias

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = self.gather_all(reps["image_features"], reps["text_features"])
        logits = model.temperature_scale() * image @ text.T + self.bias(model)
        signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
        pairwise = -F.logsigmoid(signs * logits)
        count = logits.shape[0]
        return {
            "loss": pairwise.sum() / count,
            "positive_loss": (pairwise.diagonal().sum() / count).detach(),
            "logit_bias": self.bias(model).detach(),
        }
