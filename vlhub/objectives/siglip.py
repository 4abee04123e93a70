"""SigLIP: the sigmoid pairwise loss, with a learnable temperature and bias (Zhai et al. 2023).

Departs from the paper: nothing in the loss. The paper passes text features round the devices in
chunks to save memory; vlhub gathers every rank's features (the same sum), or tiles it (``loss_tiles``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.objectives.base import set_by_weights
from vlhub.objectives.clip import ContrastiveObjective
from vlhub.objectives.tiled import tiled_sigmoid_loss
from vlhub.registry import OBJECTIVES


@OBJECTIVES.register("siglip")
class SiglipObjective(ContrastiveObjective):
    """-sum log sigmoid(z_ij * (t * <x_i, y_j> + b)) / N over the global N x N batch; z = +1 on pairs.

    The paper's start, temperature t = 10 and bias b = -10, is the objective's config:
    ``init_logit_scale`` (log t) is written into the model's temperature on a fresh run
    (``apply_init``) unless pretrained weights set it (then theirs is kept), and the bias is the
    objective's own parameter, unless the model already carries one (an open_clip SigLIP
    checkpoint, ``model.init_logit_bias``), which is then trained.
    ``loss_tiles`` computes the same sum R rows at a time (:func:`vlhub.objectives.tiled.tiled_sigmoid_loss`).
    """

    supports_loss_tiles = True

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
        # A pretrained checkpoint's temperature is kept (it was trained with its towers).
        if self.init_logit_scale is not None and not set_by_weights(model, "logit_scale", "init_logit_scale"):
            with torch.no_grad():
                model.logit_scale.fill_(self.init_logit_scale)

    def bias(self, model: nn.Module) -> torch.Tensor:
        return model.logit_bias if model.logit_bias is not None else self.logit_bias

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = self.gather_all(reps["image_features"], reps["text_features"])
        scale, bias, count = model.temperature_scale(), self.bias(model), image.shape[0]
        if self.loss_tiles is None:
            logits = scale * image @ text.T + bias
            signs = 2 * torch.eye(count, device=logits.device, dtype=logits.dtype) - 1
            pairwise = -F.logsigmoid(signs * logits)
            loss, positive = pairwise.sum() / count, pairwise.diagonal().sum() / count
        else:
            loss = tiled_sigmoid_loss(image, text, scale, bias, self.loss_tiles)
            with torch.no_grad():  # logged only: the pairs' logits from the features, O(B D)
                positive = -F.logsigmoid(scale * (image * text).sum(dim=1) + bias).sum() / count
        return {"loss": loss, "positive_loss": positive.detach(), "logit_bias": bias.detach()}
