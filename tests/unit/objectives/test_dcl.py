"""DCL: the decoupled contrastive loss against x_clip's on the same features."""

from __future__ import annotations

import torch.nn.functional as F

from tests.helpers.references import IdentityTowers, assert_close, randn, text_ids, tiny_xclip
from vlhub.objectives.dcl import DclObjective


def test_dcl_matches_x_clip_decoupled_contrastive_learning():
    image, text, ids = randn(6, 8), randn(6, 8, seed=1), text_ids(6, 5)
    scale = 4.0
    clip = tiny_xclip(8, ids, text, scale, decoupled_contrastive_learning=True)
    theirs = clip(ids, image, return_loss=True)
    ours = DclObjective().loss(
        {"image_features": F.normalize(image, dim=-1), "text_features": F.normalize(text, dim=-1)},
        IdentityTowers(scale),
    )
    assert_close(ours["loss"], theirs)
