"""The trainer: restore, then loop over steps; log, evaluate and checkpoint around each."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vlhub.data.batch import BadSampleMonitor, LoadedBatch, batch_size_of
from vlhub.engine.compile import CompiledTowers
from vlhub.engine.flops import count_flops
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.prefetch import prefetch
from vlhub.engine.step import GradientStrategy, PlainGradients, train_step
from vlhub.objectives.base import Objective
from vlhub.optim import OptimRecipe
from vlhub.parallel.collectives import all_gather_object, all_reduce_sum, barrier, broadcast_module_
from vlhub.parallel.environment import DistInfo
from vlhub.parallel.sharded_checkpoint import MARKER as SHARDED
from vlhub.parallel.sharded_checkpoint import load_sharded_, state_root
from vlhub.parallel.strategy import ParallelStrategy
from vlhub.run.checkpoint import Checkpointer, capture_rng_state, restore_rng_state, weights_from
from vlhub.run.loggers import MetricLogger
from vlhub.run.preemption import Preemption, WaitInterrupted

log = logging.getLogger(__name__)


def build_gradient_strategy(batch_size: int, enabled: bool, chunk_size: int | None) -> GradientStrategy:
    """Plain backward, or the gradient cache when ``trainer.grad_cache.enabled``."""
    if not enabled:
        return PlainGradients()
    if chunk_size is None or chunk_size <= 0 or batch_size % chunk_size:
        raise ValueError(
            f"trainer.grad_cache.chunk_size={chunk_size} must be a positive divisor of "
            f"trainer.batch_size={batch_size} (both per rank)"
        )
    return GradCache(chunk_size, chunks_per_step=batch_size // chunk_size)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        make_loader: Callable[[int], Iterable[LoadedBatch]],
        eval_transform: Callable[[Any], torch.Tensor],
        optim: OptimRecipe,
        evaluator: Any,
        checkpointer: Checkpointer,
        metric_logger: MetricLogger | None,
        dist_info: DistInfo,
        run_dir: Path,
        *,
        max_steps: int,
        batch_size: int,
        precision: str,
        grad_clip_norm: float | None,
        seed: int,
        log_every_n_steps: int,
        gradients: GradientStrategy,
        parallel: ParallelStrategy,
        max_nonfinite_steps: int,
        bad_samples: BadSampleMonitor,
        run_info: dict[str, Any],
        objective_spec: dict[str, Any],
        config: dict[str, Any],
        compile: bool,
        compile_strict: bool,
        preemption: Preemption | None = None,
    ) -> None:
        for name, value in (
            ("max_steps", max_steps),
            ("batch_size", batch_size),
            ("log_every_n_steps", log_every_n_steps),
            ("max_nonfinite_steps", max_nonfinite_steps),
        ):
            if value <= 0:
                raise ValueError(f"trainer.{name} must be > 0, got {value}")
        self.dist, self.run_dir = dist_info, run_dir
        self.gradients = gradients
        self.precision = Precision(precision, dist_info.device)
        self.model = model.to(dist_info.device, dtype=self.precision.param_dtype)
        self.objective = objective.to(dist_info.device, dtype=self.precision.param_dtype)
        broadcast_module_(self.model)  # data parallel: the same start on every rank
        broadcast_module_(self.objective)
        # Compile, then wrap (torch's order). Compiling is lazy and in place (vlhub/engine/compile.py);
        # the strategy says what to compile: each tower, or under FSDP each block before it is sharded.
        self.parallel = parallel
        self.compiled = CompiledTowers(parallel.compile_targets(self.model), compile_strict) if compile else None
        # Data-parallel wrapping (DDP, FSDP2) happens here and only here: on the device, after the
        # broadcast, before the optimizer sees the parameters.
        parallel.setup(self.model, self.objective)
        self.make_loader, self.eval_transform, self.evaluator = make_loader, eval_transform, evaluator
        self.checkpointer, self.metric_logger = checkpointer, metric_logger
        self.max_steps, self.batch_size, self.seed = max_steps, batch_size, seed
        self.grad_clip_norm, self.log_every_n_steps = grad_clip_norm, log_every_n_steps
        self.run_info, self.config, self.objective_spec = run_info, config, objective_spec
        global_batch = batch_size * dist_info.world_size  # what a recipe's reference batch is compared with
        self.optimizer, self.scheduler = optim.build([self.model, self.objective], max_steps, global_batch)
        self.bad_samples = bad_samples
        self.max_nonfinite_steps, self.nonfinite_steps, self.nonfinite_in_a_row = max_nonfinite_steps, 0, 0
        self.filtered_samples = 0
        self.step, self.epoch, self.samples_consumed = 0, 0, 0
        # The run's cost, in every results.jsonl record: training time summed over launches (the
        # loop's steps, data included; evaluation and checkpoints not), and the FLOPs per sample
        # of one step, counted on this launch's first step.
        self.wall_seconds, self.flops_per_sample = 0.0, None
        self.data_layout: dict | None = None  # what a shard stream's order depends on (checked at resume)
        self.preemption = preemption if preemption is not None else Preemption()  # default: no signal handled

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        self.restore()
        start_step = self.step
        built = self.make_loader(self.samples_consumed, layout=self.data_layout)  # this rank's batches from there on
        self.data_layout = getattr(built, "layout", None)
        loader = iter(built)
        if self.gradients.batch_on_device:  # the next batch's copy overlaps this step
            loader = prefetch(loader, self.dist.device)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not self.dist.is_main, mininterval=2, desc="train")
        with bar as progress:  # closed on any exit, so no bar is left open in the process after an error
            stop, metrics = self.run_steps(loader, progress)
        if stop:
            return self.stop_on_signal(start_step)
        if self.step > start_step:  # the run did something: final checkpoint, then evaluation
            if not self.checkpointer.due(self.step):
                self.save()
            metrics = self.evaluate() if not self.evaluator.due(self.step) else metrics
        if self.metric_logger is not None:
            self.metric_logger.close()
        return metrics

    def run_steps(self, loader: Any, progress: tqdm) -> tuple[int, dict[str, float]]:
        """Steps until ``trainer.max_steps`` or a stop signal: (whether a rank was signalled, the last metrics)."""
        metrics: dict[str, float] = {}
        self.model.train()
        tick, stop = time.perf_counter(), 0
        while self.step < self.max_steps:
            try:  # a stop signal ends a wait for data that may never end
                with self.preemption.interruptible():
                    loaded = next(loader)
            except WaitInterrupted:
                loaded = None
            data_time = time.perf_counter() - tick
            # Counted over all ranks, so every rank sees the same totals and stops together.
            counts = [0, 0, 0, 0]
            if loaded is not None:
                unusable = not loaded.batch or batch_size_of(loaded.batch) < self.gradients.min_samples
                counts = [loaded.samples_read, loaded.bad_samples, int(unusable), loaded.filtered]
            read, bad, empty, filtered, stop = all_reduce_sum([*counts, int(self.preemption.requested)])
            if stop or loaded is None:  # some rank was signalled (preemption, time limit): all stop, and save
                break
            self.samples_consumed += self.batch_size * self.dist.world_size  # the stream's position
            self.filtered_samples += filtered  # captions naming no class (streams; map-style filters at start)
            self.bad_samples.update(read, bad, loaded.bad_reasons)
            self.bad_samples.batch_done(bool(empty))  # stops after data.max_empty_batches in a row
            if empty:  # some rank has no (or too few) good samples in this batch: every rank skips the step
                log.warning("skipped a step: a rank's whole batch was bad (%d bad so far)", self.bad_samples.bad)
                continue
            parts = self.counted_step(loaded.batch)
            if parts is None:  # a non-finite loss: nothing was updated; stops after a few in a row
                self.skip_nonfinite_step()
                continue
            self.nonfinite_in_a_row = 0
            self.step, self.epoch = self.step + 1, loaded.epoch
            step_time = time.perf_counter() - tick
            self.wall_seconds += step_time
            self.after_step(parts, len(loaded.batch["image"]), data_time, step_time, progress)
            if self.evaluator.due(self.step):
                metrics = self.evaluate()
            if self.checkpointer.due(self.step):
                self.save()
            tick = time.perf_counter()
        return stop, metrics

    def train_step(self, batch: Any) -> dict[str, torch.Tensor] | None:
        def step() -> dict[str, torch.Tensor] | None:
            return train_step(
                self.model,
                self.objective,
                batch,
                self.optimizer,
                self.scheduler,
                self.precision,
                self.gradients,
                self.grad_clip_norm,
                self.parallel,
            )

        if self.compiled is None:
            return step()
        return self.compiled.run(step, reset=lambda: self.optimizer.zero_grad(set_to_none=True))

    def counted_step(self, batch: Any) -> dict[str, torch.Tensor] | None:
        """One training step; the first that trains is run under the FLOP counter (vlhub/engine/flops.py)."""
        if self.flops_per_sample is not None:
            return self.train_step(batch)
        parts, flops = count_flops(lambda: self.train_step(batch))
        if parts is not None:
            self.flops_per_sample = flops / batch_size_of(batch)
        return parts

    def stop_on_signal(self, start_step: int) -> dict[str, float]:
        """Save this step (unless it was just saved) and return once it is written; no evaluation."""
        if self.step > start_step and not self.checkpointer.due(self.step):
            self.save()
        barrier()  # the checkpoint is on disk before any rank reports the stop
        self.preemption.note_stop(self.step)
        if self.metric_logger is not None:
            self.metric_logger.close()
        return {}

    def skip_nonfinite_step(self) -> None:
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning(
            "skipped a step at step %d: the loss is not finite (%d such steps so far)", self.step, self.nonfinite_steps
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"the loss was not finite in {self.nonfinite_in_a_row} steps in a row after step {self.step} "
                f"(trainer.max_nonfinite_steps={self.max_nonfinite_steps}); no weights were updated by them "
                "nor saved: lower optim.lr, raise optim.warmup_steps, set trainer.grad_clip_norm or use fp32"
            )

    def after_step(
        self, parts: dict[str, torch.Tensor], samples: int, data_time: float, step_time: float, progress: tqdm
    ) -> None:
        progress.update(1)
        if self.step % self.log_every_n_steps and self.step != self.max_steps:
            return
        scalars = {f"train/{name}": float(value) for name, value in parts.items()}
        scalars.update(
            {
                "train/lr": self.optimizer.param_groups[0]["lr"],
                "train/logit_scale": float(self.model.temperature_scale().detach()),
                "train/samples_per_second": samples * self.dist.world_size / max(step_time, 1e-9),
                "train/data_time": data_time,
                "train/nonfinite_steps": self.nonfinite_steps,
                "data/bad_samples": self.bad_samples.bad,
                "data/filtered_samples": self.filtered_samples,
            }
        )
        # Named groups (per tower, per layer): one lr each; decay and no-decay halves share it.
        scalars.update({f"train/lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g})
        progress.set_postfix(
            loss=f"{scalars['train/loss']:.3f}",
            lr=f"{scalars['train/lr']:.2e}",
            sps=f"{scalars['train/samples_per_second']:.0f}",
        )
        if self.metric_logger is not None:
            self.metric_logger.log_scalars(scalars, self.step)
        log.info(  # to train.log too: the bar is gone once the run ends
            "step %d/%d: loss %.4f, lr %.3g, %.0f samples/s",
            self.step,
            self.max_steps,
            scalars["train/loss"],
            scalars["train/lr"],
            scalars["train/samples_per_second"],
        )

    # -- evaluation (every rank) and checkpoints (rank 0 writes) ----------------------------------
    def evaluate(self) -> dict[str, float]:
        """Run the evaluation tasks (if any) and write a record with the bad-sample count either way.

        Every rank evaluates its share of each dataset (the metrics, gathered, are the same on
        every rank); rank 0 alone writes the record."""
        metrics: dict[str, float] = {}
        described: dict[str, str] = {}  # which scoring produced each kind of metric
        if self.evaluator.tasks:
            # A sharding strategy hands every rank an unsharded copy (sharded forwards are collectives).
            with self.parallel.evaluation_model(self.model) as model:
                scoring = self.objective.scoring(model)  # the objective decides how images are scored
                metrics = self.evaluator.run(
                    model, self.eval_transform, self.dist.device, self.run_dir / "eval", scoring
                )
                described = {"scoring": scoring.record()} if metrics else {}
        if not self.dist.is_main:
            return metrics
        record = {
            "step": self.step,
            "epoch": self.epoch,
            **self.run_info,
            "data/bad_samples": self.bad_samples.bad,
            "data/samples_read": self.bad_samples.read,
            "data/filtered_samples": self.filtered_samples,
            "train/nonfinite_steps": self.nonfinite_steps,
            "train/samples_seen": self.samples_consumed,  # all ranks, from the run's start
            "train/wall_seconds": self.wall_seconds,
            "train/flops_per_sample": self.flops_per_sample,
            **described,
            **metrics,
        }
        log.info("step %d: %d bad samples of %d read", self.step, self.bad_samples.bad, self.bad_samples.read)
        if self.metric_logger is not None:
            if metrics:
                self.metric_logger.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, self.step)
            self.metric_logger.log_results(record)
        return metrics

    def state(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        layout = self.model.checkpoint_layout()  # how the weights are named: open_clip's layout
        return {
            "state_dict": self.parallel.model_state_dict(self.model),
            "objective": self.objective.state_dict(),
            "objective_spec": self.objective_spec,
            "optimizer": self.parallel.optimizer_state_dict(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
            "step": self.step,
            "epoch": self.epoch,
            "data": {
                "samples_read": self.bad_samples.read,
                "bad_samples": self.bad_samples.bad,
                "filtered_samples": self.filtered_samples,
                "nonfinite_steps": self.nonfinite_steps,
                "samples_consumed": self.samples_consumed,
                "wall_seconds": self.wall_seconds,
                "world_size": self.dist.world_size,
                "batch_size": self.batch_size,
                "layout": self.data_layout,
            },
            "rng": rng_states[0],
            "rng_per_rank": rng_states,
            "run_info": dict(self.run_info),
            "open_clip_arch": layout.arch,
            "open_clip_model_cfg": self.model.open_clip_config(),  # open_clip.create_model rebuilds it
        }

    def save(self) -> Path | None:
        rng_states = all_gather_object(capture_rng_state())  # every rank's stream, for exact resume
        if not (self.dist.is_main or self.parallel.collective_state):
            return None
        # A sharding strategy gathers the full state to rank 0 (every rank takes part), then writes its shards.
        payload = {**self.state(rng_states), "config": self.config}
        with self.preemption.deferred():  # a second signal does not cut the write short
            self.parallel.save_shards(self.checkpointer, self.optimizer, payload)
            if not self.dist.is_main:
                return None
            if self.metric_logger is not None:  # the logs a remote upload snapshots with the checkpoint
                self.metric_logger.flush()
            path = self.checkpointer.save(payload)
        log.info("saved checkpoint %s", path)
        return path

    def restore(self) -> None:
        checkpoint = self.checkpointer.load_for_resume()
        if checkpoint is None:
            return
        if SHARDED in checkpoint:  # a sharded directory: each rank reads its part, whichever strategy wrote it
            load_sharded_(checkpoint[SHARDED], state_root(self.model, self.objective), self.optimizer)
        else:
            with weights_from(self.checkpointer.resume_from):  # a wrong shape names the file
                self.parallel.load_model_state_dict(self.model, checkpoint["state_dict"])
                self.objective.load_state_dict(checkpoint["objective"])
            self.parallel.load_optimizer_state_dict(self.optimizer, checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        # A resumed run may raise max_steps: recompute the lr from this run's schedule.
        for group, base, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        if self.precision.scaler is not None and checkpoint["scaler"]:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        self.step, self.epoch = int(checkpoint["step"]), int(checkpoint["epoch"])
        data = checkpoint["data"]
        self.bad_samples.read, self.bad_samples.bad = int(data["samples_read"]), int(data["bad_samples"])
        self.filtered_samples = int(data.get("filtered_samples", 0))
        self.nonfinite_steps = int(data.get("nonfinite_steps", 0))  # counted over the run, not per launch
        self.samples_consumed = int(data["samples_consumed"])
        self.wall_seconds = float(data.get("wall_seconds", 0.0))  # training time summed over launches
        self.data_layout = data.get("layout")
        per_rank = checkpoint["rng_per_rank"]
        if len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank])
        else:  # another number of ranks: rank 0 continues its stream, the others start their own
            restore_rng_state(per_rank[0])
            if self.dist.rank > 0:
                torch.manual_seed(self.seed + 1_000_003 * self.dist.rank + self.step)
        log.info("resumed from step %d (%d samples into the data stream)", self.step, self.samples_consumed)
