"""Run CLIP_benchmark's datasets and tasks on a vlhub checkpoint (optional extra: ``pip install vlhub[benchmark]``).

CLIP_benchmark loads models through a table of loader functions, each
``loader(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)``.
:func:`load_vlhub` is that loader for vlhub checkpoints; :func:`register` adds it under
``--model_type vlhub``. From the shell, this module is CLIP_benchmark's CLI with the loader
registered, for every task (``zeroshot_classification``, ``zeroshot_retrieval``; ``linear_probe``, which
CLIP_benchmark runs on a CUDA GPU only)::

    python -m vlhub.benchmark_bridge eval --model_type vlhub --model vlhub \\
        --pretrained runs/my_run/checkpoints/latest.pt --dataset cifar10 --dataset_root /data/cifar10

``--pretrained`` is the checkpoint. ``--model`` is ignored for a vlhub checkpoint (its stored
config gives the model) and names the open_clip architecture of a plain open_clip one. From
Python, ``main(["eval", ...])`` takes the same arguments; or call :func:`register` and then
CLIP_benchmark's own functions (``clip_benchmark.metrics.zeroshot_classification.evaluate``...).

**The accuracy shim.** CLIP_benchmark 1.6.2's ``accuracy`` (zero-shot classification and the
linear probe both call it) ends in ``float()`` of a one-element 1-D numpy array: deprecated since
numpy 1.25 and a ``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars")
under numpy 2.4, which vlhub's install brings. :func:`register` calls that function on a two-class
example and, only if it raises or warns, puts :func:`_accuracy` in its place: the same top-k count
read with ``.item()``, so every number is unchanged. Once the installed CLIP_benchmark's own
function works, the example passes and nothing is replaced. A shim rather than a numpy pin
(``numpy<2.4``): a pin would hold every vlhub user, bridge or not, on an old numpy and clash with
any package needing a current one, all for one line in an optional extra.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
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


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy`` (top-k accuracy of logits [N, C] against targets [N]), numpy-2.4 safe."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def accuracy_needs_shim(accuracy: Callable[..., list[float]]) -> bool:
    """Whether CLIP_benchmark's ``accuracy`` fails (or warns) on a tiny input under this numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy 1.25-2.3 only warn
        try:
            accuracy(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        except (TypeError, DeprecationWarning):
            return True
    return False


def apply_accuracy_shim() -> bool:
    """Replace CLIP_benchmark's broken ``accuracy`` where its metrics look it up; True if it was replaced."""
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    original = zeroshot_classification.accuracy
    if original is _accuracy or not accuracy_needs_shim(original):
        return False
    for module in (zeroshot_classification, linear_probe):  # linear_probe imported it by name
        if module.accuracy is original:
            module.accuracy = _accuracy
    return True


def register() -> None:
    """Make ``--model_type vlhub`` known to CLIP_benchmark and fix its ``accuracy`` if needed (idempotent)."""
    from clip_benchmark import models  # the optional extra; imported only when asked for

    models.TYPE2FUNC[MODEL_TYPE] = load_vlhub
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # in place: the CLI's --model_type choices are this list
    apply_accuracy_shim()


def main(argv: Sequence[str] | None = None) -> None:
    """CLIP_benchmark's CLI with the vlhub loader; ``argv`` (without the program name) defaults to ``sys.argv``."""
    register()
    from clip_benchmark import cli

    if argv is None:
        cli.main()
        return
    saved = sys.argv
    sys.argv = ["clip_benchmark", *argv]  # CLIP_benchmark's parser reads sys.argv only
    try:
        cli.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
