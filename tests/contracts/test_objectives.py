"""Every objective under the gradient cache, at evaluation, at launch and from a checkpoint."""

import pytest
import torch

import vlhub
from tests.helpers.configs import run_train
from tests.helpers.objectives import objective_batch, prepared_objective
from tests.helpers.tensors import relative_error
from vlhub.data import SyntheticShapes
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.eval import SyntheticZeroShot
from vlhub.eval.context import EvalContext
from vlhub.objectives import IncompatibleObjective
from vlhub.objectives.mlm import MaskedLanguageModel
from vlhub.registry import OBJECTIVES

CPU = torch.device("cpu")


def _gradients(model, objective, batch, strategy) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    strategy(model, objective, batch, Precision("fp32", CPU))
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_the_gradient_cache_gives_every_objective_its_full_batch_gradient(name):
    model, objective = prepared_objective(name)
    batch = objective_batch(model, objective, size=8)
    plain = _gradients(model, objective, batch, PlainGradients())
    cached = _gradients(model, objective, batch, GradCache(4))
    assert cached.keys() == plain.keys()
    assert any(k.startswith("objective.") for k in plain) or not list(objective.parameters())
    assert relative_error(cached, plain) <= 1e-5


def test_mlm_masks_are_a_function_of_the_sample_not_of_the_batch():
    model, objective = prepared_objective("mlm")
    batch = objective_batch(model, objective, size=8)
    chosen, replaced = objective.mlm.masks(batch["text"], batch["sample_id"])
    part_chosen, part_replaced = objective.mlm.masks(batch["text"][4:], batch["sample_id"][4:])
    assert torch.equal(part_chosen, chosen[4:]) and torch.equal(part_replaced, replaced[4:])
    special = (batch["text"] == 0) | (batch["text"] == 49406) | (batch["text"] == 49407)
    assert not (chosen & special).any() and (replaced <= chosen).all()
    real = (~special).sum(dim=1).float()
    assert torch.equal(chosen.sum(dim=1).float(), (real * 0.15).ceil())  # ceil(15%) of each caption
    other = MaskedLanguageModel()
    other.special_ids = objective.mlm.special_ids
    assert torch.equal(other.masks(batch["text"], batch["sample_id"] + 1000)[0].sum(1), chosen.sum(1))
    assert not torch.equal(other.masks(batch["text"], batch["sample_id"] + 1000)[0], chosen)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_mlm_logits_at_a_masked_position_see_the_right_context_only_when_bidirectional(attention):
    model, objective = prepared_objective("mlm", mlm_attention=attention)
    mlm, masked, right = objective.mlm, 2, 4
    text = model.tokenize(["a small red triangle on a dark background"])
    changed = text.clone()
    changed[0, right] = text[0, right] + 1  # another real token, to the right of the masked one
    changed_left = text.clone()
    changed_left[0, masked - 1] = text[0, masked - 1] + 1
    replaced = torch.zeros_like(text, dtype=torch.bool)
    replaced[0, masked] = True

    def logits(tokens):
        with torch.no_grad():
            return mlm.head(mlm.token_features(model, tokens, replaced))[0, masked]

    assert not torch.allclose(logits(changed_left), logits(text))  # the left side counts either way
    assert torch.allclose(logits(changed), logits(text)) == (attention == "causal")
    # The contrastive pass keeps the causal mask, before and after an MLM pass.
    with torch.no_grad():
        tokens = [model(text=t, output_tokens=True)["text_tokens"][0, masked] for t in (text, changed)]
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_mlm_padding_as_attention_keys_does_not_move_the_real_tokens(attention):
    model, objective = prepared_objective("mlm", mlm_attention=attention)
    mlm = objective.mlm
    text = model.tokenize(["two green squares", "a small yellow triangle next to a large purple circle"])
    padding = text == 0
    assert padding.any(dim=1).all()  # padding in every row
    replaced = torch.zeros_like(text, dtype=torch.bool)
    replaced[:, 2] = True
    noise = torch.randn(*text.shape, model.text_tower.module.width, generator=torch.Generator().manual_seed(0))

    def noisy_padding(module, inputs, output):  # whatever the padding tokens carry, as keys they are unseen
        return torch.where(padding[..., None], output + noise, output)

    with torch.no_grad():
        clean = mlm.token_features(model, text, replaced)
        handle = model.text_tower.module.token_embedding.register_forward_hook(noisy_padding)
        try:
            noisy = mlm.token_features(model, text, replaced)
        finally:
            handle.remove()
    torch.testing.assert_close(noisy[~padding], clean[~padding])
    assert not torch.allclose(noisy[padding], clean[padding])  # the noise did reach the padding positions


def test_mlm_attention_key_is_checked():
    with pytest.raises(ValueError, match="objective.mlm_attention must be one of bidirectional, causal"):
        OBJECTIVES.build("mlm", mlm_attention="both")


def _evaluate(model, objective, num_samples=30):
    context = EvalContext("synthetic", _eval_transform(model), CPU, batch_size=16, scoring=objective.scoring(model))
    return SyntheticZeroShot(num_samples=num_samples, image_size=32).run(model, context)


def _eval_transform(model):
    from vlhub.api import eval_transform

    return eval_transform(model)


@pytest.mark.parametrize(
    ("name", "expected", "absent"),
    [
        ("filip", "synthetic-zeroshot-top1", "synthetic-linear_probe-top1"),
        ("cloob", "synthetic-zeroshot-top1", "synthetic-classifier-top1"),
        ("ce", "synthetic-classifier-top1", "synthetic-zeroshot-top1"),
        ("simclr", "synthetic-linear_probe-top1", "synthetic-zeroshot-top1"),
    ],
)
def test_the_objective_decides_how_images_are_scored(name, expected, absent):
    model, objective = prepared_objective(name)
    metrics = _evaluate(model.eval(), objective.eval())
    assert expected in metrics and absent not in metrics
    assert 0.0 <= metrics[expected] <= 1.0


def test_filip_zero_shot_is_the_mean_over_templates_of_the_token_similarity():
    from vlhub.objectives.filip import token_similarity

    model, objective = prepared_objective("filip")
    model.eval()
    scorer = objective.scoring(model).zero_shot
    names, templates = ["red circle", "blue star"], ["a {}.", "a photo of a {}."]
    classifier = scorer.build_classifier(names, templates, CPU, 8)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image_tokens = objective.image_tokens(model, images)
        expected = torch.zeros(3, 2)
        for c, name in enumerate(names):
            for template in templates:
                text_tokens, mask = objective.text_tokens(model, model.tokenize([template.format(name)]))
                expected[:, c] += token_similarity(image_tokens, text_tokens, mask)[0][:, 0] / len(templates)
    torch.testing.assert_close(scorer.logits(images, classifier), 100 * expected, rtol=1e-5, atol=1e-5)


def test_ce_classifier_is_scored_on_the_task_classes_by_name():
    model, objective = prepared_objective("ce")
    model.eval()
    classifier = objective.scoring(model).classifier
    assert classifier.class_names == SyntheticShapes(num_samples=1).class_names
    metrics = _evaluate(model, objective)
    images = torch.stack([_eval_transform(model)(SyntheticShapes(30, split="val").load(i).image) for i in range(30)])
    labels = torch.tensor([SyntheticShapes(30, split="val").load(i).label for i in range(30)])
    top1 = (classifier.logits(images).argmax(1) == labels).float().mean().item()
    assert metrics["synthetic-classifier-top1"] == pytest.approx(top1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=filip", "model=rn50"], "objective=filip with model=rn50.*needs token features"),
        (["objective=coca", "model=rn50"], "objective=coca with model=rn50.*needs token features"),
        (["objective=simclr", "augment_views=none"], "objective=simclr.*augment_views=none.*identical"),
    ],
)
def test_an_objective_that_cannot_work_fails_at_launch_naming_both(tmp_path, overrides, message):
    choices = {"model": "tiny", "data": "synthetic", "augment": "clip", "augment_views": "simclr"}
    choices.update(dict(o.split("=") for o in overrides))
    with pytest.raises(IncompatibleObjective, match=message):
        run_train(overrides, tmp_path, choices)


def test_ce_without_labels_fails_at_launch(tmp_path):
    root = SyntheticShapes(num_samples=4).write_csv(tmp_path / "csv")
    choices = {"model": "tiny", "objective": "ce", "data": "csv"}
    with pytest.raises(IncompatibleObjective, match="objective=ce with model=tiny, data=csv.*needs class labels"):
        run_train(["objective=ce", "data=csv", f"data.root={root}"], tmp_path / "run", choices)


def test_ce_runs_on_an_imagefolder_with_no_other_key(tmp_path):
    root = SyntheticShapes(num_samples=30, split="val").write_imagefolder(tmp_path / "folder")
    shapes_eval = ["eval=synthetic", "eval.synthetic.num_samples=60"]  # the folder holds the shapes' classes
    metrics = run_train(["objective=ce", "data=imagefolder", f"data.root={root}", *shapes_eval], tmp_path / "run")
    assert "synthetic-classifier-top1" in metrics and "synthetic-zeroshot-top1" not in metrics  # classes by name
    checkpoint = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert checkpoint["objective_spec"]["kwargs"]["num_classes"] == 30


def test_a_checkpoint_rebuilds_the_objective_and_its_heads_through_the_registry(tmp_path):
    run_train(["objective=siglip"], tmp_path, {"model": "tiny", "objective": "siglip"})
    path = tmp_path / "checkpoints/latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["objective_spec"]["name"] == "siglip"
    assert "_target_" not in checkpoint["objective_spec"]["kwargs"]
    loaded = vlhub.load(path)
    model, preprocess, tokenizer = loaded  # still unpacks as three
    assert type(loaded.objective).__name__ == "SiglipObjective"
    torch.testing.assert_close(loaded.objective.logit_bias.detach(), checkpoint["objective"]["logit_bias"])
    assert loaded.objective.logit_bias.item() != -10.0  # trained, not re-initialised


def test_siglip_starts_from_the_papers_temperature_and_bias():
    model, objective = prepared_objective("siglip")
    assert model.temperature_scale().item() == pytest.approx(10.0)
    assert objective.logit_bias.item() == -10.0


# Which loss parts each view moves: image-text terms read the base view only, SSL terms the strong ones.
CLIP_PARTS = {"contrastive_loss", "image_to_text_loss", "text_to_image_loss"}
VIEW_READERS = {
    "slip": (CLIP_PARTS, {"ssl_loss"}, {}),
    "declip": (
        CLIP_PARTS,
        {"ssl_loss", "multiview_loss", "nn_loss"},
        {"ssl_projection_dim": 8, "ssl_hidden_dim": 16, "queue_size": 16},
    ),
    "simclr": (set(), {"ssl_loss"}, {}),
}


@pytest.mark.parametrize("name", list(VIEW_READERS))
def test_image_text_terms_see_the_base_view_and_ssl_terms_the_strong_views(name):
    base_parts, strong_parts, kwargs = VIEW_READERS[name]
    model, objective = prepared_objective(name, **kwargs)
    batch = objective_batch(model, objective, size=8)
    objective.train()
    if getattr(objective, "text_queue", None) is not None:  # DeCLIP: neighbours in the queue
        objective.text_queue.push(torch.randn(16, model.embed_dim, generator=torch.Generator().manual_seed(0)))

    def parts(batch):
        with torch.no_grad():
            out = objective.loss(objective.represent(model, batch), model)
        return {key: value for key, value in out.items() if key.endswith("_loss")}

    before = parts(batch)
    assert base_parts | strong_parts <= set(before)
    for key, movers in (("image", base_parts), ("image_view2", strong_parts), ("image_view3", strong_parts)):
        after = parts({**batch, key: batch[key].roll(1, dims=0)})  # pairs broken in this view only
        moved = {part for part in before if not torch.equal(before[part], after[part])}
        assert moved == movers, (key, moved)
    if name == "slip":  # the SSL head reads the image tower's features before its projection
        with torch.no_grad():
            proj = model.image_tower.module.proj
            proj.add_(0.1 * torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)))
        moved = {part for part, value in parts(batch).items() if not torch.equal(before[part], value)}
        assert moved == CLIP_PARTS
