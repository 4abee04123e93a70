"""The trainer: restore, then loop over steps; log, evaluate and checkpoint around each."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlhub.data.batch import LoadedBatch, batch_size_of
from vlhub.engine.flops import count_flops
from vlhub.engine.guard import StepGuard, Verdict
from vlhub.engine.prefetch import prefetch
from vlhub.engine.prepare import Prepared, build_gradient_strategy, choose_chunk_size, probe_fits
from vlhub.engine.state import TrainerState
from vlhub.engine.step import train_step
from vlhub.engine.trainer_config import TrainerConfig
from vlhub.eval.during_training import Evaluation
from vlhub.optim.schedules import load_scheduler_state
from vlhub.parallel.collectives import all_gather_object, barrier
from vlhub.parallel.sharded_checkpoint import MARKER as SHARDED
from vlhub.parallel.sharded_checkpoint import load_sharded_, state_root
from vlhub.run.checkpoint import Checkpointer, capture_rng_state, restore_rank_rng_state, weights_from
from vlhub.run.loggers import MetricLogger
from vlhub.run.preemption import Preemption, WaitInterrupted

log = logging.getLogger(__name__)


class Trainer:
    """Trains what :func:`~vlhub.engine.prepare.prepare` made, on this rank's batches from ``make_loader``
    (a function of the samples consumed so far). ``fit(run)`` restores, loops and saves through ``run``.

    ``guard`` decides what each batch and loss does (train, skip, stop); ``run_info`` names the run in
    every record and checkpoint; ``checkpoint_extras`` are stored with each checkpoint (the objective's
    spec, the config); ``preemption`` is polled at every step. The seam for tests is
    :meth:`train_on_batch` (wrap it to act in the middle of a given step)."""

    def __init__(
        self,
        prepared: Prepared,
        config: TrainerConfig,
        make_loader: Callable[..., Iterable[LoadedBatch]],
        *,
        evaluation: Evaluation | None = None,
        guard: StepGuard | None = None,
        metric_logger: MetricLogger | None = None,
        run_info: dict[str, Any] | None = None,
        checkpoint_extras: dict[str, Any] | None = None,
        preemption: Preemption | None = None,
    ) -> None:
        self.prepared, self.config, self.make_loader, self.evaluation = prepared, config, make_loader, evaluation
        self.model, self.objective, self.dist = prepared.model, prepared.objective, prepared.dist
        self.optimizer, self.scheduler, self.precision = prepared.optimizer, prepared.scheduler, prepared.precision
        self.guard = guard or StepGuard(max_nonfinite_steps=config.max_nonfinite_steps)
        self.metric_logger, self.run_info = metric_logger, dict(run_info or {})
        self.checkpoint_extras = dict(checkpoint_extras or {})
        self.preemption = preemption or Preemption()  # default: no signal handled
        self.state = TrainerState()

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, run: Checkpointer) -> dict[str, float]:
        """Train to ``max_steps``; ``run`` (the Checkpointer, or the run session) says when to save, and
        where from to resume. Returns the last evaluation's metrics ({} when stopped by a signal)."""
        self.restore(run)
        start_step = self.state.step
        built = self.make_loader(self.state.samples_consumed, layout=self.state.data_layout)  # this rank's batches
        self.state.data_layout = getattr(built, "layout", None)
        loader = iter(built)
        if self.config.grad_cache.enabled and self.config.grad_cache.chunk_size == "auto":
            first = next(loader)  # the probe's batch, then the first step's
            chunk = choose_chunk_size(self.config.batch_size, self.dist.device, probe_fits(self.prepared, first.batch))
            self.prepared.gradients = build_gradient_strategy(self.config.batch_size, True, chunk)
            loader = itertools.chain([first], loader)
        if self.prepared.gradients.batch_on_device:  # the next batch's copy overlaps this step
            loader = prefetch(loader, self.dist.device)
        main = self.dist.is_main
        bar = tqdm(total=self.config.max_steps, initial=start_step, disable=not main, mininterval=2, desc="train")
        with bar as progress:  # closed on any exit, so no bar is left open in the process after an error
            stop, metrics = self.run_steps(loader, progress, run)
        if stop:
            return self.stop_on_signal(start_step, run)
        if self.state.step > start_step:  # the run did something: final checkpoint, then evaluation
            if not run.due(self.state.step):
                self.save(run)
            metrics = self.evaluate() if not self.eval_due() else metrics
        if self.metric_logger is not None:
            self.metric_logger.close()
        return metrics

    def run_steps(self, loader: Any, progress: tqdm, run: Checkpointer) -> tuple[bool, dict[str, float]]:
        """Steps until ``trainer.max_steps`` or a stop signal: (whether a rank was signalled, the last metrics)."""
        metrics: dict[str, float] = {}
        state, world_batch = self.state, self.config.batch_size * self.dist.world_size
        self.model.train()
        tick = time.perf_counter()
        while state.step < self.config.max_steps:
            try:  # a stop signal ends a wait for data that may never end
                with self.preemption.interruptible():
                    loaded = next(loader)
            except WaitInterrupted:
                loaded = None
            data_time = time.perf_counter() - tick
            verdict = self.guard.admit(state, loaded, self.prepared.gradients.min_samples, self.preemption.requested)
            if verdict is Verdict.STOP:  # some rank was signalled (preemption, time limit): all stop, and save
                return True, metrics
            state.samples_consumed += world_batch  # the stream's position
            if verdict is Verdict.SKIP:  # some rank has no (or too few) good samples: every rank skips the step
                continue
            parts = self.counted_step(loaded.batch)
            if self.guard.after_loss(state, parts is not None) is Verdict.SKIP:  # nothing was updated
                continue
            state.step, state.epoch = state.step + 1, loaded.epoch
            step_time = time.perf_counter() - tick
            state.wall_seconds += step_time
            self.after_step(parts, len(loaded.batch["image"]), data_time, step_time, progress)
            if self.eval_due():
                metrics = self.evaluate()
            if run.due(state.step):
                self.save(run)
            tick = time.perf_counter()
        return False, metrics

    def train_on_batch(self, batch: Any) -> dict[str, torch.Tensor] | None:
        """One optimizer step on ``batch`` (vlhub/engine/step.py), through the compiled towers when compiled."""
        p = self.prepared

        def step() -> dict[str, torch.Tensor] | None:
            return train_step(
                p.model, p.objective, batch, p.optimizer, p.scheduler, p.precision, p.gradients,
                self.config.grad_clip_norm, p.parallel,
            )  # fmt: skip

        if p.compiled is None:
            return step()
        return p.compiled.run(step, reset=lambda: p.optimizer.zero_grad(set_to_none=True))

    def counted_step(self, batch: Any) -> dict[str, torch.Tensor] | None:
        """One training step; the first that trains is run under the FLOP counter (vlhub/engine/flops.py)."""
        if self.state.flops_per_sample is not None:
            return self.train_on_batch(batch)
        parts, flops = count_flops(lambda: self.train_on_batch(batch))
        if parts is not None:
            self.state.flops_per_sample = flops / batch_size_of(batch)
        return parts

    def eval_due(self) -> bool:
        return self.evaluation is not None and self.evaluation.due(self.state.step)

    def stop_on_signal(self, start_step: int, run: Checkpointer) -> dict[str, float]:
        """Save this step (unless it was just saved) and return once it is written; no evaluation."""
        if self.state.step > start_step and not run.due(self.state.step):
            self.save(run)
        barrier()  # the checkpoint is on disk before any rank reports the stop
        self.preemption.note_stop(self.state.step)
        if self.metric_logger is not None:
            self.metric_logger.close()
        return {}

    def after_step(
        self, parts: dict[str, torch.Tensor], samples: int, data_time: float, step_time: float, progress: tqdm
    ) -> None:
        progress.update(1)
        step, max_steps = self.state.step, self.config.max_steps
        if step % self.config.log_every_n_steps and step != max_steps:
            return
        scalars = {f"train/{name}": float(value) for name, value in parts.items()}
        scalars.update(
            {
                "train/lr": self.optimizer.param_groups[0]["lr"],
                "train/logit_scale": float(self.model.temperature_scale().detach()),
                "train/samples_per_second": samples * self.dist.world_size / max(step_time, 1e-9),
                "train/data_time": data_time,
                "train/nonfinite_steps": self.state.nonfinite_steps,
                "data/bad_samples": self.state.bad_samples,
                "data/filtered_samples": self.state.filtered_samples,
            }
        )
        # Named groups (per tower, per layer): one lr each; decay and no-decay halves share it.
        scalars.update({f"train/lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g})
        loss, lr, rate = scalars["train/loss"], scalars["train/lr"], scalars["train/samples_per_second"]
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
        if self.metric_logger is not None:
            self.metric_logger.log_scalars(scalars, step)
        # To train.log too: the bar is gone once the run ends.
        log.info("step %d/%d: loss %.4f, lr %.3g, %.0f samples/s", step, max_steps, loss, lr, rate)

    # -- evaluation (every rank) and checkpoints (rank 0 writes) ----------------------------------
    def evaluate(self) -> dict[str, float]:
        """Run the evaluation (if any; every rank takes part); rank 0 writes a record with the bad-sample
        count either way."""
        metrics: dict[str, float] = {}
        described: dict[str, str] = {}  # which scoring produced each kind of metric
        if self.evaluation is not None:
            p = self.prepared
            metrics, described = self.evaluation.run(self.model, self.objective, p.parallel, self.dist.device)
        if not self.dist.is_main:
            return metrics
        state = self.state
        record = {"step": state.step, "epoch": state.epoch, **self.run_info, **state.record(), **described, **metrics}
        log.info("step %d: %d bad samples of %d read", state.step, state.bad_samples, state.samples_read)
        if self.metric_logger is not None:
            if metrics:
                self.metric_logger.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, state.step)
            self.metric_logger.log_results(record)
        return metrics

    def checkpoint(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """What a checkpoint holds (its keys as every earlier vlhub wrote them)."""
        p, layout, counters = self.prepared, self.model.checkpoint_layout(), self.state.state_dict()
        counters["data"].update(world_size=self.dist.world_size, batch_size=self.config.batch_size)
        return {
            "state_dict": p.parallel.model_state_dict(self.model),
            "objective": self.objective.state_dict(),
            "objective_spec": self.checkpoint_extras.get("objective_spec"),
            "optimizer": p.parallel.optimizer_state_dict(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
            **counters,
            "rng": rng_states[0],
            "rng_per_rank": rng_states,
            "run_info": dict(self.run_info),
            "open_clip_arch": layout.arch,
            "open_clip_model_cfg": self.model.open_clip_config(),  # open_clip.create_model rebuilds it
            "config": self.checkpoint_extras.get("config", {}),
        }

    def save(self, run: Checkpointer) -> Path | None:
        rng_states = all_gather_object(capture_rng_state())  # every rank's stream, for exact resume
        if not (self.dist.is_main or self.prepared.parallel.collective_state):
            return None
        # A sharding strategy gathers the full state to rank 0 (every rank takes part), then writes its shards.
        payload = self.checkpoint(rng_states)
        with self.preemption.deferred():  # a second signal does not cut the write short
            self.prepared.parallel.save_shards(run, self.optimizer, payload)
            if not self.dist.is_main:
                return None
            if self.metric_logger is not None:  # the logs a remote upload snapshots with the checkpoint
                self.metric_logger.flush()
            path = run.save(payload)
        log.info("saved checkpoint %s", path)
        return path

    def restore(self, run: Checkpointer) -> None:
        checkpoint = run.load_for_resume()
        if checkpoint is None:
            return
        p = self.prepared
        if SHARDED in checkpoint:  # a sharded directory: each rank reads its part, whichever strategy wrote it
            load_sharded_(checkpoint[SHARDED], state_root(self.model, self.objective), self.optimizer)
        else:
            with weights_from(run.resume_from):  # a wrong shape names the file
                p.parallel.load_model_state_dict(self.model, checkpoint["state_dict"])
                self.objective.load_state_dict(checkpoint["objective"])
            p.parallel.load_optimizer_state_dict(self.optimizer, checkpoint["optimizer"])
        load_scheduler_state(self.scheduler, checkpoint["scheduler"])  # the lr from this run's schedule
        if self.precision.scaler is not None and checkpoint["scaler"]:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        self.state.load_state_dict(checkpoint)
        reseed = self.config.seed + self.state.step  # ranks the checkpoint did not have start from this
        restore_rank_rng_state(checkpoint["rng_per_rank"], self.dist.rank, self.dist.world_size, reseed)
        log.info("resumed from step %d (%d samples into the data stream)", self.state.step, self.state.samples_consumed)
