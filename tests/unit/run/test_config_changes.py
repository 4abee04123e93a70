"""A key a later vlhub added to a component is no change to a run folder whose stored config lacks it,
while it holds the component's own default; any other value is a change."""

import copy

from omegaconf import OmegaConf

from tests.helpers.configs import compose_train
from vlhub.config_resolvers import component_defaults
from vlhub.run.config_changes import config_changes


def _stored_without(config: dict, *paths: str) -> dict:
    stored = copy.deepcopy(config)
    for path in paths:
        *parents, leaf = path.split(".")
        node = stored
        for parent in parents:
            node = node[parent]
        del node[leaf]
    return stored


def test_keys_added_to_components_at_their_signature_defaults_are_no_change():
    new = OmegaConf.to_container(compose_train(["objective=siglip"]), resolve=True)
    old = _stored_without(new, "augment.decode", "objective.init_logit_bias")
    defaults = component_defaults(new)
    assert defaults["augment"]["decode"] == "cpu"
    assert defaults["objective"]["init_logit_bias"] == -10.0  # the paper's start (SiglipObjective)
    assert config_changes(old, new, defaults) == {}
    assert set(config_changes(old, new)) == {"augment.decode", "objective.init_logit_bias"}  # without them
    new["augment"]["decode"] = "cuda"
    assert config_changes(old, new, defaults) == {"augment.decode": [None, "cuda"]}
