"""Issue 17.7: an objective's initialisation (``apply_init``) never overwrites what pretrained weights set."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers.configs import compose_train
from vlhub.augment import build_clip_transforms
from vlhub.data import SyntheticShapes
from vlhub.train import prepare_objective

PRETRAINED_SCALE = math.log(42.0)  # neither CLIP's log(1 / 0.07) nor SigLIP's log(10)


@pytest.fixture(scope="module")
def siglip_config(tmp_path_factory):
    """The composed ``objective=siglip`` config, and a tiny model's open_clip state dict saved to disk
    with its temperature set apart from every init (and the source's state dict)."""
    cfg = compose_train(["objective=siglip"])
    torch.manual_seed(1)
    source = instantiate(cfg.model)
    with torch.no_grad():
        source.logit_scale.fill_(PRETRAINED_SCALE)
    path = tmp_path_factory.mktemp("pretrained") / "tiny_open_clip.pt"
    torch.save(source.open_clip_state_dict(), path)
    return cfg, path, source.state_dict()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("pretrained", PRETRAINED_SCALE),  # the whole checkpoint: its temperature stays
        ("image_pretrained", math.log(10.0)),  # a tower only: the temperature is fresh, so SigLIP's
        (None, math.log(10.0)),  # no weights: SigLIP's init
    ],
)
def test_siglip_init_applies_only_where_no_pretrained_weights_were_loaded(siglip_config, key, expected):
    cfg, path, source_state = siglip_config
    model_cfg = cfg.model.copy()
    if key is not None:
        model_cfg[key] = str(path)  # model.pretrained=PATH / model.image_pretrained=PATH
    torch.manual_seed(0)
    model, objective = instantiate(model_cfg), instantiate(cfg.objective)
    choices = {"objective": "siglip", "model": "tiny", "data": "synthetic", "augment": "clip"}
    # What vlhub.train does before training: fit the objective to data and model, then apply_init.
    transforms = build_clip_transforms(model.image_stats)
    prepare_objective(objective, SyntheticShapes(num_samples=8), model, transforms, choices)
    assert model.logit_scale.item() == pytest.approx(expected, abs=1e-6)
    loaded_block = "image_tower.module.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(model.state_dict()[loaded_block], source_state[loaded_block]) == (key is not None)
