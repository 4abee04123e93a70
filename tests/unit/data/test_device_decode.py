"""JPEG decoding on the device (``augment.decode=cuda``), run on the CPU device: the same crops as the CPU
path, pixels within a grey level of it, rows in sample order, a corrupt JPEG dropped from every key and
counted once, and the launch refusals naming the keys."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from tests.helpers.shards import jpeg, png, truncated_scan
from vlhub.augment import RandomResizedCropUint8
from vlhub.data.batch import BadSample, RawSample
from vlhub.data.device_decode import EncodedView, decode_loaded
from vlhub.data.images import open_image
from vlhub.data.loader import Collate, transform_sample

SEED, SIZE, SCALE = 3, 48, (0.08, 1.0)
CPU = torch.device("cpu")


def exact_path(**kwargs) -> RandomResizedCropUint8:
    return RandomResizedCropUint8(SIZE, SCALE, draft=False, **kwargs)


def sample(data: bytes, slot: int, transform) -> dict | BadSample:
    raw = RawSample(open_image(data, f"image {slot}.jpg"), caption=f"caption {slot}", label=slot % 5)
    return transform_sample(raw, slot, 0, SEED, transform, 1)


def loaded_batch(files: list[bytes], transform):
    tokenizer = lambda texts: torch.tensor([[len(t), 7] for t in texts])  # noqa: E731
    return Collate(tokenizer, 1)([sample(data, 100 + i, transform) for i, data in enumerate(files)])


def test_the_device_path_draws_the_cpu_paths_crops_and_its_pixels_are_within_two_grey_levels():
    files = [jpeg(120 + 24 * i, 90 + 16 * i, seed=i) for i in range(8)]
    for slot, data in enumerate(files):
        view = sample(data, slot, exact_path(decode="cuda"))["views"][0]
        assert isinstance(view, EncodedView) and view.data.numpy().tobytes() == data
        torch.manual_seed(SEED * 7_919 + slot)  # the slot's seed, drawn by torchvision itself
        reference = RandomResizedCrop.get_params(Image.open(io.BytesIO(data)), list(SCALE), [3 / 4, 4 / 3])
        assert view.box == tuple(reference)
    device = decode_loaded(loaded_batch(files, exact_path(decode="cuda")), CPU).batch["image"]
    cpu = loaded_batch(files, exact_path()).batch["image"]
    difference = (device.int() - cpu.int()).abs().float()
    # On the CPU device the decoders agree (libjpeg both); torchvision's bicubic resize differs from PIL's by
    # rounding: measured mean 0.004-0.02, max 2 grey levels (60 JPEGs each, 224 px at scale (0.9, 1) and
    # (0.08, 1), 48 px). nvJPEG's IDCT adds its own difference on CUDA (unmeasured here).
    assert device.dtype == torch.uint8 and device.shape == cpu.shape == (8, 3, SIZE, SIZE)
    assert difference.max() <= 2 and difference.mean() < 0.05


def test_a_batch_mixing_jpeg_and_png_keeps_sample_order_and_the_png_rows_are_the_cpu_paths():
    files = [jpeg(96, 80, seed=0), png(40), jpeg(100, 120, seed=1), png(90), png(130), jpeg(64, 64, seed=2)]
    loaded = loaded_batch(files, exact_path(decode="cuda"))
    assert loaded.batch["image"].jpeg_rows == [0, 2, 5]  # only the JPEGs wait for the device
    device = decode_loaded(loaded, CPU)
    cpu = loaded_batch(files, exact_path())
    assert device.batch["sample_id"].tolist() == cpu.batch["sample_id"].tolist() == list(range(100, 106))
    for row in (1, 3, 4):  # PNG: cropped and resized in the worker, bit for bit
        assert torch.equal(device.batch["image"][row], cpu.batch["image"][row])
    for row in (0, 2, 5):
        assert (device.batch["image"][row].int() - cpu.batch["image"][row].int()).abs().max() <= 2


def test_a_jpeg_corrupt_past_its_header_is_dropped_from_every_key_and_counted_once_with_the_cpu_paths_reason():
    files = [jpeg(96, 80, seed=i) for i in range(4)]
    files[2] = truncated_scan(jpeg(200, 160, seed=9))
    device = decode_loaded(loaded_batch(files, exact_path(decode="cuda")), CPU)
    cpu = loaded_batch(files, exact_path())  # the worker decodes and counts it (vlhub.data.loader)
    assert (device.samples_read, device.bad_samples) == (cpu.samples_read, cpu.bad_samples) == (4, 1)
    assert device.bad_reasons == cpu.bad_reasons
    assert device.bad_reasons[0].startswith("undecodable image (sample at position 102): image file is truncated")
    assert set(device.batch) == set(cpu.batch)
    for key, value in cpu.batch.items():  # every key lost the same row
        assert len(device.batch[key]) == 3
        if key != "image":
            assert (value.tolist() if isinstance(value, torch.Tensor) else value) == (
                device.batch[key].tolist() if isinstance(device.batch[key], torch.Tensor) else device.batch[key]
            )
    assert (device.batch["image"].int() - cpu.batch["image"].int()).abs().max() <= 2


def test_a_batch_whose_every_jpeg_is_corrupt_is_empty_and_all_counted():
    files = [truncated_scan(jpeg(96, 80, seed=i)) for i in range(3)]
    device = decode_loaded(loaded_batch(files, exact_path(decode="cuda")), CPU)
    assert (device.batch, device.samples_read, device.bad_samples, len(device.bad_reasons)) == ({}, 3, 3, 3)


def test_decode_cuda_without_cuda_or_unknown_fails_naming_decode(monkeypatch):
    from vlhub.augment import build_clip_transforms
    from vlhub.models.vision_language import ImageStats

    stats = ImageStats(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"^decode='gpu' must be one of cpu, cuda"):
        build_clip_transforms(stats, decode="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what cuda_available() asks
    with pytest.raises(ValueError, match=r"^decode=cuda needs a CUDA device; torch.cuda.is_available\(\) is False"):
        build_clip_transforms(stats, decode="cuda")


def test_a_jpeg_the_device_refuses_is_retried_alone_then_decoded_by_pil_as_on_the_cpu_path(monkeypatch):
    import vlhub.data.device_decode as device_decode

    files = [jpeg(96, 80, seed=i) for i in range(4)]
    refused, calls, real = files[1], [], device_decode.decode_jpeg

    def refusing(data, **kwargs):  # a decoder that cannot read one file (as nvJPEG refuses some JPEGs)
        calls.append(len(data) if isinstance(data, list) else 1)
        items = data if isinstance(data, list) else [data]
        if any(item.numpy().tobytes() == refused for item in items):
            raise RuntimeError("unsupported JPEG")
        return real(data, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", refusing)
    device = decode_loaded(loaded_batch(files, exact_path(decode="cuda")), CPU)
    cpu = loaded_batch(files, exact_path())
    assert calls == [4, 1, 1, 1, 1]  # the batch, then each file alone
    assert (device.bad_samples, len(device.batch["image"])) == (0, 4)
    assert torch.equal(device.batch["image"][1], cpu.batch["image"][1])  # PIL's pixels: the CPU path's exactly
    assert (device.batch["image"].int() - cpu.batch["image"].int()).abs().max() <= 2
