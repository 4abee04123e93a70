"""CLOOB: modern Hopfield retrieval + InfoLOOB in both directions (Fürst et al., NeurIPS 2022).

With x the batch's normalised image embeddings (the image memory U = X) and y its text
embeddings (the text memory V = Y), each embedding is replaced by what a modern Hopfield network
retrieves from a memory, renormalised:

    U_x = norm(softmax(beta x U^T) U)   U_y = norm(softmax(beta y U^T) U)   (from the image memory)
    V_x = norm(softmax(beta x V^T) V)   V_y = norm(softmax(beta y V^T) V)   (from the text memory)

and the loss is InfoLOOB (leave one out: the positive pair is not in the denominator), anchored on
images in the image memory's space and on texts in the text memory's:

    image_to_text = -1/N sum_i ln exp(s U_x_i.U_y_i) / sum_{j != i} exp(s U_x_i.U_y_j)
    text_to_image = -1/N sum_i ln exp(s V_y_i.V_x_i) / sum_{j != i} exp(s V_y_i.V_x_j)

with s the inverse temperature 1/tau; ``loss`` = ``image_weight`` x image_to_text + ``text_weight``
x text_to_image. Memories and negatives are the global batch (gathered with gradient from every
rank), as in the authors' code (ml-jku/cloob). The defaults of ``beta`` and ``inv_tau`` are that
code's own (``--scale-hopfield 14.3``, ``--init-inv-tau 14.3``, not learnable). Their README's CC run
uses beta = 8 and 1/tau = 30 (``beta=8 inv_tau=30``); on the tiny synthetic
check (300 steps, batch 64) a fixed 1/tau = 30 collapses every embedding to one point (zero-shot
at chance, 0.033, with beta 8, 14.3 or 30) while 1/tau = 14.3 learns (0.20 with beta 8 or 14.3).

The inverse temperature is the model's ``logit_scale``: ``apply_init`` writes log(``inv_tau``)
into it on a fresh run and the loss reads it without gradient, so it is never trained (the authors'
``learnable_inv_tau=False``), the trainer logs the value in use, and an exported checkpoint carries
it as open_clip's ``logit_scale`` (where the authors' ``logit_inv_tau`` goes). A resumed run keeps
its checkpoint's value. Zero-shot is the paper's: 100 x cosine of the normalised embeddings, no
retrieval at evaluation (the default scoring).

Where this departs from the paper and the authors' code:
- Their loss is tau x (image_to_text + text_to_image); here the directions are weighted (0.5 each by
  default, as every contrastive objective here), a constant factor that Adam all but ignores (it
  matters only to ``eps`` and to gradient clipping); ``image_weight = text_weight = 1/inv_tau``
  gives theirs exactly.
- Their leave-one-out puts -1000 on the diagonal before the log-sum-exp; here it is -inf (exact).
- ``loss_tiles`` is refused: the four retrievals are B x B softmax attentions over the
  memories, which the tiled losses do not cover, so tiling only InfoLOOB would not bound memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.objectives.clip import ContrastiveObjective, weighted_directions
from vlhub.objectives.dcl import decoupled_loss
from vlhub.registry import OBJECTIVES


def hopfield_retrieve(states: torch.Tensor, memory: torch.Tensor, beta: float) -> torch.Tensor:
    """[N, D]: each state's retrieval from ``memory`` [M, D], softmax(beta s M^T) M, renormalised."""
    return F.normalize((beta * states @ memory.T).softmax(dim=-1) @ memory, dim=-1)


@OBJECTIVES.register("cloob")
class CloobObjective(ContrastiveObjective):
    """CLOOB's loss on the gathered batch; ``beta`` scales the Hopfield retrieval, ``inv_tau`` is 1/tau."""

    trains_temperature = False
    loss_tiles_refusal = (
        "its Hopfield retrievals are B x B softmax attentions over the batch's memories, which the tiled "
        "losses do not cover (tiling InfoLOOB alone would not bound the memory)"
    )

    def __init__(
        self,
        beta: float = 14.3,
        inv_tau: float = 14.3,
        image_weight: float = 0.5,
        text_weight: float = 0.5,
        **contrastive,
    ) -> None:
        super().__init__(**contrastive)
        for name, value in (("beta", beta), ("inv_tau", inv_tau)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.beta, self.inv_tau = float(beta), float(inv_tau)
        self.image_weight, self.text_weight = image_weight, text_weight

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        if self.inv_tau > model.max_logit_scale:
            raise ValueError(
                f"inv_tau={self.inv_tau} is above the model's max_logit_scale={model.max_logit_scale}, "
                "which would clamp it"
            )

    def apply_init(self, model: nn.Module) -> None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(self.inv_tau))

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = self.gather_all(reps["image_features"], reps["text_features"])
        scale = model.temperature_scale().detach()  # fixed 1/tau: never trained (see the module docstring)
        image_from_images = hopfield_retrieve(image, image, self.beta)  # U_x
        text_from_images = hopfield_retrieve(text, image, self.beta)  # U_y
        image_from_texts = hopfield_retrieve(image, text, self.beta)  # V_x
        text_from_texts = hopfield_retrieve(text, text, self.beta)  # V_y
        image_to_text = decoupled_loss(scale * image_from_images @ text_from_images.T)
        text_to_image = decoupled_loss(scale * text_from_texts @ image_from_texts.T)
        return weighted_directions(image_to_text, text_to_image, self.image_weight, self.text_weight)
