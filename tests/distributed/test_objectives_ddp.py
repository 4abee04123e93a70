"""Every objective under DDP (gloo, 2 ranks, ``trainer.strategy=ddp``): negatives from both ranks,
and the averaged gradient equals one process's gradient at the doubled batch, with and without
the gradient cache (replays under ``no_sync``). Objectives that call a tower twice per step (MLM,
SimCLR's views) and objective-owned parameters used in ``represent`` (CoCa's decoder, MLM's head,
FILIP's heads) or in ``loss`` (temperature, SigLIP's bias, SSL heads) are all covered; ``lit`` locks
the image tower, which DDP then leaves unwrapped. The tiled losses (``objective.loss_tiles``) are
checked the same way, against the untiled loss of one process. The objective's own state after the
step (``after_step``: DeCLIP's queue of text embeddings, filled beforehand so that its nearest-neighbour
term is live) must also equal one process's."""

import copy
import functools
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from tests.helpers.models import timm_bn_model
from tests.helpers.objectives import objective_batch, prepared_objective
from tests.helpers.ranks import as_rank, start_ranks
from tests.helpers.tensors import relative_error
from vlhub.data.batch import slice_batch
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.parallel.ddp import TowerDDP
from vlhub.parallel.environment import DistInfo
from vlhub.parallel.manual import ManualAllReduce
from vlhub.registry import OBJECTIVES

BATCH = 8
CASES = {name: (name, {}) for name in OBJECTIVES.names()} | {
    "lit": ("clip", {"lock_image": True}),
    # Tiled variants, in the same two processes (a spawn costs seconds); their reference is untiled.
    "clip-tiled": ("clip", {"loss_tiles": 3}),
    "clip-tiled-local": ("clip", {"loss_tiles": 3, "local_loss": True}),
    "siglip-tiled": ("siglip", {"loss_tiles": 5}),
    "declip": ("declip", {"queue_size": 24}),  # 20 entries before the step, 16 pushed: the queue wraps
}
Result = tuple[dict[str, torch.Tensor], float, dict[str, torch.Tensor]]


def _prepared(case: str, **kwargs):
    model, objective = prepared_objective(CASES[case][0], **kwargs)
    if getattr(objective, "text_queue", None) is not None:  # neighbours from the start
        rows = torch.randn(20, model.embed_dim, generator=torch.Generator().manual_seed(7))
        objective.text_queue.push(torch.nn.functional.normalize(rows, dim=-1))
    return model, objective


def _after_step(objective) -> dict[str, torch.Tensor]:
    """The objective's buffers once the step is applied (its queue, its heads' statistics)."""
    objective.after_step()
    return {name: value.detach().clone() for name, value in objective.named_buffers()}


def _grads(model, objective) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


@functools.cache
def _reference(case: str) -> Result:
    """One process, the whole batch, plain gradients, untiled."""
    kwargs = {k: v for k, v in CASES[case][1].items() if k != "loss_tiles"}
    model, objective = _prepared(case, **kwargs)
    batch = objective_batch(model, objective, size=BATCH)
    parts = PlainGradients()(model, objective, batch, Precision("fp32", torch.device("cpu")))
    return _grads(model, objective), float(parts["loss"]), _after_step(objective)


def _under_ddp(case: str, rank: int) -> dict[str, object]:
    """This rank's half under DDP: plain gradients, then (same wrapped model) the gradient cache."""
    model, objective = _prepared(case, **CASES[case][1])
    half = BATCH // 2
    batch = slice_batch(objective_batch(model, objective, size=BATCH), rank * half, (rank + 1) * half)
    parallel = TowerDDP(DistInfo(rank, 2, rank, torch.device("cpu")))
    parallel.setup(model, objective)
    params = [*model.parameters(), *objective.parameters()]
    result: dict[str, object] = {"wrapped": sorted(parallel.wrappers)}
    before = copy.deepcopy(objective.state_dict())
    for label, gradients in (("plain", PlainGradients()), ("grad_cache", GradCache(2))):
        objective.load_state_dict(before)  # each strategy starts from the same state
        for param in params:
            param.grad = None
        parts = gradients(model, objective, batch, Precision("fp32", torch.device("cpu")), no_sync=parallel.no_sync)
        parallel.finish_gradients(params)
        result[label] = (_grads(model, objective), float(parts["loss"]), _after_step(objective))
    return result


def _bf16_weights(rank: int, strategy: type) -> dict[str, torch.Tensor]:
    """Gradients of bf16 weights (``trainer.precision=bf16``), averaged by ``strategy``."""
    model, objective = prepared_objective("clip")
    model, objective = model.to(torch.bfloat16), objective.to(torch.bfloat16)
    half = BATCH // 2
    batch = slice_batch(objective_batch(model, objective, size=BATCH), rank * half, (rank + 1) * half)
    parallel = strategy(DistInfo(rank, 2, rank, torch.device("cpu")))
    parallel.setup(model, objective)
    PlainGradients()(model, objective, batch, Precision("bf16", torch.device("cpu")), no_sync=parallel.no_sync)
    parallel.finish_gradients([*model.parameters(), *objective.parameters()])
    return _grads(model, objective)


def _bucket_reductions(rank: int) -> dict[str, int]:
    """How many bucket all-reduces each tower's DDP ran in one gradient-cache step of 4 chunks."""
    model, objective = prepared_objective("clip")
    half = BATCH // 2
    batch = slice_batch(objective_batch(model, objective, size=BATCH), rank * half, (rank + 1) * half)
    parallel = TowerDDP(DistInfo(rank, 2, rank, torch.device("cpu")))
    parallel.setup(model, objective)
    counts = dict.fromkeys(parallel.wrappers, 0)

    def counting_hook(name):
        def hook(state, bucket):
            counts[name] += 1
            return allreduce_hook(None, bucket)

        return hook

    for name, wrapper in parallel.wrappers.items():
        wrapper.register_comm_hook(None, counting_hook(name))
    GradCache(1)(model, objective, batch, Precision("fp32", torch.device("cpu")), no_sync=parallel.no_sync)
    return counts


def _batchnorm_tower(rank: int, strategy: type) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A BatchNorm image tower under the gradient cache: gradients and running statistics after a step."""
    model = timm_bn_model()
    objective = OBJECTIVES.build("clip")
    objective.apply_to_model(model)
    half = BATCH // 2
    batch = slice_batch(objective_batch(model, objective, size=BATCH), rank * half, (rank + 1) * half)
    parallel = strategy(DistInfo(rank, 2, rank, torch.device("cpu")))
    parallel.setup(model, objective)
    GradCache(2)(model, objective, batch, Precision("fp32", torch.device("cpu")), no_sync=parallel.no_sync)
    parallel.finish_gradients([*model.parameters(), *objective.parameters()])
    return _grads(model, objective), {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def _rank_main(rank: int, port: int, cases: list[str], out: str) -> None:
    with as_rank(rank, port, init=True):
        results = {case: _under_ddp(case, rank) for case in cases}
        results["reductions"] = _bucket_reductions(rank)
        results["batchnorm"] = {s.name: _batchnorm_tower(rank, s) for s in (TowerDDP, ManualAllReduce)}
        results["bf16"] = {s.name: _bf16_weights(rank, s) for s in (TowerDDP, ManualAllReduce)}
        if rank == 0:
            torch.save(results, out)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    out = Path(tmp_path_factory.mktemp("ddp")) / "grads.pt"
    start_ranks(_rank_main, list(CASES), str(out))
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("gradients", ["plain", "grad_cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_at_half_the_batch_match_one_process(two_rank_results, case, gradients):
    reference, reference_loss, reference_state = _reference(case)
    grads, loss, state = two_rank_results[case][gradients]
    if not CASES[case][1].get("local_loss"):  # with local_loss each rank's loss is its own rows' (open_clip)
        assert loss == pytest.approx(reference_loss, rel=1e-5)  # the global batch's loss, negatives from both ranks
    assert grads.keys() == reference.keys()  # nothing reached on no rank stays without a gradient
    assert relative_error(grads, reference) <= 1e-5
    loss_only = [k for k in ("logit_scale", "logit_bias") if k in reference]  # averaged by hand, not by DDP
    for key in loss_only:
        assert torch.allclose(grads[key], reference[key], rtol=1e-5, atol=1e-8), key
    assert state.keys() == reference_state.keys()  # the queue saw the same global batch in the same order
    for key, value in reference_state.items():
        assert torch.allclose(state[key].double(), value.double(), rtol=1e-5, atol=1e-6), key
    if case == "declip":
        assert int(state["text_queue.filled"]) == 24 and int(state["text_queue.pointer"]) == 12
        assert grads.keys() == reference.keys() and loss > 0


@pytest.mark.slow
def test_a_locked_or_unused_tower_is_left_out_of_ddp(two_rank_results):
    assert two_rank_results["lit"]["wrapped"] == ["text"]
    assert two_rank_results["clip"]["wrapped"] == ["image", "text"]
    assert two_rank_results["simclr"]["wrapped"] == ["image"]  # an image-only objective
    grads, _, _ = two_rank_results["lit"]["plain"]
    assert not any(k.startswith("image_tower.") for k in grads)


@pytest.mark.slow
def test_a_batchnorm_tower_under_ddp_and_the_gradient_cache_matches_the_manual_all_reduce(two_rank_results):
    """Batch statistics are per rank (no SyncBatchNorm), so one process at the doubled batch is no
    reference; the manual all-reduce of the same per-rank gradients is. The no-grad first pass runs
    the tower bare and its running statistics are restored, so DDP changes neither."""
    ddp_grads, ddp_stats = two_rank_results["batchnorm"]["ddp"]
    manual_grads, manual_stats = two_rank_results["batchnorm"]["manual"]
    assert ddp_grads.keys() == manual_grads.keys() and any(k.startswith("image_tower.") for k in ddp_grads)
    assert relative_error(ddp_grads, manual_grads) <= 1e-6
    fresh = {n: b for n, b in timm_bn_model().named_buffers() if "running" in n}
    assert ddp_stats.keys() == fresh.keys() and fresh
    assert all(torch.equal(ddp_stats[k], manual_stats[k]) for k in fresh)  # rank 0's own, untouched by DDP
    assert any(not torch.equal(ddp_stats[k], fresh[k]) for k in fresh)  # updated by the replays


@pytest.mark.slow
def test_bf16_gradients_are_averaged_in_fp32_under_ddp_as_by_the_manual_all_reduce(two_rank_results):
    ddp, manual = two_rank_results["bf16"]["ddp"], two_rank_results["bf16"]["manual"]
    assert ddp.keys() == manual.keys() and all(v.dtype == torch.bfloat16 for v in ddp.values())
    assert all(torch.equal(ddp[k], manual[k]) for k in manual)  # the same fp32 mean, cast once


@pytest.mark.slow
def test_the_gradient_cache_syncs_each_tower_once_per_step(two_rank_results):
    # 4 chunks per rank: 3 replays under no_sync, then one reduction of the tower's single bucket
    # (DDP's first step uses one bucket per module).
    assert two_rank_results["reductions"] == {"image": 1, "text": 1}
