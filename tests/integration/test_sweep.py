"""Sweeps: each job of a multirun gets its own run folder and results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.configs import FAST

REPO = Path(__file__).resolve().parents[2]


def _multirun(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "vlhub.train",
        "-m",
        "optim.lr=1e-3,3e-4",
        *FAST,
        "trainer.max_steps=2",
        f"hydra.sweep.dir={tmp_path}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _check_jobs(tmp_path: Path) -> None:
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        record = json.loads((tmp_path / job / "results.jsonl").read_text().splitlines()[-1])
        assert record["step"] == 2 and "synthetic-zeroshot-top1" in record
        config = (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        assert f"optim.lr={lr:g}".replace("0.001", "1e-3") in config or str(lr) in config
        assert (tmp_path / job / "checkpoints" / "latest.pt").is_file()


@pytest.mark.slow
def test_a_two_job_sweep_with_the_submitit_local_launcher(tmp_path):
    result = _multirun(tmp_path, "hydra/launcher=local")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_jobs(tmp_path)


@pytest.mark.slow
def test_the_objective_comparison_is_a_two_job_sweep_with_the_basic_launcher_and_compares(tmp_path):
    """+experiment=compare_objectives on two objectives and one seed (the command line narrows its sweep),
    through Hydra's basic launcher: each job its own folder, overrides, results and checkpoint; then
    vlhub.compare: each job headlined by its own metric, no confound between them."""
    command = [sys.executable, "-m", "vlhub.train", "-m", "+experiment=compare_objectives", "objective=clip,ce"]
    command += [*FAST, "trainer.max_steps=2", "trainer.seed=0", f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
    for job, (objective, metric) in enumerate((("clip", "zeroshot"), ("ce", "classifier"))):
        record = json.loads((tmp_path / str(job) / "results.jsonl").read_text().splitlines()[-1])
        assert record["step"] == 2 and f"synthetic-{metric}-top1" in record
        assert f"objective={objective}" in (tmp_path / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert (tmp_path / str(job) / "checkpoints" / "latest.pt").is_file()
    from vlhub.compare import compare_folder, headline, write_comparison

    found = compare_folder(tmp_path)
    assert [(job.swept.get("objective"), job.step) for job in found.jobs] == [("clip", 2), ("ce", 2)]
    assert [headline(job)[0] for job in found.jobs] == ["synthetic-zeroshot-top1", "synthetic-classifier-top1"]
    assert found.confounds == [] and found.notes == []
    table, chart = write_comparison(tmp_path)
    assert "Confounds:** none" in table.read_text() and chart.stat().st_size > 0
