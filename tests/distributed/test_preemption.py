"""Preemption: a signal mid-training stops every rank at one step with a checkpoint, chains to the
handler it replaced, and the resumed run ends where an uninterrupted one does."""

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vlhub.run.checkpoint as checkpoint_module
import vlhub.train
from tests.helpers.configs import FAST, compose_train
from tests.helpers.ranks import as_rank, free_port
from vlhub.engine.trainer import Trainer
from vlhub.run.preemption import Preemption

# Six steps, no periodic checkpoint and no evaluation: a checkpoint at any other step comes from the signal.
BASE = [o for o in FAST if not o.startswith("eval.synthetic")]
RUN = [*BASE, "optim.scheduler=constant", "checkpoint.every_n_steps=0", "eval=none", "trainer.max_steps=6"]
CHOICES = {"model": "tiny", "objective": "clip"}


def _train(run_dir: Path, preemption: Preemption | None = None, overrides: list[str] = RUN) -> dict:
    return vlhub.train.train(compose_train(overrides), run_dir, CHOICES, None, preemption)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)


def _signal_during_step(monkeypatch, step: int, signum: int):
    """Send ``signum`` to this process in the middle of training step ``step`` (1-based); returns the real step."""
    real_step, calls = Trainer.train_on_batch, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)  # delivered here, mid-step: the step still completes
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_on_batch", step_then_signal)
    return real_step


@pytest.fixture
def previous_handler():
    """A Python handler already installed for SIGUSR1 / SIGUSR2 (as submitit installs one): it must be chained."""
    calls: list[int] = []
    saved = {
        sig: signal.signal(sig, lambda signum, frame: calls.append(signum)) for sig in (signal.SIGUSR1, signal.SIGUSR2)
    }
    yield calls
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.slow
@pytest.mark.parametrize("under_submitit", [False, True], ids=["plain", "submitit"])
def test_a_signal_mid_run_saves_that_step_chains_and_resumes_to_the_same_weights(
    tmp_path, monkeypatch, previous_handler, under_submitit
):
    _train(tmp_path / "straight")
    if under_submitit:  # what Hydra's submitit_slurm launcher sets in the job
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    else:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    preemption = Preemption.from_environment()
    signum = signal.SIGUSR2 if under_submitit else signal.SIGUSR1
    assert signum in preemption.signals
    real_step = _signal_during_step(monkeypatch, 3, signum)
    with preemption:
        metrics = _train(tmp_path / "run", preemption)
    assert metrics == {} and preemption.stopped_at == 3
    assert _checkpoint(tmp_path / "run")["step"] == 3  # the step the signal arrived in, completed and saved
    assert previous_handler == []  # not before the checkpoint
    if under_submitit:
        preemption.finish()  # submitit's handler requeues (here: records) and the task ends normally
    else:
        with pytest.raises(SystemExit) as stopped:
            preemption.finish()
        assert stopped.value.code == 128 + signal.SIGUSR1
    assert previous_handler == [signum]  # chained, once

    monkeypatch.setattr(Trainer, "train_on_batch", real_step)
    _train(tmp_path / "run")  # the requeued job: same folder, resumes at step 3
    final, straight = _checkpoint(tmp_path / "run"), _checkpoint(tmp_path / "straight")
    assert final["step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


def test_a_signal_before_the_trainer_polls_is_kept_and_a_finished_run_ignores_it(tmp_path, previous_handler):
    preemption = Preemption([signal.SIGUSR1])
    with preemption:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested
    preemption.finish()  # the trainer never stopped on it: nothing to do, nothing chained
    assert previous_handler == [] and signal.getsignal(signal.SIGUSR1) != preemption._handle


def _rank_main(rank: int, port: int, run_dir: str, out: str) -> None:
    real_step, calls = Trainer.train_on_batch, []

    def step(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:  # only rank 1 is signalled
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*args, **kwargs)

    Trainer.train_on_batch = step  # the seam: this process is a forked rank
    preemption = Preemption([signal.SIGUSR1])
    with as_rank(rank, port), preemption:
        _train(Path(run_dir), preemption)
    Path(out, f"rank{rank}").write_text(str(preemption.stopped_at))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    mp.start_processes(  # fork: the ranks inherit this process's imports
        _rank_main, args=(free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "2"
    saved = _checkpoint(tmp_path / "run")
    assert saved["step"] == 2 and saved["data"]["samples_consumed"] == 2 * 2 * 8  # 2 steps x 2 ranks x batch 8


def _write_then_die(run_dir: str) -> None:
    """Resume the 3-step run, then be SIGKILLed halfway through writing the step-4 checkpoint."""
    real_save = torch.save

    def half_then_killed(payload, handle, *args, **kwargs):
        real_save(payload, handle, *args, **kwargs)
        handle.flush()
        handle.truncate(handle.tell() // 2)  # half a file on disk, then the node dies
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_module.torch.save = half_then_killed  # type: ignore[attr-defined]
    _train(Path(run_dir), None, [*RUN, "trainer.max_steps=4"])


@pytest.mark.slow
def test_a_signal_during_a_checkpoint_write_waits_for_it_and_a_kill_leaves_the_previous_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    seen: list[tuple[int, bool]] = []  # per call of the previous handler: was step 3's checkpoint in place?
    previous = signal.signal(
        signal.SIGUSR1, lambda signum, frame: seen.append((signum, (run_dir / "checkpoints/latest.pt").exists()))
    )
    real_save = torch.save

    def signalled_twice_while_writing(payload, handle, *args, **kwargs):
        real_save(payload, handle, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)  # a stop request...
        os.kill(os.getpid(), signal.SIGUSR1)  # ...and "now", both before the file is renamed into place

    monkeypatch.setattr(torch, "save", signalled_twice_while_writing)
    try:
        preemption = Preemption([signal.SIGUSR1])
        with preemption:
            _train(run_dir, preemption, [*RUN, "trainer.max_steps=3"])  # the final save, at step 3
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # The second signal reached the previous handler once, after the write had completed.
    assert seen == [(signal.SIGUSR1, True)]
    assert _checkpoint(run_dir)["step"] == 3

    # A kill in the middle of the next write: the previous checkpoint stays whole and is what resumes.
    monkeypatch.undo()
    child = mp.get_context("fork").Process(target=_write_then_die, args=(str(run_dir),))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert _checkpoint(run_dir)["step"] == 3
    assert not (run_dir / "checkpoints/step_4.pt").exists()


def test_a_signal_while_waiting_for_data_that_never_comes_stops_the_run(tmp_path, monkeypatch):
    import threading
    import time

    from vlhub.data.pair_source import PairSource

    def stalled(self, *args, **kwargs):  # a source stuck in a read (a stalled file system, a silent pipe)
        def batches():
            time.sleep(120)
            yield from ()

        return batches()

    monkeypatch.setattr(PairSource, "build_loader", stalled)
    preemption = Preemption([signal.SIGUSR1]).install()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1))
    started = time.monotonic()
    timer.start()
    try:
        assert _train(tmp_path / "run", preemption) == {}
    finally:
        timer.cancel()
        preemption.uninstall()
    assert time.monotonic() - started < 60 and preemption.stopped_at == 0  # stopped, not waited out
