"""SigLIP: its start (temperature 10, bias -10) and its sigmoid loss against open_clip's SigLipLoss."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.models import micro_model
from tests.helpers.objectives import prepared_objective
from tests.helpers.references import assert_close, randn
from vlhub.objectives.siglip import SiglipObjective


def test_siglip_starts_at_temperature_10_bias_minus_10_and_matches_open_clip():
    model, objective = prepared_objective("siglip")
    assert model.temperature_scale().item() == pytest.approx(10.0, rel=1e-6)
    assert model.logit_bias is None and objective.bias(model).item() == -10.0
    image, text = F.normalize(randn(6, 64), dim=-1), F.normalize(randn(6, 64, seed=1), dim=-1)
    reference = open_clip.loss.SigLipLoss(rank=0, world_size=1)
    for logit_scale, bias in ((None, None), (2.0, -1.5)):  # the paper's start, then a moved one
        if logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(logit_scale)
                objective.logit_bias.fill_(bias)
        ours_image, ours_text = image.clone().requires_grad_(), text.clone().requires_grad_()
        theirs_image, theirs_text = image.clone().requires_grad_(), text.clone().requires_grad_()
        ours = objective.loss({"image_features": ours_image, "text_features": ours_text}, model)["loss"]
        scale, bias = model.temperature_scale().detach(), objective.bias(model).detach()
        theirs = reference(theirs_image, theirs_text, scale, bias)
        assert_close(ours, theirs)
        ours.backward()
        theirs.backward()
        assert_close(ours_image.grad, theirs_image.grad)
        assert_close(ours_text.grad, theirs_text.grad)


def test_siglip_trains_the_models_own_bias_when_it_has_one():
    torch.manual_seed(0)
    model = micro_model()
    model.logit_bias = nn.Parameter(torch.tensor(-4.0))  # as an open_clip SigLIP checkpoint carries
    objective = SiglipObjective()
    objective.apply_to_model(model)
    assert objective.logit_bias is None and objective.bias(model) is model.logit_bias
    image, text = F.normalize(randn(5, 64), dim=-1), F.normalize(randn(5, 64, seed=1), dim=-1)
    ours = objective.loss({"image_features": image, "text_features": text}, model)["loss"]
    their_bias = torch.tensor(-4.0, requires_grad=True)
    theirs = open_clip.loss.SigLipLoss()(image, text, model.temperature_scale().detach(), their_bias)
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert_close(model.logit_bias.grad, their_bias.grad)
