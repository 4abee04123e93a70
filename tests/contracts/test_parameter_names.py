"""The library names its own parameters, the launcher adds the key; each default has one home.

- A Python user of a data source or an eval task is told ``root=``; the commands, which build the
  same object from ``cfg.data`` / ``cfg.eval``, say ``data.root=`` / ``eval.<task>.root=``
  (``vlhub.config_keys``).
- Lists of names in messages come from the registry, not from a hand-written list.
- An objective's or augmentation's default lives in its signature; its YAML reads it with
  ``${default:}`` (``vlhub.config_resolvers``), so the two cannot disagree.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_object
from omegaconf import OmegaConf

from tests.helpers.configs import CONFIG_ROOT, compose_train
from vlhub.config_keys import build_at, name_keys
from vlhub.config_resolvers import signature_defaults
from vlhub.data import CsvPairs, SyntheticShapes
from vlhub.objectives import FilipObjective
from vlhub.registry import OBJECTIVES, TRANSFORMS

CONFIGS = CONFIG_ROOT


def _error_of(call) -> BaseException:
    with pytest.raises(Exception) as caught:
        call()
    error = caught.value
    while error.__cause__ is not None:  # under Hydra's InstantiationException: the library's own error
        error = error.__cause__
    return error


def test_a_python_user_of_csvpairs_is_told_root_and_the_command_line_data_root(tmp_path):
    missing = tmp_path / "missing.csv"
    python = str(_error_of(lambda: CsvPairs(str(missing))))
    assert python == f"root={missing}: no such CSV file"  # the argument the caller wrote, no config key
    cfg = compose_train(["data=csv", f"data.root={missing}"])
    launched = str(_error_of(lambda: build_at(cfg, "data")))
    assert launched == f"data.root={missing}: no such CSV file"


def test_the_key_of_a_nested_or_shared_name_is_the_one_holding_the_quoted_value(tmp_path):
    train = SyntheticShapes(num_samples=2).write_csv(tmp_path)
    missing = tmp_path / "val.csv"  # data.root and data.val.root are both "root" to the library
    cfg = compose_train(
        ["data=csv", f"data.root={train}", f"+data.val={{_target_:vlhub.data.CsvPairs,root:{missing}}}"]
    )
    assert str(_error_of(lambda: build_at(cfg, "data"))) == f"data.val.root={missing}: no such CSV file"
    leaves = {"imagenet.root": "/a", "imagenet_sketch.root": None, "templates": "openai"}
    assert name_keys("root=None: not set", "eval", leaves) == "eval.imagenet_sketch.root=null: not set"
    assert name_keys("root=/a: no such folder", "eval", leaves) == "eval.imagenet.root=/a: no such folder"
    # prose and unknown names stay as written; a name with no value and two keys is not guessed
    assert name_keys("the root of it, got x=1", "eval", leaves) == "the root of it, got x=1"
    assert name_keys("root must be a folder", "eval", leaves) == "root must be a folder"
    assert name_keys("templates=openia: not one", "eval", leaves) == "eval.templates=openia: not one"


def test_a_command_names_an_objective_key_its_library_error_named_by_parameter():
    cfg = compose_train(["objective=filip", "objective.block_size=0"])
    python = str(_error_of(lambda: FilipObjective(block_size=0)))
    assert python == "block_size must be > 0, got 0"
    assert str(_error_of(lambda: build_at(cfg, "objective"))) == "objective.block_size must be > 0, got 0"


def test_the_objectives_with_a_local_form_are_read_from_the_registry():
    local = [name for name, cls in OBJECTIVES.items() if getattr(cls, "supports_local_loss", False)]
    message = str(_error_of(lambda: FilipObjective(local_loss=True)))
    listed = message.split("(only ")[1].split(" have a local form")[0].split(", ")
    assert listed == local and "lit" not in listed  # lit is an option of clip, not a registered objective


def _registered_yaml() -> list[tuple[str, Path]]:
    """(kind, YAML) of every registered objective and image transform, and the shared file they pull in."""
    files = [("objective", CONFIGS / "objective" / f"{name}.yaml") for name in OBJECTIVES.names()]
    files += [("augment", CONFIGS / "augment" / f"{name}.yaml") for name in TRANSFORMS.names()]
    return [*files, ("objective", CONFIGS / "objective" / "shared" / "contrastive.yaml")]


@pytest.mark.parametrize(("kind", "path"), _registered_yaml(), ids=lambda p: getattr(p, "stem", p))
def test_a_registered_components_yaml_states_no_default_of_its_own(kind, path):
    """Each key whose parameter has a default reads it from the signature; a value written here
    would be a second home that can drift (siglip's 2.302585 beside its math.log(10))."""
    written = yaml.safe_load(path.read_text()) or {}
    target = written.get("_target_") or "vlhub.objectives.ClipObjective"  # the shared file: every contrastive one
    defaults = signature_defaults(get_object(target))
    restated = {k: v for k, v in written.items() if k in defaults and v != "${default:}"}
    assert restated == {}, f"{path.name} restates signature defaults; write ${{default:}}"


@pytest.mark.parametrize(
    "choice",
    [f"objective={n}" for n in OBJECTIVES.names()] + [f"augment={n}" for n in TRANSFORMS.names()] + ["objective=lit"],
)
def test_the_composed_values_are_the_signatures_defaults(choice):
    """What the command line gets is what a Python caller gets, except what an option sets on purpose."""
    group = choice.split("=")[0]
    cfg = compose_train([choice])
    OmegaConf.resolve(cfg)  # in place, as --cfg job --resolve does: list defaults too
    node = cfg[group]
    defaults = signature_defaults(get_object(node._target_))
    on_purpose = {"lock_image": True, "freeze_bn_stats": True} if choice == "objective=lit" else {}
    for key, value in node.items():
        if key in defaults:
            expected = on_purpose.get(key, defaults[key])
            assert value == (list(expected) if isinstance(expected, tuple) else expected), (choice, key)
    exposed = set(node) - {"_target_", "_partial_"}
    assert exposed <= set(inspect.signature(get_object(node._target_)).parameters) | set(defaults), choice


def test_vlhub_compare_reads_the_presets_objective_sweep_as_hydra_stored_it(tmp_path):
    """Hydra writes multirun.yaml unresolved: the sweep's objective list is ``${vlhub_objectives:}`` there."""
    from vlhub.compare_jobs import swept_keys

    sweep = tmp_path / "multirun.yaml"
    sweep.write_text(
        "hydra:\n  sweeper:\n    params:\n      objective: ${vlhub_objectives:}\n      trainer.seed: 0,1,2\n"
    )
    notes: list[str] = []
    assert swept_keys(sweep, notes) == {"objective", "trainer.seed"} and notes == []
