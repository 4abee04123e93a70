"""The real YAML composed with fast settings, and a training run through ``vlhub.train.train``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import vlhub.train  # (registers the run-folder resolvers)

REPO = Path(__file__).resolve().parents[2]
CONFIG_ROOT = REPO / "configs"
EXPERIMENTS_ROOT = REPO / "experiments"  # the experiment group's search-path root

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
FAST_EVAL = ["eval.synthetic.num_samples=60", "eval.batch_size=64", "eval.workers=0", "device=cpu"]

# A run that checkpoints every 3 steps with a flat lr: two halves resume into the straight run.
RESUME = ["optim.scheduler=constant", "checkpoint.every_n_steps=3", "eval=none", "checkpoint.keep=5"]
# A short run whose weights compare across strategies and rank counts (no eval, flat lr, one checkpoint).
COMPARABLE = [
    "eval=none",
    "optim.scheduler=constant",
    "optim.lr=1e-3",
    "trainer.max_steps=3",
    "checkpoint.every_n_steps=0",
]


def options(group: str) -> list[str]:
    """The YAML options of a config group, by file name."""
    root = EXPERIMENTS_ROOT if group == "experiment" else CONFIG_ROOT
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    return copy.deepcopy(_composed("train", tuple(overrides or [])))


def compose_evaluate(overrides: list[str]) -> DictConfig:
    return copy.deepcopy(_composed("evaluate", tuple(overrides)))


@functools.cache
def _composed(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """One Hydra compose per config and overrides for the session (a compose reads the YAML tree again:
    about 0.1 s, hundreds of times a run); callers get a deep copy, so the cached one stays as composed.
    The YAML does not change during a session; interpolations (``${oc.env:...}``, resolvers) stay unresolved."""
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def run_train(overrides: list[str], run_dir: Path, choices: dict[str, str] | None = None) -> dict[str, float]:
    """``vlhub.train.train`` on the FAST settings plus ``overrides`` (real data: eval=none unless given)."""
    other_eval = any(o.startswith("eval=") or (o.startswith("data=") and o != "data=synthetic") for o in overrides)
    fast = [o for o in FAST if not o.startswith("eval.synthetic")] if other_eval else FAST
    cfg = compose_train(fast + overrides)
    return vlhub.train.train(cfg, run_dir, choices or {"model": "tiny", "objective": "clip"})


def cache_config_files() -> None:
    """Hydra parses each YAML file again in every compose (a third of a compose's time, and the suite composes
    hundreds of times): keep what each file parsed to, by path, modification time and size, and hand out deep
    copies (Hydra edits the loaded config: it takes the defaults list out). Files that change are read again."""
    from dataclasses import replace

    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's plugin scan executes its config-source modules again: patch the class it keeps
    try:  # a private method: should a later Hydra move it, the tests compose uncached (slower, still right)
        from hydra._internal.core_plugins.importlib_resources_config_source import ImportlibResourcesConfigSource

        read, parsed = ImportlibResourcesConfigSource._read_config, {}
    except (ImportError, AttributeError):
        return

    def read_once(self, res):
        if not isinstance(res, Path):  # a zipped package: read as Hydra does
            return read(self, res)
        stat = res.stat()
        key = (str(res), stat.st_mtime_ns, stat.st_size)
        if key not in parsed:
            parsed[key] = read(self, res)
        result = parsed[key]
        return replace(result, config=copy.deepcopy(result.config), header=dict(result.header))

    ImportlibResourcesConfigSource._read_config = read_once
