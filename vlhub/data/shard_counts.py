"""How many samples each local shard holds, without being told: ``num_samples`` is never needed for them.

For each shard, the first of:
1. ``sizes.json`` beside it (``{"shard-000000.tar": 10000}``, what ``vlhub.data.write_shards`` writes);
2. img2dataset's ``<stem>_stats.json`` beside ``<stem>.tar``: its ``successes`` (``count`` is the number
   of URLs attempted, not the samples written);
3. img2dataset's ``<stem>.parquet``: its rows with ``status == "success"`` (when ``pyarrow`` is installed);
4. the tar's own headers (``vlhub.data.tar_index``: one small read per member, no image is read), once,
   with a progress line; the counts are then added to ``sizes.json`` when the folder is writable, so the
   next launch reads them from there.

A stats file that is not JSON, or lacks ``successes``, is warned about and the tar counted instead. A
stats count that disagrees with the tar is found when the shard is read: the samples it lacks are
counted as bad samples (one warning per shard). Remote shards (``pipe:``, URLs) are not counted here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from vlhub.data.tar_index import scan

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def _stats_count(shard: Path) -> int | None:
    """img2dataset's count for ``shard`` (``00000.tar`` -> ``00000_stats.json`` or ``00000.parquet``)."""
    stats = shard.with_name(f"{shard.stem}_stats.json")
    if stats.is_file():
        try:
            document = json.loads(stats.read_text())
            return int(document["successes"])
        except (ValueError, KeyError, TypeError, OSError) as error:
            log.warning("%s is not img2dataset's stats (%s): counting %s from its tar headers", stats, error, shard)
            return None
    parquet = shard.with_suffix(".parquet")
    if parquet.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return None
        try:
            status = pq.read_table(parquet, columns=["status"]).column("status").to_pylist()
        except Exception as error:  # noqa: BLE001 (any unreadable parquet: count the tar instead)
            log.warning("cannot read %s (%s): counting %s from its tar headers", parquet, error, shard)
            return None
        return sum(value == "success" for value in status)
    return None


def count_tar(path: Path) -> int:
    """Samples in one tar, from its headers (a corrupt header ends the count: what precedes it)."""
    with open(path, "rb", buffering=0) as file:  # unbuffered: each header read is 512 bytes, not 8 KB
        spans, error = scan(file)
    if error is not None:
        log.warning("shard %s: %s; %d samples before it are counted", path, error, len(spans))
    return len(spans)


def _keep(folder: Path, counted: dict[str, int]) -> None:
    """Add ``counted`` to ``folder/sizes.json`` atomically; a read-only folder keeps nothing (said once)."""
    file = folder / "sizes.json"
    try:
        existing = json.loads(file.read_text()) if file.is_file() else {}
        if not isinstance(existing, dict):
            existing = {}
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".sizes.", suffix=".json")
        with os.fdopen(handle, "w") as out:
            json.dump({**existing, **counted}, out, indent=1, sort_keys=True)
        os.replace(temporary, file)
        log.info("kept the counts of %d shards in %s", len(counted), file)
    except (OSError, ValueError) as error:
        log.info("counted %d shards in %s; not kept (%s): counted again next launch", len(counted), folder, error)


def shard_counts(urls: tuple[str, ...]) -> dict[str, int] | None:
    """Samples per shard url, or None when a shard is remote (then ``num_samples`` says the epoch)."""
    if any(url.startswith(REMOTE_PREFIXES) for url in urls):
        return None
    listed: dict[Path, dict] = {}
    counts: dict[str, int] = {}
    unknown: list[Path] = []
    for url in urls:
        path = Path(url)
        if path.parent not in listed:
            file = path.parent / "sizes.json"
            try:
                listed[path.parent] = json.loads(file.read_text()) if file.is_file() else {}
            except (ValueError, OSError) as error:
                log.warning("%s is not readable JSON (%s): shards are counted without it", file, error)
                listed[path.parent] = {}
        count = listed[path.parent].get(path.name) if isinstance(listed[path.parent], dict) else None
        if count is None:
            count = _stats_count(path)
        if count is None:
            unknown.append(path)
        else:
            counts[url] = int(count)
    if unknown:
        counted = _count_tars(unknown)
        counts.update({str(path): n for path, n in counted.items()})
        for folder in sorted({path.parent for path in counted}):
            _keep(folder, {path.name: n for path, n in counted.items() if path.parent == folder})
    return {url: counts[url] for url in urls}


def _count_tars(paths: list[Path]) -> dict[Path, int]:
    log.info("counting the samples of %d shards from their tar headers (no sizes.json nor stats)", len(paths))
    counted, started, shown = {}, time.monotonic(), time.monotonic()
    for index, path in enumerate(paths):
        counted[path] = count_tar(path)
        if time.monotonic() - shown > 5:
            log.info("counted %d of %d shards (%.0f s)", index + 1, len(paths), time.monotonic() - started)
            shown = time.monotonic()
    log.info("counted %d samples in %d shards in %.1f s", sum(counted.values()), len(paths), time.monotonic() - started)
    return counted
