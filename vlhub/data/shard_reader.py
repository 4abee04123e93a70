"""Reading sample ``j`` of a local shard by seeking: the shard's tar headers once, then one read a sample.

Every slot of the layout (``vlhub.data.layout``) is one (shard, sample index) pair, so losses count
exactly: a shard that cannot be opened gives one :class:`BadSample` per slot it was given; one whose
headers end early (corrupt, cut) or that holds fewer samples than its count (``sizes.json`` or
img2dataset's stats disagreeing with the tar) gives one per sample it lacks, with one warning per
shard (and worker); samples beyond the count are never read (warned the same way).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import BinaryIO

from vlhub.data.batch import BadSample
from vlhub.data.tar_index import Span, TarHeaderError, read_member, read_span, scan

log = logging.getLogger(__name__)


class LocalShards:
    """Open shards and their sample spans, the most recently used: up to ``samples`` spans in all (a
    shuffle buffer reaches back over many small shards or a few large ones), at most ``files`` files."""

    def __init__(self, counts: dict[str, int], samples: int = 100_000, files: int = 128) -> None:
        self.counts, self.samples, self.files = counts, samples, files
        self._held = 0
        self._open: OrderedDict[str, tuple[BinaryIO | None, list[Span], str | None]] = OrderedDict()
        self._warned: set[str] = set()

    def _entry(self, url: str) -> tuple[BinaryIO | None, list[Span], str | None]:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        try:
            file: BinaryIO | None = open(url, "rb", buffering=0)  # noqa: SIM115 (unbuffered: a header read is 512 bytes, not 8 KB)
            spans, error = scan(file)  # type: ignore[arg-type]
            problem = f"shard {url} is corrupt after {len(spans)} samples: {error}" if error else None
        except OSError as error:
            file, spans, problem = None, [], f"cannot open shard {url}: {error}"
        expected = self.counts.get(url)
        if problem is None and expected is not None and len(spans) < expected:
            problem = f"shard {url} holds {len(spans)} samples, its count says {expected}"
        if problem and url not in self._warned:
            self._warned.add(url)
            log.warning("%s: the samples it lacks are counted as bad", problem)
        elif expected is not None and len(spans) > expected and url not in self._warned:
            self._warned.add(url)
            log.warning(
                "shard %s holds %d samples, its count says %d: the last are not read", url, len(spans), expected
            )
        self._open[url] = (file, spans, problem)
        self._held += len(spans)
        while len(self._open) > 2 and (len(self._open) > self.files or self._held > self.samples):
            old, old_spans, _ = self._open.popitem(last=False)[1]
            self._held -= len(old_spans)
            if old is not None:
                old.close()
        return self._open[url]

    def sample(self, url: str, index: int) -> dict | BadSample:
        """Sample ``index`` of shard ``url`` as webdataset groups it, or the reason it is lost."""
        file, spans, problem = self._entry(url)
        if file is None or index >= len(spans):
            return BadSample(f"{problem or f'shard {url} has no sample {index}'} (sample {index} lost)")
        try:
            return read_span(file, spans[index], url)
        except (OSError, TarHeaderError) as error:
            return BadSample(f"cannot read sample {spans[index].key} of shard {url}: {error}")

    def caption(self, url: str, index: int) -> bytes | None:
        """Sample ``index``'s ``txt`` alone (to filter on), or None when there is none to read."""
        file, spans, _ = self._entry(url)
        if file is None or index >= len(spans):
            return None
        try:
            return read_member(file, spans[index], "txt")
        except OSError:
            return None

    def close(self) -> None:
        for file, _, _ in self._open.values():
            if file is not None:
                file.close()
        self._open.clear()
        self._held = 0
