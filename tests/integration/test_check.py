"""``python -m vlhub.check``: its quick CPU run passes and writes its report; a broken objective fails it by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from vlhub.check.cli import main
from vlhub.objectives import ClipObjective
from vlhub.registry import OBJECTIVES, list_objectives

# A micro model (one block per tower, 16 px): the check's own rows, at the smallest size that runs.
MICRO = [
    "model.config.vision_cfg.layers=1",
    "model.config.vision_cfg.image_size=16",
    "data.image_size=16",
    "model.config.embed_dim=32",
    "model.config.vision_cfg.width=32",
    "model.config.text_cfg.width=32",
    "model.config.text_cfg.context_length=16",
]
LONG = pytest.mark.skipif(os.environ.get("VLHUB_LONG_TESTS") != "1", reason="set VLHUB_LONG_TESTS=1")


def _report(folder: Path) -> dict:
    return json.loads((folder / "check.json").read_text())


def _rows(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["rows"]}


def test_quick_check_on_cpu_passes_every_objective_and_writes_its_report(tmp_path):
    """The command itself, in its own process: exit code, table, report, and what it imported."""
    command = [sys.executable, "-m", "vlhub.check", "--quick", "--out", str(tmp_path), "--batch-size", "4", *MICRO]
    ran = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = _rows(_report(tmp_path))
    for name in list_objectives():  # every registered objective, two finite losses and real gradients
        row = rows[f"{name}: 2 steps, fp32"]
        assert row["status"] == "ok", row
        assert len(row["values"]["losses"]) == 2 and all(v > 0 for v in row["values"]["grad_norms"])
    assert rows["grad cache = plain step"]["values"]["relative_error"] <= 1e-5
    assert rows["checkpoint read back"]["status"] == "ok"
    stored = torch.load(rows["checkpoint read back"]["values"]["path"], weights_only=True)
    assert stored["step"] == 2 and stored["objective_spec"]["name"] == "clip"
    assert rows["ddp on all GPUs = one process"]["status"] == "untested here"  # no GPUs here
    assert rows["torch"]["detail"] == torch.__version__
    assert "compile on = off" not in rows  # --quick: no compile
    # A bare GPU machine has torch, open_clip, timm and hydra: nothing else is on the check's import path.
    assert rows["unneeded imports"]["detail"] == "none"
    assert "grad cache = plain step" in ran.stdout and "all rows passed" in ran.stdout
    markdown = (tmp_path / "check.md").read_text()
    assert markdown.startswith("# vlhub check: ok") and "| correctness | clip: 2 steps, fp32 | ok |" in markdown


class NanLossObjective(ClipObjective):
    def loss(self, reps, model):
        parts = super().loss(reps, model)
        return {**parts, "loss": parts["loss"] * float("nan")}


class ZeroGradientObjective(ClipObjective):
    def loss(self, reps, model):
        parts = super().loss(reps, model)
        return {**parts, "loss": parts["loss"] * 0.0}


@pytest.fixture
def broken_objectives():
    """Two objectives registered (registry entry + config option), as a user's own would be."""
    broken = {"broken_nan": NanLossObjective, "broken_zero_grad": ZeroGradientObjective}
    for name, cls in broken.items():
        OBJECTIVES.register(name)(cls)
        ConfigStore.instance().store(group="objective", name=name, node={"_target_": f"{__name__}.{cls.__name__}"})
    yield list(broken)
    for name in broken:  # gone again for the tests that follow (the registry has no public removal)
        OBJECTIVES._entries.pop(name)
        ConfigStore.instance().repo["objective"].pop(f"{name}.yaml")


def test_a_broken_objective_fails_the_check_by_name(tmp_path, broken_objectives, capsys):
    names = ",".join(["clip", *broken_objectives])
    args = ["--quick", "--out", str(tmp_path), "--batch-size", "4", "--objectives", names]
    assert main([*args, *MICRO]) == 1
    report = _report(tmp_path)
    assert not report["ok"]
    assert report["failed"] == ["broken_nan: 2 steps, fp32", "broken_zero_grad: 2 steps, fp32"]
    rows = _rows(report)
    assert "not finite at step 1" in rows["broken_nan: 2 steps, fp32"]["detail"]
    assert "all zero" in rows["broken_zero_grad: 2 steps, fp32"]["detail"]
    assert rows["clip: 2 steps, fp32"]["status"] == "ok"  # one broken row does not stop the others
    assert "FAILED: broken_nan" in capsys.readouterr().err


@LONG
def test_full_check_compiles_and_measures_speed_on_cpu(tmp_path):
    assert main(["--large", "--out", str(tmp_path), "--batch-size", "4", "--objectives", "clip", *MICRO]) == 0
    rows = _rows(_report(tmp_path))
    assert rows["compile on = off"]["values"]["relative_difference"] <= 1e-4
    rates = {name: rows[name]["values"]["samples_per_s"] for name in ("vlhub eager", "open_clip compile + fused")}
    assert all(rate > 0 for rate in rates.values())
    ratio = rows["vlhub vs open_clip"]["values"]["ratio"]
    assert ratio == pytest.approx(
        rows["vlhub compile + fused"]["values"]["samples_per_s"] / rates["open_clip compile + fused"]
    )
    assert "CPU figure" in rows["vlhub vs open_clip"]["detail"]
    assert rows["loader images/s"]["values"]["images_per_s"] > 0
    assert rows["host-to-device copy"]["status"] == "untested here"  # no GPU
    assert rows["grad cache 256, tiled loss"]["values"]["logical"] == 256


@LONG
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_row_matches_one_process_on_two_cpu_ranks(tmp_path, strategy):
    from vlhub.check.ranks import distributed_row
    from vlhub.check.trainers import CheckSettings

    status, detail, values = distributed_row(CheckSettings("cpu", "fp32", 4, MICRO), strategy, 2, tmp_path)
    assert status == "ok" and values["relative_error"] <= 1e-5, detail
