"""The cheap input path (issue 8, item 7): uint8 images normalised on the device equal open_clip's
normalised tensors; batches pinned when asked; the prefetcher keeps order and content; JPEG
draft decoding draws the same crops and is exact when off."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlhub.augment import build_clip_transforms, build_plain_transforms, open_clip_train_transform
from vlhub.data import CsvPairs, SyntheticShapes, build_train_loader
from vlhub.data.batch import LoadedBatch, move_batch, normalize_images
from vlhub.engine.prefetch import prefetch
from vlhub.models.vision_language import ImageStats

CPU = torch.device("cpu")
STATS = ImageStats(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth random picture with edges, as a quality-90 JPEG."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((width, height))
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-20, 20, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_csv(folder: Path, count: int, width: int = 120, height: int = 90) -> Path:
    rows = ["filepath,title"]
    for index in range(count):
        (folder / f"{index}.jpg").write_bytes(_jpeg(width, height, index))
        rows.append(f"{index}.jpg,picture {index}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def _seeded(transform, image, seed=0):
    torch.manual_seed(seed)
    return transform(image)


def test_uint8_transfer_equals_open_clips_normalised_tensors(tmp_path):
    ours = build_clip_transforms(STATS, draft=False).train
    theirs = open_clip_train_transform(STATS)
    decoded = SyntheticShapes(num_samples=3).load(1).image
    for seed, make in enumerate([lambda: decoded, lambda: Image.open(io.BytesIO(_jpeg(120, 90, 3)))] * 2):
        uint8 = _seeded(ours, make(), seed)
        assert uint8.dtype == torch.uint8 and uint8.shape == (3, 32, 32)
        reference = _seeded(theirs, make(), seed)
        on_device = move_batch({"image": uint8[None]}, CPU, torch.float32, STATS.mean, STATS.std)["image"][0]
        torch.testing.assert_close(on_device, reference, rtol=0, atol=1e-6)
        # In a reduced param dtype: the same values as casting today's float tensor.
        bf16 = move_batch({"image": uint8[None]}, CPU, torch.bfloat16, STATS.mean, STATS.std)["image"][0]
        assert torch.equal(bf16, reference.to(torch.bfloat16))


def test_plain_transform_trains_in_uint8_and_evaluates_in_float():
    transforms = build_plain_transforms(STATS)
    image = SyntheticShapes(num_samples=1).load(0).image
    evaluated = transforms.eval(image)
    assert evaluated.dtype == torch.float32
    torch.testing.assert_close(normalize_images(transforms.train(image)[None], STATS.mean, STATS.std)[0], evaluated)


def test_loader_batches_equal_todays_batches_sample_for_sample(tmp_path):
    source = CsvPairs(str(_write_csv(tmp_path, 12)))
    ours = build_clip_transforms(STATS, draft=False).train  # draft off: exactly the same pixels
    new = next(iter(build_train_loader(source, ours, None, 6, seed=3, start_sample=6))).batch
    old = next(
        iter(build_train_loader(source, open_clip_train_transform(STATS), None, 6, seed=3, start_sample=6))
    ).batch
    assert new["image"].dtype == torch.uint8 and new["text_raw"] == old["text_raw"]
    moved = move_batch(new, CPU, torch.float32, STATS.mean, STATS.std)
    torch.testing.assert_close(moved["image"], old["image"], rtol=0, atol=1e-6)


def test_draft_decoding_keeps_the_crop_and_decodes_fewer_pixels():
    data, stats = _jpeg(1024, 768, 7), ImageStats(128, STATS.mean, STATS.std)
    drafted_image = _open(data)
    _seeded(build_clip_transforms(stats, draft_min_fraction=1.0).train, drafted_image)
    assert drafted_image.size == (256, 192)  # decoded at 1/4: the crop still spans >= 128 px a side
    # Smaller crops, so that each seed's crop differs: the drafted crop is the same crop, seen at
    # another decoding resolution (close to the exact one, and far from any other crop).
    exact, drafted = (build_clip_transforms(stats, (0.2, 0.5), on, 1.0).train for on in (False, True))
    exacts = [_seeded(exact, _open(data), seed).float() for seed in range(3)]
    for seed in range(3):
        ours = _seeded(drafted, _open(data), seed).float()
        errors = [(ours - other).abs().mean().item() for other in exacts]
        assert 0 < errors[seed] < 2.0 and min(e for k, e in enumerate(errors) if k != seed) > 4 * errors[seed]
    # Already-decoded images are left alone: draft on gives exactly the pixels of draft off.
    decoded = _open(data).convert("RGB")
    assert torch.equal(_seeded(drafted, decoded), _seeded(exact, _open(data)).to(torch.uint8))


def test_draft_min_fraction_limits_the_reduction():
    data, stats = _jpeg(1024, 768, 7), ImageStats(128, STATS.mean, STATS.std)
    for fraction, expected in [(1.0, (256, 192)), (0.5, (128, 96))]:
        image = _open(data)
        _seeded(build_clip_transforms(stats, draft_min_fraction=fraction).train, image)
        assert image.size == expected
    with pytest.raises(ValueError, match="draft_min_fraction"):
        build_clip_transforms(stats, draft_min_fraction=0.0)


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_a_jpeg_corrupt_past_its_header_is_skipped_and_counted(tmp_path):
    csv = _write_csv(tmp_path, 4)
    whole = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(whole[:200] + b"\x00" * 50)  # header intact, data broken
    loader = build_train_loader(CsvPairs(str(csv)), build_clip_transforms(STATS).train, None, 4, seed=0)
    loaded = next(iter(loader))
    assert (loaded.samples_read, loaded.bad_samples) == (4, 1)
    assert len(loaded.batch["image"]) == 3 and "picture 2" not in loaded.batch["text_raw"]


def test_pin_memory_is_passed_to_the_loader_and_pins_batches():
    source = SyntheticShapes(num_samples=16)
    train = build_clip_transforms(STATS).train
    assert build_train_loader(source, train, None, 4, seed=0, pin_memory=True).pin_memory
    assert not build_train_loader(source, train, None, 4, seed=0).pin_memory
    if not torch.cuda.is_available():
        pytest.skip("page-locked memory needs a CUDA device: the flag's plumbing is checked above")
    loaded = next(iter(build_train_loader(source, train, None, 4, seed=0, pin_memory=True)))
    assert isinstance(loaded, LoadedBatch) and loaded.batch["image"].is_pinned()


def test_prefetch_yields_the_same_batches_in_the_same_order():
    loader = build_train_loader(SyntheticShapes(num_samples=32), build_clip_transforms(STATS).train, None, 4, seed=1)
    expected = [b for _, b in zip(range(5), loader)]
    fetched = [b for _, b in zip(range(5), prefetch(iter(loader), CPU))]
    for want, got in zip(expected, fetched, strict=True):
        assert isinstance(got, LoadedBatch) and got.samples_read == want.samples_read
        assert torch.equal(got.batch["image"], want.batch["image"]) and got.batch["text_raw"] == want.batch["text_raw"]
    chunks = [{"image": torch.full((2, 3, 4, 4), k, dtype=torch.uint8)} for k in range(4)]
    assert [int(c["image"][0, 0, 0, 0]) for c in prefetch(chunks, CPU)] == [0, 1, 2, 3]
    assert list(prefetch([], CPU)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copy needs a CUDA device")
def test_prefetch_on_cuda_copies_pinned_batches_in_order():
    device = torch.device("cuda")
    chunks = [{"image": torch.full((8, 3, 64, 64), k, dtype=torch.uint8).pin_memory()} for k in range(6)]
    for k, chunk in enumerate(prefetch(chunks, device)):
        assert chunk["image"].device.type == "cuda"
        assert torch.equal(chunk["image"].cpu(), chunks[k]["image"])


def test_normalize_images_uses_each_calls_own_mean_and_std():
    # The per-device mean/std tensors are made once and reused: a second model's stats must not get the first's.
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    stats = [((0.1, 0.2, 0.3), (0.5, 0.5, 0.5)), ((0.5, 0.5, 0.5), (0.2, 0.3, 0.4)), ([0.1, 0.2, 0.3], [1, 1, 1])]
    for mean, std in stats:
        column = [torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (mean, std)]
        expected = (images.float() / 255 - column[0]) / column[1]
        assert torch.equal(normalize_images(images, mean, std), expected)


def test_evaluation_skips_and_counts_a_jpeg_corrupt_past_its_header(tmp_path):
    # Sources hand JPEGs over undecoded; the eval transform decodes them, so it is where one fails.
    from vlhub.eval.image_batches import iter_labelled_batches
    from vlhub.eval.retrieval import _Images

    csv = _write_csv(tmp_path, 4)
    whole = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(whole[:200] + b"\x00" * 50)  # header intact, data broken
    evaluate = build_clip_transforms(STATS).eval
    [(images, labels, skipped)] = list(iter_labelled_batches(CsvPairs(str(csv)), evaluate, 4))
    assert (len(images), len(labels), skipped) == (3, 3, 1)
    with pytest.raises(RuntimeError, match="retrieval set image .*2.jpg cannot be read"):
        _Images([tmp_path / "2.jpg"], evaluate)[0]
