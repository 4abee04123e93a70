"""The published-run presets (experiments/experiment/): each composes, and the optimizer and schedule
it builds carry the paper's values (the table below is docs/recipes.md's table, written out again
by hand: a preset edited away from its paper fails here)."""

from __future__ import annotations

import importlib.resources
import math

import open_clip
import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers.configs import compose_train, run_train
from tests.helpers.objectives import TEST_HEADS

# preset: optimizer, lr, weight decay, warmup steps, logical (global) batch, gradient-cache chunk, steps
PUBLISHED = {
    "openclip_rn50_cc3m": ("AdamW", 1e-3, 0.1, 10000, 1024, 256, 85000),
    "openclip_rn50_cc12m": ("AdamW", 1e-3, 0.1, 10000, 1024, 256, 293000),
    "openclip_vit_b32_laion400m": ("AdamW", 5e-4, 0.2, 2000, 32768, 256, 397785),
    "openclip_vit_l14_laion2b": ("AdamW", 1e-3, 0.2, 10000, 86016, 64, 372000),
    "openclip_vit_h14_laion2b": ("AdamW", 5e-4, 0.2, 2000, 79104, 32, 439000),
    "lit_vit_l16_public": ("AdamW", 1e-3, 1e-4, 10000, 16384, 256, 60000),
    "siglip_vit_b16": ("AdamW", 1e-3, 1e-4, 5000, 32768, 128, 1220000),
    "evaclip_vit_b16": ("Lamb", 5e-4, 0.05, 2000, 131072, 256, 61000),  # 5e-4: the temperature's group
    "declip_benchmark_yfcc15m": ("AdamW", 1e-3, 0.1, 2500, 4096, 256, 128000),
    "declip_benchmark_yfcc15m_slip_filip": ("AdamW", 5e-4, 0.5, 2500, 4096, 256, 128000),
    "captionnet_in100": ("AdamW", 1e-3, 0.1, 10000, 128, None, 30000),
}
# What else a preset must pick to be the paper's run: (model arch or timm trunk, objective class).
TOWERS_AND_LOSS = {
    "openclip_rn50_cc3m": ("RN50-quickgelu", "ClipObjective"),
    "openclip_rn50_cc12m": ("RN50-quickgelu", "ClipObjective"),
    "openclip_vit_b32_laion400m": ("ViT-B-32-quickgelu", "ClipObjective"),
    "openclip_vit_l14_laion2b": ("ViT-L-14", "ClipObjective"),
    "openclip_vit_h14_laion2b": ("ViT-H-14", "ClipObjective"),
    "lit_vit_l16_public": ("vit_large_patch16_224.augreg_in21k", "ClipObjective"),
    "siglip_vit_b16": ("ViT-B-16-SigLIP", "SiglipObjective"),
    "evaclip_vit_b16": ("EVA02-B-16", "ClipObjective"),
    "declip_benchmark_yfcc15m": ("ViT-B-32", "ClipObjective"),
    "declip_benchmark_yfcc15m_slip_filip": ("ViT-B-32", "ClipObjective"),
    "captionnet_in100": ("RN50", "ClipObjective"),
}


def preset_names() -> set[str]:
    folder = importlib.resources.files("vlhub.experiments").joinpath("experiment")
    return {entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def test_presets_ship_inside_the_package_and_every_published_run_is_in_the_table():
    # importlib finds them the way Hydra's pkg://vlhub.experiments does (editable install, wheel or checkout).
    names = preset_names()
    assert set(PUBLISHED) <= names
    assert {"smoke", "compare_objectives", "finetune_zeroshot_head", "vit_b32_gradcache"} <= names


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_published_preset_builds_the_papers_optimizer_and_schedule(name, tiny_model):
    optimizer_name, lr, weight_decay, warmup, batch, chunk, steps = PUBLISHED[name]
    cfg = compose_train([f"+experiment={name}"])
    arch, objective = TOWERS_AND_LOSS[name]
    assert arch in (cfg.model.get("arch"), cfg.model.get("timm_backbone"))
    if cfg.model.get("timm_backbone"):
        assert timm.is_model_pretrained(arch)
    else:
        assert open_clip.get_model_config(arch) is not None, arch  # a real open_clip config
    assert cfg.objective._target_.endswith(objective)
    assert cfg.trainer.batch_size == batch and cfg.trainer.max_steps == steps
    assert cfg.trainer.grad_cache.enabled == (chunk is not None)
    if chunk is not None:
        assert cfg.trainer.grad_cache.chunk_size == chunk and batch % chunk == 0

    # The effect: the optimizer and schedule the run gets, built on a small model at that global batch.
    optimizer, scheduler = instantiate(cfg.optim).build([tiny_model], max_steps=steps, batch_size=batch)
    assert type(optimizer).__name__ == optimizer_name
    lrs = [group["initial_lr"] for group in optimizer.param_groups]  # the peak; "lr" is the warmup's first
    assert max(lrs) == pytest.approx(lr)  # used as given: no scaling with the batch
    assert sorted({group["weight_decay"] for group in optimizer.param_groups}) == pytest.approx([0.0, weight_decay])
    factor = scheduler.lr_lambdas[0]
    assert factor(warmup // 2) == pytest.approx(0.5, abs=1e-3) and factor(warmup) == pytest.approx(1.0, abs=1e-6)
    assert factor(steps) == pytest.approx(0.0, abs=1e-6)  # cosine to zero at the last step


def test_the_eva_clip_preset_gives_each_tower_its_lr_and_decays_it_per_layer(tiny_model):
    cfg = compose_train(["+experiment=evaclip_vit_b16"])
    optimizer, _ = instantiate(cfg.optim).build([tiny_model], max_steps=10, batch_size=131072)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    by_name = {group["name"]: group["initial_lr"] for group in optimizer.param_groups}
    # Hand-computed: block i of a depth-L tower gets lr x 0.75^(L - i), embeddings 0.75^(L + 1).
    depth = len(tiny_model.image_tower.module.transformer.resblocks)
    assert by_name["image_final"] == pytest.approx(2e-4)
    assert by_name["image_embeddings"] == pytest.approx(2e-4 * 0.75 ** (depth + 1))
    assert by_name["image_block_0"] == pytest.approx(2e-4 * 0.75**depth)
    text_depth = len(tiny_model.text_tower.module.transformer.resblocks)
    assert by_name["text_final"] == pytest.approx(2e-5)
    assert by_name["text_embeddings"] == pytest.approx(2e-5 * 0.75 ** (text_depth + 1))


def test_the_declip_sweeps_run_the_four_objectives_with_each_ones_lr_and_weight_decay(tiny_model):
    from hydra import compose, initialize_config_module

    swept = {}
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        for name in ("declip_benchmark_yfcc15m", "declip_benchmark_yfcc15m_slip_filip"):
            cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
            optimizer, _ = instantiate(cfg.optim).build([tiny_model], max_steps=10, batch_size=4096)
            assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8
            for objective in cfg.hydra.sweeper.params.objective.split(","):
                swept[objective] = (optimizer.param_groups[0]["initial_lr"], cfg.optim.weight_decay)
    # The DeCLIP repository's yfcc15m_vit_* configs: (warmup_lr, weight_decay) per method.
    assert swept == {"clip": (1e-3, 0.1), "declip": (1e-3, 0.1), "slip": (5e-4, 0.5), "filip": (5e-4, 0.5)}


# What every preset is run with here: the tiny model on the synthetic shapes, 2 steps, fp32, a small
# evaluation at the end; the gradient cache, where the preset has it, in chunks of 4.
TINY_RUN = [
    "model=tiny",
    "data=synthetic",
    "eval=synthetic",
    "eval.synthetic.num_samples=40",
    "eval.every_n_steps=0",
    "trainer.batch_size=8",
    "trainer.grad_cache.chunk_size=4",
    "trainer.max_steps=2",
    "trainer.precision=fp32",
]
# A preset's own data keys that cannot hold on the shapes: no caption of theirs names an ImageNet-100 class.
SHAPES_FIT = {"captionnet_in100": ["data.filter_to_classes=false", "data.label_from_caption=false"]}


def preset_objective(name: str) -> tuple[str, list[str], set[str]]:
    """The objective the preset's first job trains (the first of its sweep, else the one its defaults
    pick, else the default clip), the override that picks it (only a sweep's needs one), and the
    objective keys the preset sets itself."""
    preset = OmegaConf.load(importlib.resources.files("vlhub.experiments").joinpath(f"experiment/{name}.yaml"))
    own = set(preset.get("objective") or {})
    if swept := OmegaConf.select(preset, "hydra.sweeper.params.objective"):
        objective = swept.split(",")[0]
        return objective, [f"objective={objective}"], own
    picked = [entry["override /objective"] for entry in preset.get("defaults", []) if "override /objective" in entry]
    return (picked[0] if picked else "clip"), [], own


@pytest.mark.slow
def test_every_preset_trains_two_steps_on_cpu_with_the_tiny_model(tmp_path):
    # model=tiny must replace the preset's model whole (a preset choosing its towers through the model
    # group, never by model.* keys the tiny config would inherit), so each published run can be checked on
    # a laptop before its long job. finetune_zeroshot_head goes last: it starts from another run's checkpoint.
    names = sorted(preset_names() - {"finetune_zeroshot_head"}) + ["finetune_zeroshot_head"]
    failures, checkpoint, options = {}, None, {}
    tiny = OmegaConf.to_container(compose_train()["model"], resolve=True)
    for name in names:
        objective, pick, own = preset_objective(name)
        if objective not in options:  # the objective option as composed alone (lit: clip's target, locked)
            options[objective] = OmegaConf.to_container(
                compose_train([f"objective={objective}"])["objective"], resolve=True
            )
        heads = [f"objective.{key}={value}" for key, value in TEST_HEADS.get(objective, {}).items()]
        start = [f"model.pretrained={checkpoint}"] if name == "finetune_zeroshot_head" else []
        overrides = [f"+experiment={name}", *pick, *TINY_RUN, *SHAPES_FIT.get(name, []), *heads]
        try:
            metrics = run_train([*overrides, *start], tmp_path / name, {"model": "tiny", "objective": objective})
        except Exception as error:  # noqa: BLE001 (every preset is tried; the failures are listed together)
            failures[name] = f"{type(error).__name__}: {error}"
            continue
        saved = torch.load(tmp_path / name / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
        model = saved["config"]["model"]  # the tiny model whole: its keys only (no arch, no timm trunk)
        kept = own | set(TEST_HEADS.get(objective, {}))  # the objective's keys as its option has them, but these
        ran = {key: value for key, value in saved["config"]["objective"].items() if key not in kept}
        trained = (saved["step"], ran, sorted(model), model["config"])
        expected = (2, {key: value for key, value in options[objective].items() if key not in kept})
        finite = bool(metrics) and all(map(math.isfinite, metrics.values()))
        if trained != (*expected, sorted(tiny), tiny["config"]) or not finite:
            failures[name] = f"step, objective, model keys, model config: {trained}, metrics {metrics}"
        checkpoint = checkpoint or tmp_path / name / "checkpoints" / "latest.pt"
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())
