"""Rank liveness: which rank stopped. Unrelated to the run folder's lock refresh (``vlhub.run.lock``)."""

from __future__ import annotations

import _thread
import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch.distributed as dist

from vlhub.parallel.environment import DistInfo, is_initialized

log = logging.getLogger(__name__)

PULSE_INTERVAL_S = 5.0  # how often each rank says it is alive
SILENT_AFTER_S = 180.0  # a rank silent this long is dead: the others stop (NCCL would wait the whole timeout)


class RankStopped(RuntimeError):
    """A collective failed because another rank died or hangs; the message names it."""


class RankWatch:
    """Every rank bumps a counter in the rendezvous store (``MASTER_ADDR:MASTER_PORT``, a client of its own)
    every :data:`PULSE_INTERVAL_S` from a daemon thread, which runs while the main thread waits in a
    collective, and reads everyone's counters.

    Why: when a rank dies, gloo fails the others' next collective at once, but names only a socket
    address; NCCL waits out the process-group timeout. :meth:`silent_ranks` names the ranks whose
    counters stopped; the watcher ends this process when a rank has been silent for
    :data:`SILENT_AFTER_S`, so no rank hangs for hours. A rank that leaves normally says so first.
    """

    LEFT = 10**12  # added to a counter when its rank leaves on purpose

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        self.keys = [f"vlhub/rank_pulse/{attempt}/{r}" for r in range(world_size)]
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(minutes=5),
            wait_for_workers=False,
        )
        self.lock, self.explaining, self.interrupted = threading.Lock(), False, False
        self.stopped = threading.Event()
        self.store.add(self.keys[rank], 1)
        self.store.wait(self.keys)  # every rank beats before anyone watches
        self.store.set_timeout(datetime.timedelta(seconds=max(30.0, 6 * PULSE_INTERVAL_S)))
        self.thread = threading.Thread(target=self._run, name="vlhub-rank-watch", daemon=True)
        self.thread.start()

    def _counts(self) -> list[int]:
        with self.lock:
            return [int(v) for v in self.store.multi_get(self.keys)]

    def _beat(self) -> None:
        with self.lock:
            self.store.add(self.keys[self.rank], 1)

    def _run(self) -> None:
        last, changed = self._counts(), [time.monotonic()] * self.world_size
        while not self.stopped.wait(PULSE_INTERVAL_S):
            try:
                self._beat()
                counts = self._counts()
            except Exception as error:  # noqa: BLE001 (the store's host is gone)
                return self._give_up(f"the rendezvous store stopped answering ({error}); {self._store_host()}")
            now = time.monotonic()
            changed = [now if c != p else t for c, p, t in zip(counts, last, changed, strict=True)]
            last = counts
            silent = [r for r, t in enumerate(changed) if now - t > SILENT_AFTER_S and last[r] < self.LEFT]
            if silent and not self.explaining:
                return self._give_up(f"rank(s) {silent} stopped responding (no pulse for {SILENT_AFTER_S:.0f} s)")

    def _store_host(self) -> str:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            return "torchrun's agent on the first node stopped"
        return "rank 0, which hosts it, stopped"

    def _give_up(self, why: str) -> None:
        if self.stopped.is_set() or self.explaining:
            return
        log.error("rank %d stops: %s", self.rank, why)
        self.interrupted = True
        _thread.interrupt_main()  # a main thread back in Python (gloo) raises; one stuck in NCCL does not
        if not self.stopped.wait(2 * PULSE_INTERVAL_S):
            os._exit(1)

    def silent_ranks(self) -> list[int] | None:
        """The ranks whose counters do not move for three beats (None: the store itself is unreachable)."""
        self.explaining = True
        try:
            before = self._counts()
            time.sleep(3 * PULSE_INTERVAL_S)
            after = self._counts()
        except Exception:  # noqa: BLE001
            return None
        return [r for r, (b, a) in enumerate(zip(before, after, strict=True)) if a == b and a < self.LEFT]

    def leave(self, normally: bool = True) -> None:
        """Stop beating. ``normally``: say so, so the others never name this rank; a rank that leaves
        on an error stays silent, and ranks still waiting for it are stopped naming it."""
        self.stopped.set()
        self.thread.join()
        if normally:
            with suppress(Exception):  # leaving anyway
                self.store.add(self.keys[self.rank], self.LEFT)


@contextmanager
def ranks_watched(info: DistInfo) -> Iterator[None]:
    """Run the body with a :class:`RankWatch`; a failed collective is re-raised naming the rank that stopped."""
    if not info.distributed or not is_initialized() or "MASTER_ADDR" not in os.environ:
        yield
        return
    watch = RankWatch(info.rank, info.world_size)
    normally = False
    try:
        yield
        normally = True
    except (RuntimeError, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt) and not watch.interrupted:
            raise  # Ctrl-C
        if isinstance(error, RankStopped) or not _is_peer_failure(error):
            raise
        silent = watch.silent_ranks()
        if silent is None:
            who = f"the rendezvous store stopped answering: {watch._store_host()}"
        elif silent:
            who = f"rank(s) {silent} stopped responding"
        else:
            raise
        raise RankStopped(f"rank {info.rank} stops: {who} ({type(error).__name__}: {str(error)[:300]})") from error
    finally:
        watch.leave(normally)


def _is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because of another rank (gloo's connection errors, NCCL's, a watcher interrupt)."""
    if isinstance(error, KeyboardInterrupt | dist.DistError):
        return True
    text = str(error).lower()
    return any(mark in text for mark in ("gloo", "nccl", "connection reset", "connection closed", "timed out"))
