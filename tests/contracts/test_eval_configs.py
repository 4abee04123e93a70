"""The eval YAML: every preset composes and builds on generated folders; shared keys live in one file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

from tests.helpers.configs import compose_train
from tests.helpers.eval_folders import DATASET_TASKS
from vlhub.config_keys import build_at
from vlhub.eval import ClassNameTransform
from vlhub.registry import list_eval_tasks

EVAL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eval"
SHARED_KEYS = ("every_n_steps", "batch_size", "workers", "templates", "subset", "extended_metrics", "classnames")
MINE = (*DATASET_TASKS, "imagenet_shifts", "suite", "none", "synthetic", "imagefolder")


@pytest.fixture(scope="module")
def roots(eval_layouts) -> dict[str, Path]:
    return eval_layouts  # generated once for the session (conftest.py)


def build(option: str, overrides: list[str] = ()):
    """As the commands build it: errors name eval.<key> (vlhub.config_keys)."""
    return build_at(compose_train([f"eval={option}", *overrides]), "eval")


def test_every_dataset_task_has_a_preset_that_builds_it(roots):
    assert set(DATASET_TASKS) <= set(list_eval_tasks())
    for name in DATASET_TASKS:
        evaluator = build(name, [f"eval.{name}.root={roots[name]}"])
        assert set(evaluator.tasks) == {name}
        assert evaluator.tasks[name].source.samples  # the folder was read at build time


def test_shared_keys_have_one_home_and_reach_every_preset():
    shared = (EVAL_CONFIGS / "shared" / "evaluator.yaml").read_text()
    assert all(f"\n{key}:" in f"\n{shared}" for key in SHARED_KEYS)
    for option in MINE:
        text = (EVAL_CONFIGS / f"{option}.yaml").read_text()
        assert not [k for k in SHARED_KEYS if f"\n{k}:" in f"\n{text}"], f"{option}.yaml redefines a shared key"
        cfg = compose_train([f"eval={option}"]).eval
        assert {*SHARED_KEYS} <= set(cfg) and set(cfg.classnames) >= {"case", "shift_cipher"}, option
        assert cfg.templates == "openai" and cfg.subset is None and cfg.extended_metrics is False


def test_shared_keys_are_set_from_the_command_line(roots):
    evaluator = build(
        "imagenet_a",
        [
            f"eval.imagenet_a.root={roots['imagenet_a']}",
            "eval.subset=in100",
            "eval.templates=simple",
            "eval.classnames.case=upper",
            "eval.classnames.shift_cipher=3",
            "eval.extended_metrics=true",
            "eval.workers=0",
        ],
    )
    assert evaluator.subset.name == "in100" and evaluator.templates == "simple" and evaluator.extended_metrics
    assert evaluator.classnames == ClassNameTransform("upper", 3)
    context = evaluator.context("imagenet_a", None, torch.device("cpu"), Path("run/eval"))
    assert context.output_dir == Path("run/eval/imagenet_a") and context.subset is evaluator.subset


def test_imagenet_shifts_builds_its_five_tasks(roots):
    shifts = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    evaluator = build("imagenet_shifts", [f"eval.{n}.root={roots[n]}" for n in shifts])
    assert list(evaluator.tasks) == sorted(shifts)
    with pytest.raises(InstantiationException, match=r"eval\.imagenet_sketch\.root=null: not set"):
        build("imagenet_shifts", [f"eval.{n}.root={roots[n]}" for n in shifts if n != "imagenet_sketch"])


def test_suite_runs_only_the_tasks_whose_root_is_set(roots, tmp_path):
    assert build("suite").tasks == {}
    sets = [f"eval.aircraft.root={roots['aircraft']}", f"eval.imagenet_r.root={roots['imagenet_r']}"]
    evaluator = build("suite", sets)
    assert list(evaluator.tasks) == ["aircraft", "imagenet_r"]
    with pytest.raises(InstantiationException, match=r"eval\.cars\.root=.*no such folder"):
        build("suite", [f"eval.cars.root={tmp_path / 'missing'}"])  # a set but wrong root still fails


def test_bad_eval_values_fail_at_build_naming_the_key(roots, tmp_path):
    with pytest.raises(InstantiationException, match=r"eval\.imagenet\.root=null: not set"):
        build("imagenet")
    with pytest.raises(InstantiationException, match=r"eval\.subset=in1000"):
        build("imagefolder", [f"eval.imagefolder.root={roots['imagenet_a']}", "eval.subset=in1000"])
    with pytest.raises(InstantiationException, match=r"eval\.templates=openia"):
        build("none", ["eval.templates=openia"])
    with pytest.raises(InstantiationException, match=r"eval\.classnames\.case"):
        build("none", ["eval.classnames.case=title"])
    with pytest.raises(ConfigCompositionException, match="extended_metric"):
        compose_train(["eval=imagenet", "eval.extended_metric=true"])


def test_a_trained_tiny_model_is_evaluated_the_same_in_any_task_order(roots, tiny_model, tmp_path):
    from vlhub.augment import build_plain_transforms

    transform = build_plain_transforms(tiny_model.image_stats).eval
    sets = [
        f"eval.inat2021.root={roots['inat2021']}",
        f"eval.aircraft.root={roots['aircraft']}",
        "eval.templates=simple",
        "eval.batch_size=64",
    ]
    evaluator = build("suite", sets)
    first = evaluator.run(tiny_model, transform, torch.device("cpu"), tmp_path / "one")
    reordered = evaluator.tasks
    evaluator.tasks = dict(reversed(list(reordered.items())))
    second = evaluator.run(tiny_model, transform, torch.device("cpu"), tmp_path / "two")
    assert first == second and len(first) == 6
    assert all(0.0 <= value <= 1.0 for value in first.values())
