"""torch and torchvision must be a matching pair; a mismatched pair (what a PyPI-only mirror gives on
the CPU route: PyTorch's CPU torch beside PyPI's CUDA torchvision, or two releases apart) otherwise
fails deep inside torchvision with ``operator torchvision::nms does not exist`` and a long traceback.

Read from the installed packages' metadata only (no torch import), so ``import vlhub`` stays cheap.
torchvision 0.N pairs with torch 2.(N - 15) (0.21 with 2.6, 0.29 with 2.14); builds of two variants
(``+cpu`` beside ``+cu130``) do not mix. Versions outside that scheme are not judged.
"""

from __future__ import annotations

from importlib import metadata


def _release_and_variant(version: str) -> tuple[tuple[int, ...], str]:
    public, _, local = version.partition("+")
    numbers = []
    for part in public.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else -1)
    return tuple(numbers), local


def mismatch(torch_version: str, torchvision_version: str) -> str | None:
    """Why the pair does not match, or None (also when the scheme does not apply)."""
    (torch_major, torch_minor), torch_variant = _release_and_variant(torch_version)
    (vision_major, vision_minor), vision_variant = _release_and_variant(torchvision_version)
    if torch_major == 2 and vision_major == 0 and vision_minor != torch_minor + 15:
        return f"torchvision {torchvision_version} is built for torch 2.{vision_minor - 15}"
    if torch_variant and vision_variant and torch_variant != vision_variant:
        return f"torch is a +{torch_variant} build, torchvision a +{vision_variant} one"
    return None


def check_torch_pair() -> None:
    """Raise ImportError naming both versions when the installed torch and torchvision do not match."""
    try:
        torch_version, torchvision_version = metadata.version("torch"), metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return  # a missing package fails on its own import, naming itself
    why = mismatch(torch_version, torchvision_version)
    if why:
        raise ImportError(
            f"torch {torch_version} and torchvision {torchvision_version} do not match ({why}): install them "
            "together from one index, e.g. pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
        )
