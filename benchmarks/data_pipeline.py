"""Images/s of the training input pipeline at 224 px: vlhub's against open_clip's, same shards.

Both sides read the same webdataset shards of ImageNet-like 500x375 JPEGs (quality 90, written
here with ``webdataset.TarWriter``), decode, crop, tokenise and batch them in DataLoader workers:
- open_clip: ``open_clip_train.data.get_wds_dataset`` with open_clip's training transform
  (eager PIL decode, RandomResizedCrop bicubic, ToTensor, Normalize; float batches);
- vlhub: plain ``webdataset`` reading the same tars, the JPEG handed over undecoded to vlhub's
  training transform (``vlhub.augment``: the same crop draws, JPEG draft decoding, uint8 out;
  the float conversion and normalisation happen on the GPU), once per draft setting;
- vlhub ``data=wds``: the whole training source (``WebDatasetPairs.build_loader``: its seeded
  shuffle buffer, reads by seeking, bad-sample accounting, slot-seeded augmentation, captions,
  tokenisation) with the default transform and with exact pixels, what a training run reads
  through: the headline, as a ratio to open_clip and to the matching decode-only row; the
  plain-webdataset rows above isolate the decode cost.

open_clip 3.3's pipeline fails with webdataset 1.0.2 (``KeyError: 'fname'``); its training extra
pins webdataset <= 0.2.86. So the open_clip side runs in its own venv, as a subprocess, which
takes webdataset 0.2.86 and pandas from there and everything else (torch, Pillow, open_clip)
from vlhub's venv, so both sides decode with the same Pillow and libjpeg:

    python3 -m venv /tmp/oc-venv
    /tmp/oc-venv/bin/pip install 'webdataset<=0.2.86' pandas
    python -c 'import site; print(site.getsitepackages()[0])' \\
        > /tmp/oc-venv/lib/python3.11/site-packages/zz_vlhub_venv.pth   # appended after its own
    python benchmarks/data_pipeline.py --workers 2 --open-clip-python /tmp/oc-venv/bin/python

(``python`` is vlhub's venv; use the oc-venv's Python version in the .pth path.) ``--repeats``
rounds (default 3), each one pass of every pipeline in turn (2000 images by default, in
``/tmp/vlhub-bench-shards-2000``), so that a change in the machine's load hits every row alike.
Output: one JSON line per pipeline (its median pass: images/s, per worker, and every pass's
images/s), each decode-only row's ratio to open_clip, and the HEADLINE lines: the real source's
ratio to open_clip and to its decode-only row, each the median of the rounds' ratios.

``--profile`` prints instead where the real source's time goes, per sample and stage (CPU time,
in-process with workers=0, so it holds on a loaded machine), beside the decode-only pipeline's
total in-process (``benchmarks/stage_profile.py``).

JPEG decoding on the GPU (``augment.decode=cuda``), only where CUDA is available (otherwise one line
says the rows are skipped): the ``data=wds`` source at ``--workers`` and at all cores, each batch
counted once its uint8 images are on the GPU, with CPU decode (default draft, and exact pixels) and
with the JPEGs decoded on the GPU (``vlhub.data.device_decode``). ``--device-decode-only`` runs these
rows alone (no open_clip venv needed):

    python benchmarks/data_pipeline.py --device-decode-only --workers 2
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, QUALITY = 500, 375, 90


def make_image(rng: np.random.Generator) -> bytes:
    """A smooth random background, a few filled shapes and mild noise, as a q90 JPEG."""
    coarse = (rng.random((int(rng.integers(3, 12)), int(rng.integers(4, 16)), 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 10))):
        x, y, r = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)), int(rng.integers(15, 120))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=fill)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-10, 11, (HEIGHT, WIDTH, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def write_shards(folder: Path, count: int, shard_size: int) -> list[str]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    shards = [str(folder / f"shard-{k:06d}.tar") for k in range((count + shard_size - 1) // shard_size)]
    if all(Path(s).exists() for s in shards) and (folder / "sizes.json").exists():
        return shards
    rng = np.random.default_rng(0)
    for k, shard in enumerate(shards):
        with wds.TarWriter(shard) as sink:
            for index in range(k * shard_size, min(count, (k + 1) * shard_size)):
                sink.write({"__key__": f"{index:08d}", "jpg": make_image(rng), "txt": f"a picture number {index}"})
    (folder / "sizes.json").write_text(json.dumps({Path(s).name: shard_size for s in shards}))
    return shards


def time_batches(loader, count: int) -> dict[str, float]:
    """Images/s after the first batch (worker start-up and first decodes are not counted)."""
    seen, start = 0, None
    for images, _ in loader:
        if start is None:
            start, first = time.perf_counter(), len(images)
            continue
        seen += len(images)
    elapsed = time.perf_counter() - start
    return {"images": seen + first, "timed_images": seen, "seconds": elapsed, "images_per_s": seen / elapsed}


def _decode_only_loader(shards: list[str], args, draft: bool, min_fraction: float):
    import open_clip
    import webdataset as wds
    from torch.utils.data import DataLoader

    from vlhub.augment import build_clip_transforms
    from vlhub.models.vision_language import ImageStats

    stats = ImageStats(args.size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    transform = build_clip_transforms(stats, draft=draft, draft_min_fraction=min_fraction).train
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def prepare(sample):  # the JPEG opened, not decoded: the transform decides at what scale
        return transform(Image.open(io.BytesIO(sample["jpg"]))), sample["txt"].decode("utf-8")

    def collate(samples):
        images, texts = zip(*samples)
        return torch.stack(images), tokenizer(list(texts))

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(prepare),
        wds.batched(args.batch_size, collation_fn=collate, partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=args.workers)


def run_vlhub(shards: list[str], args, draft: bool, min_fraction: float) -> dict[str, float]:
    return time_batches(_decode_only_loader(shards, args, draft, min_fraction), args.num_images)


def _source_loader(shards: list[str], args, draft: bool):
    import open_clip

    from vlhub.augment import build_clip_transforms
    from vlhub.data import WebDatasetPairs
    from vlhub.models.vision_language import ImageStats

    stats = ImageStats(args.size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    source = WebDatasetPairs("::".join(shards), workers=args.workers)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return source.build_loader(build_clip_transforms(stats, draft=draft).train, tokenizer, args.batch_size, seed=0)


def run_vlhub_source(shards: list[str], args, draft: bool = True) -> dict[str, float]:
    import itertools

    loader = _source_loader(shards, args, draft)
    batches = itertools.islice(loader, -(-args.num_images // args.batch_size))  # the loader is endless
    return time_batches(((loaded.batch["image"], loaded.batch["text"]) for loaded in batches), args.num_images)


def run_source_on_device(
    shards: list[str], args, workers: int, decode: str, device: torch.device, draft: bool = True
) -> dict[str, float]:
    """The data=wds source's images/s up to uint8 batches on ``device``: decoded in the workers
    (``decode="cpu"``, pinned and copied) or in this process on the device (``decode="cuda"``)."""
    import itertools

    import open_clip

    from vlhub.augment import build_clip_transforms
    from vlhub.data import WebDatasetPairs
    from vlhub.data.device_decode import DeviceDecoding
    from vlhub.models.vision_language import ImageStats

    stats = ImageStats(args.size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    transforms = build_clip_transforms(stats, draft=draft, decode=decode)
    source = WebDatasetPairs("::".join(shards), workers=workers)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loader = source.build_loader(transforms.train, tokenizer, args.batch_size, seed=0, pin_memory=device.type == "cuda")
    if transforms.device_decode:
        loader = DeviceDecoding(loader, device)

    def on_device():
        for loaded in itertools.islice(loader, -(-args.num_images // args.batch_size)):  # the loader is endless
            images = loaded.batch["image"].to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the batch is there, decoded
            yield images, loaded.batch["text"]

    return time_batches(on_device(), args.num_images)


def device_decode_rows(shards: list[str], args) -> None:
    """CPU decode vs GPU decode at ``--workers`` and at all cores (only with CUDA)."""
    if not torch.cuda.is_available():
        print("device decode rows (augment.decode=cuda) skipped: torch.cuda.is_available() is False", flush=True)
        return
    device = torch.device("cuda")
    for workers in sorted({args.workers, os.cpu_count() or 1}):
        rows = {}
        for name, decode, draft in [
            ("CPU decode, default draft", "cpu", True),
            ("CPU decode, exact pixels (augment.draft=false)", "cpu", False),
            ("GPU decode (augment.decode=cuda)", "cuda", True),
        ]:
            best = max(
                (run_source_on_device(shards, args, workers, decode, device, draft) for _ in range(args.repeats)),
                key=lambda r: r["images_per_s"],
            )
            rows[name] = report(f"vlhub data=wds to the GPU, {workers} workers, {name}", best, workers)
        gpu = rows["GPU decode (augment.decode=cuda)"]["images_per_s"]
        print(
            f"GPU decode at {workers} workers: {gpu / rows['CPU decode, default draft']['images_per_s']:.2f}x "
            f"CPU decode (draft), {gpu / rows['CPU decode, exact pixels (augment.draft=false)']['images_per_s']:.2f}x "
            "CPU decode (exact)",
            flush=True,
        )


def run_open_clip(shards: list[str], args) -> dict[str, float]:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    transform = open_clip.image_transform(args.size, is_train=True)
    settings = SimpleNamespace(
        train_data="::".join(shards),
        val_data=None,
        train_num_samples=args.num_images,
        val_num_samples=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=args.batch_size,
        workers=args.workers,
        world_size=1,
    )
    data = get_wds_dataset(settings, transform, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return time_batches(data.dataloader, args.num_images)


def report(name: str, result: dict, workers: int) -> dict:
    row = {"pipeline": name, **result, "images_per_s_per_worker": result["images_per_s"] / max(1, workers)}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="shard folder (default: /tmp/vlhub-bench-shards-NUM_IMAGES)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds (one pass of each pipeline in turn); medians are reported"
    )
    parser.add_argument("--open-clip-python", default="/tmp/oc-venv/bin/python")
    parser.add_argument(
        "--profile", action="store_true", help="print the real source's CPU ms/sample per stage (in-process) and stop"
    )
    parser.add_argument("--side", choices=["all", "open_clip"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--device-decode-only", action="store_true", help="only the augment.decode=cuda rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = args.shards or Path(f"/tmp/vlhub-bench-shards-{args.num_images}")  # a run never rewrites another's
    shards = write_shards(folder, args.num_images, args.shard_size)
    if args.device_decode_only:
        device_decode_rows(shards, args)
        return
    if args.profile:
        from stage_profile import print_profile  # beside this file (sys.path[0] when run as a script)

        print_profile(shards, args, _source_loader, _decode_only_loader)
        return
    if args.side == "open_clip":  # the subprocess, in the open_clip venv: one pass a call
        print("RESULT " + json.dumps(run_open_clip(shards, args)))
        return
    run_rounds(shards, args)
    device_decode_rows(shards, args)


EXACT, DEFAULT = "vlhub uint8, draft off (exact pixels)", "vlhub uint8, draft on, min_fraction 0.75 (default)"
DECODE_ONLY = {  # name: (draft, draft_min_fraction)
    EXACT: (False, 1.0),
    "vlhub uint8, draft on, min_fraction 1.0 (no upsampling)": (True, 1.0),
    DEFAULT: (True, 0.75),
}
REAL = {  # name: (draft, the decode-only row it is compared with)
    "vlhub data=wds source (WebDatasetPairs, default transform)": (
        True,
        "vlhub uint8, draft on, min_fraction 0.75 (default)",
    ),
    "vlhub data=wds source (WebDatasetPairs, exact pixels: augment.draft=false)": (
        False,
        "vlhub uint8, draft off (exact pixels)",
    ),
}
OPEN_CLIP = "open_clip get_wds_dataset (webdataset 0.2.86)"


def run_open_clip_side(args) -> dict[str, float]:
    """One pass of open_clip's pipeline, in its own venv (a subprocess)."""
    command = [args.open_clip_python, __file__, "--side", "open_clip", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"the open_clip side failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def run_rounds(shards: list[str], args) -> None:
    """``--repeats`` rounds, each one pass of every pipeline in turn, so that a change in the machine's load
    hits every row alike: each real source beside its decode-only row, every other round in reverse order
    (a steady drift cancels); each row is its median pass, each ratio the median of the rounds' ratios."""
    runs = {OPEN_CLIP: lambda: run_open_clip_side(args)}
    for real, (draft, alone) in REAL.items():
        runs[alone] = functools.partial(run_vlhub, shards, args, *DECODE_ONLY[alone])
        runs[real] = functools.partial(run_vlhub_source, shards, args, draft)
    for name, (draft, fraction) in DECODE_ONLY.items():
        runs.setdefault(name, functools.partial(run_vlhub, shards, args, draft, fraction))
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in [OPEN_CLIP, *DECODE_ONLY, *REAL]}
    for round_ in range(args.repeats):
        for name in list(runs)[:: -1 if round_ % 2 else 1]:
            passes[name].append(runs[name]())
    speeds = {name: [row["images_per_s"] for row in rows] for name, rows in passes.items()}
    for name, rows in passes.items():
        median = sorted(rows, key=lambda row: row["images_per_s"])[len(rows) // 2]
        report(name, {**median, "passes_images_per_s": [round(v, 1) for v in speeds[name]]}, args.workers)

    def ratio(name: str, other: str) -> float:
        return float(np.median([a / b for a, b in zip(speeds[name], speeds[other], strict=True)]))

    for name in DECODE_ONLY:
        print(f"{name}: {ratio(name, OPEN_CLIP):.2f}x open_clip")
    for name, (_, alone) in REAL.items():  # the headline: what training reads
        print(
            f"HEADLINE {name}: {ratio(name, OPEN_CLIP):.2f}x open_clip, {ratio(name, alone):.0%} of the decode-only row"
        )


if __name__ == "__main__":
    main()
