"""Streamed webdataset shards: read-back, blends, resampling, rank split, resume, bad input, config."""

import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset
from hydra.utils import instantiate

from tests.helpers.configs import compose_train
from tests.helpers.shards import batches, captions, pixels, png, tagged_shards
from vlhub.data import BlendedShards, SyntheticShapes, WebDatasetPairs
from vlhub.data.layout import StreamLayout
from vlhub.data.shard_reader import LocalShards
from vlhub.data.write_shards import main as write_shards_main


def test_written_shards_read_back_exactly_here_and_with_plain_webdataset(tmp_path):
    shapes = SyntheticShapes(num_samples=30, image_size=8)
    write_shards_main(
        ["--source", "synthetic", "--num-samples", "30", "--image-size", "8"]
        + ["--format", "png", "--out", str(tmp_path), "--shard-size", "10"]
    )
    assert json.loads((tmp_path / "sizes.json").read_text()) == {f"shard-00000{i}.tar": 10 for i in range(3)}
    labels = {
        shapes.load(i).caption + str(pixels(shapes.load(i).image).tolist()): shapes.load(i).label for i in range(30)
    }
    expected = set(labels)
    plain = webdataset.WebDataset(str(tmp_path / "shard-{000000..000002}.tar"), shardshuffle=False).decode("pil")
    assert {s["txt"] + str(pixels(s["png"]).tolist()) for s in plain} == expected
    source = WebDatasetPairs(str(tmp_path / "shard-{000000..000002}.tar"), shuffle_buffer=0)
    assert len(source) == 30  # from sizes.json
    epoch = batches(source, 3, 10)  # one epoch, one reader: every sample exactly once
    got = {
        c + str(img.tolist()): int(label)
        for b in epoch
        for c, img, label in zip(b.batch["text_raw"], b.batch["image"], b.batch["label"])
    }
    assert got == labels and sum(b.bad_samples for b in epoch) == 0  # images, captions and cls labels
    assert torch.cat([b.batch["sample_id"] for b in epoch]).tolist() == list(range(30))


def test_a_three_to_one_blend_follows_the_weights_whatever_the_shard_counts(tmp_path):
    big = tagged_shards(tmp_path / "a", "a", shards=2, per_shard=20)  # the first source is the smaller one
    small = tagged_shards(tmp_path / "b", "b", shards=8, per_shard=20)
    schema = tmp_path / "blend.yaml"
    schema.write_text(
        f"sources:\n  - {{name: a, root: '{big}', num_samples: 40, weight: 3}}\n"
        f"  - {{name: b, root: '{small}', num_samples: 160, weight: 1}}\n"
    )
    read = captions(batches(BlendedShards(str(schema), shuffle_buffer=0), 30, 100))
    share = Counter(c.split()[0] for c in read)["a"] / len(read)
    assert len(read) == 3000 and share == pytest.approx(0.75, abs=0.03)
    joined = WebDatasetPairs(f"{big}::{small}", weights=[3, 1], shuffle_buffer=0, num_samples=200)
    assert Counter(c.split()[0] for c in captions(batches(joined, 10, 100)))["a"] / 1000 == pytest.approx(
        0.75, abs=0.05
    )


def test_resampled_shards_are_deterministic_per_seed_and_epoch(tmp_path):
    root = tagged_shards(tmp_path, "s", shards=6, per_shard=5)
    source = WebDatasetPairs(root, resampled=True, shuffle_buffer=4, num_samples=20)
    first, again = captions(batches(source, 8, 5)), captions(batches(source, 8, 5))
    assert first == again
    assert captions(batches(source, 8, 5, seed=1)) != first
    assert first[:20] != first[20:]  # epoch 1 draws other shards than epoch 0
    assert len({c.split()[1] for c in first}) > 1


def test_two_ranks_read_disjoint_shards_and_equal_batch_counts(tmp_path):
    source = WebDatasetPairs(tagged_shards(tmp_path, "s", shards=8, per_shard=5), shuffle_buffer=3, workers=2)
    shards = []
    for rank in (0, 1):
        loaded = batches(source, 4, 5, rank=rank, world_size=2)  # one epoch: 40 samples / (2 ranks x 5)
        assert [b.epoch for b in loaded] == [0, 0, 0, 0]
        assert torch.cat([b.batch["sample_id"] for b in loaded]).tolist() == [
            (k * 2 + rank) * 5 + i for k in range(4) for i in range(5)
        ]
        shards.append({c.split()[1] for c in captions(loaded)})
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 8


def test_resume_mid_epoch_continues_the_stream_bit_for_bit(tmp_path):
    source = WebDatasetPairs(tagged_shards(tmp_path, "s", shards=4, per_shard=6), shuffle_buffer=5, workers=2)
    full = batches(source, 9, 4)  # 24 samples, 6 batches an epoch: crosses into epoch 1
    resumed = batches(source, 5, 4, start_sample=4 * 4)
    for expected, got in zip(full[4:], resumed, strict=True):
        assert got.batch["text_raw"] == expected.batch["text_raw"] and got.epoch == expected.epoch
        assert torch.equal(got.batch["image"], expected.batch["image"])
        assert torch.equal(got.batch["sample_id"], expected.batch["sample_id"])
    assert [b.epoch for b in full] == [0] * 6 + [1] * 3


def _corrupt_shards(folder):
    folder.mkdir()
    with webdataset.TarWriter(str(folder / "s-000000.tar")) as writer:
        writer.write({"__key__": "good0", "png": png(1), "txt": "fine"})
        writer.write({"__key__": "badimg", "jpg": b"not a jpeg", "txt": "broken image"})
        writer.write({"__key__": "notxt", "png": png(2)})
        writer.write({"__key__": "empty", "png": png(3), "txt": "   "})
        writer.write({"__key__": "good1", "png": png(4), "txt": "fine too", "json": b"{}", "cls": "3"})
    with webdataset.TarWriter(str(folder / "s-000001.tar")) as writer:
        for i in range(4):
            writer.write({"__key__": f"long{i}", "png": png(i) + bytes(600), "txt": f"kept {i}"})
    data = (folder / "s-000001.tar").read_bytes()
    (folder / "s-000001.tar").write_bytes(data[: len(data) // 2])  # ends early, inside a sample
    (folder / "s-000002.tar").write_bytes(b"this is no tar file at all" * 40)
    return f"{folder}/s-{{000000..000002}}.tar"


def test_corrupt_samples_and_shards_are_skipped_and_counted_exactly(tmp_path, caplog):
    root = _corrupt_shards(tmp_path / "shards")
    with tarfile.open(tmp_path / "shards" / "s-000001.tar") as tar, pytest.raises(tarfile.ReadError):
        tar.getmembers()  # the tar really is truncated
    source = WebDatasetPairs(root, shuffle_buffer=0)  # counted from the tars: 5 + 1 before the cut + 0
    assert len(source) == 6
    assert "s-000001.tar" in caplog.text and "s-000002.tar" in caplog.text  # one warning each, at the count
    loaded = batches(source, 1, 6)[0]  # one reader, one pass over the 3 shards
    # shard 0: 2 good, 3 bad; shard 1: 1 good sample before the cut; shard 2: no sample
    assert sorted(loaded.batch["text_raw"]) == ["fine", "fine too", "kept 0"]
    assert (loaded.samples_read, loaded.bad_samples) == (6, 3)
    reasons = " ".join(loaded.bad_reasons)
    for words in ("unreadable jpg", "no txt caption", "empty caption"):
        assert words in reasons
    labels = dict(zip(loaded.batch["text_raw"], loaded.batch["label"].tolist()))
    assert labels["fine too"] == 3 and labels["fine"] == -1  # from cls; json is carried along
    # With sizes.json every lost sample counts: 3 lost in the cut shard, all 5 of the unreadable one
    sizes = {"s-000000.tar": 5, "s-000001.tar": 4, "s-000002.tar": 5}
    (tmp_path / "shards" / "sizes.json").write_text(json.dumps(sizes))
    loaded = batches(WebDatasetPairs(root, shuffle_buffer=0), 1, 14)[0]  # 14 = the sizes' sum: one pass
    assert (loaded.samples_read, loaded.bad_samples, len(loaded.batch["text_raw"])) == (14, 3 + 3 + 5, 3)
    assert "s-000001.tar is corrupt after 1 samples" in " ".join(loaded.bad_reasons)


def test_a_shard_cut_at_a_sample_boundary_counts_its_lost_samples_from_sizes_json(tmp_path):
    root = tagged_shards(tmp_path, "s", shards=2, per_shard=3)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 3, "s-000001.tar": 5}))  # 2 missing
    loaded = batches(WebDatasetPairs(root, shuffle_buffer=0), 1, 8)[0]
    assert (loaded.bad_samples, len(loaded.batch["text_raw"])) == (2, 6)
    assert any("holds 3 samples, its count says 5" in reason for reason in loaded.bad_reasons)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda t, r: WebDatasetPairs(r.replace("000003", "000009")),
            "^root=.*6 of 10 shards do not exist: .*s-000004.tar",
        ),
        (lambda t, r: WebDatasetPairs(r + "::"), "^root=.*source 2 of 2.*empty"),
        (lambda t, r: WebDatasetPairs(f"{r}::{r}", weights=[1]), r"^weights=\[1\] has 1 entries for 2 sources"),
        (lambda t, r: WebDatasetPairs(f"{r}::{r}", weights=[1, 0]), r"^weights\[1\]=0"),
        (lambda t, r: WebDatasetPairs(r.replace("{000000..000003}", "{}")), "do not exist"),
        (lambda t, r: WebDatasetPairs(f"pipe:cat {r}"), "^num_samples is not set.*remote shards"),
        (lambda t, r: BlendedShards(_schema(t, f"{{name: a, root: '{r}', weight: 1}}")), "sources.0. .*num_samples"),
        (
            lambda t, r: BlendedShards(_schema(t, f"{{name: a, root: '{r}', num_samples: 4, weight: -1}}")),
            r"\(a\).weight=-1",
        ),
        (lambda t, r: BlendedShards(str(t / "nope.yaml")), "^schema=.*no such file"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_key(tmp_path, make, match):
    root = tagged_shards(tmp_path / "x", "s", shards=4, per_shard=1, sizes=False)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make(tmp_path, root)


def _schema(folder, entry):
    (folder / "blend.yaml").write_text(f"sources:\n  - {entry}\n")
    return str(folder / "blend.yaml")


def test_too_few_remote_shards_for_ranks_times_workers_fails_naming_the_settings(tmp_path):
    root = tagged_shards(tmp_path, "s", shards=2, per_shard=4)
    source = WebDatasetPairs(f"pipe:cat {root}", workers=2, num_samples=8)  # read through, one lane a worker
    with pytest.raises(ValueError, match="2 remote shards, fewer than ranks x workers = 2 x 2.*data.resampled=true"):
        source.build_loader(pixels, None, 2, 0, rank=0, world_size=2)


def test_captionnet_preset_streams_shards_and_adds_in100_eval_only_with_a_root(tmp_path, caplog):
    root = tagged_shards(tmp_path, "s", shards=2, per_shard=4)
    cfg = compose_train(["data=captionnet", f'data.root="{root}"'])
    assert cfg.data._target_ == "vlhub.data.WebDatasetPairs" and cfg.data.root == root
    assert cfg.eval.subset == "in100" and cfg.eval.imagenet.root is None
    with caplog.at_level("INFO"):
        evaluator = instantiate(cfg.eval)
    assert not evaluator.tasks
    assert "eval imagenet on the in100 subset: left out; add it with eval.imagenet.root=" in caplog.text
    assert "imagenet" not in compose_train(["data=captionnet", "eval=none"]).eval  # the command line wins
    from tests.helpers.eval_folders import make_class_folders
    from vlhub.eval.prompts import imagenet_wnids

    val = make_class_folders(tmp_path / "val", list(imagenet_wnids()), 1, copies=1)
    evaluator = instantiate(compose_train(["data=captionnet", f"eval.imagenet.root={val}"]).eval)
    assert set(evaluator.tasks) == {"imagenet"} and evaluator.subset.name == "in100"
    assert len(evaluator.subset.indices) == 100


def test_caption_filtering_keeps_batches_full_counts_the_dropped_and_resumes_exactly(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for s in range(2):
        with webdataset.TarWriter(str(folder / f"f-{s:06d}.tar")) as writer:
            for i in range(12):
                text = f"a red circle {s} {i}" if i % 3 else f"nothing to see {s} {i}"
                writer.write({"__key__": f"{s}_{i:03d}", "png": png(i), "txt": text})
    source = WebDatasetPairs(
        f"{folder}/f-{{000000..000001}}.tar",
        num_samples=16,
        shuffle_buffer=4,
        classes=[["red circle"], ["blue square"]],
        filter_to_classes=True,
        label_from_caption=True,
    )
    full = batches(source, 4, 4)
    assert all(len(b.batch["text_raw"]) == 4 and b.batch["label"].tolist() == [0] * 4 for b in full)
    assert all("red circle" in c for c in captions(full))
    layout = StreamLayout(source.sources, 0, 1, 4, 6, 4, False, False)  # the unfiltered order: 24 in one pass
    reader = LocalShards({})
    raw = [reader.caption(*place).decode() for place in layout.locate(0, 0, np.arange(24))]
    kept = [c for c in raw if "red" in c][:16]
    assert captions(full) == kept  # the unfiltered stream's order, less the dropped
    assert sum(b.filtered for b in full) == raw.index(kept[-1]) + 1 - 16  # dropped on the way, exactly
    resumed = batches(source, 2, 4, start_sample=2 * 4)
    assert [b.batch["text_raw"] for b in resumed] == [b.batch["text_raw"] for b in full[2:]]
    assert [b.filtered for b in resumed] == [b.filtered for b in full[2:]]


def test_every_sample_lost_with_a_remote_shard_names_its_whole_url():
    from vlhub.data.shards import _lost

    url = "https://host:8080/s-000000.tar"  # colons in the url: the reason must not be cut at them
    lost = list(_lost(url, f"cannot open shard {url}: refused", 0, 3))
    assert [str(bad) for bad in lost] == [
        f"cannot open shard {url}: refused (3 samples lost)",
        f"a sample of shard {url}, lost with it",
        f"a sample of shard {url}, lost with it",
    ]


# -- issue 20, 11: weights that cannot be sampled, and a schema that is no YAML, fail at launch -----------


def test_a_schema_with_bad_weights_or_bad_yaml_fails_naming_the_file_and_the_line(tmp_path):
    root = tagged_shards(tmp_path / "x", "s", shards=4, per_shard=1)
    schema = tmp_path / "blend.yaml"
    for weight, problem in ((".inf", "=inf"), ("true", "=True")):
        schema.write_text(f"sources:\n  - name: a\n    root: '{root}'\n    num_samples: 4\n    weight: {weight}\n")
        with pytest.raises(ValueError, match=rf"^schema={schema}: sources\[0\] \(a\).weight{problem} \(line 5\)"):
            BlendedShards(str(schema))
    two = "".join(f"  - {{name: {n}, root: '{root}', num_samples: 4, weight: 1.0e+308}}\n" for n in "ab")
    schema.write_text("sources:\n" + two)
    with pytest.raises(ValueError, match=rf"^schema={schema}: sources: the weights .* sum past the largest float"):
        BlendedShards(str(schema))
    schema.write_text(f"sources:\n  - {{name: a, root: '{root}', num_samples: 4, weight: 1\n  - oops: [\n")
    with pytest.raises(ValueError, match=rf"^schema={schema}: line 3, column \d+: ") as caught:
        BlendedShards(str(schema))
    assert "Mark object" not in str(caught.value)


# -- issue 20, 12: the shard writer names its own flags, fails when nothing was read, never mixes old shards --
def test_the_shard_writer_names_its_flags_refuses_an_empty_result_and_old_shards(tmp_path, capsys):
    def fails(*args: str) -> str:
        with pytest.raises(SystemExit) as caught:
            write_shards_main(list(args))
        assert caught.value.code not in (0, None)
        return str(caught.value.code)

    assert fails("--source", "csv", "--root", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")) == (
        f"error: --root={tmp_path / 'nope.csv'}: no such CSV file"
    )
    assert fails("--source", "synthetic", "--num-samples", "0", "--out", str(tmp_path / "o")).startswith(
        "error: --num-samples must be > 0"
    )
    assert "data." not in fails("--source", "csv", "--out", str(tmp_path / "o"))  # --root missing
    (tmp_path / "pairs.csv").write_text("filepath,title\ngone1.png,a\ngone2.png,b\n")
    message = fails("--source", "csv", "--root", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "empty"))
    assert message == "error: none of the 2 samples could be read (see the warnings above): no shards written"
    assert not list((tmp_path / "empty").glob("*"))
    out = tmp_path / "shards"
    write_shards_main(["--source", "synthetic", "--num-samples", "6", "--out", str(out), "--shard-size", "2"])
    assert "already holds 4 shard file(s)" in fails(
        "--source", "synthetic", "--num-samples", "2", "--out", str(out), "--shard-size", "2"
    )
    write_shards_main(
        ["--source", "synthetic", "--num-samples", "2", "--out", str(out), "--shard-size", "2", "--overwrite"]
    )
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 2}
