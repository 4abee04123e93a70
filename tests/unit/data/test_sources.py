"""Data sources and the step-indexed loader: determinism, layouts, bad input."""

import functools

import pytest
import torch
from PIL import Image

from vlhub.data import CsvPairs, ImageFolderPairs, SyntheticShapes, build_train_loader
from vlhub.data.synthetic import class_names
from vlhub.engine.guard import StepGuard
from vlhub.engine.state import TrainerState


def _to_tensor(image):
    return torch.tensor(list(image.getdata()), dtype=torch.float32).view(image.height, image.width, 3).permute(2, 0, 1)


def test_synthetic_is_deterministic_and_varied():
    a, b = SyntheticShapes(seed=3), SyntheticShapes(seed=3)
    assert a.load(5).caption == b.load(5).caption
    assert list(a.load(5).image.getdata()) == list(b.load(5).image.getdata())
    captions = {a.load(i).caption for i in range(200)}
    assert len(captions) > 100  # sizes, positions, backgrounds and wordings vary
    assert SyntheticShapes(seed=4).load(5).caption != a.load(5).caption or list(
        SyntheticShapes(seed=4).load(5).image.getdata()
    ) != list(a.load(5).image.getdata())


def test_synthetic_caption_names_the_labelled_class():
    source = SyntheticShapes(num_samples=300)
    for index in range(300):
        sample = source.load(index)
        colour, shape = source.class_names[sample.label].split(" ")
        assert colour in sample.caption and shape in sample.caption


def test_held_out_split_is_class_balanced_with_at_least_24_pairs():
    held_out = SyntheticShapes(num_samples=len(class_names()) * 4, split="val")
    labels = [held_out.load(i).label for i in range(len(held_out))]
    assert len(set(labels)) == len(class_names()) >= 24
    assert all(labels.count(c) == 4 for c in set(labels))
    train = SyntheticShapes(num_samples=50)
    assert train.load(0).caption != held_out.load(0).caption or train.load(1).caption != held_out.load(1).caption


def test_csv_round_trip_with_another_separator(tmp_path):
    source = SyntheticShapes(num_samples=6, split="val")
    path = source.write_csv(tmp_path, separator="\t")
    pairs = CsvPairs(str(path), separator="\t", label_key="label")
    assert len(pairs) == 6
    for i in range(6):
        assert pairs.load(i).caption == source.load(i).caption
        assert pairs.load(i).label == source.load(i).label
        assert torch.equal(_to_tensor(pairs.load(i).image), _to_tensor(source.load(i).image))


def test_csv_without_the_named_column_fails_naming_it(tmp_path):
    path = SyntheticShapes(num_samples=2).write_csv(tmp_path)
    with pytest.raises(ValueError, match="caption_key='caption'.*columns found"):
        CsvPairs(str(path), caption_key="caption")
    with pytest.raises(FileNotFoundError, match="^root=.*nope.csv"):
        CsvPairs(str(tmp_path / "nope.csv"))


def test_imagefolder_labels_follow_sorted_folders(tmp_path):
    SyntheticShapes(num_samples=len(class_names()) * 2, split="val").write_imagefolder(tmp_path)
    folder = ImageFolderPairs(str(tmp_path))
    assert folder.class_names == sorted(class_names())
    assert len(folder) == 2 * len(class_names())
    sample = folder.load(0)
    assert sample.label == 0 and sample.caption == f"a photo of a {sorted(class_names())[0]}."


def _identity_transform(image):
    return _to_tensor(image) / 255.0


def _loader(source, batch_size, start_sample=0, rank=0, world_size=1, seed=0):
    return iter(
        build_train_loader(source, _identity_transform, None, batch_size, seed, start_sample, 1, rank, world_size)
    )


def test_loader_resumes_at_a_step_with_identical_batches():
    source = SyntheticShapes(num_samples=20)
    from_start = _loader(source, 4)
    batches = [next(from_start).batch for _ in range(8)]  # crosses an epoch boundary (20 samples)
    resumed = _loader(source, 4, start_sample=5 * 4)
    for expected in batches[5:]:
        got = next(resumed).batch
        assert got["text_raw"] == expected["text_raw"]
        assert torch.equal(got["image"], expected["image"])
    assert sorted(sum((b["text_raw"] for b in batches[:5]), [])) == sorted(
        source.load(i).caption for i in range(20)
    )  # one epoch is a permutation


def test_ranks_split_the_same_global_batch():
    source = SyntheticShapes(num_samples=64)
    single = next(_loader(source, 8)).batch
    halves = [next(_loader(source, 4, rank=r, world_size=2)).batch for r in (0, 1)]
    assert halves[0]["text_raw"] + halves[1]["text_raw"] == single["text_raw"]


def test_a_missing_image_is_skipped_and_counted(tmp_path):
    path = SyntheticShapes(num_samples=10).write_csv(tmp_path)
    (tmp_path / "images" / "000003.png").unlink()
    (tmp_path / "images" / "000007.png").write_bytes(b"not a png")
    loader = _loader(CsvPairs(str(path)), 10)
    loaded = next(loader)
    assert loaded.samples_read == 10 and loaded.bad_samples == 2
    assert len(loaded.batch["text_raw"]) == 8
    assert any("000003.png" in r for r in loaded.bad_reasons)
    state = TrainerState()
    StepGuard(0.25).count_samples(state, loaded.samples_read, loaded.bad_samples, loaded.bad_reasons)
    assert (state.samples_read, state.bad_samples) == (10, 2)


def test_too_many_bad_samples_stop_the_run_with_a_clear_error():
    guard, state = StepGuard(0.1, bad_fraction_min_samples=100), TrainerState()
    guard.count_samples(state, 100, 10, [])
    with pytest.raises(RuntimeError, match="11 of 101 samples read were bad.*max_bad_fraction=0.1"):
        guard.count_samples(state, 1, 1, ["x.png: unreadable"])


def test_an_empty_caption_is_a_bad_sample(tmp_path):
    path = tmp_path / "pairs.csv"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path.write_text("filepath,title\na.png,\na.png,a caption\n")
    loaded = next(_loader(CsvPairs(str(path)), 2))
    assert loaded.bad_samples == 1 and loaded.batch["text_raw"] == ["a caption"]


# -- views: the base view is the same whatever extra views an objective asks for ----------------


def _jpeg_csv(folder, count=12, size=64):
    """Synthetic shapes as JPEGs (large enough for draft decoding of a 32 px crop) and ``pairs.csv``."""
    import csv

    shapes = SyntheticShapes(num_samples=count, image_size=size)
    (folder / "images").mkdir(parents=True)
    with (folder / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        for index in range(count):
            shapes.load(index).image.save(folder / f"images/{index}.jpg", quality=90)
            writer.writerow([f"images/{index}.jpg", shapes.load(index).caption])
    return CsvPairs(str(folder / "pairs.csv"))


@functools.cache
def _job_views(objective: str):
    """A job's image transforms and view count: its augment, augment_views and objective composed and
    instantiated as ``vlhub.train`` does (for the tiny model's 32 px), and its seed."""
    from hydra.utils import instantiate

    from tests.helpers.configs import compose_train
    from vlhub.models.vision_language import ImageStats

    cfg = compose_train([f"objective={objective}"])
    stats = ImageStats(32, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    transforms, views = instantiate(cfg.augment)(stats), instantiate(cfg.augment_views)(stats)
    return transforms.train, views.train, instantiate(cfg.objective).image_views, cfg.trainer.seed


def _job_batches(source, objective, count=2):
    """The first ``count`` batches a job with ``objective=...`` trains on, from the source's own loader."""
    base, strong, image_views, seed = _job_views(objective)
    loader = source.build_loader(base, None, 4, seed, image_views=image_views, view_transform=strong)
    return [loaded.batch for loaded, _ in zip(loader, range(count), strict=False)]


@pytest.mark.parametrize("layout", ["csv", "wds"])
def test_views_a_clip_and_a_slip_job_train_on_bit_identical_base_images(tmp_path, layout):
    from vlhub.data import WebDatasetPairs
    from vlhub.data.write_shards import write_shards

    if layout == "csv":  # map-style slots (vlhub.data.loader)
        source = _jpeg_csv(tmp_path)
    else:  # streamed shards (vlhub.data.stream)
        shapes = SyntheticShapes(num_samples=12, image_size=64)
        write_shards((shapes.load(i) for i in range(12)), tmp_path, shard_size=6)
        source = WebDatasetPairs(f"{tmp_path}/shard-{{000000..000001}}.tar", num_samples=12, shuffle_buffer=4)
    clip, slip, simclr = (_job_batches(source, objective) for objective in ("clip", "slip", "simclr"))
    for clip_batch, slip_batch, simclr_batch in zip(clip, slip, simclr, strict=True):
        assert set(clip_batch) & {"image_view2", "image_view3"} == set()
        assert clip_batch["image"].dtype == torch.uint8 and torch.equal(clip_batch["image"], slip_batch["image"])
        for key in ("image", "image_view2", "image_view3"):  # simclr's strong views are slip's
            assert torch.equal(slip_batch[key], simclr_batch[key]), key
        strong = slip_batch["image_view2"], slip_batch["image_view3"]
        assert not torch.equal(strong[0], strong[1]) and not torch.equal(strong[0], slip_batch["image"])


def test_views_extra_views_start_from_the_whole_image_when_the_base_view_drafts(tmp_path):
    from vlhub.augment import build_clip_transforms, build_simclr_transforms
    from vlhub.models.vision_language import ImageStats

    source = _jpeg_csv(tmp_path)
    stats = ImageStats(32, (0.5,) * 3, (0.5,) * 3)
    base, strong = build_clip_transforms(stats).train, build_simclr_transforms(stats).train
    loader = build_train_loader(source, base, None, 4, seed=5, image_views=3, view_transform=strong)
    batch = next(iter(loader)).batch
    for row, slot in enumerate(batch["sample_id"].tolist()):
        # By hand: the slot's generator; the base view drafts a JPEG (64 px for a 32 px crop: 1/2 scale),
        # then both strong views are drawn from the whole image, decoded at full size.
        raw = source.load(loader.dataset.position(slot)[1])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(5 * 7_919 + slot)
            drafted = source.load(loader.dataset.position(slot)[1]).image
            expected = [base(drafted)]
            assert drafted.size == (32, 32)  # the base view really drafted
            whole = raw.image.convert("RGB")
            expected += [strong(whole), strong(whole)]
        for key, view in zip(("image", "image_view2", "image_view3"), expected, strict=True):
            assert torch.equal(batch[key][row], view), (key, slot)


def test_collate_stacks_uint8_views_as_torch_stack_does():
    import numpy as np

    from vlhub.augment.transforms import to_uint8_tensor
    from vlhub.data.batch import stack_images

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(3)]
    views = [to_uint8_tensor(Image.fromarray(p)) for p in pixels]  # [3, H, W] views of [H, W, 3] pixels
    stacked = stack_images(views)
    assert stacked.is_contiguous() and stacked.shape == (3, 3, 5, 7)
    assert torch.equal(stacked, torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy()))
    floats = [view.float() for view in views]  # not uint8: torch.stack's own result
    assert stack_images(floats).dtype == torch.float32 and torch.equal(stack_images(floats), torch.stack(floats))
