"""A rank that dies mid-training: the other fails within seconds, with a message naming the dead rank."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vlhub.train
from tests.helpers.configs import FAST, compose_train
from tests.helpers.ranks import free_port, set_rank_environment
from vlhub.engine.trainer import Trainer
from vlhub.parallel import liveness

RUN = [o for o in FAST if not o.startswith("eval.synthetic")]
RUN += ["eval=none", "checkpoint.every_n_steps=0", "trainer.max_steps=6"]


def _rank_main(rank: int, victim: int, port: int, run_dir: str, out: str, how: str = "killed") -> None:
    torch.set_num_threads(1)
    stderr = os.open(Path(out, f"stderr{rank}"), os.O_WRONLY | os.O_CREAT)
    os.dup2(stderr, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)  # what the rank logs, for the test to read
    set_rank_environment(rank, port)  # no teardown below: the peer may be gone
    liveness.PULSE_INTERVAL_S = 0.3  # the test's clock; 5 s in real runs
    liveness.SILENT_AFTER_S = 3.0  # 180 s in real runs
    real_step, calls = Trainer.train_on_batch, []

    def step(*args, **kwargs):
        calls.append(1)
        if rank == victim and len(calls) == 3:
            Path(out, "killed_at").write_text(str(time.time()))
            # The node dies mid-run, or freezes (its sockets stay open: the others' collective just waits).
            os.kill(os.getpid(), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        return real_step(*args, **kwargs)

    Trainer.train_on_batch = step  # the seam: this process is a forked rank
    try:
        vlhub.train.train(compose_train(RUN), Path(run_dir), {"model": "tiny", "objective": "clip"})
        Path(out, f"rank{rank}").write_text("finished")
    except BaseException as error:  # noqa: BLE001 (the test reads what was raised)
        Path(out, f"rank{rank}").write_text(f"{time.time()}\n{type(error).__name__}: {error}")
    os._exit(0)  # leave without tearing down a process group whose peer is gone


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_the_survivor_stops_soon_naming_the_dead_rank(tmp_path, victim):
    survivor = 1 - victim
    fork, port = mp.get_context("fork"), free_port()  # fork: the ranks inherit this process's imports
    ranks = [
        fork.Process(target=_rank_main, args=(rank, victim, port, str(tmp_path / "run"), str(tmp_path)))
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    ranks[survivor].join(120)
    hung = ranks[survivor].is_alive()
    for process in ranks:
        if process.is_alive():
            process.kill()
    assert not hung, "the survivor hung"
    stopped_at, message = (tmp_path / f"rank{survivor}").read_text().split("\n", 1)
    print(message)
    assert float(stopped_at) - float((tmp_path / "killed_at").read_text()) < 30
    assert message.startswith("RankStopped")
    if victim == 1:
        assert "rank(s) [1] stopped responding" in message
    else:  # rank 0 hosts the rendezvous store (no torchrun agent here)
        assert "rank 0, which hosts it, stopped" in message


@pytest.mark.slow
def test_a_frozen_rank_is_named_and_the_survivor_exits_instead_of_waiting_out_the_timeout(tmp_path):
    fork, port = mp.get_context("fork"), free_port()
    ranks = [
        fork.Process(target=_rank_main, args=(rank, 1, port, str(tmp_path / "run"), str(tmp_path), "frozen"))
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    ranks[0].join(120)
    hung = ranks[0].is_alive()
    for process in ranks:
        if process.is_alive():
            process.kill()
    assert not hung, "the survivor waited in the collective"
    assert ranks[0].exitcode == 1  # ended by the watcher: gloo would have waited the process-group timeout
    assert "rank 0 stops: rank(s) [1] stopped responding (no pulse for 3 s)" in (tmp_path / "stderr0").read_text()


def test_a_rank_leaving_on_an_error_stays_silent_and_one_leaving_normally_says_so(monkeypatch):
    import datetime

    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    for normally in (False, True):
        watch = liveness.RankWatch(0, 1)
        before = int(store.get(watch.keys[0]))
        watch.leave(normally)
        after = int(store.get(watch.keys[0]))
        # The others skip a rank whose counter carries LEFT; one that left on an error must still be named.
        assert (after - before >= liveness.RankWatch.LEFT) is normally
