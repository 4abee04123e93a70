"""``python -m vlhub.compare``: what differs between jobs, seeds and noise, bad input, and the run's cost.

Run folders are fabricated the way the trainer and Hydra write them (``config.yaml`` from the
real composed config, ``run.json`` with the launch's environment, ``.hydra/overrides.yaml``,
``results.jsonl``, the sweep's ``multirun.yaml``); one real tiny run checks the trainer's record.
"""

from __future__ import annotations

import json
import math
import types
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

import vlhub.engine.trainer as trainer_module
from tests.helpers.configs import compose_train, run_train
from tests.helpers.models import micro_model
from vlhub import compare
from vlhub.registry import list_objectives

PRESET = "+experiment=compare_objectives"
ENV = {"step": 0, "vlhub": "git v0.1-3-gabc1234", "torch": "2.14.0", "device": "cpu", "world_size": 1}


@cache
def _composed(overrides: tuple[str, ...]) -> str:
    return json.dumps(OmegaConf.to_container(compose_train(list(overrides)), resolve=True))


def _config(overrides: list[str], edits: dict) -> dict:
    """The resolved config a job writes to config.yaml: composed once per objective and augment
    (composing is the slow part), then the job's own plain values set as the launch would."""
    groups = tuple(sorted(o for o in overrides if o.startswith(("objective=", "augment=", "+experiment="))))
    config = json.loads(_composed(groups))
    plain = dict(o.split("=", 1) for o in overrides if o not in groups)
    for key, value in {**plain, **edits}.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return config


def _job(folder: Path, overrides: list[str], metrics: dict | None, edits: dict | None = None, env=None, config=None):
    """A job folder as a sweep leaves it; ``edits`` are config values the overrides do not show (a hand
    edit), ``config`` composes the config from other overrides than those recorded."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    composed = _config(config or overrides, edits or {})
    (folder / "config.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
    (folder / "run.json").write_text(json.dumps({"run_id": folder.name, "launches": [env or ENV]}))
    if metrics is not None:
        cost = {"train/samples_seen": 19200, "train/wall_seconds": 40.0, "train/flops_per_sample": 3.1e7}
        record = {"step": 300, "epoch": 0, "objective": "clip", "model": "tiny", "overrides": overrides}
        (folder / "results.jsonl").write_text(json.dumps({**record, **cost, **metrics}) + "\n")


def _sweep(folder: Path, task: list[str], params: dict | None = None) -> None:
    """The sweep's multirun.yaml: the sweeper's params and the command line, as Hydra writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = {"sweeper": {"params": params or {}}, "overrides": {"hydra": [], "task": task}}
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra_cfg}))


def _zs(value: float) -> dict:
    return {"synthetic-zeroshot-top1": value, "synthetic-zeroshot-top5": 0.5}


def _rows(text: str, title: str) -> list[dict[str, str]]:
    """The table under a ``## title`` heading, as dicts."""
    section = text.split(f"## {title}")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0]]
    return [dict(zip(header, (cell.strip() for cell in row))) for row in rows[2:]]


def test_clip_slip_at_the_preset_settings_reports_no_confound(tmp_path):
    # slip composed with the run's augment, as it is once objectives stop picking their own augment.
    _sweep(tmp_path, [PRESET, "objective=clip,slip"])
    _job(tmp_path / "0", ["objective=clip", PRESET], _zs(0.30))
    _job(tmp_path / "1", ["objective=slip", PRESET], _zs(0.25), config=["objective=slip", PRESET, "augment=clip"])
    found = compare.compare_folder(tmp_path)
    assert found.swept == ["objective"] and found.confounds == [] and found.notes == []
    assert "**Confounds:** none" in found.text
    assert [(r["job"], r["objective"], "confound" in r) for r in _rows(found.text, "Jobs")] == [
        ("0", "clip", False),
        ("1", "slip", False),
    ]


def test_a_swept_augment_is_swept_not_a_confound(tmp_path):
    _sweep(tmp_path, [PRESET, "augment=clip,simclr"])
    _job(tmp_path / "0", ["augment=clip", PRESET], _zs(0.33))
    _job(tmp_path / "1", ["augment=simclr", PRESET], _zs(0.22))
    found = compare.compare_folder(tmp_path)
    assert found.swept == ["augment"] and found.confounds == []
    assert [g.label for g in found.groups] == ["augment=clip", "augment=simclr"]


def test_a_hand_changed_lr_and_another_torch_are_confounds_marked_on_the_jobs_and_the_chart(tmp_path):
    _sweep(tmp_path, [PRESET], {"objective": "clip,siglip,slip"})
    slip = ["objective=slip", PRESET, "augment=clip"]
    _job(tmp_path / "0", ["objective=clip", PRESET], _zs(0.30))
    _job(tmp_path / "1", ["objective=siglip", PRESET], _zs(0.20), edits={"optim.lr": 0.004})
    _job(tmp_path / "2", ["objective=slip", PRESET], _zs(0.28), env={**ENV, "torch": "2.13.0"}, config=slip)
    found = compare.compare_folder(tmp_path)
    assert found.confounds == ["env.torch", "optim.lr"]
    assert "- `optim.lr`: 0.002 (jobs 0, 2); 0.004 (job 1)" in found.text
    assert "- `env.torch`: 2.14.0 (jobs 0, 1); 2.13.0 (job 2)" in found.text
    assert [r["confound"] for r in _rows(found.text, "Jobs")] == ["", "optim.lr", "env.torch"]
    fig = compare.draw_chart(found.groups, None, "t")
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [("confound: optim.lr" in t, "confound: env.torch" in t) for t in ticks] == [
        (False, False),  # clip 0.30
        (False, True),  # slip 0.28
        (True, False),  # siglip 0.20
    ]


def _seed_sweep(folder: Path, values: dict[str, list[float]]) -> None:
    _sweep(folder, [PRESET, f"objective={','.join(values)}"], {"trainer.seed": "0,1,2"})
    number = 0
    for objective, scores in values.items():
        for seed, score in enumerate(scores):
            overrides = [f"objective={objective}", f"trainer.seed={seed}", PRESET]
            config = overrides if objective != "slip" else [*overrides, "augment=clip"]
            _job(folder / str(number), overrides, _zs(score), config=config)
            number += 1


def test_seeds_are_grouped_with_mean_and_std_and_the_chart_draws_error_bars(tmp_path):
    scores = {"clip": [0.31, 0.35, 0.30], "slip": [0.22, 0.27, 0.25]}
    _seed_sweep(tmp_path, scores)
    found = compare.compare_folder(tmp_path)
    assert found.swept == ["objective", "trainer.seed"] and found.confounds == []
    rows = _rows(found.text, "Groups")
    for row, objective in zip(rows, ("clip", "slip")):
        values = np.array(scores[objective])
        assert row["group"] == f"objective={objective}" and row["seeds"] == "3"
        assert row["headline"] == f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"
    group = found.groups[0]
    assert group.mean == pytest.approx(np.mean(scores["clip"]))
    assert group.std == pytest.approx(np.std(scores["clip"], ddof=1))
    # Columns equal in every job leave the table for one header line; the cost columns say it once.
    assert "**Same for every job:** step=300, samples seen=19200, train s=40, FLOPs/sample=3.1e+07" in found.text
    header = ["job", "objective", "trainer.seed", "headline", "synthetic-zeroshot-top1"]
    assert list(_rows(found.text, "Jobs")[0]) == header
    fig = compare.draw_chart(found.groups, 1 / 30, "t")
    bars = fig.axes[0].containers  # one ErrorbarContainer per bar, its half-width the group's std
    lines = [c for c in bars if hasattr(c, "has_xerr") and c.has_xerr]
    segments = [c.lines[2][0].get_segments()[0] for c in lines]
    assert [s[1][0] - s[0][0] for s in segments] == pytest.approx([2 * np.std(v, ddof=1) for v in scores.values()])


def test_within_noise_is_welchs_test_on_a_hand_computed_case(tmp_path):
    # Two seeds a side with equal spread: Welch's df is 2, where the t distribution's two-sided
    # p is 1 - |t| / sqrt(2 + t^2) in closed form.
    a, near, far = [0.50, 0.52], [0.53, 0.55], [0.60, 0.62]
    for other, t in ((near, 0.03 / math.sqrt(0.0002)), (far, 0.10 / math.sqrt(0.0002))):
        assert compare.welch_p(a, other) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    assert compare.welch_p(a, near) > 0.05 > compare.welch_p(a, far)
    assert compare.welch_p(a, [0.5]) is None  # one seed: no noise estimate
    scores = {"clip": a, "slip": near, "siglip": far}
    _sweep(tmp_path, [PRESET, "objective=clip,slip,siglip", "trainer.seed=0,1"])
    for number, (objective, values) in enumerate((o, v) for o, v in scores.items()):
        for seed, score in enumerate(values):
            overrides = [f"objective={objective}", f"trainer.seed={seed}", PRESET]
            config = overrides if objective != "slip" else [*overrides, "augment=clip"]
            _job(tmp_path / f"{number}{seed}", overrides, _zs(score), config=config)
    rows = _rows(compare.compare_folder(tmp_path).text, "Groups")
    assert [(r["#"], r["group"], r["within noise of"]) for r in rows] == [
        ("1", "objective=siglip", ""),  # 0.61: beyond noise of both
        ("2", "objective=slip", "#3"),
        ("3", "objective=clip", "#2"),
    ]


def test_bad_input_is_one_line_each_and_the_rest_is_reported(tmp_path):
    _sweep(tmp_path, [PRESET, "objective=clip,slip,clip,siglip"])
    _job(tmp_path / "0", ["objective=clip", PRESET], _zs(0.30))
    _job(tmp_path / "1", [PRESET], _zs(0.28))  # its objective (the swept key) is neither overridden nor a key
    (tmp_path / "1" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 300}}))
    _job(tmp_path / "2", ["objective=clip", PRESET], None)  # failed before evaluating
    _job(tmp_path / "3", ["objective=siglip", PRESET], _zs(0.20))
    results = tmp_path / "3" / "results.jsonl"
    good = results.read_text()
    results.write_text(good.replace('"step": 300', '"step": 100') + "[1, 2]\n" + good + '{"step": 300, "epo')
    found = compare.compare_folder(tmp_path)
    assert found.notes == [
        "job 2: no results.jsonl (failed or not evaluated yet)",
        f"{results} line 2: not a JSON object (a torn write?), skipped",
        f"{results} line 4: not a JSON object (a torn write?), skipped",
        "job 1: swept key objective not found in its config or overrides",
    ]
    rows = {r["job"]: r for r in _rows(found.text, "Jobs")}
    assert sorted(rows) == ["0", "1", "3"] and rows["3"]["step"] == "not final (step 300)"
    assert rows["0"]["step"] == "300" and rows["3"]["headline"] == "0.2 (zero-shot top-1)"
    assert all(f"- {note}" in found.text for note in found.notes)


def test_a_folder_without_jobs_is_one_line_and_the_cli_says_what_it_wrote(tmp_path, capsys):
    compare.main([str(tmp_path)])
    assert f"{tmp_path}: no jobs" in (tmp_path / "comparison.md").read_text()
    assert "no chart" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not a folder"):
        compare.main([str(tmp_path / "missing")])


def test_a_mixed_folder_stays_readable(tmp_path):
    """Two sweeps in one folder: long labels are not cut, the legend covers no data."""
    long = "objective=" + "x" * 60
    _sweep(tmp_path / "a", [PRESET, "objective=clip,slip"])
    _job(tmp_path / "a" / "0", ["objective=clip", PRESET], _zs(0.30))
    _job(tmp_path / "a" / "1", ["objective=slip", PRESET], _zs(0.25), config=["objective=slip", PRESET, "augment=clip"])
    _sweep(tmp_path / "b", [PRESET, "augment=clip,simclr"])
    _job(tmp_path / "b" / "0", ["augment=clip", PRESET], _zs(0.33))
    _job(tmp_path / "b" / "1", ["augment=simclr", PRESET], _zs(0.22))
    table, chart = compare.write_comparison(tmp_path)
    found = compare.compare_folder(tmp_path)
    assert found.swept == ["augment", "objective"] and found.confounds == []
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found.groups[0].label = long
    fig = compare.draw_chart(found.groups, 1 / 30, "t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box, axes = fig.bbox, fig.axes[0].get_window_extent(renderer)
    for label in fig.axes[0].get_yticklabels():
        extent = label.get_window_extent(renderer)
        assert extent.x0 >= box.x0 and extent.y0 >= box.y0 and extent.y1 <= box.y1, label.get_text()
    assert long in fig.axes[0].get_yticklabels()[0].get_text().replace("\n", "")  # wrapped, whole
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(axes)


def test_the_trainer_records_samples_seen_wall_seconds_over_resumes_and_flops_per_sample(tmp_path, monkeypatch):
    clock = iter(range(10**6))  # each reading of the trainer's clock is one second later
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    run_train(["trainer.max_steps=2", "eval=none"], tmp_path)  # a run without evaluation still writes its record
    run_train(["trainer.max_steps=3", "eval=none"], tmp_path)  # resumes from step 2
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert (first["step"], last["step"]) == (2, 3)
    assert (first["train/samples_seen"], last["train/samples_seen"]) == (2 * 8, 3 * 8)
    # A step is timed from the end of the previous step to the end of its own (data included): two
    # readings of the fake clock, so 2 s each, summed over both launches.
    assert (first["train/wall_seconds"], last["train/wall_seconds"]) == (4.0, 6.0)
    # Forward + backward, counted independently: the towers' forward (the counter on the towers
    # alone), twice that for the backward except the patch embedding's input gradient (images
    # need none), and the loss's image x text similarity (B x B x D, forward and two backward).
    model, batch, config = micro_model(), 8, compose_train().model.config
    with FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(batch, 3, 32, 32))
        model.encode_text(torch.zeros(batch, config.text_cfg.context_length, dtype=torch.long))
    patch_embed = 2 * batch * 3 * 32 * 32 * config.vision_cfg.width  # one MAC per input pixel and output channel
    similarity = 3 * 2 * batch * batch * config.embed_dim
    expected = 3 * counter.get_total_flops() - patch_embed + similarity
    assert last["train/flops_per_sample"] * batch == expected
    assert json.loads((tmp_path / "run.json").read_text())["launches"][1]["step"] == 2  # both launches recorded


def test_the_comparison_sweeps_every_objective_over_three_seeds_on_one_augment():
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=compare_objectives"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params.objective.split(",") == list_objectives()  # every registered one
        assert len(list_objectives()) == 11 and "lit" not in list_objectives()  # lit is an option of clip
        assert str(cfg.hydra.sweeper.params["trainer.seed"]).split(",") == ["0", "1", "2"]
        assert cfg.model.config.vision_cfg.image_size == 32 and cfg.data._target_ == "vlhub.data.SyntheticShapes"
        assert "synthetic" in cfg.eval and cfg.checkpoint.every_n_steps == 0
        for objective in ("declip", "slip", "simclr", "clip"):  # extra views come from augment_views
            job = compose(config_name="train", overrides=["+experiment=compare_objectives", f"objective={objective}"])
            assert job.augment._target_ == "vlhub.augment.build_clip_transforms", objective
