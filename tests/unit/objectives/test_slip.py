"""SLIP: its projector is the paper's and x_clip's (its SSL term: test_simclr.py, shared with simclr)."""

from __future__ import annotations

from torch import nn

from tests.helpers.models import micro_model
from tests.helpers.references import assert_close, randn
from vlhub.registry import OBJECTIVES


def test_slips_projector_is_the_papers_and_x_clips_at_two_layers():
    from x_clip.visual_ssl import MLP

    from vlhub.objectives.ssl import mlp_projector

    # SLIP's _build_mlp(in, 4096, 256): Linear, BN, ReLU, Linear, BN, ReLU, Linear, on the encoder's width.

    model, objective = micro_model(), OBJECTIVES.build("slip")  # its defaults, not the tests' narrow head
    objective.apply_to_model(model)
    layers = list(objective.ssl_head.projector)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    widths = [(layer.in_features, layer.out_features) for layer in layers if isinstance(layer, nn.Linear)]
    assert widths == [(model.image_tower.unprojected_dim, 4096), (4096, 4096), (4096, 256)]
    assert objective.ssl_head.temperature == 0.1
    # At two layers it is x_clip's MLP: the same keys, the same outputs.
    ours, theirs = mlp_projector(6, 3, 5, layers=2).train(), MLP(6, 3, 5).train()
    theirs.load_state_dict(ours.state_dict())
    assert_close(ours(randn(4, 6)), theirs(randn(4, 6)))
