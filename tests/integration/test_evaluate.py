"""``python -m vlhub.evaluate``: checkpoints in, results.json and report.md out, numbers as computed directly."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from tests.helpers.cli import run_module
from tests.helpers.configs import FAST_EVAL, compose_evaluate, run_train
from tests.helpers.eval_folders import write_karpathy_set
from tests.helpers.models import micro_model
from vlhub.augment import build_plain_transforms
from vlhub.eval import SyntheticZeroShot
from vlhub.eval.retrieval import RetrievalTask, encode_texts, retrieval_recall
from vlhub.eval.tasks import EvalContext
from vlhub.evaluate import evaluate, render_report


@pytest.fixture
def checkpoint(trained_checkpoint):
    return trained_checkpoint  # one 2-step run for the session (conftest.py)


def _reference_model(path):
    """The checkpoint's weights loaded into a freshly built tiny model, without vlhub.api."""
    model = micro_model()
    model.load_open_clip_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model.eval()


def _reference_zero_shot(path):
    model = _reference_model(path)
    context = EvalContext("synthetic", build_plain_transforms(model.image_stats).eval, torch.device("cpu"), 64)
    with torch.no_grad():
        return SyntheticZeroShot(num_samples=60, image_size=32).run(model, context)


def test_vlhub_checkpoint_in_process_matches_a_direct_evaluation(checkpoint, tmp_path):
    cfg = compose_evaluate([f"checkpoint={checkpoint}", *FAST_EVAL])
    record = evaluate(cfg, tmp_path, model_given=False)
    expected = _reference_zero_shot(checkpoint)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value), key
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert (saved["step"], saved["epoch"], saved["objective"], saved["model"]) == (2, 0, "clip", "tiny")
    report = (tmp_path / "report.md").read_text()
    assert f"| zeroshot-top1 | {expected['synthetic-zeroshot-top1']:.4f} |" in report


def test_plain_open_clip_checkpoint_needs_model_and_gives_the_same_numbers(checkpoint, tmp_path):
    plain = tmp_path / "open_clip.pt"
    torch.save({"epoch": 1, "state_dict": torch.load(checkpoint, weights_only=True)["state_dict"]}, plain)
    cfg = compose_evaluate([f"checkpoint={plain}", "model=tiny", *FAST_EVAL])
    with pytest.raises(ValueError, match="plain open_clip checkpoint .* model="):
        evaluate(cfg, tmp_path / "no_model", model_given=False)
    record = evaluate(cfg, tmp_path / "with_model", model_given=True)
    expected = _reference_zero_shot(checkpoint)
    assert record["synthetic-zeroshot-top1"] == pytest.approx(expected["synthetic-zeroshot-top1"])
    assert record["step"] is None and record["model"] == "?"


def test_a_missing_retrieval_root_fails_before_loading_the_model(tmp_path):
    cfg = compose_evaluate(["checkpoint=/nonexistent/ckpt.pt", "eval=retrieval", f"eval.retrieval.root={tmp_path}/x"])
    with pytest.raises(Exception, match="eval.retrieval.root=.*no such folder"):  # Hydra wraps the error
        evaluate(cfg, tmp_path / "run")


def test_default_run_folder_is_dated_under_runs():
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="evaluate", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("runs/evaluate/20")


def test_report_links_the_files_tasks_wrote(tmp_path):
    (tmp_path / "eval" / "imagenet").mkdir(parents=True)
    (tmp_path / "eval" / "imagenet" / "confusion_matrix.png").write_bytes(b"png")
    (tmp_path / "eval" / "imagenet" / "per_class.csv").write_text("class,accuracy\n")
    record = {"step": 3, "imagenet-zeroshot-top1": 0.5, "imagenet_v2-zeroshot-top1": 0.25, "imagenet-x-rank": 12.5}
    report = render_report(record, ["imagenet", "imagenet_v2"], tmp_path)
    imagenet, v2 = report.split("## imagenet\n")[1].split("## imagenet_v2\n")
    assert "| zeroshot-top1 | 0.5000 |" in imagenet and "| x-rank | 12.50 |" in imagenet
    assert "| zeroshot-top1 | 0.2500 |" in v2 and "0.2500" not in imagenet
    assert "![confusion_matrix.png](eval/imagenet/confusion_matrix.png)" in imagenet
    assert "[per_class.csv](eval/imagenet/per_class.csv)" in imagenet


def _run_cli(args, run_dir):
    """``python -m vlhub.evaluate ARGS`` as runpy runs it, in this process (the same command from a fresh process,
    installed from the wheel: tests/integration/test_runs.py)."""
    assert run_module("vlhub.evaluate", [*args, f"hydra.run.dir={run_dir}"]) in (0, None)
    return json.loads((run_dir / "results.json").read_text()), (run_dir / "report.md").read_text()


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs vlhub.evaluate
def test_cli_synthetic_writes_results_and_report(checkpoint, tmp_path):
    results, report = _run_cli(["model=tiny", f"checkpoint={checkpoint}", "eval=synthetic", *FAST_EVAL], tmp_path)
    expected = _reference_zero_shot(checkpoint)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value), key
    assert "## synthetic" in report and "| zeroshot-mean_per_class_recall |" in report


def test_retrieval_matches_brute_force_on_the_models_features(checkpoint, tmp_path):
    # In process, as the CLI calls it (model=tiny given); the CLI's own launch: test_cli_synthetic_writes_...
    root = write_karpathy_set(tmp_path / "coco", num_test=10, image_size=32)
    overrides = [
        "model=tiny",
        f"checkpoint={checkpoint}",
        "eval=retrieval",
        f"eval.retrieval.root={root}",
        "device=cpu",
    ]
    evaluate(compose_evaluate(overrides), tmp_path / "run", True, "tiny")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()
    model = _reference_model(checkpoint)
    task = RetrievalTask(str(root))
    transform = build_plain_transforms(model.image_stats).eval
    from vlhub.data.files import read_image

    with torch.no_grad():
        images = model.encode_image(torch.stack([transform(read_image(p)) for p in task.image_paths]))
    texts = encode_texts(model, [c for captions in task.captions for c in captions], torch.device("cpu"), 64)
    owners = torch.arange(10).repeat_interleave(5)
    scores = texts @ images.T
    for k in (1, 5, 10):
        by_text = (scores.topk(k, dim=1).indices == owners[:, None]).any(1).float().mean().item()
        by_image = torch.stack([(owners[scores[:, i].topk(k).indices] == i).any() for i in range(10)]).float().mean()
        assert results[f"retrieval-image_retrieval_recall@{k}"] == pytest.approx(by_text)
        assert results[f"retrieval-text_retrieval_recall@{k}"] == pytest.approx(by_image.item())
    assert results["retrieval-image_retrieval_recall@10"] == 1.0  # only 10 images: every caption finds its own
    assert retrieval_recall(texts, images, owners)["image_retrieval_recall@1"] == pytest.approx(
        results["retrieval-image_retrieval_recall@1"]
    )
    assert "## retrieval" in report and "| image_retrieval_recall@5 |" in report


def test_retrieval_linear_probe_and_val_pairs_presets_compose_and_build(tmp_path):
    from hydra.utils import instantiate

    from tests.helpers.configs import compose_train
    from vlhub.config_keys import build_at
    from vlhub.eval.linear_probe import LinearProbeTask
    from vlhub.eval.retrieval import PairValidationTask

    root = write_karpathy_set(tmp_path, num_test=3, num_train=1)
    built = instantiate(compose_train(["eval=retrieval", f"eval.retrieval.root={root}"]).eval)
    assert list(built.tasks) == ["retrieval"] and len(built.tasks["retrieval"].image_paths) == 3
    probe = [
        "eval=linear_probe",
        "eval.synthetic.train.num_samples=8",
        "eval.synthetic.k=3",
        "eval.synthetic.C=[0.1,1]",
    ]
    built = instantiate(compose_train(probe).eval)
    task = built.tasks["synthetic"]
    assert isinstance(task, LinearProbeTask) and len(task.train) == 8
    assert task.settings.k == 3 and list(task.settings.C) == [0.1, 1]
    built = instantiate(compose_train(["eval=val_pairs", "eval.val_pairs.max_samples=5"]).eval)
    assert isinstance(built.tasks["val_pairs"], PairValidationTask) and built.tasks["val_pairs"].count == 5
    with pytest.raises(Exception, match="eval.retrieval.root=null: not set"):
        build_at(compose_train(["eval=retrieval"]), "eval")  # as the commands build it


def test_model_given_differing_only_in_where_weights_came_from_is_not_reported(caplog):
    from omegaconf import OmegaConf

    from vlhub.evaluate import _model_config

    stored = {"_target_": "m", "embed_dim": 8, "timm_pretrained": True, "pretrained": "tag"}
    checkpoint = {"config": {"model": stored}}
    same = OmegaConf.create({"checkpoint": "c.pt", "model": {**stored, "timm_pretrained": False, "pretrained": None}})
    other = OmegaConf.create({"checkpoint": "c.pt", "model": {**stored, "embed_dim": 16}})
    with caplog.at_level("WARNING", logger="vlhub.evaluate"):
        assert _model_config(same, checkpoint, True, "timm") is None  # the stored config is used
        assert "differs" not in caplog.text
        _model_config(other, checkpoint, True, "timm")
    assert "differs from the model stored" in caplog.text


def test_an_evaluation_where_every_task_skips_itself_is_an_error_not_a_silent_success(tmp_path):
    from PIL import Image

    from vlhub.errors import ConfigError
    from vlhub.evaluate import evaluate

    run_train(["objective=ce", "eval=none"], tmp_path / "ce")  # a classifier of the 30 synthetic classes
    folder = tmp_path / "other"
    for name in ("cat", "dog"):  # classes it was never trained on: its scoring skips the task
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), "red" if name == "cat" else "blue").save(folder / name / "0.png")
    cfg = compose_evaluate(
        [f"checkpoint={tmp_path / 'ce/checkpoints/latest.pt'}", "eval=imagefolder", f"eval.imagefolder.root={folder}"]
    )
    with pytest.raises(ConfigError, match="none of imagefolder produced a metric"):
        evaluate(cfg, tmp_path / "eval")
    assert (tmp_path / "eval/results.json").is_file()  # the record is still written
