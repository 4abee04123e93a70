"""A run folder written by an earlier vlhub (tests/fixtures/run_before_the_house_move, made by the
code at 791a88c, before the engine was split into engine/, parallel/ and run/) still resumes and loads.

The fixture is a real run: ``python -m vlhub.train`` with the overrides in its ``.hydra/overrides.yaml``
(a one-layer 32-wide ViT, objective=ce, 2 steps, a checkpoint at each step), so its stored config and
its checkpoint are what that layout wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

import vlhub
from tests.helpers.configs import compose_train
from vlhub.train import train

FIXTURE = Path(__file__).parents[1] / "fixtures" / "run_before_the_house_move"


def copied_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "prev"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def test_a_run_folder_of_the_previous_layout_resumes_where_it_stopped(tmp_path):
    run_dir = copied_run(tmp_path)
    overrides = [o for o in yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text()) if "max_steps" not in o]
    before = torch.load(run_dir / "checkpoints/step_2.pt", weights_only=True)
    train(compose_train([*overrides, "trainer.max_steps=3"]), run_dir, {"model": "tiny", "objective": "ce"})
    after = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    assert after["step"] == 3 and after["run_id"] == before["run_id"]  # the same run, one step further
    assert after["data"]["samples_consumed"] == before["data"]["samples_consumed"] + 8
    launches = json.loads((run_dir / "run.json").read_text())["launches"]
    assert [launch["step"] for launch in launches] == [0, 2]
    changed = [k for k in before["state_dict"] if not torch.equal(before["state_dict"][k], after["state_dict"][k])]
    assert changed  # it trained from the stored weights


def test_a_checkpoint_of_the_previous_layout_loads_for_inference(tmp_path):
    loaded = vlhub.load(copied_run(tmp_path) / "checkpoints/step_2.pt")
    stored = torch.load(FIXTURE / "checkpoints/step_2.pt", weights_only=True)["state_dict"]
    weights = loaded.model.open_clip_state_dict()  # the layout the checkpoint stores
    common = [k for k in stored if k in weights]
    assert len(common) > 10 and all(torch.equal(weights[k], stored[k]) for k in common)
    image = torch.rand(1, 3, 32, 32)
    assert loaded.model.encode_image(image).shape == (1, 16)
