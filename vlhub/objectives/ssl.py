"""Image self-supervision on two views: SimCLR's NT-Xent and SimSiam, with x_clip's heads.

The heads are x_clip's (``visual_ssl.MLP`` for SimSiam's predictor, ``visual_ssl.SimSiamMLP`` for
SimSiam's projector) or laid out as they are (SimCLR's projector, :func:`mlp_projector`: x_clip's
``MLP`` at 2 layers, SLIP's at 3); their BatchNorm layers see the whole (gathered) batch, so they run
in ``loss``, never per chunk. Their input width is read from the model, never fixed. The losses are
written here (x_clip's ``SimCLR`` / ``SimSiam`` modules run their own augmentations on one image batch).
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


def mlp_projector(in_dim: int, out_dim: int, hidden_dim: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers, each but the last followed by BatchNorm and ReLU: x_clip's ``MLP``
    (same modules, same order, same state_dict keys) at 2, SLIP's ``_build_mlp`` at 3."""
    widths = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
        modules.append(nn.Linear(width_in, width_out))
        if index < layers - 1:
            modules += [nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*modules)


class SimclrHead(nn.Module):
    """SimCLR: an MLP projector (BatchNorm between its ``layers`` Linear layers) and NT-Xent at ``temperature``.

    ``prefix`` is how the objective that owns the head names these parameters (slip's ``ssl_temperature``)."""

    def __init__(
        self,
        in_dim: int,
        projection_dim: int,
        hidden_dim: int | None,
        temperature: float,
        layers: int = 2,
        prefix: str = "",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"{prefix}temperature must be > 0, got {temperature}")
        if layers < 1:
            raise ValueError(f"{prefix}layers must be >= 1, got {layers}")
        for name, width in (("projection_dim", projection_dim), ("hidden_dim", hidden_dim or in_dim)):
            if width < 1:
                raise ValueError(f"{prefix}{name} must be >= 1, got {width}")
        self.projector = mlp_projector(in_dim, projection_dim, hidden_dim or in_dim, layers)
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
