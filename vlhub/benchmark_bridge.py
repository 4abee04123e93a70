"""Run CLIP_benchmark's datasets and tasks on a vlhub checkpoint (optional extra: ``pip install vlhub[benchmark]``).

CLIP_benchmark loads models through a table of loader functions, each
``loader(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)``.
:func:`load_vlhub` is that loader for vlhub checkpoints; :func:`register` adds it under
``--model_type vlhub``. From the shell, this module is CLIP_benchmark's CLI with the loader
registered::

    python -m vlhub.benchmark_bridge eval --model_type vlhub --model vlhub \\
        --pretrained runs/my_run/checkpoints/latest.pt --dataset cifar10 --dataset_root /data/cifar10

``--pretrained`` is the checkpoint. ``--model`` is ignored for a vlhub checkpoint (its stored
config gives the model) and names the open_clip architecture of a plain open_clip one.
"""

from __future__ import annotations

from typing import Any

import torch

from vlhub.api import build_model, eval_transform, read_checkpoint, stored_model_config

MODEL_TYPE = "vlhub"


def load_vlhub(
    model_name: str = MODEL_TYPE, pretrained: str = "", cache_dir: str | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, Any]:
    """CLIP_benchmark's loader contract: the model (eval mode, on ``device``), its eval transform, its tokenizer."""
    checkpoint = read_checkpoint(pretrained)
    model_config = None
    if stored_model_config(checkpoint) is None:  # a plain open_clip checkpoint: model_name is its arch
        model_config = {"_target_": "vlhub.models.build_open_clip_model", "arch": model_name}
    model = build_model(pretrained, model_config, checkpoint).to(device).eval()
    return model, eval_transform(model), model.tokenize


def register() -> None:
    """Make ``--model_type vlhub`` known to CLIP_benchmark (idempotent)."""
    from clip_benchmark import models  # the optional extra; imported only when asked for

    models.TYPE2FUNC[MODEL_TYPE] = load_vlhub
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # in place: the CLI's --model_type choices are this list


def main() -> None:
    register()
    from clip_benchmark import cli

    cli.main()


if __name__ == "__main__":
    main()
