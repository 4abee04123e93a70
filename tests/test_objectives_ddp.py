"""Every objective under data parallelism (gloo, 2 ranks): negatives from both ranks, and the
averaged gradient equals one process's gradient at the doubled batch; the tiled losses
(``objective.loss_tiles``) too, against the untiled loss of one process."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import objective_batch, prepared_objective
from vlhub.data.batch import slice_batch
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.registry import OBJECTIVES

BATCH = 8
# Tiled variants, run in the same two processes (a spawn costs seconds): case -> (objective, kwargs).
TILED = {
    "clip-tiled": ("clip", {"loss_tiles": 3}),
    "clip-tiled-local": ("clip", {"loss_tiles": 3, "local_loss": True}),
    "siglip-tiled": ("siglip", {"loss_tiles": 5}),
}


def _gradients(name: str, rank: int | None, **kwargs) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of objective ``name``: of the whole batch (rank None) or of this rank's half, averaged."""
    from vlhub import distributed

    model, objective = prepared_objective(name, **kwargs)
    batch = objective_batch(model, objective, size=BATCH)
    if rank is not None:
        half = BATCH // 2
        batch = slice_batch(batch, rank * half, (rank + 1) * half)
    parts = PlainGradients()(model, objective, batch, Precision("fp32", torch.device("cpu")))
    params = [*model.parameters(), *objective.parameters()]
    distributed.all_reduce_grads_(params)
    names = [*(n for n, _ in model.named_parameters()), *("objective." + n for n, _ in objective.named_parameters())]
    grads = {n: p.grad.detach().clone() for n, p in zip(names, params, strict=True) if p.grad is not None}
    return grads, float(parts["loss"])


def _rank_main(rank: int, port: int, names: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {name: _gradients(name, rank) for name in names}
        results.update({case: _gradients(name, rank, **kwargs) for case, (name, kwargs) in TILED.items()})
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    out = Path(tmp_path_factory.mktemp("ddp")) / "grads.pt"
    mp.spawn(_rank_main, args=(_free_port(), OBJECTIVES.names(), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_two_ranks_at_half_the_batch_match_one_process(two_rank_results, name):
    reference, reference_loss = _gradients(name, rank=None)
    grads, loss = two_rank_results[name]
    assert loss == pytest.approx(reference_loss, rel=1e-5)  # the global batch's loss, negatives from both ranks
    # all_reduce_grads_ zero-fills parameters nothing reached (the text tower of image-only objectives)
    assert grads.keys() >= reference.keys()
    assert all(not grads[k].any() for k in grads.keys() - reference.keys())
    diff = torch.sqrt(sum(((grads[k].double() - reference[k].double()) ** 2).sum() for k in reference))
    assert (diff / torch.sqrt(sum((v.double() ** 2).sum() for v in reference.values()))).item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", TILED)
def test_two_ranks_with_tiles_match_one_untiled_process(two_rank_results, case):
    name, kwargs = TILED[case]
    untiled = {k: v for k, v in kwargs.items() if k != "loss_tiles"}
    reference, reference_loss = _gradients(name, rank=None, **untiled)
    grads, loss = two_rank_results[case]
    if not kwargs.get("local_loss"):  # with local_loss each rank's loss is its own rows' (open_clip)
        assert loss == pytest.approx(reference_loss, rel=1e-5)
    assert grads.keys() >= reference.keys() and "logit_scale" in reference
    diff = torch.sqrt(sum(((grads[k].double() - reference[k].double()) ** 2).sum() for k in reference))
    assert (diff / torch.sqrt(sum((v.double() ** 2).sum() for v in reference.values()))).item() <= 1e-5
