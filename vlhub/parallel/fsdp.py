"""``trainer.strategy=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over the towers.

What is sharded: every transformer block of each tower (``Tower.blocks()``: open_clip's
VisionTransformer and TextTransformer blocks, a timm ViT trunk's, a Hugging Face encoder's layers)
is its own ``fully_shard`` unit, and each tower is one more unit holding what lies outside its blocks
(patch and token embeddings, final norms, projections). Parameters, gradients and AdamW states
of the towers are split over the ranks (about 1/world_size each); a block's weights are
all-gathered just before it runs and freed after. Everything outside the towers (the
temperature, SigLIP's bias, objective heads) stays an ordinary replicated tensor: those are
small, and some are used only in ``loss``, outside any tower call; their gradients are averaged
by hand once per step (:meth:`FsdpStrategy.finish_gradients`).

Precision (``trainer.precision``), as an FSDP ``MixedPrecisionPolicy``:
- ``fp32``: no casting.
- ``amp_bf16``: the sharded (master) weights stay fp32, FSDP casts the gathered weights to bf16
  (``param_dtype``) and reduces gradients in fp32 (``reduce_dtype``); autocast stays on around
  the objective as on one process, for the ops outside the towers. Chosen over fp32 weights
  under autocast alone because the all-gather then moves half the bytes and the gathered block
  takes half the memory, while the optimizer still updates fp32 weights and the gradient
  average is as exact as the fp32 all-reduce.
- ``amp_fp16``: fp32 weights gathered as they are, autocast alone (as on one process). Gathering
  them in fp16 would also give the norm weights and biases fp16 gradients, which autocast keeps in
  fp32: scaled by the loss scaler's initial 2^16 they overflow, and more steps are skipped (on
  the tiny model, 2 ranks: fp16 gathers skipped both first steps; fp32 gathers one, as ``ddp`` and
  ``manual`` do). The loss scaler works on the sharded gradients: DTensor reduces its found-inf
  flag over the ranks, so every rank skips the same steps.
- ``bf16``: the weights are bf16 already (the trainer casts them); gradients are reduced in fp32
  and stored back in bf16, as the manual all-reduce does.

Composition:
- gradient cache: composes. Each chunk's replay but the last runs with
  ``set_requires_gradient_sync(False)`` (:meth:`no_sync`); gradients then accumulate unsharded on
  every rank until the last chunk reduce-scatters them, which costs one full-size gradient of the
  towers per rank between chunks and saves ``chunks - 1`` reduce-scatters per step. The no-grad
  first pass all-gathers each block like any forward.
- activation checkpointing: composes when the checkpoint wraps a block before it is sharded
  (or, as open_clip's ``set_grad_checkpointing`` does, calls the sharded block inside
  ``torch.utils.checkpoint``): the recomputation all-gathers the block again in the backward
  (open_clip's flag on 2 gloo ranks: gradients identical to those without it).
- compile: ``trainer.compile`` compiles each block (``block.compile()``) before sharding, torch's
  documented pattern (:meth:`FsdpStrategy.compile_targets`). Compiling the whole model around the
  sharded towers is not supported (graph breaks at every FSDP hook unless compiled autograd is on).
- the weights are built whole on every device before sharding (the trainer moves the model there
  first), so the whole model must fit one device at start; after sharding each rank keeps 1/N of
  it. Building on the meta device would lift that; not done.
- ``model.encode_*`` outside training (evaluation) runs sharded forwards, which are collectives:
  every rank must take part (:meth:`evaluation_model` gives every rank a full copy instead, each
  evaluating its share).
- towers without transformer blocks (open_clip's ModifiedResNet, timm CNNs) are refused at
  launch; ``trainer.strategy=ddp`` trains them.

Checkpoints: ``vlhub/parallel/sharded_checkpoint.py`` writes the resumable sharded directory; this
module gathers the full open_clip-layout state dict (and a full optimizer state) for rank 0's
single-file ``step_<N>.pt`` / ``latest.pt``, and loads either back on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vlhub.errors import ConfigError
from vlhub.parallel import collectives
from vlhub.parallel.environment import DistInfo
from vlhub.parallel.sharded_checkpoint import state_root
from vlhub.parallel.strategy import ParallelStrategy

if TYPE_CHECKING:  # type hints only
    from vlhub.models.vision_language import VisionLanguageModel
    from vlhub.run.checkpoint import Checkpointer


KEY = "trainer.strategy"
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the host
FULL_ON_EVERY_RANK = StateDictOptions(full_state_dict=True)  # gathered to every rank, on the device
WEIGHT_KEYS = ("state_dict", "objective", "optimizer")  # what the directory holds as shards


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """The FSDP policy for ``trainer.precision`` (the module docstring says why)."""
    if precision == "amp_bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "bf16":
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32, amp_fp16: no casting by FSDP


def check_fsdp_model(model: VisionLanguageModel) -> None:
    """Fail naming ``trainer.strategy`` when a tower of ``model`` has no blocks to shard."""
    for name, tower in model.towers().items():
        if not tower.blocks():
            raise ConfigError(
                f"{KEY}=fsdp shards transformer blocks, and the {name} tower ({tower.describe()}) has none",
                hint=f"use {KEY}=ddp for this model",
            )


def apply_fsdp_(model: VisionLanguageModel, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> list[nn.Module]:
    """Shard each tower of ``model`` in place, block by block, then the tower; returns the towers."""
    check_fsdp_model(model)
    towers = []
    for tower in model.towers().values():
        for block in tower.blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(tower, mesh=mesh, mp_policy=policy)
        towers.append(tower)
    return towers


def host_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its weights and buffers on the host, made without a second
    copy on the device."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().to("cpu", copy=True), p.requires_grad) for p in model.parameters()
    }
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in model.buffers()})
    return copy.deepcopy(model, memo)


class FsdpStrategy(ParallelStrategy):
    """FSDP2 on the towers; replicated, hand-averaged gradients for everything else."""

    name = "fsdp"
    collective_state = True

    def __init__(self, dist_info: DistInfo, precision: str = "fp32") -> None:
        if not dist_info.distributed:
            raise ConfigError(
                f"{KEY}=fsdp needs more than one process, and this run is one process",
                hint=f"launch with torchrun --nproc_per_node=N (or SLURM tasks), or use {KEY}=auto",
            )
        super().__init__(dist_info, precision)
        self.dist: DistInfo = dist_info
        self.policy = mixed_precision_policy(precision)
        self.towers: list[nn.Module] = []
        self.root: nn.Module | None = None  # model and objective: the names of the optimized parameters
        self.eval_copy: nn.Module | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, objective: nn.Module) -> None:
        """Shard the towers of ``model`` (on the device, identical on every rank) before the
        optimizer is built; ``objective`` and the model's own parameters stay replicated."""
        check_fsdp_model(model)
        # Every rank evaluates its share of each dataset (vlhub/eval/sharding.py) on an unsharded
        # copy kept on the host between evaluations: a sharded forward is a collective, and the
        # ranks' shares differ in size.
        self.eval_copy = host_copy(model)
        mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
        self.towers = apply_fsdp_(model, mesh, self.policy)
        self.root = state_root(model, objective)

    def _root(self) -> nn.Module:
        if self.root is None:
            raise RuntimeError("FsdpStrategy.setup() was not called")
        return self.root

    # -- gradients ---------------------------------------------------------------------------------
    def compile_targets(self, model: VisionLanguageModel) -> list[nn.Module]:
        """Each block, compiled before it is sharded (torch's pattern for FSDP2): a compiled tower
        would trace through every FSDP hook."""
        return model.compile_units(per_block=True)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes in here accumulate unsharded gradients; the next one reduce-scatters."""
        for tower in self.towers:
            tower.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            for tower in self.towers:
                tower.set_requires_gradient_sync(True)  # type: ignore[operator]

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        """Average the replicated parameters' gradients (the sharded ones were reduce-scattered)."""
        return collectives.all_reduce_grads_((p for p in params if not isinstance(p, DTensor)), flags=flags)

    def clip_gradients_(self, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over sharded and replicated gradients together (torch's refuses the
        mix): the sharded part's norm is reduced over the ranks, the replicated part is the same on
        every rank. Returns the total norm before clipping."""
        with_grad = [p for p in params if p.grad is not None]
        groups = [[p for p in with_grad if isinstance(p.grad, DTensor) == sharded] for sharded in (True, False)]
        squared = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        for group in filter(None, groups):
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            squared += (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
        total = squared.sqrt()
        for group in filter(None, groups):  # scales each parameter's .grad
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    # -- checkpoints: full state on rank 0 (the single file), shards (the directory) --------------------
    def model_state_dict(self, model: VisionLanguageModel) -> dict[str, torch.Tensor]:
        """Collective: the full weights in the checkpoint's layout (``model.checkpoint_layout()``,
        open_clip's names) on rank 0 (on the host), {} elsewhere."""
        weights = get_model_state_dict(model, options=FULL_ON_RANK0)
        return model.checkpoint_layout().to_open_clip(weights) if self.dist.is_main else {}

    def load_model_state_dict(self, model: VisionLanguageModel, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Full weights in the checkpoint's layout (every rank holds them) into the sharded model."""
        own = model.checkpoint_layout().from_open_clip(state_dict, model.state_dict())
        set_model_state_dict(model, own, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective: on rank 0 the full optimizer state in ``Optimizer.state_dict()``'s layout, what
        one process saves; {} elsewhere."""
        named = get_optimizer_state_dict(self._root(), optimizer, options=FULL_ON_RANK0)
        return indexed_optimizer_state(named) if self.dist.is_main else {}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        named = named_optimizer_state(state_dict, optimizer, self._root())
        set_optimizer_state_dict(self._root(), optimizer, named, options=StateDictOptions(full_state_dict=True))

    def save_shards(
        self, checkpointer: Checkpointer, optimizer: torch.optim.Optimizer, payload: dict[str, Any]
    ) -> None:
        """Collective: the sharded directory of ``payload["step"]`` (rank 0's ``payload``, the single
        file's contents, gives its ``trainer.pt`` without the weights)."""
        header = {k: v for k, v in payload.items() if k not in WEIGHT_KEYS} if self.dist.is_main else None
        checkpointer.save_sharded(int(payload["step"]), self._root(), optimizer, header)

    # -- evaluation ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """Collective: every rank gets an unsharded copy of ``model`` with the current weights, on
        the device; the copy goes back to the host afterwards."""
        weights = get_model_state_dict(model, options=FULL_ON_EVERY_RANK)
        assert self.eval_copy is not None, "setup() makes the evaluation copy"
        self.eval_copy.load_state_dict(weights)
        del weights
        self.eval_copy.to(self.dist.device).train(model.training)
        try:
            yield self.eval_copy
        finally:
            self.eval_copy.cpu()


# -- optimizer state layouts ---------------------------------------------------------------------
def indexed_optimizer_state(named: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (``get_optimizer_state_dict``) in ``Optimizer.state_dict()``'s
    layout: parameters numbered in param-group order, as one process saves them."""
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in named["state"].items()}
    return {"state": state, "param_groups": groups}


def named_optimizer_state(indexed: dict[str, Any], optimizer: torch.optim.Optimizer, root: nn.Module) -> dict[str, Any]:
    """The inverse: ``Optimizer.state_dict()``'s layout keyed by the names of ``root``'s parameters,
    matched to ``optimizer``'s own parameters in order."""
    names = {id(param): name for name, param in root.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = []
    for group in indexed["param_groups"]:
        groups.append({**group, "params": [ordered[i] for i in group["params"]]})
    state = {ordered[int(i)]: value for i, value in indexed["state"].items()}
    return {"state": state, "param_groups": groups}
