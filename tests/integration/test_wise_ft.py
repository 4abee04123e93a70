"""WiSE-FT: interpolated weights at alpha 0, 1 and 0.5, metrics reproduced, report and plot, bad pairs."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from tests.helpers.configs import run_train
from vlhub.api import build_model, read_checkpoint
from vlhub.eval.weight_interpolation import interpolate
from vlhub.wise_ft import wise_ft

EVAL = ["eval.synthetic.num_samples=60", "eval.batch_size=64", "eval.workers=0"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A 3-step clip run, a 3-step fine-tune from it (another seed), and their final metrics."""
    root = tmp_path_factory.mktemp("wise_ft_runs")
    zeroshot = run_train([], root / "zeroshot")
    path = root / "zeroshot/checkpoints/latest.pt"
    finetuned = run_train([f"model.pretrained={path}", "trainer.seed=1", "optim.lr=1e-2"], root / "finetuned")
    return {"zeroshot": (path, zeroshot), "finetuned": (root / "finetuned/checkpoints/latest.pt", finetuned)}


def compose_wise_ft(overrides: list[str]):
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        return compose(config_name="wise_ft", overrides=overrides)


def test_interpolation_reproduces_the_ends_and_averages_the_middle(checkpoints):
    zeroshot, finetuned = (read_checkpoint(checkpoints[k][0]) for k in ("zeroshot", "finetuned"))
    for part in ("state_dict", "objective"):
        a, b = zeroshot[part], finetuned[part]
        assert all(torch.equal(interpolate(a, b, 0)[k], a[k]) for k in a)
        assert all(torch.equal(interpolate(a, b, 1)[k], b[k]) for k in a)
        middle = interpolate(a, b, 0.5)
        assert all(torch.allclose(middle[k], (a[k] + b[k]) / 2, atol=1e-7) for k in a)
    assert any(not torch.equal(zeroshot["state_dict"][k], finetuned["state_dict"][k]) for k in zeroshot["state_dict"])
    model = build_model(checkpoints["zeroshot"][0], None, zeroshot)  # the zero-shot model, loaded at alpha 1
    model.load_open_clip_state_dict(interpolate(zeroshot["state_dict"], finetuned["state_dict"], 1))
    assert all(torch.equal(v, finetuned["state_dict"][k]) for k, v in model.open_clip_state_dict().items())


def test_every_alpha_is_evaluated_and_the_report_and_plot_are_written(checkpoints, tmp_path):
    (zs_path, zs_metrics), (ft_path, ft_metrics) = checkpoints["zeroshot"], checkpoints["finetuned"]
    cfg = compose_wise_ft(
        [f"zeroshot={zs_path}", f"finetuned={ft_path}", "alphas=[0,0.5,1]", "wise_ft.id_tasks=[synthetic]", *EVAL]
    )
    rows = wise_ft(cfg, tmp_path)
    assert [row["alpha"] for row in rows] == [0, 0.5, 1]
    for row, metrics in ((rows[0], zs_metrics), (rows[2], ft_metrics)):  # the ends reproduce the runs' metrics
        assert {k: row[k] for k in metrics} == pytest.approx(metrics, abs=1e-6)
    report = (tmp_path / "wise_ft.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| alpha")]
    assert [line.split(" | ")[0] for line in table] == ["| 0", "| 0.5", "| 1"]
    top1 = f"{rows[1]['synthetic-zeroshot-top1']:.4f}"
    assert "synthetic-zeroshot-top1" in report and top1 in table[1]
    assert (tmp_path / "wise_ft.png").stat().st_size > 1000


def test_checkpoints_of_different_architectures_fail_naming_the_difference(checkpoints, tmp_path):
    other = run_train(["model.config.vision_cfg.layers=3", "trainer.max_steps=1", "eval=none"], tmp_path / "other")
    assert other == {}
    cfg = compose_wise_ft(
        [f"zeroshot={checkpoints['zeroshot'][0]}", f"finetuned={tmp_path / 'other/checkpoints/latest.pt'}", *EVAL]
    )
    with pytest.raises(ValueError, match=r"differ in architecture: model.config.vision_cfg.layers: 2 != 3"):
        wise_ft(cfg, tmp_path / "wise")
    assert not Path(tmp_path / "wise" / "wise_ft.md").exists()


def test_a_ce_fine_tune_from_the_zero_shot_head_interpolates_a_classifier(checkpoints, tmp_path):
    zs_path, zs_metrics = checkpoints["zeroshot"]
    ft_metrics = run_train(
        ["+experiment=finetune_zeroshot_head", f"model.pretrained={zs_path}", "optim.warmup_steps=1", *EVAL],
        tmp_path / "ce",
        {"model": "tiny", "objective": "ce"},
    )
    cfg = compose_wise_ft([f"zeroshot={zs_path}", f"finetuned={tmp_path / 'ce/checkpoints/latest.pt'}", *EVAL])
    rows = wise_ft(cfg, tmp_path / "wise")
    # alpha 0: the zero-shot head on the zero-shot model classifies as zero-shot does; alpha 1: the fine-tune.
    assert rows[0]["synthetic-classifier-top1"] == pytest.approx(zs_metrics["synthetic-zeroshot-top1"], abs=1e-6)
    assert {k: rows[-1][k] for k in ft_metrics} == pytest.approx(ft_metrics, abs=1e-6)
    assert [row["alpha"] for row in rows] == [0, 0.25, 0.5, 0.75, 1]


# -- issue 20, 10: extrapolated or overflowing alphas, and NaN weights, are refused rather than scored ---
def test_alphas_outside_0_1_are_refused_unless_asked_and_non_finite_weights_are_refused(checkpoints, tmp_path):
    ends = [f"zeroshot={checkpoints['zeroshot'][0]}", f"finetuned={checkpoints['finetuned'][0]}", *EVAL]
    for alphas in ("[-1,2]", "[1e30]"):
        with pytest.raises(ValueError, match=r"lie outside \[0, 1\].*extrapolate=true"):
            wise_ft(compose_wise_ft([*ends, f"alphas={alphas}"]), tmp_path / "a")
    # Asked for, -1 is evaluated; and weights that come out non-finite are refused, naming the alpha.
    rows = wise_ft(compose_wise_ft([*ends, "alphas=[-1]", "extrapolate=true"]), tmp_path / "c")
    assert [row["alpha"] for row in rows] == [-1]
    broken = torch.load(checkpoints["finetuned"][0], weights_only=True)
    key = next(k for k, v in broken["state_dict"].items() if v.is_floating_point())
    broken["state_dict"][key] = torch.full_like(broken["state_dict"][key], float("inf"))
    torch.save(broken, tmp_path / "inf.pt")
    ends[1] = f"finetuned={tmp_path / 'inf.pt'}"
    with pytest.raises(
        ValueError, match=rf"alphas: alpha=0.5: 1 weight tensor\(s\) hold NaN or infinite values \({key}\)"
    ):
        wise_ft(compose_wise_ft([*ends, "alphas=[0.5]"]), tmp_path / "b")


def test_evaluate_refuses_a_checkpoint_with_nan_weights_naming_it(checkpoints, tmp_path):
    from tests.helpers.configs import FAST_EVAL, compose_evaluate
    from vlhub.evaluate import evaluate

    saved = torch.load(checkpoints["zeroshot"][0], weights_only=True)
    saved["state_dict"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=rf"checkpoint={tmp_path / 'nan.pt'}: \d+ weight tensor\(s\) hold NaN"):
        evaluate(compose_evaluate([f"checkpoint={tmp_path / 'nan.pt'}", *FAST_EVAL]), tmp_path / "eval")
    assert not (tmp_path / "eval/results.json").exists()
