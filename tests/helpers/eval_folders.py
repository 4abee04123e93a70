"""Evaluation data sets generated in each real layout (ImageNet and its shifts, Food-101, FGVC-Aircraft,
Stanford Cars, iNaturalist 2021, a COCO Karpathy set).

Every image of the class-folder layouts is an 8x8 PNG whose pixels encode (dataset, class, copy), so an
oracle can recognise it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from vlhub.data import SyntheticShapes
from vlhub.eval.prompts import imagenet_wnids, read_index_list

DATASET_TASKS = (
    "imagenet",
    "imagenet_v2",
    "imagenet_sketch",
    "imagenet_a",
    "imagenet_r",
    "food101",
    "aircraft",
    "cars",
    "inat2021",
)
A_INDICES = read_index_list("imagenet_a_indices.txt")
R_INDICES = read_index_list("imagenet_r_indices.txt")


def write_image(path: Path, dataset: int, label: int, copy: int = 0) -> None:
    """A unique flat 8x8 image; PNG bytes even under a .jpg name (PIL reads by content), so lossless."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = label % 256, label // 256 + 8 * copy, dataset
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def make_class_folders(root: Path, folders: list[str], dataset: int, copies: int = 1) -> Path:
    for label, folder in enumerate(folders):
        for copy in range(copies):
            write_image(root / folder / f"img{copy}.png", dataset, label, copy)
    return root


def make_imagenet_layouts(base: Path) -> dict[str, Path]:
    """Roots for imagenet (2 images per class), imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r."""
    wnids = list(imagenet_wnids())
    return {
        "imagenet": make_class_folders(base / "val", wnids, 1, copies=2),
        "imagenet_v2": make_class_folders(base / "v2", [str(i) for i in range(1000)], 2),
        "imagenet_sketch": make_class_folders(base / "sketch", wnids, 3),
        "imagenet_a": make_class_folders(base / "a", [wnids[i] for i in A_INDICES], 4),
        "imagenet_r": make_class_folders(base / "r", [wnids[i] for i in R_INDICES], 5),
    }


def make_food101(root: Path, num_classes: int = 101) -> Path:
    classes = [f"dish_{i:03d}_pie" for i in range(num_classes)]
    meta = {name: [f"{name}/{1000 + i}"] for i, name in enumerate(classes)}
    (root / "food-101" / "meta").mkdir(parents=True)
    (root / "food-101" / "meta" / "test.json").write_text(json.dumps(meta))
    for label, name in enumerate(classes):
        write_image(root / "food-101" / "images" / name / f"{1000 + label}.jpg", 6, label)
    return root


def make_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    families = [f"Boeing {700 + i}" for i in range(70)]
    data.mkdir(parents=True)
    (data / "families.txt").write_text("\n".join(families) + "\n")
    lines = []
    for label, family in enumerate(families):
        image_id = f"{1_000_000 + label}"
        write_image(data / "images" / f"{image_id}.jpg", 7, label)
        lines.append(f"{image_id} {family}")
    (data / "images_family_test.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cars(root: Path) -> Path:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array([f"Make{i} Model {2000 + i % 13}" for i in range(196)], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    annotations = np.zeros(196, dtype=[("fname", object), ("class", object)])
    for label in range(196):
        annotations[label] = (f"{label + 1:05d}.jpg", label + 1)  # the .mat classes count from 1
        write_image(base / "cars_test" / f"{label + 1:05d}.jpg", 8, label)
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    return root


INAT_SPECIES = ["Corvus corax", "Lithobius forficatus", "Quercus robur", "Amanita muscaria"]


def make_inat(root: Path) -> Path:
    taxa = [
        "Animalia_Chordata_Aves_Passeriformes_Corvidae",
        "Animalia_Arthropoda_Chilopoda_Lithobiomorpha_Lithobiidae",
        "Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae",
        "Fungi_Basidiomycota_Agaricomycetes_Agaricales_Amanitaceae",
    ]
    for label, (taxon, species) in enumerate(zip(taxa, INAT_SPECIES, strict=True)):
        folder = root / "2021_valid" / f"{label:05d}_{taxon}_{species.replace(' ', '_')}"
        for copy in range(2):
            write_image(folder / f"{label}-{copy}.jpg", 9, label, copy)
    return root


def make_fine_grained_layouts(base: Path) -> dict[str, Path]:
    return {
        "food101": make_food101(base / "food"),
        "aircraft": make_aircraft(base / "aircraft"),
        "cars": make_cars(base / "cars"),
        "inat2021": make_inat(base / "inat"),
    }


CAPTIONS_PER_IMAGE = 5


def write_karpathy_set(folder, num_test=12, num_train=3, image_size=16):
    """A COCO-style Karpathy set: images under val2014/, a dataset_coco.json with train and test entries.

    Test image i is a distinct generated shape; its captions are unique ("... number i, caption j").
    """
    source = SyntheticShapes(num_samples=num_test + num_train, split="val", image_size=image_size)
    (folder / "val2014").mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(num_test + num_train):
        sample = source.load(index)
        filename = f"COCO_val2014_{index:012d}.jpg"
        sample.image.save(folder / "val2014" / filename, quality=95)
        split = "test" if index < num_test else "train"
        sentences = [{"raw": f"{sample.caption} number {index}, caption {j}"} for j in range(CAPTIONS_PER_IMAGE)]
        entries.append({"filepath": "val2014", "filename": filename, "split": split, "sentences": sentences})
    (folder / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return folder
