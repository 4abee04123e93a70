"""Food-101, FGVC-Aircraft (family level), Stanford Cars and iNaturalist 2021, in torchvision's layouts.

torchvision's own dataset classes read the annotations (``download=False``; nothing is ever
fetched). They are given a loader that returns the image path instead of decoding it, which
lists (path, class) pairs without reading a single image; decoding happens at evaluation.
The expected files are checked first, so a wrong root names the key and the layout rather
than surfacing torchvision's "Dataset not found. You can use download=True".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchvision import datasets

from vlhub.data.files import IMAGE_EXTENSIONS
from vlhub.eval.labelled_files import LabelledFiles, require_files, require_root
from vlhub.eval.prompts import published_templates
from vlhub.eval.tasks import ZeroShotTask, task_templates
from vlhub.registry import EVAL_TASKS


def _path_only(path: str | Path) -> Path:
    return Path(path)


def _list_samples(build: Callable[[], object], root: str, expected: str) -> tuple[object, list]:
    """Build the torchvision dataset and list its (path, class) pairs, naming ``root`` on failure."""
    try:
        dataset = build()
        pairs = (dataset[i] for i in range(len(dataset)))  # type: ignore[index]
        # Stray files (.DS_Store, notes) in a species folder are not images of that species.
        samples = [(Path(path), int(label)) for path, label in pairs if str(path).lower().endswith(IMAGE_EXTENSIONS)]
    except (RuntimeError, ValueError, KeyError, OSError, IndexError) as error:
        raise ValueError(f"root={root}: not a valid layout ({error}); expected {expected}") from error
    if not samples:
        raise ValueError(f"root={root}: the annotations list no images (expected {expected})")
    return dataset, samples


def _check_count(root: str, found: int, expected_count: int, expected: str) -> None:
    if found != expected_count:
        raise ValueError(f"root={root}: {found} classes, expected {expected_count} ({expected})")


class FineGrainedTask(ZeroShotTask):
    """Shared tail of the four: readable names, the dataset's published templates, the task override."""

    def __init__(self, name: str, samples: list, class_names: list[str], templates: list[str] | str | None) -> None:
        super().__init__(
            name,
            LabelledFiles(samples, class_names),
            class_names,
            published_templates(name),
            override=task_templates(templates),
        )


@EVAL_TASKS.register("food101")
class Food101ZeroShot(FineGrainedTask):
    """Food-101: 101 dishes. Names from ``meta/<split>.json``, underscores made spaces."""

    def __init__(self, root: str | None, split: str = "test", templates: list[str] | str | None = None) -> None:
        expected = "torchvision's Food101 layout: <root>/food-101/meta/<split>.json and <root>/food-101/images/"
        base = require_root(root, expected)
        require_files(base, ["food-101/images", f"food-101/meta/{split}.json"], str(root), expected)
        dataset, samples = _list_samples(
            lambda: datasets.Food101(str(base), split=split, download=False, loader=_path_only),
            str(root),
            expected,
        )
        _check_count(str(root), len(dataset.classes), 101, expected)
        super().__init__("food101", samples, [c.replace("_", " ") for c in dataset.classes], templates)


@EVAL_TASKS.register("aircraft")
class AircraftZeroShot(FineGrainedTask):
    """FGVC-Aircraft at the family level: 70 classes (``Boeing 737``, ``A320``, ...)."""

    def __init__(self, root: str | None, split: str = "test", templates: list[str] | str | None = None) -> None:
        expected = (
            "torchvision's FGVCAircraft layout: <root>/fgvc-aircraft-2013b/data/ with families.txt, "
            "images_family_<split>.txt and images/"
        )
        base = require_root(root, expected)
        data = "fgvc-aircraft-2013b/data"
        require_files(
            base,
            [f"{data}/families.txt", f"{data}/images_family_{split}.txt", f"{data}/images"],
            str(root),
            expected,
        )
        dataset, samples = _list_samples(
            lambda: datasets.FGVCAircraft(
                str(base), split=split, annotation_level="family", download=False, loader=_path_only
            ),
            str(root),
            expected,
        )
        _check_count(str(root), len(dataset.classes), 70, expected)
        super().__init__("aircraft", samples, list(dataset.classes), templates)


@EVAL_TASKS.register("cars")
class StanfordCarsZeroShot(FineGrainedTask):
    """Stanford Cars: 196 make-model-year classes (``AM General Hummer SUV 2000``)."""

    def __init__(self, root: str | None, split: str = "test", templates: list[str] | str | None = None) -> None:
        annotations = "cars_test_annos_withlabels.mat" if split == "test" else "devkit/cars_train_annos.mat"
        expected = (
            f"torchvision's StanfordCars layout: <root>/stanford_cars/ with devkit/cars_meta.mat, "
            f"{annotations} and cars_{split}/"
        )
        base = require_root(root, expected)
        require_files(
            base,
            [f"stanford_cars/{p}" for p in ("devkit/cars_meta.mat", annotations, f"cars_{split}")],
            str(root),
            expected,
        )
        dataset, samples = _list_samples(
            lambda: datasets.StanfordCars(str(base), split=split, download=False, loader=_path_only),
            str(root),
            expected,
        )
        _check_count(str(root), len(dataset.classes), 196, expected)
        super().__init__("cars", samples, [str(c).strip() for c in dataset.classes], templates)


def inat_species_name(category: str) -> str:
    """``00000_Animalia_..._Lithobius_forficatus`` -> ``Lithobius forficatus`` (genus + epithet)."""
    return " ".join(category.split("_")[-2:])


@EVAL_TASKS.register("inat2021")
class INaturalist2021ZeroShot(FineGrainedTask):
    """iNaturalist 2021 validation: one folder per species, named ``<id>_<kingdom>_..._<genus>_<epithet>``."""

    def __init__(self, root: str | None, templates: list[str] | str | None = None) -> None:
        expected = (
            "torchvision's INaturalist(version='2021_valid') layout: <root>/2021_valid/ with one folder per "
            "species named 00000_Kingdom_Phylum_Class_Order_Family_Genus_epithet"
        )
        # Check before torchvision: INaturalist creates a missing root folder instead of failing.
        base = require_root(root, expected)
        require_files(base, ["2021_valid"], str(root), expected)
        dataset, samples = _list_samples(
            lambda: datasets.INaturalist(str(base), version="2021_valid", download=False, loader=_path_only),
            str(root),
            expected,
        )
        super().__init__("inat2021", samples, [inat_species_name(c) for c in dataset.all_categories], templates)
