"""Which sample sits at each position of a shard stream: a pure function of (seed, position, ranks, batch size).

Used by ``vlhub.data.stream`` when every shard's sample count is known (local shards always are:
``vlhub.data.shard_counts``). Nothing here depends on the number of DataLoader workers, so any
worker can build any batch and ``workers`` may change on resume.

- **Passes.** Source ``i``'s samples form an endless sequence: pass ``p`` is its shards in an order
  seeded by (seed, p, i), each shard's samples in tar order. Global index ``g`` -> (pass, shard,
  sample in shard) by the counts, without reading anything.
- **Ranks.** Each rank reads ``M = N * B`` samples an epoch (``N`` batches of ``B``). Source ``i``
  gives rank ``r`` a quota ``n_i`` of them (``M`` split by the weights, largest remainder; one source:
  ``M``), the contiguous run ``[base_i(e) + r * n_i, base_i(e) + (r + 1) * n_i)`` of its sequence. With
  the epoch from the counts, ``base_i(e) = e * max(T_i, W * n_i)``: an epoch is one pass, every sample
  read once across ranks, the last ``T_i - W * n_i`` (less than a global batch) left out and counted.
  With ``num_samples``, ``base_i(e) = e * W * n_i``: an epoch reads the next ``num_samples`` of
  the passes, where the previous epoch stopped (a new, reshuffled pass when one ends).
  With ``resampled``, rank ``r`` reads its own endless draw of shards (with replacement), seeded by
  (seed, e, i, r).
- **Mix.** Several sources: their items are merged by the "times" ``(u + phase_i) / n_i`` (item ``u``
  of source ``i``, a seeded phase), so each stretch of the stream holds each source by its weight.
- **Shuffle.** A buffer of ``S`` samples per rank and epoch: output ``o < M - S`` is the input that
  last entered the slot that input ``o + S`` takes (``slot(t)`` a seeded hash of ``t``); the last
  ``S`` outputs are the final buffer in a seeded order. Found by looking back over the slots, never
  by replaying the stream: moving to any position costs about ``S log S`` hash evaluations.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from vlhub.data.shards import ShardSet
from vlhub.errors import ConfigError

log = logging.getLogger(__name__)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def key_of(*parts: object) -> int:
    """A 64-bit key from any parts, the same in every process (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def mix64(key: int, positions: np.ndarray) -> np.ndarray:
    """splitmix64 of ``key + position``: uniform 64-bit values, vectorised."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64(key) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _slots(key: int, positions: np.ndarray, size: int) -> np.ndarray:
    return (mix64(key, positions) % np.uint64(size)).astype(np.int64)


def _last_before(key: int, size: int, inputs: np.ndarray) -> np.ndarray:
    """For each input ``t >= size``: the last ``t' in [size, t)`` whose slot is ``slot(t)``, else that slot
    (the item that filled it first)."""
    found = np.full(len(inputs), -1, dtype=np.int64)
    pending, reach = np.arange(len(inputs)), 8 * size
    while len(pending):
        queries = inputs[pending]
        low, high = max(size, int(queries.min()) - reach), int(queries.max())
        window = np.arange(low, high, dtype=np.int64)
        slot = np.concatenate([_slots(key, window, size), _slots(key, queries, size)])
        position = np.concatenate([window, queries])
        is_window = np.concatenate([np.ones(len(window), bool), np.zeros(len(queries), bool)])
        order = np.lexsort((is_window, position, slot))  # a query sorts before a window entry at its own t
        last = np.maximum.accumulate(np.where(is_window[order], np.arange(len(order)), -1))
        query_rank = np.flatnonzero(~is_window[order])  # in sorted order
        previous = last[query_rank]
        query_index = order[query_rank] - len(window)
        hit = (previous >= 0) & (slot[order[np.maximum(previous, 0)]] == slot[order[query_rank]])
        found[pending[query_index[hit]]] = position[order[previous[hit]]]
        missing = query_index[~hit]
        if low == size:  # looked back to the start: the slot still holds its first item
            found[pending[missing]] = slot[len(window) + missing]
            break
        pending, reach = pending[np.sort(missing)], reach * 4
    return found


def _final_buffer(key: int, size: int, total: int) -> np.ndarray:
    """The buffer after all ``total`` inputs entered: per slot, the last input that took it."""
    state, open_ = np.arange(size, dtype=np.int64), np.ones(size, bool)
    high = total
    while high > size and open_.any():
        low = max(size, high - 8 * size)
        window = np.arange(low, high, dtype=np.int64)
        last = np.full(size, -1, dtype=np.int64)
        np.maximum.at(last, _slots(key, window, size), window)
        take = open_ & (last >= 0)
        state[take], open_[take], high = last[take], False, low
    return state


def buffer_inputs(outputs: np.ndarray, total: int, size: int, key: int) -> np.ndarray:
    """Which input of a ``size``-sample shuffle buffer comes out at each of ``outputs`` (of ``total``)."""
    if size <= 1:
        return outputs.copy()
    if total <= size:  # the buffer never fills: the whole input, in a seeded order
        return np.random.Generator(np.random.PCG64(key)).permutation(total)[outputs]
    result = np.empty(len(outputs), dtype=np.int64)
    early = outputs < total - size
    result[early] = _last_before(key, size, outputs[early] + size)
    if (~early).any():
        flush = np.random.Generator(np.random.PCG64(key + 1)).permutation(size)
        result[~early] = _final_buffer(key, size, total)[flush[outputs[~early] - (total - size)]]
    return result


def quotas(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split by ``weights`` (largest remainder: they sum to ``total``)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_range(start: int, stop: int, counts: Sequence[int], phases: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[start, stop)`` of sources merged by time ``(u + phase_i) / n_i``: (source, item u) of each."""
    live = [i for i, n in enumerate(counts) if n > 0]

    def before(tau: float) -> list[int]:  # items of each source with time < tau
        found = []
        for i in live:
            n, phase = counts[i], phases[i]
            c = min(n, max(0, int(np.ceil(tau * n - phase))))
            while c > 0 and (c - 1 + phase) / n >= tau:
                c -= 1
            while c < n and (c + phase) / n < tau:
                c += 1
            found.append(c)
        return found

    low, high = 0.0, 2.0
    for _ in range(64):  # the latest time with at most ``start`` items before it
        middle = (low + high) / 2
        low, high = (middle, high) if sum(before(middle)) <= start else (low, middle)
    firsts = before(low)
    need = stop - sum(firsts)
    sources, items, times = [], [], []
    for i, first in zip(live, firsts, strict=True):
        u = np.arange(first, min(counts[i], first + need), dtype=np.int64)
        sources.append(np.full(len(u), i)), items.append(u), times.append((u + phases[i]) / counts[i])
    source, item, time = np.concatenate(sources), np.concatenate(items), np.concatenate(times)
    order = np.lexsort((source, time))[start - sum(firsts) : start - sum(firsts) + stop - start]
    return source[order], item[order]


class SourcePasses:
    """One source's samples as an endless sequence of passes (or a rank's own resampled draws)."""

    def __init__(self, shards: ShardSet, index: int, seed: int) -> None:
        assert shards.sizes is not None
        self.urls, self.index, self.seed = shards.urls, index, seed
        self.counts = [shards.sizes[url] for url in shards.urls]
        self.total = sum(self.counts)
        self._draws: dict[tuple[int, int], tuple[list[int], list[int], random.Random]] = {}

    @lru_cache(maxsize=4)  # noqa: B019 (a few passes at a time; the object lives as long as the stream)
    def _pass(self, number: int) -> tuple[list[int], list[int]]:
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}/{number}/{self.index}/order").shuffle(order)
        return order, list(np.cumsum([self.counts[s] for s in order]).tolist())

    def locate(self, g: int) -> tuple[str, int]:
        """Global index -> (shard url, sample index in the shard)."""
        number, offset = divmod(g, self.total)
        order, ends = self._pass(number)
        k = bisect.bisect_right(ends, offset)
        return self.urls[order[k]], offset - (ends[k - 1] if k else 0)

    def locate_drawn(self, epoch: int, rank: int, u: int) -> tuple[str, int]:
        """Item ``u`` of rank ``rank``'s own draw of shards with replacement in ``epoch``."""
        if (epoch, rank) not in self._draws:
            if len(self._draws) > 4:
                self._draws.clear()
            self._draws[(epoch, rank)] = ([], [], random.Random(f"{self.seed}/{epoch}/{self.index}/{rank}/resample"))
        shards, ends, rng = self._draws[(epoch, rank)]
        while not ends or ends[-1] <= u:
            shard = rng.randrange(len(self.urls))
            shards.append(shard)
            ends.append((ends[-1] if ends else 0) + self.counts[shard])
        k = bisect.bisect_right(ends, u)
        return self.urls[shards[k]], u - (ends[k - 1] if k else 0)


class StreamLayout:
    """Output position ``o`` of rank ``r`` in epoch ``e`` -> (source, shard url, sample in shard)."""

    def __init__(
        self,
        sources: Sequence[ShardSet],
        seed: int,
        world_size: int,
        batch_size: int,
        batches_per_epoch: int,
        shuffle_buffer: int,
        resampled: bool,
        whole_passes: bool,
        filtering: bool = False,
    ) -> None:
        self.passes = [SourcePasses(s, i, seed) for i, s in enumerate(sources)]
        for source, passes in zip(sources, self.passes, strict=True):
            if passes.total == 0:
                raise ValueError(f"data source {source.name!r}: its {len(source.urls)} shards hold no samples")
        self.seed, self.world_size, self.resampled = seed, world_size, resampled
        self.per_rank = batches_per_epoch * batch_size
        if filtering:  # positions count kept samples: give each rank its share of a whole pass to keep them from
            self.per_rank = max(self.per_rank, sum(p.total for p in self.passes) // world_size)
        self.shuffle_buffer = shuffle_buffer
        self.quotas = quotas(self.per_rank, [s.weight for s in sources])
        self.strides = [
            max(p.total, world_size * n) if whole_passes else world_size * n
            for p, n in zip(self.passes, self.quotas, strict=True)
        ]

    def left_out(self) -> int:
        """Samples of each pass an epoch leaves out (whole passes: less than a global batch a source)."""
        return sum(max(0, p.total - self.world_size * n) for p, n in zip(self.passes, self.quotas, strict=True))

    def locate(self, epoch: int, rank: int, outputs: np.ndarray) -> list[tuple[str, int]]:
        """(shard url, sample in shard) of each output position of this rank and epoch."""
        inputs = buffer_inputs(outputs, self.per_rank, self.shuffle_buffer, key_of(self.seed, epoch, rank, "shuffle"))
        if len(self.passes) == 1:
            sources, items = np.zeros(len(inputs), dtype=np.int64), inputs
        else:
            low, high = int(inputs.min()), int(inputs.max()) + 1
            phases = [random.Random(f"{self.seed}/{epoch}/{rank}/{i}/phase").random() for i in range(len(self.passes))]
            mixed_sources, mixed_items = mix_range(low, high, self.quotas, phases)
            sources, items = mixed_sources[inputs - low], mixed_items[inputs - low]
        found = []
        for source, u in zip(sources.tolist(), items.tolist(), strict=True):
            passes = self.passes[source]
            if self.resampled:
                found.append(passes.locate_drawn(epoch, rank, u))
            else:
                found.append(passes.locate(epoch * self.strides[source] + rank * self.quotas[source] + u))
        return found


LAYOUT_KEYS = {
    "world_size": "the number of ranks",
    "batch_size": "trainer.batch_size",
    "num_samples": "data.num_samples",
    "shuffle_buffer": "data.shuffle_buffer",
    "resampled": "data.resampled",
    "shards": "data.root (its shards or their counts)",
    "lanes": "data.workers (remote shards are read in lanes, one per worker)",
}


def layout_record(sources: Sequence[ShardSet], num_samples: int, **settings: int | bool) -> dict:
    """What the stream's order depends on (stored in the checkpoint; compared at resume)."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(repr((source.name, source.weight, source.urls, source.sizes)).encode())
    return {"num_samples": num_samples, "shards": digest.hexdigest()[:16], **settings}


def resume_anchor(record: dict, saved: dict | None, start_sample: int) -> tuple[int, int]:
    """(epoch, sample) the stream's batches count from: the saved anchor when the layout is unchanged, the
    current epoch boundary when it changed there; else a :class:`ConfigError` naming what changed."""
    if not saved:
        return 0, 0
    anchor = int(saved.get("anchor_epoch", 0)), int(saved.get("anchor_sample", 0))
    changed = [key for key in LAYOUT_KEYS if key in record and saved.get(key) != record[key]]
    if not changed:
        return anchor
    epoch_samples = int(saved["world_size"]) * int(saved["batch_size"]) * int(saved["batches_per_epoch"])
    done, within = divmod(start_sample - anchor[1], epoch_samples)
    if within == 0:
        log.info("resuming at an epoch boundary with a new layout (%s changed)", ", ".join(changed))
        return anchor[0] + done, start_sample
    names = "; ".join(f"{LAYOUT_KEYS[key]}: {saved.get(key)} -> {record[key]}" for key in changed)
    raise ConfigError(
        f"the checkpoint's shard stream is {within} samples into an epoch, and its layout changed ({names})",
        hint="resume with the checkpoint's settings, or change them at an epoch boundary",
    )
