"""``python -m vlhub.compare``: the table and chart of a sweep, and the comparison sweep's config."""

import json

import pytest
from hydra import compose, initialize_config_module

from vlhub import compare

OBJECTIVES = ["clip", "siglip", "filip", "dcl", "cloob", "mlm", "declip", "slip", "coca", "simclr", "ce"]
COMMON = ["+experiment=compare_objectives", "trainer.max_steps=5"]


def _write_job(folder, records):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(objective, step, **metrics):
    overrides = [*COMMON, f"objective={objective}"]
    return {"step": step, "epoch": 0, "objective": objective, "model": "tiny", "overrides": overrides, **metrics}


@pytest.fixture
def sweep(tmp_path):
    """Four jobs as a multirun leaves them (folders 0..3 and 10), each with different metrics."""
    runs = tmp_path / "sweep"
    _write_job(
        runs / "0",
        [
            _record("clip", 2, **{"synthetic-zeroshot-top1": 0.1}),  # an earlier evaluation: not the final one
            _record("clip", 5, **{"synthetic-zeroshot-top1": 0.5, "synthetic-zeroshot-top5": 0.9}),
        ],
    )
    _write_job(
        runs / "1",
        [_record("simclr", 5, **{"synthetic-linear_probe-top1": 0.4, "synthetic-knn-top1": 0.3})],
    )
    _write_job(runs / "2", [_record("ce", 5, **{"synthetic-classifier-top1": 0.7, "synthetic-zeroshot-top5": None})])
    # A job whose record has a linear probe too: zero-shot still wins the headline.
    _write_job(
        runs / "10",
        [_record("slip", 5, **{"synthetic-linear_probe-top1": 0.8, "synthetic-zeroshot-top1": 0.25})],
    )
    (runs / "3" / ".hydra").mkdir(parents=True)  # a job that failed before evaluating
    return runs


def _table(path):
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0]]
    return header, [dict(zip(header, (cell.strip() for cell in row))) for row in rows[2:]]


def test_the_table_has_one_row_per_job_with_swept_values_step_and_the_union_of_metrics(sweep):
    table_path, chart_path = compare.write_comparison(sweep)
    header, rows = _table(table_path)
    assert header == [
        "job",
        "objective",  # the only override that differs: +experiment and max_steps are shared, so not shown
        "step",
        "headline",
        "synthetic-zeroshot-top1",  # then the union of the jobs' metrics, in order of first appearance
        "synthetic-zeroshot-top5",
        "synthetic-linear_probe-top1",
        "synthetic-knn-top1",
        "synthetic-classifier-top1",
    ]
    assert [(r["job"], r["objective"], r["step"]) for r in rows] == [
        ("0", "clip", "5"),
        ("1", "simclr", "5"),
        ("2", "ce", "5"),
        ("10", "slip", "5"),
    ]
    clip, simclr, ce, slip = rows
    assert clip["synthetic-zeroshot-top1"] == "0.5" and clip["synthetic-zeroshot-top5"] == "0.9"
    assert clip["synthetic-knn-top1"] == "" and simclr["synthetic-zeroshot-top1"] == ""
    assert simclr["synthetic-knn-top1"] == "0.3" and ce["synthetic-zeroshot-top5"] == ""
    assert clip["headline"] == "0.5 (zero-shot top-1)"
    assert simclr["headline"] == "0.4 (linear-probe top-1)"
    assert ce["headline"] == "0.7 (classifier top-1)"
    assert slip["headline"] == "0.25 (zero-shot top-1)"
    assert "Jobs without results (failed or unfinished): 3" in table_path.read_text()
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart_path.stat().st_size > 5000


def test_the_headline_prefers_zero_shot_then_linear_probe_then_classifier(sweep):
    jobs = {job.swept["objective"]: job for job in compare.list_jobs(sweep)}
    assert jobs["clip"].headline() == ("synthetic-zeroshot-top1", "zero-shot top-1")
    assert jobs["simclr"].headline() == ("synthetic-linear_probe-top1", "linear-probe top-1")
    assert jobs["ce"].headline() == ("synthetic-classifier-top1", "classifier top-1")
    assert jobs["slip"].headline() == ("synthetic-zeroshot-top1", "zero-shot top-1")
    assert jobs["clip"].label() == "objective=clip"
    assert compare.default_chance(list(jobs.values())) == pytest.approx(1 / 30)


def test_the_cli_prints_where_it_wrote(sweep, capsys):
    compare.main([str(sweep), "--chance", "0.1"])
    out = capsys.readouterr().out
    assert f"wrote {sweep / 'comparison.md'}" in out and f"wrote {sweep / 'comparison.png'}" in out


def test_a_folder_without_results_fails_naming_it(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "results.jsonl").write_text("")  # a job that never evaluated
    with pytest.raises(SystemExit, match=f"no results.jsonl with a record under {tmp_path}"):
        compare.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a folder"):
        compare.main([str(tmp_path / "missing")])


def test_the_comparison_sweeps_every_objective_on_one_augment():
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=compare_objectives"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params.objective.split(",") == OBJECTIVES
        assert cfg.model.config.vision_cfg.image_size == 32 and cfg.data._target_ == "vlhub.data.SyntheticShapes"
        assert "synthetic" in cfg.eval and cfg.checkpoint.every_n_steps == 0
        for objective in ("declip", "slip", "simclr", "clip"):  # extra views come from augment_views
            job = compose(config_name="train", overrides=["+experiment=compare_objectives", f"objective={objective}"])
            assert job.augment._target_ == "vlhub.augment.build_clip_transforms", objective
