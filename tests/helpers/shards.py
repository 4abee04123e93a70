"""Webdataset shards written by plain tools, and reading batches and captions back."""

from __future__ import annotations

import io
import json

import torch
import webdataset
from PIL import Image


def pixels(image):
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.size[1], image.size[0], 3)


def png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (colour % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A baseline RGB JPEG of smooth random colour (upsampled noise: edges and gradients, like a photo)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=torch.uint8, generator=generator)
    image = Image.fromarray(noise.numpy()).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def truncated_scan(data: bytes, keep: float = 0.6) -> bytes:
    """``data`` (a JPEG) cut inside its scan: the header is whole, so opening it succeeds; decoding fails."""
    return data[: int(len(data) * keep)]


def tagged_shards(folder, name, shards, per_shard, sizes=True):
    """Shards written by a plain ``webdataset.TarWriter``; each caption names its source and shard."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with webdataset.TarWriter(str(folder / f"{name}-{s:06d}.tar")) as writer:
            for i in range(per_shard):
                writer.write({"__key__": f"{s:04d}_{i:04d}", "png": png(i), "txt": f"{name} {s} {i}"})
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({f"{name}-{s:06d}.tar": per_shard for s in range(shards)}))
    return f"{folder}/{name}-{{000000..{shards - 1:06d}}}.tar"


def batches(source, count, batch_size, **kwargs):
    loader = iter(source.build_loader(pixels, None, batch_size, kwargs.pop("seed", 0), **kwargs))
    return [next(loader) for _ in range(count)]


def captions(loaded):
    return [c for b in loaded for c in b.batch["text_raw"]]


def shards_with_one_bad_sample_each(folder, shards=6):
    """``shards`` shards of three good samples and one truncated JPEG each."""
    folder.mkdir(parents=True)
    for s in range(shards):
        with webdataset.TarWriter(str(folder / f"b-{s:06d}.tar")) as writer:
            for i in range(3):
                writer.write({"__key__": f"{s}_{i}", "png": png(s * 3 + i), "txt": f"a red circle {s} {i}"})
            writer.write({"__key__": f"{s}_bad", "jpg": b"\xff\xd8 truncated", "txt": "a broken image"})
    return f"{folder}/b-{{000000..{shards - 1:06d}}}.tar"
