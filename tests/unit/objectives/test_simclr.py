"""SimCLR: NT-Xent against brute force and x_clip's, and the SSL term of simclr and slip on their projections."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from x_clip.visual_ssl import nt_xent_loss

from tests.helpers.objectives import prepared_objective
from tests.helpers.references import IdentityTowers, assert_close, randn
from vlhub.objectives.ssl import nt_xent


def brute_force_nt_xent(first, second, temperature):
    """For each of the 2N views, -log softmax over the other 2N - 1 views of cos / temperature, at its partner."""
    views, count = torch.cat([first, second]), first.shape[0]
    total = torch.zeros(())
    for a in range(2 * count):
        others = [b for b in range(2 * count) if b != a]
        logits = torch.stack([F.cosine_similarity(views[a], views[b], dim=0) / temperature for b in others])
        partner = others.index((a + count) % (2 * count))
        total = total - (logits[partner] - logits.logsumexp(dim=0))
    return total / (2 * count)


def test_nt_xent_is_the_brute_force_one_and_x_clips():
    first, second = randn(5, 6), randn(5, 6, seed=1)
    for temperature in (0.1, 0.5):
        expected = brute_force_nt_xent(first, second, temperature)
        assert_close(nt_xent(first, second, temperature), expected)
        normalized = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
        assert_close(nt_xent_loss(*normalized, temperature=temperature), expected)


@pytest.mark.parametrize("name", ["simclr", "slip"])
def test_simclr_and_slip_ssl_terms_are_nt_xent_on_the_projections(name):
    if name == "simclr":
        model, objective = prepared_objective("simclr", projection_dim=8, hidden_dim=16, temperature=0.2)
        head, dim = objective.head, model.image_tower.output_dim
    else:
        model, objective = prepared_objective(
            "slip", ssl_projection_dim=8, ssl_hidden_dim=16, clip_weight=0.3, ssl_weight=0.6
        )
        head, dim = objective.ssl_head, model.image_tower.unprojected_dim  # the encoder's own features
    batch, scale, width = 6, 9.0, model.image_tower.output_dim
    view2, view3 = randn(batch, dim), randn(batch, dim, seed=1)
    base, text = randn(batch, width, seed=3), randn(batch, width, seed=2)
    reps = {"view2_features": view2, "view3_features": view3}
    if name == "slip":
        reps |= {"image_features": F.normalize(base, dim=-1), "text_features": F.normalize(text, dim=-1)}
    objective.train()
    parts = objective.loss(reps, IdentityTowers(scale))
    # The projector (BatchNorm in training mode: batch statistics) runs on each strong view's batch.
    expected = brute_force_nt_xent(head.projector(view2), head.projector(view3), head.temperature)
    assert_close(parts["ssl_loss"], expected)
    if name == "simclr":
        assert head.temperature == 0.2
        assert_close(parts["loss"], expected)
    else:
        assert head.temperature == 0.1
        clip = open_clip.ClipLoss()(reps["image_features"], reps["text_features"], torch.tensor(scale))
        assert_close(parts["contrastive_loss"], clip)
        assert_close(parts["loss"], 0.3 * clip + 0.6 * expected)
