"""optim.fused: the optimizer kernel it picks (fused on CUDA, foreach on CPU, left alone where none exists)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers.configs import compose_train
from vlhub.optim import OptimRecipe


def _recipe(optimizer, fused=True):
    return OptimRecipe(optimizer, lr=1e-3, weight_decay=0.1, scheduler="constant", warmup_steps=0, fused=fused)


def test_fused_flag_picks_the_optimizer_kernel(caplog):
    from timm.optim import Lamb

    model = torch.nn.Linear(4, 4)
    optimizer, _ = _recipe(torch.optim.AdamW).build([model], 10)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]  # CPU: foreach
    optimizer, _ = _recipe(torch.optim.AdamW, fused=False).build([model], 10)
    assert optimizer.defaults["foreach"] is None and optimizer.defaults["fused"] is None  # torch's default
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}]
    assert _recipe(torch.optim.AdamW).kernel_options(groups) == {"foreach": True}
    # On CUDA parameters: the fused kernel (checked on the options; this machine may have no GPU).
    groups = [{"params": [_FakeCuda()]}]
    assert _recipe(torch.optim.AdamW).kernel_options(groups) == {"fused": True}
    assert _recipe(torch.optim.AdamW, fused=False).kernel_options(groups) == {}
    with caplog.at_level(logging.INFO, logger="vlhub.optim"):
        optimizer, _ = _recipe(Lamb).build([model], 10)
    assert "fused" not in optimizer.defaults and optimizer.defaults["foreach"] is None  # left as timm has it
    assert [r.getMessage() for r in caplog.records] == ["optim.fused: Lamb has no fused kernel; the key is ignored"]


class _FakeCuda:
    """Stands for a CUDA parameter where kernel_options only asks ``is_cuda``."""

    is_cuda = True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_adamw_on_cuda():
    model = torch.nn.Linear(4, 4).cuda()
    optimizer, _ = _recipe(torch.optim.AdamW).build([model], 10)
    assert optimizer.defaults["fused"] is True


def test_optim_fused_is_a_config_key():
    assert compose_train().optim.fused is True
    assert compose_train(["optim.fused=false"]).optim.fused is False
