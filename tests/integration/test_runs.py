"""Run folders, loggers and pretrained weights: what a run leaves behind."""

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.helpers.configs import FAST_EVAL, compose_train, run_train
from vlhub.models import build_open_clip_model


def _run_dir(overrides):
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.run, resolve=False), cfg


def test_a_named_run_has_a_stable_folder_and_an_unnamed_one_a_dated_one():
    from vlhub.train import run_dir_for

    assert run_dir_for("my_run", "2026-01-01_00-00-00") == "runs/my_run"
    assert run_dir_for(None, "2026-01-01_00-00-00") == "runs/2026-01-01_00-00-00"
    assert run_dir_for(None, "stamp", kind="sweep") == "runs/multirun/stamp"
    _, cfg = _run_dir(["run.name=my_run"])
    assert OmegaConf.select(cfg, "hydra.run.dir") == "runs/my_run"


def test_tensorboard_gets_the_training_scalars(tmp_path):
    run_train(["logger.tensorboard=true", "eval=none"], tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/logit_scale", "train/samples_per_second", "data/bad_samples"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.slow
def test_wandb_offline_mode_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_train(["logger.wandb.enabled=true", "logger.wandb.mode=offline", "eval=none"], tmp_path)
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))


def test_pretrained_accepts_a_local_vlhub_checkpoint(trained_checkpoint, tmp_path):
    saved = torch.load(trained_checkpoint, weights_only=True)["state_dict"]
    config = dict(compose_train().model.config)
    loaded = build_open_clip_model(config=config, pretrained=str(trained_checkpoint))
    for key, value in loaded.open_clip_state_dict().items():
        assert torch.equal(value, saved[key].reshape(value.shape)), key
    with pytest.raises(FileNotFoundError, match="neither a file nor an open_clip tag"):
        build_open_clip_model(config=config, pretrained=str(tmp_path / "missing.pt"))


def test_a_chunk_size_that_does_not_divide_the_batch_fails_at_launch(tmp_path):
    with pytest.raises(ValueError, match="chunk_size=3 must be a positive divisor of trainer.batch_size=8"):
        run_train(["trainer.grad_cache.enabled=true", "trainer.grad_cache.chunk_size=3"], tmp_path)


def test_a_resumed_run_may_raise_max_steps_and_follows_the_new_schedule(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cosine = ["eval=none", "optim.warmup_steps=0", "logger.tensorboard=true", "checkpoint.every_n_steps=0"]
    run_train([*cosine, "trainer.max_steps=2"], tmp_path)
    run_train([*cosine, "trainer.max_steps=8"], tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    assert checkpoint["step"] == 8 and checkpoint["scheduler"]["last_epoch"] == 8
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    # Step 3 (the first resumed step) already uses the 8-step cosine; lr is logged after the update.
    import math

    lr = compose_train().optim.lr
    assert logged[3] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 3 / 8)), rel=1e-5)


def test_experiment_presets_compose_and_the_smoke_preset_trains(tmp_path):
    heavy = compose_train(["+experiment=vit_b32_gradcache"])
    assert heavy.model.arch == "ViT-B-32" and heavy.trainer.grad_cache.chunk_size == 256
    assert {"imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"} <= set(heavy.eval)
    from vlhub.train import train

    cfg = compose_train(["+experiment=smoke", "trainer.max_steps=2", "data.workers=0", "logger.tensorboard=false"])
    assert cfg.trainer.batch_size == 32
    metrics = train(cfg, tmp_path, {"model": "tiny", "objective": "clip"})
    assert set(metrics) >= {"synthetic-zeroshot-top1"}


# The wheel's commands in one fresh process started from it (each process costs an import of torch and
# open_clip): where vlhub.configs and vlhub.experiments come from, then each `python -m MODULE ARGS` (a JSON
# list in argv[1]) as runpy runs it, evaluate first, while nothing of vlhub.train is imported yet.
WHEEL_COMMANDS = """
import json, runpy, sys
import vlhub.configs, vlhub.experiments
from hydra.core.global_hydra import GlobalHydra
print("configs from", vlhub.configs.__file__, flush=True)
print("presets from", vlhub.experiments.__file__, flush=True)
for module, args in json.loads(sys.argv[1]):
    print("=== python -m", module, *args, flush=True)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    GlobalHydra.instance().clear()
"""


@pytest.mark.slow
def test_configs_are_found_from_a_built_wheel_and_its_commands_run(tmp_path, trained_checkpoint):
    import json
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    import zipfile
    from pathlib import Path

    pytest.importorskip("setuptools")
    repo, source = Path(__file__).resolve().parents[2], tmp_path / "source"
    # Built from a copy of what the wheel is made of: a build/ folder left in the checkout by an earlier
    # build would otherwise go into the wheel (a package dropped from pyproject.toml would still ship).
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(repo / name, source / name)
    for name in ("vlhub", "configs", "experiments"):
        shutil.copytree(repo / name, source / name, symlinks=True, ignore=skip)
    env = {**os.environ, "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
        check=True,
        env=env,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("vlhub-*.whl"))
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip install --target puts there, without a pip process
    # The wheel's vlhub first on the path; its dependencies from this environment.
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    evaluation = [f"checkpoint={trained_checkpoint}", *FAST_EVAL, f"hydra.run.dir={tmp_path / 'evaluation'}"]
    commands = [
        ("vlhub.evaluate", evaluation),
        ("vlhub.train", ["--cfg", "job", "model=vit_b32", "eval=imagenet"]),
        ("vlhub.train", ["--cfg", "job", "+experiment=openclip_vit_b32_laion400m"]),
    ]
    command = [sys.executable, "-c", WHEEL_COMMANDS, json.dumps(commands)]
    ran = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    where, evaluated, job, preset = ran.stdout.split("=== python -m")
    package = target / "vlhub"
    expected = f"configs from {package / 'configs/__init__.py'}\npresets from {package / 'experiments/__init__.py'}"
    assert where.strip() == expected, ran.stderr[-2000:]
    # vlhub.evaluate from a fresh process (the numbers against a reference: tests/integration/test_evaluate.py).
    record = json.loads((tmp_path / "evaluation/results.json").read_text())
    assert record["step"] == 2 and 0.0 <= record["synthetic-zeroshot-top1"] <= 1.0
    assert "## synthetic" in (tmp_path / "evaluation/report.md").read_text()
    assert "ViT-B-32" in job and "ImageNetZeroShot" in job
    # The presets ship too (vlhub.experiments on configs/train.yaml's search path): +experiment=NAME.
    assert "batch_size: 32768" in preset and "lr: 0.0005" in preset


def test_bad_data_or_eval_folders_fail_before_the_model_is_built(tmp_path, monkeypatch):
    import vlhub.models.open_clip_models as builders

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(builders.open_clip, "CustomTextCLIP", never)
    with pytest.raises(Exception, match="data.root=.*no such CSV file"):
        run_train(["data=csv", f"data.root={tmp_path / 'missing.csv'}"], tmp_path)
    with pytest.raises(Exception, match="eval.imagefolder.root"):
        run_train(["eval=imagefolder"], tmp_path)


def test_sweep_jobs_of_one_named_run_get_distinct_stable_wandb_ids(tmp_path):
    from vlhub.run.loggers import wandb_run_id

    first, second = wandb_run_id(tmp_path / "runs/name/0"), wandb_run_id(tmp_path / "runs/name/1")
    assert first != second and first == wandb_run_id(tmp_path / "runs/name/0")
    assert len(first) <= 64 and "/" not in first


def test_data_val_pairs_are_scored_with_in_batch_metrics(tmp_path):
    import json

    from vlhub.data import SyntheticShapes

    train_csv = SyntheticShapes(num_samples=16).write_csv(tmp_path / "train")
    val_csv = SyntheticShapes(num_samples=12, split="val").write_csv(tmp_path / "val")
    val_node = f"data.val={{_target_:vlhub.data.CsvPairs,root:'{val_csv}'}}"
    synthetic_eval = ["eval=synthetic", "eval.synthetic.num_samples=60"]
    run_train(["data=csv", f"data.root={train_csv}", "data.workers=0", val_node, *synthetic_eval], tmp_path / "run")
    record = json.loads((tmp_path / "run/results.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["val-image_to_text_R@1"] <= 1.0 and record["val-text_to_image_mean_rank"] >= 1.0
    assert "synthetic-zeroshot-top1" in record  # an eval group's own tasks still run beside data.val
    with pytest.raises(Exception, match="no such CSV file"):
        run_train(
            ["data=csv", f"data.root={train_csv}", "data.val={_target_:vlhub.data.CsvPairs,root:/nope.csv}"],
            tmp_path / "bad",
        )
