"""The shard stream's layout: one pass an epoch across ranks and workers, independent of the worker count,
a resume that reads nothing before its position, a layout change refused mid-epoch, empty shards."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset

from tests.helpers.shards import batches, captions, pixels, png, tagged_shards
from vlhub.data import WebDatasetPairs
from vlhub.data.layout import _slots, buffer_inputs, key_of
from vlhub.errors import ConfigError

UNEQUAL = [3, 7, 5, 11, 2, 9]  # 37 samples


def unequal_shards(folder, sizes=UNEQUAL):
    folder.mkdir(parents=True)
    for s, count in enumerate(sizes):
        with webdataset.TarWriter(str(folder / f"u-{s:06d}.tar")) as writer:
            for i in range(count):
                writer.write({"__key__": f"{s:02d}_{i:02d}", "png": png(i), "txt": f"u {s} {i}"})
    return f"{folder}/u-{{000000..{len(sizes) - 1:06d}}}.tar"


def brute_force_buffer(total, size, key):
    """The shuffle buffer run item by item (the definition ``buffer_inputs`` answers without replaying)."""
    if total <= size:
        return np.random.Generator(np.random.PCG64(key)).permutation(total).tolist()
    buffer, out = list(range(size)), []
    slots = _slots(key, np.arange(total), size)
    for t in range(size, total):
        out.append(buffer[slots[t]])
        buffer[slots[t]] = t
    flush = np.random.Generator(np.random.PCG64(key + 1)).permutation(size)
    return out + [buffer[i] for i in flush]


@pytest.mark.parametrize(("total", "size"), [(2000, 100), (50, 7), (7, 10), (300, 1)])
def test_the_shuffle_buffer_is_found_at_any_position_without_replaying_it(total, size):
    key = key_of(0, 3, total)
    expected = brute_force_buffer(total, size, key) if size > 1 else list(range(total))
    assert sorted(expected) == list(range(total))  # a permutation: every input once
    assert buffer_inputs(np.arange(total), total, size, key).tolist() == expected
    middle = np.arange(total * 9 // 10, min(total, total * 9 // 10 + 16))
    assert buffer_inputs(middle, total, size, key).tolist() == [expected[o] for o in middle]


def test_one_epoch_reads_every_sample_once_across_two_ranks_of_two_workers(tmp_path):
    source = WebDatasetPairs(unequal_shards(tmp_path / "u"), shuffle_buffer=5, workers=2)
    assert len(source) == 37  # from the tar headers
    per_rank = 37 // (2 * 4)  # batches of 4 on 2 ranks: 4 batches a rank, 32 read, 5 left out
    seen = Counter()
    for rank in (0, 1):
        loaded = batches(source, per_rank + 1, 4, rank=rank, world_size=2)  # in-process rank, 2 workers
        assert [b.epoch for b in loaded] == [0] * per_rank + [1]
        seen.update(captions(loaded[:per_rank]))
    everything = {f"u {s} {i}" for s, n in enumerate(UNEQUAL) for i in range(n)}
    assert set(seen) <= everything and max(seen.values()) == 1 and len(seen) == 32
    # the next epoch is another pass, in another order, again once each
    second = Counter(c for r in (0, 1) for c in captions(batches(source, 2 * per_rank, 4, rank=r, world_size=2)[4:]))
    assert max(second.values()) == 1 and len(second) == 32 and list(second) != list(seen)


def test_a_resume_gives_the_same_stream_whatever_data_workers_before_and_after(tmp_path):
    root = unequal_shards(tmp_path / "u")
    straight = batches(WebDatasetPairs(root, shuffle_buffer=6, workers=2), 12, 4)  # past the epoch's end (9)
    for workers in (0, 1):
        resumed = batches(WebDatasetPairs(root, shuffle_buffer=6, workers=workers), 7, 4, start_sample=5 * 4)
        for expected, got in zip(straight[5:], resumed, strict=True):
            assert got.batch["text_raw"] == expected.batch["text_raw"] and got.epoch == expected.epoch
            assert torch.equal(got.batch["image"], expected.batch["image"])
            assert torch.equal(got.batch["sample_id"], expected.batch["sample_id"])


def test_other_ranks_on_resume_fail_naming_them_except_at_an_epoch_boundary(tmp_path):
    source = WebDatasetPairs(unequal_shards(tmp_path / "u"), shuffle_buffer=5)
    saved = source.build_loader(pixels, None, 4, 0, world_size=2).layout  # what the checkpoint stores
    assert saved["world_size"] == 2 and saved["batch_size"] == 4 and saved["batches_per_epoch"] == 4
    with pytest.raises(ConfigError, match=r"8 samples into an epoch.*the number of ranks: 2 -> 1"):
        source.build_loader(pixels, None, 4, 0, start_sample=8, world_size=1, layout=saved)
    with pytest.raises(ConfigError, match=r"trainer.batch_size: 4 -> 2"):
        source.build_loader(pixels, None, 2, 0, start_sample=8, world_size=2, layout=saved)
    # at the end of epoch 0 (4 batches of 2 x 4) one rank lays out epoch 1 as a fresh one-rank run does
    loader = source.build_loader(pixels, None, 4, 0, start_sample=32, world_size=1, layout=saved)
    assert (loader.layout["anchor_epoch"], loader.layout["anchor_sample"]) == (1, 32)
    resumed, fresh = next(iter(loader)), batches(source, 10, 4)[9]  # a one-rank epoch is 9 batches
    assert resumed.epoch == fresh.epoch == 1 and resumed.batch["text_raw"] == fresh.batch["text_raw"]
    assert resumed.batch["sample_id"].tolist() == [32, 33, 34, 35]  # positions go on from the boundary


def test_a_resume_reads_no_sample_before_its_position(tmp_path, monkeypatch):
    from vlhub.data import shard_reader

    root = tagged_shards(tmp_path / "s", "s", shards=10, per_shard=10)
    read = []
    original = shard_reader.read_span
    monkeypatch.setattr(shard_reader, "read_span", lambda f, span, url: read.append(span.key) or original(f, span, url))
    source = WebDatasetPairs(root, shuffle_buffer=8)
    resumed = batches(source, 1, 5, start_sample=90)  # the last batch but one of the epoch
    assert read == [raw.split()[1].zfill(4) + "_" + raw.split()[2].zfill(4) for raw in resumed[0].batch["text_raw"]]


def test_local_shards_with_no_sample_fail_at_start_naming_the_source(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    for s in range(3):
        webdataset.TarWriter(str(folder / f"e-{s:06d}.tar")).close()  # valid, empty tars
    with pytest.raises(ValueError, match="'data.root': its 3 shards hold no samples"):
        WebDatasetPairs(f"{folder}/e-{{000000..000002}}.tar").build_loader(pixels, None, 2, 0)
    with pytest.raises(ValueError, match="'data.root source 2': its 3 shards hold no samples"):
        good = tagged_shards(tmp_path / "g", "g", shards=1, per_shard=4)
        WebDatasetPairs(f"{good}::{folder}/e-{{000000..000002}}.tar", weights=[1, 1]).build_loader(pixels, None, 2, 0)


def test_remote_shards_with_no_sample_fail_after_a_bounded_read_naming_the_source(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    for s in range(3):
        webdataset.TarWriter(str(folder / f"e-{s:06d}.tar")).close()
    source = WebDatasetPairs(f"pipe:cat {folder}/e-{{000000..000002}}.tar", num_samples=4, resampled=True)
    with pytest.raises(ValueError, match="'data.root': 20 shards in a row hold no sample"):
        batches(source, 1, 2)


def test_a_stats_count_off_the_tar_is_warned_about_and_counted_as_bad_samples_exactly(tmp_path, caplog):
    root = tagged_shards(tmp_path, "s", shards=2, per_shard=3, sizes=False)
    for s, said in enumerate([3, 6]):  # img2dataset's stats say 6 for a shard of 3
        (tmp_path / f"s-{s:06d}_stats.json").write_text(json.dumps({"count": 9, "successes": said}))
    source = WebDatasetPairs(root, shuffle_buffer=0)
    assert len(source) == 9
    loaded = batches(source, 1, 9)[0]
    assert (loaded.samples_read, loaded.bad_samples, len(loaded.batch["text_raw"])) == (9, 3, 6)
    assert "s-000001.tar holds 3 samples, its count says 6" in caplog.text
    (tmp_path / "s-000000_stats.json").write_text(json.dumps({"count": 9, "successes": 2}))  # one too few
    loaded = batches(WebDatasetPairs(root, shuffle_buffer=0), 1, 8)[0]
    assert (loaded.samples_read, loaded.bad_samples) == (8, 3)
    assert "s-000000.tar holds 3 samples, its count says 2: the last are not read" in caplog.text


def test_remote_shards_are_read_in_lanes_so_other_workers_mid_epoch_fail_naming_data_workers(tmp_path):
    root = tagged_shards(tmp_path, "s", shards=4, per_shard=4)
    source = WebDatasetPairs(f"pipe:cat {root}", num_samples=16, workers=2)
    saved = source.build_loader(pixels, None, 2, 0).layout
    other = WebDatasetPairs(f"pipe:cat {root}", num_samples=16, workers=1)
    with pytest.raises(ConfigError, match=r"data.workers .*: 2 -> 1"):
        other.build_loader(pixels, None, 2, 0, start_sample=4, layout=saved)
    assert other.build_loader(pixels, None, 2, 0, start_sample=16, layout=saved).layout["anchor_epoch"] == 1
