"""Config tests: compose the real YAML, instantiate every option, fail on bad keys and values."""

import functools

import open_clip
import pytest
import torch
from huggingface_hub import try_to_load_from_cache
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tests.helpers.configs import CONFIG_ROOT, compose_train, options
from vlhub import registry
from vlhub.launch import check_config
from vlhub.objectives import Objective
from vlhub.train import PLAIN_KEYS


def test_groups_offer_the_options_the_spec_names():
    assert set(options("model")) >= {
        "tiny",
        "rn50",
        "vit_b32",
        "vit_b16",
        "vit_l14",
        "convnext_tiny",
        "timm",
        "eva02_b16",
    }
    assert set(options("objective")) >= {"clip", "lit"}
    assert set(options("data")) >= {"synthetic", "csv", "imagefolder"}
    assert set(options("augment")) >= {"clip", "none"}
    assert set(options("optim")) >= {"adamw", "sgd", "lamb"}
    assert set(options("eval")) >= {"none", "synthetic", "imagefolder"}
    assert set(options("hydra/launcher")) >= {"local", "slurm"}


def test_defaults_compose_to_the_cpu_default():
    cfg = compose_train()
    assert cfg.trainer.precision == "fp32"
    assert cfg.model.config.vision_cfg.image_size == 32
    assert cfg.logger.tensorboard is True and cfg.logger.wandb.enabled is False


def other_nodes(cfg, *own: str) -> dict:
    return {key: value for key, value in OmegaConf.to_container(cfg).items() if key not in own}


@functools.cache
def composed_alone(override: str) -> DictConfig:
    return compose_train([override])


# Every model composes with every objective: each model option sets only the model node and its optimizer
# recipe, each objective option only the objective node (both checked here), so composing each option once
# covers the product (216 compositions, a minute, before this was checked).
@pytest.mark.parametrize("model", options("model"))
def test_every_model_option_composes_and_sets_only_the_model_and_its_recipe(model):
    cfg = compose_train([f"model={model}", "objective=siglip"])  # not the default objective
    check_config(cfg, PLAIN_KEYS)  # the shipped values have their annotated types
    assert get_method(cfg.model._target_) is registry.MODELS.get("open_clip")
    assert other_nodes(cfg, "model", "optim") == other_nodes(composed_alone("objective=siglip"), "model", "optim")


@pytest.mark.parametrize("objective", options("objective"))
def test_every_objective_option_composes_and_sets_only_the_objective(objective):
    cfg = compose_train(["model=vit_b32", f"objective={objective}"])  # not the default model
    check_config(cfg, PLAIN_KEYS)
    assert get_class(cfg.objective._target_) in dict(registry.OBJECTIVES.items()).values()
    assert other_nodes(cfg, "objective") == other_nodes(composed_alone("model=vit_b32"), "objective")


# Built on the meta device (the same modules and shapes, no memory, no init): options too large to
# allocate in the default run (ViT-H/14: 986M parameters, 4 GB; a ViT-L/16 trunk; ViT-L/14, 428M, whose
# open_clip ViT is built for real as vit_b32 and vit_b16, and eva02_b16, whose timm trunk kind is built
# for real as timm), and the QuickGELU twins of rn50 and vit_b32 (their towers are built for real above;
# seconds each). Weights that would be downloaded are left out (the same architecture, initialised).
ON_META = {
    "vit_h14": [],
    "vit_l14": [],
    "eva02_b16": [],
    "timm_vit_l16_in21k": ["model.timm_pretrained=false"],
    "rn50_quickgelu": [],
    "vit_b32_quickgelu": [],
}


def downloaded_tokenizer(cfg) -> str | None:
    """The Hugging Face tokenizer the option's arch downloads, when it is not in the local cache."""
    arch = open_clip.get_model_config(cfg.model.arch) if cfg.model.get("arch") else None
    name = (arch or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    return name if name and not isinstance(try_to_load_from_cache(name, "tokenizer.json"), str) else None


@pytest.mark.slow
@pytest.mark.parametrize("model", options("model"))
def test_every_model_option_instantiates(model):
    cfg = compose_train([f"model={model}", *ON_META.get(model, [])])
    if missing := downloaded_tokenizer(cfg):
        pytest.skip(f"model={model} downloads its tokenizer {missing} (offline here)")
    device = torch.device("meta" if model in ON_META else "cpu")
    with device:
        built = instantiate(cfg.model)
    images = torch.zeros(1, 3, built.image_stats.size, built.image_stats.size, device=device)
    tokens = built.tokenize(["a red circle"]).to(device)
    with torch.no_grad():
        assert built.encode_image(images).shape == (1, built.embed_dim)
        assert built.encode_text(tokens).shape == (1, built.embed_dim)


@pytest.mark.parametrize("group", ["objective", "augment", "augment_views", "optim"])
def test_every_other_group_option_instantiates(group, tiny_model):
    for option in options(group):
        cfg = compose_train([f"{group}={option}"])
        built = instantiate(cfg[group])
        if group.startswith("augment"):
            transforms = built(tiny_model.image_stats)
            assert transforms.train(Image.new("RGB", (40, 40))).shape == (3, 32, 32)
        elif group == "objective":
            assert isinstance(built, Objective) and callable(built.loss)
        else:
            optimizer, _ = built.build([tiny_model], max_steps=10)
            assert optimizer.param_groups[0]["lr"] > 0


def test_every_data_and_eval_option_instantiates(tmp_path):
    from vlhub.data import SyntheticShapes

    csv_path = SyntheticShapes(num_samples=4, split="val").write_csv(tmp_path / "csv")
    folder = SyntheticShapes(num_samples=4, split="val").write_imagefolder(tmp_path / "folder")
    from vlhub.data.write_shards import write_shards

    write_shards((SyntheticShapes(num_samples=4).load(i) for i in range(4)), tmp_path / "shards", shard_size=2)
    shards = f"{tmp_path}/shards/shard-{{000000..000001}}.tar"
    (tmp_path / "blend.yaml").write_text(f"sources: [{{name: a, root: '{shards}', num_samples: 4, weight: 1}}]")
    roots = {"synthetic": None, "csv": csv_path, "imagefolder": folder, "wds": shards, "captionnet": shards}
    for option in options("data"):
        extra = [f'data.root="{roots[option]}"'] if roots.get(option) else []
        extra += [f"data.schema={tmp_path}/blend.yaml"] if option == "blend" else []
        cfg = compose_train([f"data={option}", *extra])
        check_config(cfg, PLAIN_KEYS)
        source = instantiate(cfg.data)
        assert len(source) == 4 or option == "synthetic"
        loaded = next(iter(source.build_loader(lambda image: torch.zeros(1), None, 2, seed=0)))
        assert loaded.batch["text_raw"][0]
    for option in ("none", "synthetic", "imagefolder"):  # dataset presets: tests/contracts/test_eval_configs.py
        extra = [f"eval.imagefolder.root={folder}"] if option == "imagefolder" else []
        cfg = compose_train([f"eval={option}", *extra])
        check_config(cfg, PLAIN_KEYS)
        evaluator = instantiate(cfg.eval)
        assert set(evaluator.tasks) == ({option} if option != "none" else set())


def test_registered_components_each_have_a_config():
    targets = set()
    for path in CONFIG_ROOT.rglob("*.yaml"):
        targets |= {line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if "_target_:" in line}
    for table in (registry.OBJECTIVES, registry.DATASETS, registry.EVAL_TASKS):
        for name, component in table.items():
            assert any(t.endswith("." + component.__name__) for t in targets), f"{table.kind} {name} has no YAML"


def test_a_mistyped_key_fails_at_launch_naming_it():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(["trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match="modle"):
        compose_train(["modle=tiny"])


def test_an_unknown_option_fails_listing_the_options():
    with pytest.raises(ConfigCompositionException, match="vit_b32"):
        compose_train(["model=vit_b99"])


def test_bad_values_fail_naming_the_key(tmp_path):
    from tests.helpers.configs import run_train

    with pytest.raises(ValueError, match="trainer.precision='fp64'"):
        run_train(["trainer.precision=fp64"], tmp_path)
    with pytest.raises(Exception, match="Did you mean 'cosine'"):
        run_train(["optim.scheduler=cosin"], tmp_path)
    with pytest.raises(Exception, match="trainer.batch_size must be > 0"):
        run_train(["trainer.batch_size=0"], tmp_path)
