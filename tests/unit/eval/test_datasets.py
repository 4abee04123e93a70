"""Eval datasets on generated folders in each real layout: loading, class counts, target mapping, errors.

The builders (``make_*``) are in tests/helpers/eval_folders.py. Every image is
an 8x8 PNG whose pixels encode (dataset, class, copy), so an oracle can recognise it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.eval_folders import (
    A_INDICES,
    INAT_SPECIES,
    R_INDICES,
    make_class_folders,
    make_food101,
)
from vlhub.eval import (
    AircraftZeroShot,
    Food101ZeroShot,
    ImageNetAZeroShot,
    ImageNetRZeroShot,
    ImageNetSketchZeroShot,
    ImageNetV2ZeroShot,
    ImageNetZeroShot,
    INaturalist2021ZeroShot,
    StanfordCarsZeroShot,
)
from vlhub.eval.labelled_files import RootNotSet
from vlhub.eval.prompts import imagenet_class_names, imagenet_wnids


@pytest.fixture(scope="module")
def roots(eval_layouts) -> dict[str, Path]:
    return eval_layouts  # generated once for the session (conftest.py)


def _pixel_label(task, index: int) -> int:
    """The class a generated image was written for, read back from its pixels."""
    pixels = np.asarray(task.source.load(index).image)
    return int(pixels[0, 0, 0]) + 256 * (int(pixels[0, 0, 1]) % 8)


def test_imagenet_val_and_sketch_load_1000_classes_in_sorted_wnid_order(roots):
    names = imagenet_class_names()
    for task in (ImageNetZeroShot(str(roots["imagenet"])), ImageNetSketchZeroShot(str(roots["imagenet_sketch"]))):
        assert len(task.class_names) == 1000 and task.class_names == names
        assert task.class_names[0] == "tench" and task.imagenet_indices == list(range(1000))
        assert len(task.source) == (2000 if task.name == "imagenet" else 1000)
        first = task.source.samples[0]
        assert first[0].parent.name == "n01440764" and first[1] == 0
        assert all(_pixel_label(task, i) == task.source.samples[i][1] for i in range(0, len(task.source), 97))


def test_imagenet_v2_folders_are_class_indices_not_string_order(roots):
    task = ImageNetV2ZeroShot(str(roots["imagenet_v2"]))
    by_folder = {path.parent.name: label for path, label in task.source.samples}
    assert by_folder["10"] == 10 and by_folder["2"] == 2 and by_folder["999"] == 999  # sorted strings: "10" < "2"
    assert task.class_names[10] == imagenet_class_names()[10]
    assert all(_pixel_label(task, i) == task.source.samples[i][1] for i in range(len(task.source)))


@pytest.mark.parametrize(
    ("cls", "key", "indices"),
    [(ImageNetAZeroShot, "imagenet_a", A_INDICES), (ImageNetRZeroShot, "imagenet_r", R_INDICES)],
)
def test_imagenet_a_and_r_map_200_folders_to_their_imagenet_classes(roots, cls, key, indices):
    task = cls(str(roots[key]))
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(task.class_names) == 200 and task.imagenet_indices == indices
    assert task.class_names == [names[i] for i in indices]
    for path, label in task.source.samples:
        assert path.parent.name == wnids[indices[label]]
    assert len(openai := task.templates) == 80 and "{}" in openai[0]


def test_food101_aircraft_cars_inat_read_through_torchvision_with_readable_names(roots):
    food = Food101ZeroShot(str(roots["food101"]))
    assert len(food.class_names) == 101 and food.class_names[3] == "dish 003 pie"
    assert food.templates == ["a photo of {}, a type of food."]
    aircraft = AircraftZeroShot(str(roots["aircraft"]))
    assert len(aircraft.class_names) == 70 and aircraft.class_names[5] == "Boeing 705"
    assert aircraft.templates[0] == "a photo of a {}, a type of aircraft."
    cars = StanfordCarsZeroShot(str(roots["cars"]))
    assert len(cars.class_names) == 196 and cars.class_names[14] == "Make14 Model 2001" and len(cars.templates) == 8
    inat = INaturalist2021ZeroShot(str(roots["inat2021"]))
    assert inat.class_names == INAT_SPECIES and len(inat.source) == 8
    for task in (food, aircraft, cars, inat):
        assert task.imagenet_indices is None  # eval.subset never applies to them
        assert all(_pixel_label(task, i) == label for i, (_, label) in enumerate(task.source.samples))


@pytest.mark.parametrize(
    "cls",
    [
        ImageNetZeroShot,
        ImageNetAZeroShot,
        Food101ZeroShot,
        AircraftZeroShot,
        StanfordCarsZeroShot,
        INaturalist2021ZeroShot,
    ],
)
def test_missing_or_unset_roots_fail_naming_the_parameter(tmp_path, cls):
    with pytest.raises(RootNotSet, match=r"^root=None: not set"):
        cls(None)
    with pytest.raises(FileNotFoundError, match=rf"root={tmp_path / 'nope'}: no such folder \(expected"):
        cls(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()  # torchvision's INaturalist would have created it


def test_malformed_imagenet_folders_fail_naming_what_is_missing_or_extra(tmp_path, roots):
    wnids = list(imagenet_wnids())
    make_class_folders(tmp_path / "short", wnids[:999], 1)
    expected = r"root=.*short: expected .*1000 ImageNet-1k wnid.*missing 1 \(n15075141\)"
    with pytest.raises(ValueError, match=expected):
        ImageNetZeroShot(str(tmp_path / "short"))
    (tmp_path / "short" / wnids[-1]).mkdir()
    (tmp_path / "short" / "train").mkdir()
    with pytest.raises(ValueError, match=r"unexpected 1 \(train\)"):
        ImageNetSketchZeroShot(str(tmp_path / "short"))
    with pytest.raises(ValueError, match=r"root=.*folders named 0\.\.999.*missing 1000 \(0, 1, 2"):
        ImageNetV2ZeroShot(str(roots["imagenet"]))
    with pytest.raises(ValueError, match=r"root=.*200 wnid folders.*unexpected 800"):
        ImageNetAZeroShot(str(roots["imagenet"]))


def test_malformed_torchvision_layouts_fail_naming_the_file_or_count(tmp_path, roots):
    with pytest.raises(FileNotFoundError, match=r"root=.*missing food-101/images, food-101/meta/test"):
        Food101ZeroShot(str(tmp_path))
    make_food101(tmp_path / "food100", num_classes=100)
    with pytest.raises(ValueError, match=r"root=.*100 classes, expected 101"):
        Food101ZeroShot(str(tmp_path / "food100"))
    with pytest.raises(FileNotFoundError, match=r"root=.*families.txt"):
        AircraftZeroShot(str(roots["food101"]))
    with pytest.raises(FileNotFoundError, match=r"root=.*stanford_cars/devkit/cars_meta.mat"):
        StanfordCarsZeroShot(str(roots["aircraft"]))
    bad = tmp_path / "inat" / "2021_valid" / "00000_not_a_species"
    bad.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"root=.*not a valid layout.*wrong number of pieces"):
        INaturalist2021ZeroShot(str(tmp_path / "inat"))


def test_a_subset_drops_images_outside_it_before_reading_any(roots):
    from vlhub.eval.subsets import load_subset

    task = ImageNetZeroShot(str(roots["imagenet"]))
    subset = load_subset("in100")
    view = task.view(_context(subset))
    assert len(view.class_names) == 100 and len(view.source) == 200
    assert view.class_names == [imagenet_class_names()[i] for i in subset.indices]
    assert {label for _, label in view.source.samples} == set(range(100))
    assert all(_pixel_label(view, i) == subset.indices[label] for i, (_, label) in enumerate(view.source.samples))


def _context(subset=None):
    from vlhub.eval import EvalContext

    return EvalContext("imagenet", None, torch.device("cpu"), subset=subset)
