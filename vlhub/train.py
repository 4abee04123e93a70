"""``python -m vlhub.train``: compose the config groups, build each component once, fit.

python -m vlhub.train model=vit_b32 objective=lit data=csv data.root=/data/pairs.csv
python -m vlhub.train -m optim.lr=1e-3,3e-4
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

import vlhub.config_help  # noqa: F401  (--help's list of config groups)
from vlhub.config_keys import build_at, naming_keys
from vlhub.config_resolvers import component_defaults
from vlhub.data.device_decode import decoding_on
from vlhub.engine.guard import StepGuard
from vlhub.engine.prepare import prepare
from vlhub.engine.trainer import Trainer
from vlhub.engine.trainer_config import TrainerConfig
from vlhub.errors import ConfigError
from vlhub.eval.during_training import Evaluation
from vlhub.eval.retrieval import PairValidationTask
from vlhub.launch import PlainKeys, check_config, check_device, errors_reported, overrides_checked
from vlhub.objectives import IncompatibleObjective, Objective
from vlhub.parallel.build import build_parallel
from vlhub.parallel.environment import DistInfo, get_dist_info, init_distributed
from vlhub.parallel.liveness import ranks_watched
from vlhub.parallel.strategy import ParallelStrategy
from vlhub.run.checkpoint import Checkpointer
from vlhub.run.loggers import MetricLogger, format_metrics_table
from vlhub.run.preemption import Preemption
from vlhub.run.secrets import mask_overrides, mask_secrets
from vlhub.run.session import CheckpointSettings, RunSession

log = logging.getLogger("vlhub.train")


def run_dir_for(name: str | None, stamp: str, kind: str = "run") -> str:
    """``runs/<name>`` when named (stable across requeues), else a dated folder."""
    if name:
        return f"runs/{name}"
    return f"runs/{stamp}" if kind == "run" else f"runs/multirun/{stamp}"


OmegaConf.register_new_resolver("vlhub_run_dir", lambda name, stamp: run_dir_for(name, stamp), replace=True)
OmegaConf.register_new_resolver(
    "vlhub_rank_suffix",
    lambda: "" if get_dist_info("cpu").rank == 0 else f"_rank{get_dist_info('cpu').rank}",
    replace=True,
)
OmegaConf.register_new_resolver("vlhub_sweep_dir", lambda name, stamp: run_dir_for(name, stamp, "sweep"), replace=True)


# The plain keys' types come from the code each node is handed to (vlhub.launch.check_config).
# trainer.* is typed by its schema (TrainerConfig), not here.
PLAIN_KEYS: PlainKeys = {
    "run": [(run_dir_for, "")],
    "checkpoint": [(CheckpointSettings, "")],
    "logger": [(MetricLogger, "")],
    "logger.wandb": [(MetricLogger, "wandb_")],
}


def limit_cpu_threads(device: torch.device, data_workers: int, local_world_size: int) -> None:
    """On CPU, leave a core to each data worker and each rank of this node: oversubscribed OpenMP
    threads spin against the workers and make steps several times slower. OMP_NUM_THREADS wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size - data_workers))


def config_of(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_objective(objective: Objective, source, model, views, choices: dict[str, str]) -> None:
    """Fit the objective to the data and model, or fail naming the config choices and why.
    ``views`` are the extra views' transforms (``augment_views``)."""
    try:
        if objective.strong_views > 1 and not views.random:
            raise IncompatibleObjective(
                "compares strongly augmented views of each image, and these augment_views make them identical "
                "(use augment_views=simclr or augment_views=clip)"
            )
        objective.apply_to_data(source)
        objective.apply_to_model(model)
    except IncompatibleObjective as error:
        groups = ("model", "data", "augment") + (("augment_views",) if objective.strong_views else ())
        names = ", ".join(f"{group}={choices.get(group, '?')}" for group in groups)
        raise IncompatibleObjective(f"objective={choices.get('objective', '?')} with {names}: {error}") from None
    objective.apply_init(model)  # a resumed run's checkpoint overwrites these


def train(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    overrides: list[str] | None = None,
    preemption: Preemption | None = None,
) -> dict[str, float]:
    """Build every component from ``cfg`` and train; returns the last evaluation's metrics.

    ``choices`` are the config groups' chosen options and ``overrides`` the job's command-line
    overrides; both are recorded with every result, so the jobs of a sweep can be told apart.
    ``preemption``, installed, stops the trainer at a step boundary on its signals (with a checkpoint).
    """
    # The run session owns the run folder (lock, identity, resume, remote copies); a launch that fails
    # before a training step leaves no folder behind when Hydra made it for this launch.
    with RunSession(run_dir) as run:
        trainer_config, dist_info, parallel = trainer_settings(cfg)  # bad values fail before the run folder
        config = mask_secrets(OmegaConf.to_container(cfg, resolve=True))  # stored and logged: no credentials
        # The run folder first: locked, its run and resume checkpoint decided, before anything is built.
        # A key this vlhub added (to the trainer, or to a component's signature: augment.decode), at its
        # default, is no change to a run whose stored config lacks it.
        defaults = {**component_defaults(config), "trainer": dataclasses.asdict(TrainerConfig())}
        start = run.open(CheckpointSettings(**cfg.checkpoint), config, dist_info, defaults)
        run_dir = run.run_dir  # rank 0's, on every rank
        if dist_info.is_main:
            log.info("run folder: %s", run_dir.resolve())
        if start.finished:
            log.warning(
                "the run in %s finished at step %d (trainer.max_steps=%d): nothing to do. To continue it, "
                "raise trainer.max_steps (e.g. trainer.max_steps=%d); the config that trained it stays in %s",
                run_dir,
                start.step,
                cfg.trainer.max_steps,
                2 * start.step,
                run_dir / "config.yaml",
            )
            return {}
        trainer = build_trainer(
            cfg, trainer_config, run_dir, choices, overrides, dist_info, parallel, run, config, preemption
        )
        run.track(lambda: trainer.state.step)
        # Log lines print above the progress bar; a rank that dies is named by the others, which stop.
        with logging_redirect_tqdm(), ranks_watched(dist_info):
            metrics = trainer.fit(run)
        run.finish()  # the final logs too; an error if the last checkpoint never reached checkpoint.remote
        if dist_info.is_main:
            if metrics:
                log.info("final metrics (step %d):\n%s", trainer.state.step, format_metrics_table(metrics))
            log.info("run folder: %s", run_dir.resolve())
        return metrics


def trainer_settings(cfg: DictConfig) -> tuple[TrainerConfig, DistInfo, ParallelStrategy]:
    """What every trainer built from ``cfg`` starts from (``train``, ``vlhub.check``): the config checked
    (each value's type, no ``???`` left; failing names the key), the trainer's keys for this number of
    ranks, this process's rank and device (in its process group), and how ranks share gradients."""
    check_config(cfg, PLAIN_KEYS)
    trainer_config: TrainerConfig = OmegaConf.to_object(cfg.trainer)  # type: ignore[assignment]
    check_device(trainer_config.device, "trainer.device")
    dist_info = get_dist_info(trainer_config.device)
    init_distributed(dist_info)  # more than one rank: join the group (once)
    trainer_config = trainer_config.per_rank(dist_info.world_size).check()
    return trainer_config, dist_info, build_parallel(trainer_config.strategy, dist_info, trainer_config.precision)


def build_trainer(
    cfg: DictConfig,
    config: TrainerConfig,
    run_dir: Path,
    choices: dict[str, str],
    overrides: list[str] | None,
    dist_info: DistInfo,
    parallel: ParallelStrategy,
    run: RunSession | Checkpointer,
    stored_config: dict[str, Any],
    preemption: Preemption | None = None,
) -> Trainer:
    """Every component from ``cfg`` (``config``: its trainer node, per rank), prepared; ``run``: what the
    trainer saves through (a plain Checkpointer for ``vlhub.check``), asked by the logger before it writes."""
    # Data and evaluation folders are checked first: bad input fails in seconds.
    source = build_at(cfg, "data")  # its errors name data.<param>
    evaluator = build_at(cfg, "eval")
    if source.val is not None:  # data.val: held-out pairs, scored with open_clip's in-batch metrics
        evaluator.add_task("val", PairValidationTask(source.val))
    if dist_info.is_main and not evaluator.tasks:  # real data picks eval=none: say how to add one
        log.info(
            "no evaluation: add held-out pairs (data.val={_target_:vlhub.data.CsvPairs,root:val.csv}) "
            "or a preset (eval=imagefolder eval.imagefolder.root=DIR; --help lists them)"
        )
    optim = build_at(cfg, "optim")
    limit_cpu_threads(dist_info.device, source.workers, dist_info.local_world_size)
    seed_everything(config.seed)  # the same initial weights on every rank
    model = build_at(cfg, "model")
    objective = build_at(cfg, "objective")
    global_batch = config.batch_size * dist_info.world_size
    if global_batch < objective.min_global_batch:
        raise ConfigError(
            f"trainer.batch_size={config.batch_size} x {dist_info.world_size} rank(s) is a global batch of "
            f"{global_batch}: objective={choices.get('objective', '?')} takes its negatives from the other samples "
            f"of the batch and needs at least {objective.min_global_batch} (raise trainer.batch_size)"
        )
    with naming_keys(cfg, "augment"):  # the base view: every image-text term's images
        transforms = instantiate(cfg.augment)(model.image_stats)
    with naming_keys(cfg, "augment_views"):  # the extra views of self-supervised terms
        views = instantiate(cfg.augment_views)(model.image_stats)
    with naming_keys(cfg, "objective"):
        prepare_objective(objective, source, model, views, choices)
    if transforms.device_decode and objective.image_views > 1:  # the strong views would decode on the CPU anyway
        raise ConfigError(
            f"augment.decode=cuda decodes the base view only: objective={choices.get('objective', '?')} also draws "
            f"{objective.strong_views} view(s) with augment_views={choices.get('augment_views', '?')}, decoded on "
            "the CPU; use augment.decode=cpu"
        )
    objective_kwargs = {k: v for k, v in config_of(cfg.objective).items() if k != "_target_"}
    torch.manual_seed(config.seed + 1_000_003 * dist_info.rank)  # per-rank dropout streams
    metric_logger = None
    if dist_info.is_main:
        metric_logger = MetricLogger(
            run_dir,
            tensorboard=cfg.logger.tensorboard,
            wandb_enabled=cfg.logger.wandb.enabled,
            wandb_project=cfg.logger.wandb.project,
            wandb_mode=cfg.logger.wandb.mode,
            run_name=cfg.run.name,
            config=stored_config,
            before_write=run.before_write,  # stops once another launch took the run's lock over
        )
    # This rank's batches from a given step on: what the trainer needs to know of the data.
    # The source builds its own loader (map-style slots or a shard stream).
    make_loader = partial(
        source.build_loader,
        transforms.train,
        model.tokenizer if objective.needs_text else None,
        config.batch_size,
        config.seed,
        image_views=objective.image_views,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pin_memory=dist_info.device.type == "cuda",
        view_transform=views.train,
    )
    if transforms.device_decode:  # augment.decode=cuda: the JPEGs of each batch decode here, on the device
        make_loader = decoding_on(make_loader, dist_info.device)
    guard = StepGuard(
        source.max_bad_fraction, source.bad_fraction_min_samples, source.max_empty_batches, config.max_nonfinite_steps
    )
    run_info = {
        "objective": choices.get("objective", "?"),
        "model": choices.get("model", "?"),
        "overrides": mask_overrides(list(overrides or [])),
    }
    return Trainer(
        prepare(model, objective, optim, config, dist_info, parallel),  # device, broadcast, compile, wrap, optimizer
        config,
        make_loader,
        evaluation=Evaluation(evaluator, transforms.eval, run_dir / "eval"),
        guard=guard,
        metric_logger=metric_logger,
        run_info=run_info,
        checkpoint_extras={"objective_spec": objective.spec(objective_kwargs), "config": stored_config},
        preemption=preemption,  # the trainer polls it at every step
    )


# An unquoted brace pattern in data.root, a trainer value of a wrong type: one line naming it, before Hydra's error.
@overrides_checked({"trainer": TrainerConfig})
@hydra.main(config_path="pkg://vlhub.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    # SLURM's warning signals (submitit's, or USR1/TERM) stop training at a step boundary with a checkpoint.
    preemption = Preemption.from_environment(get_dist_info("cpu").rank)
    with preemption, errors_reported():  # an expected mistake: one line and a hint, no traceback
        run_dir, choices, overrides = Path(hydra_cfg.runtime.output_dir), hydra_cfg.runtime.choices, hydra_cfg.overrides
        metrics = train(cfg, run_dir, dict(choices), list(overrides.task), preemption)
    preemption.finish()  # stopped on a signal: requeue (or let submitit) and exit; else nothing
    # The sweeper's return value: the first zero-shot top-1, when there is one.
    return next((v for k, v in metrics.items() if k.endswith("zeroshot-top1")), None)


if __name__ == "__main__":
    main()
