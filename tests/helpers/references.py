"""Reference harnesses for the objectives' parity tests: towers that return given features, x_clip's CLIP
driven on given tensors, seeded inputs, and the tolerance they are compared at (fp32, tiny tensors)."""

from __future__ import annotations

import math

import torch
import x_clip
from torch import nn

TOL = {"rtol": 1e-5, "atol": 1e-5}


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


class IdentityTowers(nn.Module):
    """A model whose towers return their inputs: what ``represent`` is given are the features."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.logit_bias = None

    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, image=None, text=None, output_tokens=False):
        out = {}
        if image is not None:
            out["image_features"] = image
        if text is not None:
            out["text_features"] = text
        return out


class Given(nn.Module):
    """An encoder that ignores its inputs and returns a given tensor."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_xclip(dim: int, text_ids: torch.Tensor, text_output: torch.Tensor, scale: float, **kwargs) -> x_clip.CLIP:
    """x_clip's CLIP with ``text_output`` as its text encoding, its image input as its image encoding,
    and identity latent projections (x_clip l2-normalises the latents itself)."""
    clip = x_clip.CLIP(
        dim_text=dim,
        dim_image=dim,
        dim_latent=dim,
        num_text_tokens=int(text_ids.max()) + 1,
        text_enc_depth=1,
        text_seq_len=text_ids.shape[1],
        text_heads=1,
        text_dim_head=4,
        visual_enc_depth=1,
        visual_heads=1,
        visual_dim_head=4,
        visual_image_size=4,
        visual_patch_size=2,
        use_mlm=False,
        use_visual_ssl=False,
        **kwargs,
    )
    clip.text_transformer = Given(text_output)
    clip.visual_transformer = nn.Identity()
    clip.to_text_latent = nn.Identity()
    clip.to_visual_latent = nn.Identity()
    with torch.no_grad():
        clip.temperature.fill_(math.log(scale))  # x_clip's temperature is log-scale: its scale is exp(temperature)
    assert clip.text_ssl_loss_weight == 0 and clip.image_ssl_loss_weight == 0
    return clip.train()


def text_ids(batch: int, length: int, seed: int = 0, padded: bool = False) -> torch.Tensor:
    """Token ids in [1, 10); with ``padded``, each row i ends in zeros after its first (length - i % length) ids."""
    ids = torch.randint(1, 10, (batch, length), generator=torch.Generator().manual_seed(seed))
    if padded:
        for row in range(batch):
            ids[row, max(1, length - row % length) :] = 0
    return ids
