"""``augment.decode=cuda`` through ``vlhub.train``: refused at launch without CUDA or with extra image views,
naming the keys; and a run on JPEG shards (the device being the CPU here) that decodes its batches in the
main process and counts a corrupt JPEG exactly."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset

import vlhub.augment.transforms
import vlhub.data.device_decode
from tests.helpers.configs import run_train
from tests.helpers.shards import jpeg, truncated_scan


@pytest.mark.parametrize(
    ("overrides", "cuda", "match"),
    [
        (["augment.decode=cuda"], False, r"^augment.decode=cuda needs a CUDA device; torch.cuda.is_available"),
        (["augment.decode=gpu"], True, r"^augment.decode='gpu' must be one of cpu, cuda"),
        (
            ["augment.decode=cuda", "objective=slip"],
            True,
            r"augment.decode=cuda decodes the base view only: objective=slip .* augment_views=simclr",
        ),
    ],
)
def test_augment_decode_is_refused_at_launch_naming_the_keys(tmp_path, monkeypatch, overrides, cuda, match):
    monkeypatch.setattr(vlhub.augment.transforms, "cuda_available", lambda: cuda)
    choices = {"model": "tiny", "objective": "slip" if "objective=slip" in overrides else "clip"}
    with pytest.raises(ValueError, match=match):
        run_train([*overrides, "trainer.device=cpu"], tmp_path / "run", {**choices, "augment_views": "simclr"})
    assert not (tmp_path / "run/checkpoints").exists()  # nothing was trained


def test_a_run_on_jpeg_shards_decodes_on_the_device_and_counts_a_corrupt_jpeg_exactly(tmp_path, monkeypatch):
    for s in range(3):  # 3 shards of 8 JPEGs; one in each of two shards is cut inside its scan
        with webdataset.TarWriter(str(tmp_path / f"j-{s:06d}.tar")) as writer:
            for i in range(8):
                data = jpeg(72 + 8 * i, 56 + 4 * s, seed=s * 8 + i)
                writer.write(
                    {
                        "__key__": f"{s}_{i}",
                        "jpg": truncated_scan(data) if i == 3 and s < 2 else data,
                        "txt": f"a red circle {s} {i}",
                    }
                )
    decoded = []  # the images the device decode gave back, batched or one by one
    real = vlhub.data.device_decode.decode_jpeg

    def counting(data, **kwargs):
        out = real(data, **kwargs)
        decoded.extend(out if isinstance(out, list) else [out])
        return out

    monkeypatch.setattr(vlhub.data.device_decode, "decode_jpeg", counting)
    # CUDA "available" to the launch check alone; trainer.device=cpu, so the batches decode on the CPU device
    monkeypatch.setattr(vlhub.augment.transforms, "cuda_available", lambda: True)
    root = f"{tmp_path}/j-{{000000..000002}}.tar"
    data = ["data=wds", f'data.root="{root}"', "data.num_samples=24", "data.shuffle_buffer=0", "trainer.device=cpu"]
    run_train([*data, "augment.decode=cuda", "data.max_bad_fraction=0.3"], tmp_path / "run")
    record = json.loads((tmp_path / "run/results.jsonl").read_text().splitlines()[-1])
    assert (record["step"], record["data/bad_samples"], record["data/samples_read"]) == (3, 2, 24)
    # the wrapped loader kept the stream's layout: the checkpoint records it, so a resume can check it
    checkpoint = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert checkpoint["data"]["layout"]["batches_per_epoch"] == 3
    # every good JPEG went through the device decode (each has its own size; the corrupt ones never decode)
    good = {(56 + 4 * s, 72 + 8 * i) for s in range(3) for i in range(8) if not (i == 3 and s < 2)}
    assert {(image.shape[1], image.shape[2]) for image in decoded} == good
