"""Shards as they come: img2dataset's layout and plain tars read without data.num_samples; the braces message."""

import io
import json
import logging

import pytest
import webdataset
from PIL import Image

from tests.helpers.shards import batches, captions, tagged_shards
from vlhub.data import WebDatasetPairs
from vlhub.data.shard_counts import shard_counts
from vlhub.data.tar_index import read_span, scan


def _jpeg(shade: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 40, 90)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def img2dataset_shards(folder, successes: list[int], attempted: int = 8):
    """A folder as ``img2dataset --output_format webdataset`` writes it: ``00000.tar`` of
    ``<key>.jpg/.txt/.json`` (key = 5-digit shard id + 4-digit index; failed downloads leave gaps),
    ``00000_stats.json`` with ``count`` (URLs attempted) and ``successes``, ``00000.parquet`` (not
    written here: pyarrow is not a dependency) and the run's ``stats``."""
    folder.mkdir(parents=True)
    for shard, good in enumerate(successes):
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for index in range(good):
                key = f"{shard:05d}{index * 2:04d}"  # every other URL failed: keys are not contiguous
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": f"photo {shard} {index}",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 8,
                    "height": 8,
                    "original_width": 640,
                    "original_height": 480,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
                writer.write(
                    {"__key__": key, "jpg": _jpeg(index), "txt": meta["caption"], "json": json.dumps(meta).encode()}
                )
        stats = {
            "count": attempted,
            "successes": good,
            "failed_to_download": attempted - good,
            "failed_to_resize": 0,
            "duration": 1.5,
            "start_time": 1.0,
            "end_time": 2.5,
            "status_dict": {"success": good, "404": attempted - good},
        }
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return f"{folder}/{{00000..{len(successes) - 1:05d}}}.tar"


def test_img2dataset_shards_read_without_num_samples_counted_from_successes(tmp_path):
    root = img2dataset_shards(tmp_path / "laion", [5, 3, 4])
    source = WebDatasetPairs(root, shuffle_buffer=0)
    assert len(source) == 12  # successes, not the 24 URLs attempted
    assert not (tmp_path / "laion" / "sizes.json").exists()  # nothing to count: the stats said it
    epoch = batches(source, 3, 4)
    expected = sorted(f"photo {s} {i}" for s, n in enumerate([5, 3, 4]) for i in range(n))
    assert sorted(captions(epoch)) == expected and sum(b.bad_samples for b in epoch) == 0


def test_plain_tars_are_counted_from_headers_once_and_the_counts_kept(tmp_path, caplog, monkeypatch):
    root = tagged_shards(tmp_path, "s", shards=3, per_shard=7, sizes=False)
    with caplog.at_level(logging.INFO, logger="vlhub.data.shard_counts"):
        assert len(WebDatasetPairs(root, shuffle_buffer=0)) == 21
    assert "counting the samples of 3 shards from their tar headers" in caplog.text
    assert json.loads((tmp_path / "sizes.json").read_text()) == {f"s-{s:06d}.tar": 7 for s in range(3)}
    monkeypatch.setattr("vlhub.data.shard_counts.count_tar", lambda path: pytest.fail("counted again"))
    assert len(WebDatasetPairs(root)) == 21  # the next launch reads the kept counts


def test_a_broken_stats_file_is_warned_about_and_its_tar_counted(tmp_path, caplog):
    root = img2dataset_shards(tmp_path / "d", [5, 3])
    (tmp_path / "d" / "00001_stats.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        counts = shard_counts(tuple(root.replace("{00000..00001}", f"{i:05d}") for i in range(2)))
    assert list(counts.values()) == [5, 3] and "00001_stats.json is not img2dataset's stats" in caplog.text


def test_counting_seeks_past_members_without_reading_them(tmp_path):
    path = tmp_path / "big.tar"
    with webdataset.TarWriter(str(path)) as writer:
        for i in range(20):
            writer.write({"__key__": f"k{i:03d}", "jpg": bytes(100_000), "txt": f"caption {i}"})

    class Counting(io.FileIO):
        read_bytes = 0

        def read(self, size=-1):
            data = super().read(size)
            Counting.read_bytes += len(data)
            return data

    with Counting(path) as file:
        spans, error = scan(file)
    assert error is None and [s.key for s in spans] == [f"k{i:03d}" for i in range(20)]
    assert Counting.read_bytes < 0.03 * path.stat().st_size  # headers only: ~2 KB a sample of 100 KB
    reference = list(webdataset.WebDataset(str(path), shardshuffle=False))
    with open(path, "rb") as file:
        for span, sample in zip(spans, reference, strict=True):  # one sample by seeking, as webdataset groups it
            got = read_span(file, span, str(path))
            assert {k: got[k] for k in ("__key__", "jpg", "txt")} == {k: sample[k] for k in ("__key__", "jpg", "txt")}


def test_remote_shards_without_counts_need_num_samples_and_say_so(tmp_path):
    root = tagged_shards(tmp_path, "s", shards=2, per_shard=3, sizes=False)
    with pytest.raises(ValueError, match="^num_samples is not set.*remote shards.*not counted"):
        WebDatasetPairs(f"pipe:cat {root}")


def test_samples_read_by_seeking_equal_webdataset_s_whatever_the_order_and_evictions(tmp_path):
    import random

    from vlhub.data.shard_reader import LocalShards

    tagged_shards(tmp_path, "s", shards=4, per_shard=5)
    urls = [str(tmp_path / f"s-{s:06d}.tar") for s in range(4)]
    reference = {
        (url, i): sample for url in urls for i, sample in enumerate(webdataset.WebDataset(url, shardshuffle=False))
    }
    reader = LocalShards({}, samples=6, files=2)  # at most 2 shards held: reopened and re-walked often
    places = list(reference) * 2
    random.Random(0).shuffle(places)
    for url, index in places:
        got, expected = reader.sample(url, index), reference[(url, index)]
        assert (got["__key__"], got["txt"], got["png"]) == (expected["__key__"], expected["txt"], expected["png"])
    assert len(reader._open) <= 2
