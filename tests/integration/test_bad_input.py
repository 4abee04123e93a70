"""Bad input: a bad sample, caption row or file never stops or loops a run; a bad setting fails at launch
naming the key; an expected mistake reads as one line (with a hint), an unexpected one keeps its traceback.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import sys

import pytest
import torch
import webdataset
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import vlhub.evaluate
import vlhub.train
from tests.helpers.cli import logging_restored
from tests.helpers.configs import FAST_EVAL, compose_evaluate, run_train
from vlhub.data import BadSample, CsvPairs, SyntheticShapes, WebDatasetPairs, build_train_loader
from vlhub.data.shards import decode_sample
from vlhub.engine.guard import StepGuard
from vlhub.engine.state import TrainerState
from vlhub.errors import ConfigError
from vlhub.evaluate import evaluate
from vlhub.launch import errors_reported
from vlhub.objectives import ClipObjective


def _pixels(image):
    return torch.zeros(3, 4, 4, dtype=torch.uint8)


def _first_batch(source, batch_size):
    return next(iter(build_train_loader(source, _pixels, None, batch_size, seed=0)))


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _csv_run(tmp_path, count=40):
    """A CSV of ``count`` synthetic pairs; returns (csv path, the indices read by the first batch of 16)."""
    csv = SyntheticShapes(num_samples=count).write_csv(tmp_path / "data")
    slots = build_train_loader(CsvPairs(str(csv)), None, None, batch_size=16, seed=0).dataset
    return csv, [slots.position(slot)[1] for slot in range(16)]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


# -- a non-finite loss is skipped and counted, a run of them stops, no NaN weights are written --


def _nan_loss_on(monkeypatch, calls: set[int] | None) -> None:
    """ClipObjective.loss returns NaN on the given calls (1-based; None: every call)."""
    original, counter = ClipObjective.loss, itertools.count(1)

    def loss(self, reps, model):
        parts = original(self, reps, model)
        if calls is None or next(counter) in calls:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(ClipObjective, "loss", loss)


def test_a_nonfinite_loss_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_loss_on(monkeypatch, {2, 3})
    run_train(["eval=none", "trainer.max_steps=3"], tmp_path)
    record = _records(tmp_path)[-1]
    assert record["step"] == 3 and record["train/nonfinite_steps"] == 2  # 5 batches: 3 steps, 2 skipped
    checkpoint = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["state_dict"].values())
    assert checkpoint["data"]["nonfinite_steps"] == 2  # a resumed run keeps counting from there


def test_a_run_of_nonfinite_losses_stops_with_a_clear_error_and_writes_no_weights(tmp_path, monkeypatch):
    _nan_loss_on(monkeypatch, None)
    with pytest.raises(RuntimeError, match=r"not finite in 2 steps in a row.*trainer.max_nonfinite_steps=2"):
        run_train(["eval=none", "trainer.max_nonfinite_steps=2", "checkpoint.every_n_steps=1"], tmp_path)
    assert not list(tmp_path.glob("checkpoints/*.pt"))


# -- the bad-sample fraction applies once enough samples were read; all-bad still stops fast --


def test_three_missing_images_of_40_do_not_stop_the_run_at_the_first_batch(tmp_path):
    csv, first = _csv_run(tmp_path)
    for index in first[:3]:  # 3 of 40 (7.5%), all in the first batch of 16 (18.75%)
        (tmp_path / "data" / "images" / f"{index:06d}.png").unlink()
    run_train(["data=csv", f"data.root={csv}", "data.workers=0", "trainer.batch_size=16", "eval=none"], tmp_path / "r")
    record = _records(tmp_path / "r")[-1]
    assert (record["step"], record["data/bad_samples"], record["data/samples_read"]) == (3, 3, 48)


def test_a_source_where_everything_is_bad_still_stops_within_a_few_batches():
    guard, state = StepGuard(0.1), TrainerState()  # data.bad_fraction_min_samples defaults to 500
    with pytest.raises(RuntimeError, match=r"64 of 64 samples read were bad.*max_bad_fraction=0.1.*first"):
        for _ in range(10):
            guard.count_samples(state, 16, 16, ["x.png: missing"])
    assert state.samples_read == 64  # stopped at the 4th batch: 64 bad can no longer be 10% of 500


# -- all-bad with max_bad_fraction=1.0 stops after a bounded number of empty batches ----------


def test_every_image_bad_with_max_bad_fraction_1_stops_instead_of_looping(tmp_path):
    csv = SyntheticShapes(num_samples=16).write_csv(tmp_path / "data")
    for png in (tmp_path / "data" / "images").iterdir():
        png.unlink()
    data = ["data=csv", f"data.root={csv}", "data.workers=0", "data.max_bad_fraction=1.0", "eval=none"]
    with pytest.raises(RuntimeError, match=r"21 batches in a row held no good sample.*data.max_empty_batches=20"):
        run_train(data, tmp_path / "run")


# -- an over-large image is skipped and counted like any bad sample ---------------------------


def test_an_image_over_the_pixel_cap_is_a_bad_sample_in_files_and_shards(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    (tmp_path / "huge.png").write_bytes(_png(60, 40))
    (tmp_path / "pairs.csv").write_text("filepath,title\nsmall.png,a small one\nhuge.png,a huge one\n")
    loaded = _first_batch(CsvPairs(str(tmp_path / "pairs.csv"), max_image_pixels=1000), 2)
    assert (loaded.samples_read, loaded.bad_samples) == (2, 1) and loaded.batch["text_raw"] == ["a small one"]
    assert "huge.png is 60x40 pixels, over data.max_image_pixels=1000" in loaded.bad_reasons[0]
    with pytest.raises(BadSample, match="over data.max_image_pixels=1000"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "png": _png(60, 40), "txt": b"a huge one"}, 1000)
    assert decode_sample({"png": _png(30, 30), "txt": b"fits"}, 1000).caption == "fits"


def test_a_decompression_bomb_is_skipped_not_raised_from_the_loader(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL raises DecompressionBombError over 2 x 500
    (tmp_path / "bomb.png").write_bytes(_png(60, 40))
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\nbomb.png,a bomb\nsmall.png,a small one\n")
    loaded = _first_batch(CsvPairs(str(tmp_path / "pairs.csv"), max_image_pixels=None), 2)
    assert loaded.bad_samples == 1 and "bomb.png" in loaded.bad_reasons[0]
    shards = tmp_path / "shards"
    shards.mkdir()
    with webdataset.TarWriter(str(shards / "s-000000.tar")) as writer:
        writer.write({"__key__": "bomb", "png": _png(60, 40), "txt": "a bomb"})
        writer.write({"__key__": "fine", "png": _png(8, 8), "txt": "a fine one"})
    source = WebDatasetPairs(str(shards / "s-000000.tar"), num_samples=2, shuffle_buffer=0, max_image_pixels=None)
    loaded = next(iter(source.build_loader(_pixels, None, 2, 0)))
    assert loaded.bad_samples == 1 and loaded.batch["text_raw"] == ["a fine one"]
    assert "decompression bomb" in loaded.bad_reasons[0]


# -- CSV encodings and headers ---------------------------------------------------------------


def test_a_non_utf8_caption_row_is_skipped_and_counted_naming_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "pairs.csv"
    long_caption = b"a caption " * 120  # the error quoted 1.2 KB of the file
    path.write_bytes(b"filepath,title\na.png,fine\na.png," + long_caption + b"\xff\xfe\na.png,also fine\n")
    source = CsvPairs(str(path))
    loaded = _first_batch(source, 3)
    assert (loaded.samples_read, loaded.bad_samples) == (3, 1)
    assert sorted(loaded.batch["text_raw"]) == ["also fine", "fine"]
    assert loaded.bad_reasons == [f"{path}:3: row skipped, byte 0xff in field 2 is not UTF-8"]


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufefffilepath,title\na.png,a caption\n".encode())  # Excel's "CSV UTF-8"
    assert CsvPairs(str(path)).load(0).caption == "a caption"


def test_a_duplicate_column_name_is_an_error(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title,title\na.png,one,two\n")
    with pytest.raises(ValueError, match=r"duplicate column name\(s\) \['title'\]"):
        CsvPairs(str(path))


# -- an evaluation folder's error names its own key ------------------------------------------


def test_an_eval_imagefolder_without_class_folders_names_eval_imagefolder_root(tmp_path):
    from tests.helpers.configs import compose_train
    from vlhub.config_keys import build_at

    (tmp_path / "loose.png").write_bytes(_png(8, 8))
    cfg = compose_train(["eval=imagefolder", f"eval.imagefolder.root={tmp_path}"])
    with pytest.raises(Exception, match="eval.imagefolder.root=") as error:
        build_at(cfg, "eval")  # as the commands build it: the launcher names the key
    assert "data.root" not in str(error.value) and "no class folders" in str(error.value)


# -- wrong types fail at launch naming the key: plain keys and group keys --------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # trainer.* is typed by its schema when Hydra composes: tests/test_trainer_config.py
        ("data.max_bad_fraction=abc", "data.max_bad_fraction='abc': expected float, got str"),  # a group key
        ("checkpoint.keep=two", "checkpoint.keep='two': expected int"),
        ("logger.wandb.enabled=3", "logger.wandb.enabled=3: expected bool"),
    ],
)
def test_a_wrong_type_fails_at_launch_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_train([override], tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # nothing was built or trained


# -- expected mistakes print one line and a hint; unexpected ones keep their traceback ------


def _cli(main, args: list[str], monkeypatch) -> None:
    """Run a command's Hydra ``main`` in this process (as ``python -m`` does); its exit code must be 1."""
    monkeypatch.setattr(sys, "argv", [main.__module__, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:  # Hydra configures the process's logging (levels, handlers, disabled loggers): all put back
        with pytest.raises(SystemExit) as exit_info, logging_restored():
            main()
    finally:  # and leaves its global state behind
        GlobalHydra.instance().clear()
    assert exit_info.value.code == 1


def test_the_cli_without_data_root_prints_one_line_and_a_hint(tmp_path, monkeypatch, capsys):
    _cli(vlhub.train.main, ["data=csv", f"hydra.run.dir={tmp_path}"], monkeypatch)
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "error: data.root is not set",
        "hint: give it on the command line: data.root=...",
    ]
    assert "Traceback" not in captured.out + captured.err


def _reported(capsys, action) -> str:
    with pytest.raises(SystemExit) as exit_info, errors_reported():
        action()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2 and "\nhint: " in err
    return err


def test_a_missing_checkpoint_file_is_one_line(tmp_path, capsys):
    cfg = compose_evaluate(["checkpoint=/nonexistent/ckpt.pt", *FAST_EVAL])
    assert _reported(capsys, lambda: evaluate(cfg, tmp_path)).startswith("error: checkpoint=/nonexistent/ckpt.pt")
    err = _reported(capsys, lambda: run_train(["checkpoint.resume=/nonexistent/step_5.pt"], tmp_path))
    assert err.startswith("error: checkpoint.resume=/nonexistent/step_5.pt")
    err = _reported(capsys, lambda: run_train(["data=csv", "data.root=/nonexistent/pairs.csv"], tmp_path))
    assert err.startswith("error: data.root=/nonexistent/pairs.csv: no such CSV file")  # unwrapped from Hydra's


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_and_a_hint(tmp_path, capsys):
    err = _reported(capsys, lambda: run_train(["trainer.device=cuda"], tmp_path))
    assert err == (
        "error: trainer.device=cuda: no CUDA GPU is visible to this process\n"
        "hint: use trainer.device=cpu, or trainer.device=auto to take a GPU when there is one\n"
    )


def test_the_librarys_own_config_errors_are_one_line(tmp_path, capsys):
    err = _reported(capsys, lambda: run_train(["objective=simclr", "augment_views=none"], tmp_path))
    assert err.startswith("error: objective=clip with model=tiny") and "identical" in err
    err = _reported(capsys, lambda: run_train(["trainer.batch_size=0"], tmp_path))  # a Trainer check
    assert err.startswith("error: trainer.batch_size must be > 0")


def test_unexpected_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError), errors_reported():
        _ = 1 / 0
    with pytest.raises(json.JSONDecodeError), errors_reported():  # a ValueError, but not one of vlhub's checks
        json.loads("{")


# -- evaluate without weights requires asking for a random model -----------------------------


def test_evaluate_without_a_checkpoint_or_pretrained_weights_refuses(tmp_path, monkeypatch, capsys):
    _cli(vlhub.evaluate.main, [*FAST_EVAL, f"hydra.run.dir={tmp_path / 'refused'}"], monkeypatch)
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint= and no model.pretrained=") and "allow_random_model=true" in err
    assert not (tmp_path / "refused/results.json").exists()
    record = evaluate(compose_evaluate([*FAST_EVAL, "allow_random_model=true"]), tmp_path / "random")
    assert record["checkpoint"] is None and record["weights"] == "random initialisation (allow_random_model=true)"
    assert "random initialisation (allow_random_model=true)" in (tmp_path / "random/report.md").read_text()


# -- 16-bit and float greyscale are converted by a stated rule, never clipped silently --
def _wide_grey_images():
    """A 16-bit greyscale PNG and a float TIFF over their whole ranges (float beyond [0, 1] and a NaN)."""
    import numpy as np

    wide = (np.arange(32 * 32, dtype=np.int64) * 64 + 7).clip(0, 65535).astype(np.uint16).reshape(32, 32)
    floats = np.linspace(-0.25, 1.25, 32 * 32, dtype=np.float32).reshape(32, 32)
    floats[0, 0] = np.nan
    encoded = {}
    for name, array, fmt in (("wide.png", wide, "PNG"), ("float.tif", floats, "TIFF")):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        encoded[name] = buffer.getvalue()
    # The rule, written out pixel by pixel: 16-bit value / 257; float clipped to [0, 1] x 255, NaN 0.
    expected = {
        "wide.png": [[round(int(v) / 257) for v in row] for row in wide],
        "float.tif": [[0 if v != v else round(min(max(float(v), 0.0), 1.0) * 255) for v in row] for row in floats],
    }
    return encoded, expected


def test_sixteen_bit_and_float_greyscale_follow_the_stated_rule_in_files_and_shards(tmp_path):
    encoded, expected = _wide_grey_images()
    assert Image.open(io.BytesIO(encoded["wide.png"])).mode == "I;16"
    assert Image.open(io.BytesIO(encoded["float.tif"])).mode == "F"
    for name, data in encoded.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "pairs.csv").write_text("filepath,title\nwide.png,a wide one\nfloat.tif,a float one\n")
    source = CsvPairs(str(tmp_path / "pairs.csv"))
    for index, name in enumerate(encoded):
        from_file = source.load(index).image
        from_shard = decode_sample({"__key__": "k", "png": encoded[name], "txt": b"x"}).image  # PIL reads the content
        for image in (from_file, from_shard):
            assert image.mode == "RGB"
            pixels = torch.tensor(list(image.getdata()), dtype=torch.int64).reshape(32, 32, 3)
            assert torch.equal(pixels, torch.tensor(expected[name]).unsqueeze(-1).expand(32, 32, 3)), name


# -- a path that is no regular file is one bad sample, never a hang or a crash --------------
def test_dev_zero_a_fifo_a_folder_a_nul_byte_and_an_oversized_file_are_bad_samples(tmp_path):
    import os
    import threading

    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "big.png").write_bytes(_png(40, 40) + b"\0" * 4000)  # a valid PNG, padded over the cap
    rows = ["good.png", "/dev/zero", "pipe.png", "folder.png", "bad\0name.png", "big.png"]
    (tmp_path / "pairs.csv").write_text(
        "filepath,title\n" + "".join(f"{row},caption {i}\n" for i, row in enumerate(rows))
    )
    source = CsvPairs(str(tmp_path / "pairs.csv"), max_image_bytes=3000)
    loaded = []
    reader = threading.Thread(target=lambda: loaded.append(_first_batch(source, len(rows))), daemon=True)
    reader.start()
    reader.join(30)
    assert loaded, "reading the batch hung (a FIFO opened for reading waits for a writer)"
    batch = loaded[0]
    assert (batch.samples_read, batch.bad_samples) == (6, 5) and batch.batch["text_raw"] == ["caption 0"]
    reasons = sorted(batch.bad_reasons)
    assert len(reasons) == 5
    assert any("/dev/zero is not a regular file" in r for r in reasons)
    assert any("pipe.png is not a regular file" in r for r in reasons)
    assert any("folder.png is not a regular file" in r for r in reasons)
    assert any("embedded null byte" in r and "bad\\x00name.png" in r for r in reasons)
    assert any("big.png is over data.max_image_bytes=3000" in r for r in reasons)


# -- a batch without negatives, or repeating a sample, is refused at launch ------------------
@pytest.mark.parametrize("objective", ["clip", "cloob", "dcl", "siglip", "simclr"])
def test_a_global_batch_of_one_is_refused_for_every_contrastive_objective(tmp_path, capsys, objective):
    from vlhub.registry import OBJECTIVES

    # The effect the refusal prevents: at one sample the contrastive loss has nothing to push apart.
    if objective in ("clip", "cloob"):
        features = torch.nn.functional.normalize(torch.randn(1, 8, requires_grad=True), dim=-1)
        assert torch.nn.functional.cross_entropy(features @ features.T * 10, torch.tensor([0])).item() == 0.0
    overrides = [f"objective={objective}", "trainer.batch_size=1", "eval=none"]
    if objective == "simclr":
        overrides.append("augment=simclr")
    err = _reported(capsys, lambda: run_train(overrides, tmp_path, {"objective": objective}))
    assert err.startswith(f"error: trainer.batch_size=1 x 1 rank(s) is a global batch of 1: objective={objective}")
    assert OBJECTIVES.build(objective).min_global_batch == 2
    assert OBJECTIVES.build("ce").min_global_batch == 1  # a classifier learns from one sample


def test_a_csv_smaller_than_one_batch_is_refused_naming_trainer_batch_size(tmp_path, capsys):
    csv = SyntheticShapes(num_samples=5).write_csv(tmp_path / "data")
    err = _reported(capsys, lambda: run_train(["data=csv", f"data.root={csv}", "trainer.batch_size=8"], tmp_path / "r"))
    assert "5 samples are fewer than one global batch (trainer.batch_size=8 x 1 rank(s))" in err
