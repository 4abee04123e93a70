"""The clip objective against open_clip's ClipLoss and hand computations."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlhub.objectives import ClipObjective
from vlhub.registry import OBJECTIVES


class _Temperature(torch.nn.Module):
    """Just what ``loss`` reads from a model."""

    def __init__(self, logit_scale: float) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))

    def temperature_scale(self):
        return self.logit_scale.exp().clamp(max=100.0)


def _features(batch=12, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), 0.0, 3.0])
def test_loss_and_gradients_match_open_clip(logit_scale):
    image, text = _features()
    ours_image, ours_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    theirs_image, theirs_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    model = _Temperature(logit_scale)
    ours = ClipObjective().loss({"image_features": ours_image, "text_features": ours_text}, model)["loss"]
    their_scale = torch.tensor(logit_scale, requires_grad=True)
    theirs = open_clip.ClipLoss()(theirs_image, theirs_text, their_scale.exp())
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_image.grad, theirs_image.grad)
    torch.testing.assert_close(ours_text.grad, theirs_text.grad)
    torch.testing.assert_close(model.logit_scale.grad, their_scale.grad)


def test_direction_weights_weigh_the_two_cross_entropies():
    image, text = _features(batch=5)
    model = _Temperature(2.0)
    logits = math.exp(2.0) * image @ text.T
    labels = torch.arange(5)
    i2t, t2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    parts = ClipObjective(image_weight=0.8, text_weight=0.2).loss(
        {"image_features": image, "text_features": text}, model
    )
    torch.testing.assert_close(parts["loss"], 0.8 * i2t + 0.2 * t2i)
    torch.testing.assert_close(parts["image_to_text_loss"], i2t)
    torch.testing.assert_close(parts["text_to_image_loss"], t2i)


@pytest.mark.parametrize("name", ["siglip", "dcl", "cloob", "coca", "declip", "filip"])
def test_objectives_without_a_local_form_refuse_local_loss(name):
    """Their loss ignores local_loss, so asking for it is an error naming the key, not the global loss."""
    with pytest.raises(ValueError, match=f"^local_loss=True is not supported by objective={name}"):
        OBJECTIVES.build(name, local_loss=True)
    assert OBJECTIVES.build(name, local_loss=False).local_loss is False


@pytest.mark.parametrize("name", ["clip", "mlm", "slip"])
def test_clip_based_objectives_take_local_loss(name):
    assert OBJECTIVES.build(name, local_loss=True).local_loss is True


def test_temperature_is_clamped_at_100(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(math.log(1000.0))
    assert tiny_model.temperature_scale().item() == pytest.approx(100.0)
    image, text = _features(batch=4)
    at_clamp = ClipObjective().loss({"image_features": image, "text_features": text}, tiny_model)["loss"]
    at_clamp.backward()
    assert tiny_model.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further
    reference = open_clip.ClipLoss()(image, text, torch.tensor(100.0))
    torch.testing.assert_close(at_clamp, reference)


def test_initial_temperature_is_clips(tiny_model):
    assert tiny_model.temperature_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
