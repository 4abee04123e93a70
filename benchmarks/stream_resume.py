"""Seconds and bytes read to resume a ``data=wds`` stream at 90% of an epoch (the first batch after it).

    python benchmarks/stream_resume.py --shards 100 --per-shard 100 --buffer 1000 --batch 64

Writes ``--shards`` shards of ``--per-shard`` samples (a ~10 KB JPEG and a caption each, with
``webdataset.TarWriter``, plus ``sizes.json``), then builds the source's loader at 90% of the epoch
(one process, ``data.workers=0``) and times the first batch. Bytes are the process's ``rchar`` from
``/proc/self/io`` (every ``read()``, page cache included) over that span. The transform does not
decode the images, so the figure is the positioning cost. To compare with another version of vlhub,
run this file with ``PYTHONPATH`` pointing at it (only ``WebDatasetPairs(...).build_loader`` is used).
Output: one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import webdataset
from PIL import Image


def write(folder: Path, shards: int, per_shard: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "sizes.json").is_file():
        return f"{folder}/b-{{000000..{shards - 1:06d}}}.tar"
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    for s in range(shards):
        with webdataset.TarWriter(str(folder / f"b-{s:06d}.tar")) as writer:
            for i in range(per_shard):
                writer.write({"__key__": f"{s:06d}_{i:05d}", "jpg": jpeg, "txt": f"sample {s} {i}"})
    (folder / "sizes.json").write_text(json.dumps({f"b-{s:06d}.tar": per_shard for s in range(shards)}))
    return f"{folder}/b-{{000000..{shards - 1:06d}}}.tar"


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--folder", default="/tmp/vlhub-stream-resume")
    args = parser.parse_args()
    from vlhub.data import WebDatasetPairs

    root = write(Path(args.folder), args.shards, args.per_shard)
    total = args.shards * args.per_shard
    epoch_bytes = sum(p.stat().st_size for p in Path(args.folder).glob("*.tar"))
    source = WebDatasetPairs(root, shuffle_buffer=args.buffer, workers=0)
    start = int(0.9 * total) // args.batch * args.batch
    before, tick = rchar(), time.perf_counter()
    loader = source.build_loader(lambda image: torch.zeros(1), None, args.batch, 0, start_sample=start)
    first = next(iter(loader))
    seconds, read = time.perf_counter() - tick, rchar() - before
    geometry = f"{args.shards} shards x {args.per_shard} samples, buffer {args.buffer}, batch {args.batch}"
    print(
        json.dumps(
            {
                "geometry": geometry,
                "resume_at": start,
                "seconds": round(seconds, 3),
                "bytes_read": read,
                "epoch_bytes": epoch_bytes,
                "fraction_of_epoch_read": round(read / epoch_bytes, 4),
                "batch_samples": first.samples_read,
            }
        )
    )


if __name__ == "__main__":
    main()
