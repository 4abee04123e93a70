"""``benchmarks/data_pipeline.py --profile``: where a sample's time goes on the real ``data=wds`` path.

In-process (workers=0, so every stage runs in this thread): each stage's function is wrapped with a
timer of this thread's CPU time (its own time, its timed callees excluded: a loaded machine stretches
wall time, not this), and each batch is pickled and unpickled as a worker sends it to the main
process. The timers' own cost (a ``thread_time`` call is a system call) is measured on an empty
function and shown apart; the median of ``--repeats`` passes is shown, then the totals without
timers beside the decode-only pipeline's (plain webdataset, the same transform), in-process too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

STAGES = [  # (label, module, owner, attribute)
    ("locate (layout + shuffle buffer)", "vlhub.data.layout", "StreamLayout", "locate"),
    ("tar read (seek + read)", "vlhub.data.shard_reader", "LocalShards", "sample"),
    ("open_image + caption bytes", "vlhub.data.stream", None, "decode_sample"),
    ("caption pipeline (prepare)", "vlhub.data.captions", "CaptionPipeline", "prepare"),
    ("seeding + per-sample glue (transform_sample)", "vlhub.data.stream", None, "transform_sample"),
    ("image transform (decode + crop + resize)", "vlhub.data.loader", None, "draw_views"),
    ("tokenisation", "vlhub.data.captions", "CaptionPipeline", "tokenize"),
    ("collate (stack, labels, ids)", "vlhub.data.stream", "Collate", "__call__"),
]


class StageTimer:
    """Own time per stage: a timed callee's time is charged to it, not to its caller."""

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        self.calls = 0
        self._stack: list[float] = []  # time spent in timed callees, per open frame

    def wrap(self, label: str, function):
        def timed(*args, **kwargs):
            self.calls += 1
            self._stack.append(0.0)
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                children = self._stack.pop()
                self.own[label] = self.own.get(label, 0.0) + spent - children
                if self._stack:
                    self._stack[-1] += spent

        return timed

    @staticmethod
    def cost() -> float:
        """Seconds a timed call adds (an empty function, wrapped, called from a wrapped one)."""
        timer = StageTimer()
        inner = timer.wrap("inner", lambda: None)
        outer = timer.wrap("outer", lambda: [inner() for _ in range(10_000)])
        start = time.thread_time()
        outer()
        return (time.thread_time() - start) / 10_000


def _cpu_pass(loader, args, timer: StageTimer | None = None) -> tuple[float, float, int]:
    """(CPU seconds reading the batches, CPU seconds sending them to a main process, samples) of one
    in-process pass; the first batch (shards opened) is not counted, as in time_batches."""
    import itertools
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 (registers the shared-memory tensor reductions)

    batches, transfer = -(-args.num_images // args.batch_size), 0.0
    iterator = iter(loader)
    next(iterator)
    if timer is not None:
        timer.own.clear()
        timer.calls = 0
    spent = time.thread_time()
    for batch in itertools.islice(iterator, batches - 1):
        start = time.thread_time()
        pickle.loads(bytes(ForkingPickler.dumps(batch)))  # what a worker's batch costs to send and receive
        transfer += time.thread_time() - start
    return time.thread_time() - spent - transfer, transfer, (batches - 1) * args.batch_size


def profile_source(shards: list[str], args, draft: bool, source_loader: Callable) -> dict[str, float]:
    """CPU ms per sample in each stage of ``WebDatasetPairs.build_loader``'s stream (workers=0), one pass."""
    import importlib

    timer, patched = StageTimer(), []
    for label, module_name, owner_name, attribute in STAGES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = owner.__dict__[attribute] if owner_name else getattr(module, attribute)
        patched.append((owner, attribute, original))
        setattr(owner, attribute, timer.wrap(label, original))
    try:
        loader = source_loader(shards, SimpleNamespace(**{**vars(args), "workers": 0}), draft)
        spent, transfer, samples = _cpu_pass(loader, args, timer)
    finally:
        for owner, attribute, original in patched:
            setattr(owner, attribute, original)
    per_sample = {label: 1000 * seconds / samples for label, seconds in timer.own.items()}
    per_sample["timers (measured apart)"] = 1000 * timer.calls * StageTimer.cost() / samples
    per_sample["stream loop (the rest)"] = 1000 * spent / samples - sum(per_sample.values())
    per_sample["worker -> main transfer (pickle + unpickle)"] = 1000 * transfer / samples
    return per_sample


def print_profile(shards: list[str], args, source_loader: Callable, decode_only_loader: Callable) -> None:
    """Per stage, then the totals beside the decode-only pipeline's (plain webdataset), both in-process."""
    in_process = SimpleNamespace(**{**vars(args), "workers": 0})
    for name, draft, fraction in [("default transform", True, 0.75), ("exact pixels: augment.draft=false", False, 1.0)]:
        passes = [profile_source(shards, args, draft, source_loader) for _ in range(args.repeats)]
        print(f"vlhub data=wds source, {name}: CPU ms/sample by stage (workers=0, in-process; median of {len(passes)})")
        for label in passes[0]:
            print(f"  {label:<50} {np.median([stages[label] for stages in passes]):7.3f}")
        real, alone = [], []
        for _ in range(args.repeats):  # without timers, interleaved so that load drifts hit both alike
            spent, transfer, samples = _cpu_pass(source_loader(shards, in_process, draft), args)
            real.append(1000 * (spent + transfer) / samples)
            spent, transfer, samples = _cpu_pass(decode_only_loader(shards, in_process, draft, fraction), args)
            alone.append(1000 * (spent + transfer) / samples)
        print(f"  {'total without timers':<50} {np.median(real):7.3f}")
        print(f"  {'decode-only pipeline, same transform':<50} {np.median(alone):7.3f}")
        print(f"  real source at {np.median(alone) / np.median(real):.0%} of the decode-only pipeline's speed (CPU)")
