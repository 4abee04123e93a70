"""Shared test set-up: one torch thread, offline, fp32, tiny configs composed from the real YAML."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import vlhub.train  # noqa: E402,F401  (registers the run-folder resolvers)

torch.set_num_threads(1)

# A fast version of the default run: small batches, few eval images, no background workers.
FAST = [
    "trainer.batch_size=8",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "data.workers=0",
    "eval.synthetic.num_samples=60",
    "eval.batch_size=64",
    "eval.workers=0",
    "optim.warmup_steps=1",
    "logger.tensorboard=false",
]


def free_port() -> int:
    """A TCP port free on this host now (for a test's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over the tensors of ``b``'s keys taken as one vector (in fp64)."""
    diff = torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b))
    return (diff / torch.sqrt(sum((b[k].double() ** 2).sum() for k in b))).item()


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


def run_train(overrides: list[str], run_dir: Path, choices: dict[str, str] | None = None) -> dict[str, float]:
    other_eval = any(o.startswith("eval=") or (o.startswith("data=") and o != "data=synthetic") for o in overrides)
    fast = [o for o in FAST if not o.startswith("eval.synthetic")] if other_eval else FAST  # real data: eval=none
    cfg = compose_train(fast + overrides)
    return vlhub.train.train(cfg, run_dir, choices or {"model": "tiny", "objective": "clip"})


def micro_model():
    """The tiny default model, built directly (no Hydra)."""
    from vlhub.models import build_open_clip_model

    cfg = compose_train()
    return build_open_clip_model(config=dict(cfg.model.config))


def timm_bn_model():
    """A two-tower model whose image tower is a tiny timm ResNet (BatchNorm, layer groups)."""
    from vlhub.models import build_open_clip_model

    torch.manual_seed(0)
    return build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        timm_backbone="test_resnet",
    )


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return micro_model()


def objective_batch(model, objective, size: int = 8, seed: int = 0):
    """A real training batch for ``objective`` (its views, text and labels) from the synthetic shapes,
    images normalised with the model's statistics (what ``represent`` sees)."""
    from vlhub.augment import build_clip_transforms, build_simclr_transforms
    from vlhub.data import SyntheticShapes, build_train_loader
    from vlhub.data.batch import move_batch

    transforms = build_clip_transforms(model.image_stats)
    views = build_simclr_transforms(model.image_stats)  # the defaults: augment=clip, augment_views=simclr
    tokenizer = model.tokenizer if objective.needs_text else None
    loader = build_train_loader(
        SyntheticShapes(num_samples=256),
        transforms.train,
        tokenizer,
        size,
        seed,
        image_views=objective.image_views,
        view_transform=views.train,
    )
    stats = model.image_stats
    return move_batch(next(iter(loader)).batch, torch.device("cpu"), None, stats.mean, stats.std)


# Heads narrowed for the micro model unless a test says otherwise: SLIP's paper projector (4,096 wide,
# 18M parameters against the micro image tower's 0.25M) costs seconds in every test it enters and
# checks nothing its 64-wide twin of the same depth does not (its widths: test_objective_parity.py).
TEST_HEADS = {"slip": {"ssl_hidden_dim": 64}}


def prepared_objective(name: str, **kwargs):
    """(micro model, objective ``name`` fitted to the synthetic data and that model), seeded."""
    from vlhub.data import SyntheticShapes
    from vlhub.registry import OBJECTIVES

    torch.manual_seed(0)
    model, objective = micro_model(), OBJECTIVES.build(name, **{**TEST_HEADS.get(name, {}), **kwargs})
    objective.apply_to_data(SyntheticShapes(num_samples=8))
    objective.apply_to_model(model)
    objective.apply_init(model)
    return model, objective
