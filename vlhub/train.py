"""``python -m vlhub.train``: compose the config groups, build each component once, fit.

python -m vlhub.train model=vit_b32 objective=lit data=csv data.root=/data/pairs.csv
python -m vlhub.train -m optim.lr=1e-3,3e-4
"""

from __future__ import annotations

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
from vlhub.data import BadSampleMonitor
from vlhub.engine.step import GradientStrategy
from vlhub.engine.trainer import Trainer, build_gradient_strategy
from vlhub.errors import ConfigError
from vlhub.eval.retrieval import PairValidationTask
from vlhub.launch import PlainKeys, check_config, check_device, errors_reported, shard_overrides_checked
from vlhub.objectives import IncompatibleObjective, Objective
from vlhub.parallel.build import build_parallel
from vlhub.parallel.collectives import broadcast_object
from vlhub.parallel.environment import DistInfo, get_dist_info, init_distributed
from vlhub.parallel.liveness import ranks_watched
from vlhub.parallel.strategy import ParallelStrategy
from vlhub.run.checkpoint import Checkpointer
from vlhub.run.folder import holds_only_launch_files, open_run, remove_failed_launch
from vlhub.run.loggers import MetricLogger, format_metrics_table
from vlhub.run.preemption import Preemption
from vlhub.run.remote import open_remote
from vlhub.run.secrets import mask_overrides, mask_secrets, scrub_hydra_files

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
PLAIN_KEYS: PlainKeys = {
    "run": [(run_dir_for, "")],
    "trainer": [(Trainer, ""), (get_dist_info, ""), (build_parallel, "")],
    "trainer.grad_cache": [(build_gradient_strategy, "")],
    "checkpoint": [(Checkpointer, "")],
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
    # A launch that fails before a training step leaves no run folder behind when Hydra made it for
    # this launch (removed under the run's lock: a launch that lost the folder to another removes nothing).
    main, created = get_dist_info("cpu").is_main, holds_only_launch_files(run_dir)
    if main:
        scrub_hydra_files(run_dir)  # Hydra wrote the overrides before vlhub ran: no credentials there
    start, trainer, remote, stale_after_s = None, None, None, float(cfg.checkpoint.get("lock_stale_after_s", 120))
    try:
        check_config(cfg, PLAIN_KEYS)  # every value's type, and no ??? left: fails naming the key
        settings: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
        check_device(settings["device"], "trainer.device")
        dist_info = get_dist_info(settings.pop("device"))
        init_distributed(dist_info)
        run_dir = broadcast_object(run_dir)  # every rank writes under rank 0's run folder
        if dist_info.is_main:
            log.info("run folder: %s", run_dir.resolve())
        config = mask_secrets(OmegaConf.to_container(cfg, resolve=True))  # stored and logged: no credentials
        # The run folder first: locked, its run and resume checkpoint decided, before anything is built.
        gradients = build_gradient_strategy(settings["batch_size"], **settings.pop("grad_cache"))
        parallel = build_parallel(settings.pop("strategy"), dist_info, settings["precision"])
        checkpointer = Checkpointer(run_dir / "checkpoints", **cfg.checkpoint)
        remote = open_remote(checkpointer, run_dir) if dist_info.is_main else None  # probes checkpoint.remote
        start = open_run(run_dir, checkpointer, config, dist_info, remote.before_decide if remote else None)
        if remote is not None:
            remote.run_id, checkpointer.after_save = start.run_id, remote.submit
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
            cfg, run_dir, choices, overrides, settings, dist_info, gradients, parallel, checkpointer, config, preemption
        )
        # Log lines print above the progress bar; a rank that dies is named by the others, which stop.
        with logging_redirect_tqdm(), ranks_watched(dist_info):
            metrics = trainer.fit()
        if remote is not None:  # the final logs too; an error if the last checkpoint never got there
            remote.finish(trainer.step)
        if dist_info.is_main:
            if metrics:
                log.info("final metrics (step %d):\n%s", trainer.step, format_metrics_table(metrics))
            log.info("run folder: %s", run_dir.resolve())
        return metrics
    except BaseException:
        trained = trainer is not None and trainer.step > 0
        if main and (start is None or start.step == 0) and not trained:
            remove_failed_launch(run_dir, created, start.lock if start else None, stale_after_s)
        raise
    finally:
        if remote is not None:
            remote.abandon()
        if start is not None:
            start.close()


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    overrides: list[str] | None,
    settings: dict[str, Any],
    dist_info: DistInfo,
    gradients: GradientStrategy,
    parallel: ParallelStrategy,
    checkpointer: Checkpointer,
    config: dict[str, Any],
    preemption: Preemption | None = None,
) -> Trainer:
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
    seed_everything(cfg.trainer.seed)  # the same initial weights on every rank
    model = build_at(cfg, "model")
    objective = build_at(cfg, "objective")
    global_batch = settings["batch_size"] * dist_info.world_size
    if 0 < global_batch < objective.min_global_batch:  # (<= 0: the trainer names the key)
        raise ConfigError(
            f"trainer.batch_size={settings['batch_size']} x {dist_info.world_size} rank(s) is a global batch of "
            f"{global_batch}: objective={choices.get('objective', '?')} takes its negatives from the other samples "
            f"of the batch and needs at least {objective.min_global_batch} (raise trainer.batch_size)"
        )
    with naming_keys(cfg, "augment"):  # the base view: every image-text term's images
        transforms = instantiate(cfg.augment)(model.image_stats)
    with naming_keys(cfg, "augment_views"):  # the extra views of self-supervised terms
        views = instantiate(cfg.augment_views)(model.image_stats)
    with naming_keys(cfg, "objective"):
        prepare_objective(objective, source, model, views, choices)
    objective_kwargs = {k: v for k, v in config_of(cfg.objective).items() if k != "_target_"}
    torch.manual_seed(cfg.trainer.seed + 1_000_003 * dist_info.rank)  # per-rank dropout streams
    metric_logger = None
    if dist_info.is_main:
        metric_logger = MetricLogger(
            run_dir,
            tensorboard=cfg.logger.tensorboard,
            wandb_enabled=cfg.logger.wandb.enabled,
            wandb_project=cfg.logger.wandb.project,
            wandb_mode=cfg.logger.wandb.mode,
            run_name=cfg.run.name,
            config=config,
            before_write=checkpointer.before_write,  # stops once another launch took the run's lock over
        )
    # This rank's batches from a given step on: what the trainer needs to know of the data.
    # The source builds its own loader (map-style slots or a shard stream).
    make_loader = partial(
        source.build_loader,
        transforms.train,
        model.tokenizer if objective.needs_text else None,
        settings["batch_size"],
        settings["seed"],
        image_views=objective.image_views,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pin_memory=dist_info.device.type == "cuda",
        view_transform=views.train,
    )
    return Trainer(
        model,
        objective,
        make_loader,
        transforms.eval,
        optim,
        evaluator,
        checkpointer,
        metric_logger,
        dist_info,
        run_dir,
        **settings,
        gradients=gradients,
        parallel=parallel,
        bad_samples=BadSampleMonitor(
            source.max_bad_fraction, source.bad_fraction_min_samples, source.max_empty_batches
        ),
        run_info={
            "objective": choices.get("objective", "?"),
            "model": choices.get("model", "?"),
            "overrides": mask_overrides(list(overrides or [])),
        },
        objective_spec=objective.spec(objective_kwargs),
        config=config,
        preemption=preemption,  # the trainer polls it at every step
    )


@shard_overrides_checked  # an unquoted brace pattern in data.root: one line naming it, before Hydra's parse error
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
