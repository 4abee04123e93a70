"""model.image_pretrained / text_pretrained: each tower from its own checkpoint, the skip list, bad files."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from hydra.utils import instantiate

from tests.helpers.configs import compose_train, run_train
from vlhub.launch import describe_error, is_expected
from vlhub.models import build_open_clip_model

TIMM_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_config() -> dict:
    return copy.deepcopy(dict(compose_train().model.config))


def build(seed: int = 0, config: dict | None = None, **kwargs):
    torch.manual_seed(seed)
    return build_open_clip_model(config=config or tiny_config(), **kwargs)


def assert_same(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def sources(tmp_path_factory, trained_checkpoint):
    """A: an open_clip-style file (``state_dict`` with DDP's ``module.`` prefix); B: a vlhub checkpoint
    (the session's 2-step run, read only)."""
    folder = tmp_path_factory.mktemp("sources")
    model_a = build(seed=1)
    open_clip_a = model_a.open_clip_state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_a.items()}}, folder / "a.pt")
    path_b = trained_checkpoint
    open_clip_b = torch.load(path_b, weights_only=True)["state_dict"]
    return {"a": (folder / "a.pt", open_clip_a), "b": (path_b, open_clip_b), "folder": folder}


def test_towers_from_two_checkpoints_equal_their_sources(sources):
    (path_a, weights_a), (path_b, weights_b) = sources["a"], sources["b"]
    model = build(seed=0, image_pretrained=str(path_a), text_pretrained=str(path_b))
    assert_same(model.image_tower.module, {k[7:]: v for k, v in weights_a.items() if k.startswith("visual.")})
    text_b = {k: v for k, v in weights_b.items() if not k.startswith(("visual.", "logit_"))}
    assert_same(model.text_tower.module, text_b)
    assert not torch.equal(model.logit_scale, weights_b["logit_scale"])  # only the towers are loaded


def test_a_projection_of_another_width_is_skipped_and_the_rest_loaded(sources, tmp_path, caplog):
    config = tiny_config()
    config["embed_dim"] = 32  # visual.proj is [96, 32] where the model's is [96, 64]
    path = tmp_path / "other_width.pt"
    other = build(seed=2, config=config).open_clip_state_dict()
    torch.save(other, path)
    with pytest.raises(ValueError, match=r"shapes differ \(proj:"):
        build(image_pretrained=str(path))
    with caplog.at_level("INFO", logger="vlhub.models.tower_weights"):
        model = build(seed=0, image_pretrained=str(path), pretrained_skip=["proj"])
    fresh = build(seed=0).image_tower.module.state_dict()
    loaded = model.image_tower.module.state_dict()
    assert torch.equal(loaded["proj"], fresh["proj"])  # kept as initialised
    for key in loaded.keys() - {"proj"}:
        assert torch.equal(loaded[key], other[f"visual.{key}"]), key
    assert "skipped (kept fresh) ['proj']" in caplog.text and str(path) in caplog.text


def test_missing_keys_fail_naming_them(sources, tmp_path):
    weights = {k: v for k, v in sources["a"][1].items() if not k.startswith("visual.ln_post.")}
    path = tmp_path / "no_ln_post.pt"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=r"\['ln_post.bias', 'ln_post.weight'\] are not in the file") as raised:
        build(image_pretrained=str(path))
    assert f"model.image_pretrained={path}" in str(raised.value)
    model = build(image_pretrained=str(path), pretrained_skip=["ln_post.*"])  # skipped: loads the rest
    assert torch.equal(model.image_tower.module.conv1.weight, sources["a"][1]["visual.conv1.weight"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.pt", b"not a checkpoint", "is not a readable checkpoint"),
        ("garbage.safetensors", b"\x00\x01 not safetensors", "is not a readable safetensors file"),
        ("unrelated.pt", None, "no key of the file matches the text tower"),
    ],
)
def test_a_bad_file_fails_at_launch_naming_the_key_and_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        torch.save({"classifier.weight": torch.zeros(3, 3)}, path)
    else:
        path.write_bytes(content)
    cfg = compose_train([f"model.text_pretrained={path}"])
    with pytest.raises(Exception) as raised:  # noqa: PT011  (Hydra wraps the builder's error)
        instantiate(cfg.model)
    error = raised.value.__cause__ or raised.value
    line, _ = describe_error(error)
    assert is_expected(error) and message in line and f"model.text_pretrained={path}" in line


def test_a_missing_file_fails_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.image_pretrained=.*nope.pt: neither a file nor an open_clip"):
        build(image_pretrained=str(tmp_path / "nope.pt"))


def test_a_timm_trunk_loads_timm_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    trunk = timm.create_model("test_resnet")
    path = tmp_path / "test_resnet.safetensors"
    save_file(trunk.state_dict(), str(path))
    model = build(seed=0, config=TIMM_CONFIG, timm_backbone="test_resnet", image_pretrained=str(path))
    fresh = build(seed=0, config=TIMM_CONFIG, timm_backbone="test_resnet").image_tower.module.state_dict()
    loaded = model.image_tower.module.state_dict()
    timm_weights = trunk.state_dict()
    trunk_keys = [k for k in loaded if k.startswith("trunk.")]
    assert trunk_keys
    for key in trunk_keys:
        assert torch.equal(loaded[key], timm_weights[key.removeprefix("trunk.")]), key
    for key in loaded.keys() - set(trunk_keys):  # the projection head stays as initialised
        assert torch.equal(loaded[key], fresh[key]), key


def test_a_run_started_from_tower_files_trains_and_loads_without_them(sources, tmp_path):
    import vlhub

    path_a = tmp_path / "a.pt"
    path_a.write_bytes(sources["a"][0].read_bytes())
    run_train(["trainer.max_steps=1", "eval=none", f"model.image_pretrained={path_a}"], tmp_path / "run")
    path_a.unlink()  # a checkpoint is built as trained: its initial files are not read again
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    model, _, _ = vlhub.load(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["config"]["model"]["image_pretrained"] == str(path_a)
    assert_same(model.image_tower.module, {k[7:]: v for k, v in saved["state_dict"].items() if k.startswith("visual.")})
    start, trained = sources["a"][1]["visual.conv1.weight"], model.image_tower.module.conv1.weight
    assert 0 < (trained - start).abs().max() < 0.01  # one step from A's weights


def test_a_skip_list_that_is_not_a_list_fails_at_launch_naming_the_key():
    from vlhub.launch import check_config
    from vlhub.train import PLAIN_KEYS

    with pytest.raises(Exception, match="model.pretrained_skip"):  # noqa: PT011
        check_config(compose_train(["model.pretrained_skip=proj"]), PLAIN_KEYS)


def test_a_tag_is_fetched_through_open_clip_like_pretrained(monkeypatch, tmp_path):
    import open_clip

    from vlhub.models.tower_weights import resolve_source

    asked = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: asked.append(cfg) or str(tmp_path / "w.bin"))
    assert resolve_source("openai", "model.text_pretrained", "ViT-B-32") == str(tmp_path / "w.bin")
    assert asked == [open_clip.get_pretrained_cfg("ViT-B-32", "openai")]
    with pytest.raises(FileNotFoundError, match="model.text_pretrained=nope: neither a file nor an open_clip tag"):
        resolve_source("nope", "model.text_pretrained", "ViT-B-32")


def test_text_weights_under_text_prefix_load_as_well(sources, tmp_path):
    """CustomTextCLIP's layout (hf text towers, custom_text archs) keeps text keys under ``text.``."""
    weights = sources["b"][1]
    text = {k: v for k, v in weights.items() if not k.startswith(("visual.", "logit_"))}
    path = tmp_path / "custom_text.safetensors"
    from safetensors.torch import save_file

    save_file({**{f"text.{k}": v for k, v in text.items()}, "visual.proj": weights["visual.proj"]}, str(path))
    assert_same(build(seed=3, text_pretrained=str(path)).text_tower.module, text)


def test_the_tower_keys_have_one_home_and_reach_every_model():
    from tests.helpers.configs import CONFIG_ROOT, options

    keys = ("image_pretrained", "text_pretrained", "pretrained_skip")
    shared = (CONFIG_ROOT / "model" / "shared" / "towers.yaml").read_text()
    assert all(f"\n{key}:" in f"\n{shared}" for key in keys)
    for option in options("model"):
        text = (CONFIG_ROOT / "model" / f"{option}.yaml").read_text()
        assert not [k for k in keys if f"\n{k}:" in f"\n{text}"], f"{option}.yaml redefines a shared key"
        model = compose_train([f"model={option}"]).model
        assert {k: model[k] for k in keys} == {"image_pretrained": None, "text_pretrained": None, "pretrained_skip": []}
