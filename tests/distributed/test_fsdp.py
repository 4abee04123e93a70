"""FSDP2 (``trainer.strategy=fsdp``) on CPU (gloo): two ranks at batch 16 train like one process at
batch 32, each rank stores about half the weights and AdamW states, and the checkpoints (the
sharded directory and the single file) resume on 1 and on 2 ranks and load into open_clip."""

import json
import os
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from tests.helpers.configs import run_train
from tests.helpers.objectives import prepared_objective
from tests.helpers.ranks import as_rank, start_ranks
from tests.helpers.tensors import relative_error

# Clipping on (the norm is about 30): the total norm spans sharded and replicated gradients.
COMMON = [
    "optim.scheduler=constant",
    "optim.lr=1e-3",
    "trainer.grad_clip_norm=0.05",
    "checkpoint.every_n_steps=0",
    "checkpoint.keep=5",
]
FSDP = [*COMMON, "trainer.strategy=fsdp", "trainer.batch_size=16"]
CACHE = ["trainer.grad_cache.enabled=true", "trainer.grad_cache.chunk_size=8"]


def _checkpoint(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"checkpoints/step_{step}.pt", weights_only=True)


def _copy_with_only(source: Path, target: Path, keep: str) -> None:
    """A copy of a run folder whose only checkpoint is ``keep`` (the sharded directory or the file)."""
    shutil.copytree(source, target)
    for path in (target / "checkpoints").iterdir():
        if path.name != keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _storage_per_rank(rank: int, world_size: int) -> tuple[int, int]:
    """(parameter, AdamW state) elements this rank stores after one sharded step (0 ranks: one process)."""
    from torch.distributed.tensor import DTensor

    from vlhub.parallel.environment import DistInfo
    from vlhub.parallel.fsdp import FsdpStrategy

    def local_numel(tensors) -> int:  # a DTensor counts its local shard
        return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)

    model, objective = prepared_objective("clip")
    params = [*model.parameters(), *objective.parameters()]
    if world_size > 1:
        FsdpStrategy(DistInfo(rank, world_size, rank, torch.device("cpu"))).setup(model, objective)
        params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    states = [value for state in optimizer.state.values() for value in state.values() if value.ndim > 0]
    return local_numel(params), local_numel(states)


def _rank_main(rank: int, port: int, root: str) -> None:
    root = Path(root)
    with as_rank(rank, port):
        run_train([*FSDP, "trainer.max_steps=3"], root / "fsdp")  # evaluates: rank 0 on its full copy
        if rank == 0:
            _copy_with_only(root / "fsdp", root / "from_dir", "step_3.dcp")
            _copy_with_only(root / "fsdp", root / "from_file", "latest.pt")
        torch.distributed.barrier()
        # Auto-resume on 2 ranks, one step further; from the directory with the gradient cache
        # (its chunks but the last under no_sync), a config change the resume must be allowed.
        run_train([*FSDP, *CACHE, "trainer.max_steps=4", "checkpoint.allow_config_change=true"], root / "from_dir")
        run_train([*FSDP, "trainer.max_steps=4"], root / "from_file")
        torch.save(_storage_per_rank(rank, 2), root / f"storage_{rank}.pt")


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_store_half_and_resume_anywhere(tmp_path):
    start_ranks(_rank_main, str(tmp_path))
    single = [*COMMON, "trainer.batch_size=32"]
    run_train([*single, "trainer.max_steps=3"], tmp_path / "single")
    run_train([*single, "trainer.max_steps=4"], tmp_path / "single")  # its own resume: the reference at 4
    # The directory 2 ranks wrote, named and resumed by one process (same global batch, another per rank).
    _copy_with_only(tmp_path / "fsdp", tmp_path / "dir_on_one", "step_3.dcp")
    named = f"checkpoint.resume={tmp_path / 'dir_on_one/checkpoints/step_3.dcp'}"
    run_train([*single, "trainer.max_steps=4", "checkpoint.allow_config_change=true", named], tmp_path / "dir_on_one")

    reference = _checkpoint(tmp_path / "single", 3)
    trained = _checkpoint(tmp_path / "fsdp", 3)  # loss-only parameters (logit_scale) included
    assert trained["state_dict"].keys() == reference["state_dict"].keys()
    assert relative_error(trained["state_dict"], reference["state_dict"]) <= 1e-5
    scale = "logit_scale"  # replicated, averaged by hand; moved by the steps
    assert torch.allclose(trained["state_dict"][scale], reference["state_dict"][scale], rtol=1e-6, atol=0)
    assert not torch.equal(reference["state_dict"][scale], _checkpoint(tmp_path / "single", 4)["state_dict"][scale])
    # The gathered optimizer state has one process's layout and values.
    sharded_optim, optim = _checkpoint(tmp_path / "fsdp", 3)["optimizer"], reference["optimizer"]
    assert [g["params"] for g in sharded_optim["param_groups"]] == [g["params"] for g in optim["param_groups"]]
    exp_avg = {i: s["exp_avg"] for i, s in sharded_optim["state"].items()}
    assert relative_error(exp_avg, {i: s["exp_avg"] for i, s in optim["state"].items()}) <= 1e-5

    at_four = _checkpoint(tmp_path / "single", 4)["state_dict"]
    for name in ("from_dir", "from_file", "dir_on_one"):
        resumed = _checkpoint(tmp_path / name, 4)
        assert resumed["step"] == 4
        assert relative_error(resumed["state_dict"], at_four) <= 1e-5, name
    assert (tmp_path / "from_dir/checkpoints/step_4.dcp/.metadata").is_file()

    # Every rank evaluated its share on an unsharded copy: the same zero-shot accuracy as one process.
    record = json.loads((tmp_path / "fsdp/results.jsonl").read_text().splitlines()[-1])
    single_record = json.loads((tmp_path / "single/results.jsonl").read_text().splitlines()[0])
    top1 = [k for k in single_record if k.endswith("top1")]
    assert top1 and all(record[k] == pytest.approx(single_record[k], abs=1e-6) for k in top1)

    one_params, one_states = _storage_per_rank(0, 1)
    for rank in (0, 1):
        params, states = torch.load(tmp_path / f"storage_{rank}.pt")
        assert 0.45 < params / one_params < 0.55 and 0.45 < states / one_states < 0.55

    # latest.pt is open_clip's layout: open_clip.create_model loads it as is.
    latest = tmp_path / "fsdp/checkpoints/latest.pt"
    config_dir = tmp_path / "open_clip_configs"
    config_dir.mkdir()
    (config_dir / "vlhub-tiny-fsdp.json").write_text(json.dumps(torch.load(latest)["open_clip_model_cfg"]))
    open_clip.add_model_config(config_dir)
    loaded = open_clip.create_model("vlhub-tiny-fsdp", pretrained=str(latest)).state_dict()
    for key, value in _checkpoint(tmp_path / "fsdp", 3)["state_dict"].items():
        torch.testing.assert_close(loaded[key], value.reshape(loaded[key].shape), rtol=0, atol=0)


def test_sharded_directories_are_atomic_rotated_with_their_step_files_and_read_as_checkpoints(tmp_path):
    from vlhub.parallel.sharded_checkpoint import load_sharded_, state_root
    from vlhub.run.checkpoint import Checkpointer, read_checkpoint_file
    from vlhub.run.folder import remove_tmp_files

    model, objective = prepared_objective("clip")
    optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=1e-3)
    root = state_root(model, objective)
    folder = tmp_path / "checkpoints"
    foreign = Checkpointer(folder, every_n_steps=1, keep=1, resume=None)
    foreign.run_id = "other"
    foreign.save_sharded(1, root, optimizer, {"step": 1})
    checkpointer = Checkpointer(folder, every_n_steps=1, keep=1, resume=None)
    checkpointer.run_id = "this"
    for step in (2, 3):
        checkpointer.save_sharded(step, root, optimizer, {"step": step, "config": {}})
        checkpointer.save({"step": step, "config": {}})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["latest.pt", "step_1.dcp", "step_3.dcp", "step_3.pt"]  # step 2 rotated; step 1 not ours
    assert [(step, p.name) for step, p, _ in checkpointer.scan()][:2] == [(3, "step_3.dcp"), (3, "step_3.pt")]
    header = read_checkpoint_file(folder / "step_3.dcp")
    assert header["step"] == 3 and header["run_id"] == "this" and header["sharded_dir"] == str(folder / "step_3.dcp")
    # A write killed before its rename leaves a temporary directory; the next launch removes it.
    (folder / ".step_4.dcp.tmp").mkdir()
    (folder / ".step_4.dcp.tmp" / "__0_0.distcp").write_bytes(b"torn")
    remove_tmp_files(folder)
    assert not (folder / ".step_4.dcp.tmp").exists() and (folder / "step_3.dcp").is_dir()
    # The directory loads back into a fresh model (one process, no process group).
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_objective = prepared_objective("clip")
    torch.nn.init.zeros_(fresh.logit_scale)
    fresh_optimizer = torch.optim.AdamW([*fresh.parameters(), *fresh_objective.parameters()], lr=1e-3)
    load_sharded_(folder / "step_3.dcp", state_root(fresh, fresh_objective), fresh_optimizer)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def test_fsdp_finds_the_blocks_of_vit_and_timm_towers_and_refuses_a_resnet():
    from tests.helpers.models import micro_model
    from vlhub.errors import ConfigError
    from vlhub.models import build_open_clip_model
    from vlhub.parallel.fsdp import check_fsdp_model

    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vit = micro_model()
    assert len(vit.image_tower.blocks()) == vit.image_tower.module.transformer.layers
    assert len(vit.text_tower.blocks()) == vit.text_tower.module.transformer.layers
    timm_vit = build_open_clip_model(
        config={"embed_dim": 32, "vision_cfg": {"image_size": 32}, "text_cfg": text}, timm_backbone="test_vit"
    )
    check_fsdp_model(timm_vit)  # both towers have blocks: no error
    assert timm_vit.image_tower.blocks() == list(timm_vit.image_tower.module.trunk.blocks)
    resnet_cfg = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}  # open_clip's ModifiedResNet
    resnet = build_open_clip_model(config={"embed_dim": 32, "vision_cfg": resnet_cfg, "text_cfg": text})
    with pytest.raises(ConfigError, match=r"trainer.strategy=fsdp .* image tower \(ModifiedResNet\)"):
        check_fsdp_model(resnet)


# Opt-in (VLHUB_LONG_TESTS=1): objectives and precisions beyond the default run's.
LONG = {
    # name: (overrides, reference, tolerance on the relative weight difference): the reference is
    # one process at batch 32, or 2 ranks with trainer.strategy=manual (the all-reduce after the
    # backward) where data parallelism itself changes the result.
    "siglip": (["objective=siglip"], "single", 1e-5),  # logit_bias, replicated
    "mlm": (["objective=mlm"], "single", 1e-5),  # the text tower twice per step; a head used in represent
    "lit": (["objective=lit"], "single", 1e-5),  # a locked (frozen) image tower, sharded all the same
    "amp_bf16": (["trainer.precision=amp_bf16"], "single", 2e-2),  # bf16 gathers vs autocast: rounding
    "bf16": (["trainer.precision=bf16"], "single", 2e-2),  # bf16 weights, gradients reduced in fp32
    # The loss scaler skips the first step on 2 ranks (fp16 gradients of the gathered features
    # overflow at 2^16) and not on one process: the same with manual and ddp.
    "amp_fp16": (["trainer.precision=amp_fp16"], "manual", 1e-5),
}


def _long_rank_main(rank: int, port: int, root: str) -> None:
    with as_rank(rank, port):
        for name, (overrides, reference, _) in LONG.items():
            run_train([*FSDP, *overrides, "trainer.max_steps=2", "eval=none"], Path(root) / "fsdp" / name)
            if reference == "manual":
                manual = [*FSDP, "trainer.strategy=manual", *overrides, "trainer.max_steps=2", "eval=none"]
                run_train(manual, Path(root) / name)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLHUB_LONG_TESTS"), reason="seven more 2-rank runs: VLHUB_LONG_TESTS=1")
def test_fsdp_siglip_mlm_and_low_precision_match_their_reference(tmp_path):
    start_ranks(_long_rank_main, str(tmp_path))
    for name, (overrides, reference, tolerance) in LONG.items():
        if reference == "single":
            single = [*COMMON, *overrides, "trainer.batch_size=32", "trainer.max_steps=2", "eval=none"]
            run_train(single, tmp_path / name)
        expected, sharded = _checkpoint(tmp_path / name, 2), _checkpoint(tmp_path / "fsdp" / name, 2)
        relative = relative_error(sharded["state_dict"], expected["state_dict"])
        print(f"{name}: relative weight difference fsdp vs {reference} {relative:.2e}")
        assert relative <= tolerance, name
        if expected["objective"]:  # heads (mlm): replicated, their gradients averaged by hand
            assert relative_error(sharded["objective"], expected["objective"]) <= tolerance, name
        assert sharded["optimizer"]["state"][0]["step"] == expected["optimizer"]["state"][0]["step"]
