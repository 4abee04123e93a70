"""ImageNet-1k validation and its distribution shifts: V2, Sketch, A, R.

Every task here knows each class's ImageNet-1k index, so the evaluator's ``subset`` applies to all of
them. Class names are OpenAI's; templates OpenAI's 80. Folder layouts (checked when built):

- imagenet, imagenet_sketch: the 1000 wnid folders (sorted wnid order = class index);
- imagenet_v2: folders ``0``..``999`` (integer order = class index, not string order);
- imagenet_a, imagenet_r: their 200 wnid folders; the classes' ImageNet indices are package data.
"""

from __future__ import annotations

from vlhub.eval.labelled_files import LabelledFiles, scan_class_folders
from vlhub.eval.prompts import imagenet_class_names, imagenet_wnids, openai_imagenet_templates, read_index_list
from vlhub.eval.tasks import ZeroShotTask, task_templates
from vlhub.registry import EVAL_TASKS


class ImageNetFamilyTask(ZeroShotTask):
    """A folder of one sub-folder per class, where ``folders[c]`` holds class ``c`` = ImageNet index ``indices[c]``."""

    def __init__(
        self,
        name: str,
        root: str | None,
        folders: list[str],
        indices: list[int],
        expected: str,
        templates: list[str] | str | None = None,
    ) -> None:
        samples = scan_class_folders(root, folders, expected)
        all_names = imagenet_class_names()
        class_names = [all_names[i] for i in indices]
        super().__init__(
            name,
            LabelledFiles(samples, class_names),
            class_names,
            openai_imagenet_templates(),
            imagenet_indices=list(indices),
            override=task_templates(templates),
        )


def _wnid_expectation(what: str) -> str:
    wnids = imagenet_wnids()
    return f"{what}: an ImageFolder of the 1000 ImageNet-1k wnid folders ({wnids[0]} ... {wnids[-1]})"


@EVAL_TASKS.register("imagenet")
class ImageNetZeroShot(ImageNetFamilyTask):
    """ImageNet-1k validation (50,000 images) as ``root/<wnid>/<image>``."""

    def __init__(self, root: str | None, templates: list[str] | str | None = None) -> None:
        super().__init__(
            "imagenet",
            root,
            list(imagenet_wnids()),
            list(range(1000)),
            _wnid_expectation("the ImageNet-1k validation split"),
            templates,
        )


@EVAL_TASKS.register("imagenet_v2")
class ImageNetV2ZeroShot(ImageNetFamilyTask):
    """ImageNet-V2 (matched frequency): folders named by class index, ``root/0`` .. ``root/999``."""

    def __init__(self, root: str | None, templates: list[str] | str | None = None) -> None:
        # Folder "10" is class 10, not the third folder in string order ("0", "1", "10", ...).
        super().__init__(
            "imagenet_v2",
            root,
            [str(i) for i in range(1000)],
            list(range(1000)),
            "ImageNet-V2 matched-frequency: 1000 folders named 0..999 (the class index)",
            templates,
        )


@EVAL_TASKS.register("imagenet_sketch")
class ImageNetSketchZeroShot(ImageNetFamilyTask):
    """ImageNet-Sketch: the 1000 wnid folders."""

    def __init__(self, root: str | None, templates: list[str] | str | None = None) -> None:
        super().__init__(
            "imagenet_sketch",
            root,
            list(imagenet_wnids()),
            list(range(1000)),
            _wnid_expectation("ImageNet-Sketch"),
            templates,
        )


def _two_hundred(name: str, root: str | None, index_file: str, what: str, templates: list[str] | str | None) -> tuple:
    indices = read_index_list(index_file)
    wnids = imagenet_wnids()
    # The index lists are ascending, so their wnids are in sorted folder order too.
    folders = [wnids[i] for i in indices]
    expected = f"{what}: an ImageFolder of its 200 wnid folders ({folders[0]} ... {folders[-1]})"
    return name, root, folders, indices, expected, templates


@EVAL_TASKS.register("imagenet_a")
class ImageNetAZeroShot(ImageNetFamilyTask):
    """ImageNet-A: natural adversarial examples of 200 ImageNet classes."""

    def __init__(self, root: str | None, templates: list[str] | str | None = None) -> None:
        super().__init__(*_two_hundred("imagenet_a", root, "imagenet_a_indices.txt", "ImageNet-A", templates))


@EVAL_TASKS.register("imagenet_r")
class ImageNetRZeroShot(ImageNetFamilyTask):
    """ImageNet-R: renditions (art, cartoons, sculptures, ...) of 200 ImageNet classes."""

    def __init__(self, root: str | None, templates: list[str] | str | None = None) -> None:
        super().__init__(*_two_hundred("imagenet_r", root, "imagenet_r_indices.txt", "ImageNet-R", templates))
