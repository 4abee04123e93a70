"""Image self-supervision on two views: SimCLR's NT-Xent and SimSiam, with x_clip's heads.

The heads are x_clip's (``visual_ssl.MLP`` for SimCLR's projector and SimSiam's predictor,
``visual_ssl.SimSiamMLP`` for SimSiam's projector); their BatchNorm layers see the whole
(gathered) batch, so they run in ``loss``, never per chunk. Their input width is the image
tower's embedding width, read from the model, never fixed. The losses are written here
(x_clip's ``SimCLR`` / ``SimSiam`` modules run their own augmentations on one image batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from x_clip.visual_ssl import MLP, SimSiamMLP


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each of the 2N views picks its partner among the other 2N - 1, by cosine / temperature."""
    views = F.normalize(torch.cat([first, second]), dim=-1)
    count = first.shape[0]
    logits = views @ views.T / temperature
    logits = logits.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=logits.device), float("-inf"))
    partners = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(logits.device)
    return F.cross_entropy(logits, partners)


class SimclrHead(nn.Module):
    """SimCLR: an MLP projector (x_clip's, with BatchNorm) and NT-Xent at ``temperature``."""

    def __init__(self, in_dim: int, projection_dim: int, hidden_dim: int | None, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"objective.ssl_temperature must be > 0, got {temperature}")
        self.projector = MLP(in_dim, projection_dim, hidden_dim or in_dim)
        self.temperature = temperature

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return nt_xent(self.projector(first), self.projector(second), self.temperature)


def simsiam_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, stop-gradient(target)), per row."""
    return 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target.detach(), dim=-1)).sum(dim=-1)


class SimsiamHead(nn.Module):
    """SimSiam: projector, predictor, and the symmetric stop-gradient loss (x_clip's recipe).

    Each view goes through the projector on its own, as in x_clip, so BatchNorm statistics are per view.
    """

    def __init__(self, in_dim: int, projection_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.projector = SimSiamMLP(in_dim, projection_dim, hidden_dim)
        self.predictor = MLP(projection_dim, projection_dim, hidden_dim)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(first), self.projector(second)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (simsiam_distance(p1, z2) + simsiam_distance(p2, z1)).mean()
