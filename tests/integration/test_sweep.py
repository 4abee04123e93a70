"""Sweeps: each job of a multirun gets its own run folder and results."""

import json
from pathlib import Path

import pytest

from tests.helpers.cli import run_module
from tests.helpers.configs import FAST


def _multirun(*args: str) -> None:
    """``python -m vlhub.train -m ARGS`` as runpy runs it, in this process (the test's cwd): a subprocess would
    import torch and vlhub again. The launcher picks where the jobs run."""
    assert run_module("vlhub.train", ["-m", *args, *FAST, "trainer.max_steps=2"]) in (0, None)


def _check_jobs(tmp_path: Path) -> None:
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        record = json.loads((tmp_path / job / "results.jsonl").read_text().splitlines()[-1])
        assert record["step"] == 2 and "synthetic-zeroshot-top1" in record
        config = (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        assert f"optim.lr={lr:g}".replace("0.001", "1e-3") in config or str(lr) in config
        assert (tmp_path / job / "checkpoints" / "latest.pt").is_file()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs vlhub.train as __main__
def test_a_two_job_sweep_with_the_submitit_local_launcher(tmp_path, monkeypatch):
    """Each job in a process of its own (submitit pickles the job and starts a fresh python for it)."""
    monkeypatch.chdir(tmp_path)
    _multirun("optim.lr=1e-3,3e-4", f"hydra.sweep.dir={tmp_path}", "hydra/launcher=local")
    _check_jobs(tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs vlhub.train as __main__
def test_the_objective_comparison_is_a_two_job_sweep_with_the_basic_launcher_and_compares(tmp_path, monkeypatch):
    """+experiment=compare_objectives on two objectives and one seed (the command line narrows its sweep),
    through Hydra's basic launcher: each job its own folder, overrides, results and checkpoint; then
    vlhub.compare: each job headlined by its own metric, no confound between them."""
    # The basic launcher runs both jobs in this process, one after the other.
    monkeypatch.chdir(tmp_path)
    _multirun("+experiment=compare_objectives", "objective=clip,ce", "trainer.seed=0", f"hydra.sweep.dir={tmp_path}")
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
