"""CoCa: the caption loss is causal for every text tower kind (or the tower is refused at launch), and
the attentional pooler is open_clip's and is what coca scores with when it is on."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from tests.helpers.models import micro_model
from tests.helpers.objectives import objective_batch, prepared_objective
from tests.helpers.references import assert_close
from tests.helpers.tensors import relative_error
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.models import OpenClipTextTower, build_open_clip_model
from vlhub.objectives import IncompatibleObjective
from vlhub.registry import OBJECTIVES

CPU = torch.device("cpu")
SMALL = {"decoder_layers": 1, "decoder_heads": 4}


def _per_position_nll(model, objective, images, text, targets):
    """[B, L-1]: the caption loss term at each position for ``targets``, the towers reading ``text``."""
    out = model(image=images, text=text, output_tokens=True)
    return objective.caption_nll(objective.image_outputs(out)[1], out["text_tokens"], targets)


def test_the_caption_loss_terms_up_to_t_do_not_move_when_the_tokens_after_t_change():
    model, objective = prepared_objective("coca", **SMALL)
    model.eval()  # no dropout: the two passes must be comparable
    batch = objective_batch(model, objective, size=4)
    text = batch["text"]
    with torch.no_grad():
        reps = objective.represent(model, batch)
        original = _per_position_nll(model, objective, batch["image"], text, text)
        # The terms the training loss is made of: represent's per-sample sum is theirs.
        torch.testing.assert_close(reps["caption_nll"], original.sum(dim=1))
        assert torch.equal(reps["caption_tokens"], (text[:, 1:] != 0).sum(dim=1).float())
        generator = torch.Generator().manual_seed(1)
        for t in (1, 3, 5):
            changed = text.clone()
            changed[:, t + 1 :] = torch.randint(1, 49000, changed[:, t + 1 :].shape, generator=generator)
            # The changed tokens as input, the original targets: the term at position t (predicting token
            # t + 1 from tokens <= t) and every term before it must not see the change.
            moved = _per_position_nll(model, objective, batch["image"], changed, text)
            torch.testing.assert_close(moved[:, : t + 1], original[:, : t + 1], rtol=0, atol=1e-6)
            real_after = text[:, t + 2 :] != 0
            assert ((moved[:, t + 1 :] - original[:, t + 1 :]).abs()[real_after] > 1e-4).all()  # later ones do


def _bidirectional_open_clip_model():
    torch.manual_seed(0)
    text = {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1, "no_causal_mask": True}
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    return build_open_clip_model(config={"embed_dim": 64, "vision_cfg": vision, "text_cfg": text})


def _hugging_face_encoder_model():
    """The micro model with a Hugging Face encoder (a tiny RoBERTa, open_clip's HFTextEncoder) as text tower."""
    from open_clip.hf_model import HFTextEncoder
    from transformers import RobertaConfig

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1,
    )  # fmt: skip
    model = micro_model()
    encoder = HFTextEncoder("roberta", output_dim=64, config=config, proj_type="linear", pooler_type="mean_pooler")
    model.text_tower = OpenClipTextTower(encoder, 64, pad_id=1)
    return model


@pytest.mark.parametrize(
    ("build", "tower"),
    [(_bidirectional_open_clip_model, "TextTransformer"), (_hugging_face_encoder_model, "HFTextEncoder")],
)
def test_a_text_tower_that_attends_both_ways_is_refused_at_launch_naming_it(build, tower):
    model = build()
    assert model.text_tower.has_tokens  # FILIP takes its tokens; CoCa's decoder must not
    OBJECTIVES.build("filip").apply_to_model(model)
    with pytest.raises(IncompatibleObjective, match=rf"text tower \({tower}\) attends both ways.*causal text tower"):
        OBJECTIVES.build("coca", **SMALL).apply_to_model(model)


def test_the_attentional_pooler_is_open_clips_coca_pooling():
    """open_clip's VisionTransformer with ``attentional_pool=True`` (its CoCa): attentional pooler, ln_post,
    query 0 through ``proj`` for the contrastive embedding, queries 1.. for the decoder; same weights."""
    model, objective = prepared_objective("coca", attentional_pooler=True, pooler_queries=6, pooler_heads=4, **SMALL)
    dim = model.embed_dim
    reference = VisionTransformer(
        image_size=32, patch_size=8, width=dim, layers=1, heads=2, mlp_ratio=1.0, output_dim=dim,
        attentional_pool=True, attn_pooler_queries=6, attn_pooler_heads=4,
    )  # fmt: skip
    reference.attn_pool.load_state_dict(objective.pooler.state_dict())
    reference.ln_post.load_state_dict(objective.pooler_norm.state_dict())
    with torch.no_grad():
        reference.proj.copy_(objective.pooler_projection)
        tokens = torch.randn(3, 16, dim)
        pooled, decoder_tokens = reference._pool(tokens)
        ours, memory = objective.image_outputs({"image_tokens": tokens})
    torch.testing.assert_close(ours, pooled @ reference.proj)
    torch.testing.assert_close(memory, decoder_tokens)
    assert memory.shape == (3, 5, dim)


def test_with_the_pooler_on_coca_trains_and_scores_with_the_pooled_embedding():
    model, objective = prepared_objective("coca", attentional_pooler=True, pooler_queries=5, **SMALL)
    batch = objective_batch(model, objective, size=4)
    with torch.no_grad():
        out = model(image=batch["image"], output_tokens=True)
        pooled = F.normalize(objective.image_outputs(out)[0], dim=-1)
        torch.testing.assert_close(objective.represent(model, batch)["image_features"], pooled)
        scorer = objective.scoring(model).zero_shot
        classifier = scorer.build_classifier(["red circle", "blue star"], ["a {}."], CPU, 8)
        prompts = model.encode_text(model.tokenize(["a red circle.", "a blue star."]))
        expected = 100 * pooled @ prompts.T
        torch.testing.assert_close(scorer.logits(batch["image"], classifier), expected)
        tower_only = 100 * model.encode_image(batch["image"]) @ classifier
        assert not torch.allclose(scorer.logits(batch["image"], classifier), tower_only)
    plain, cached = ({}, {})
    for grads, strategy in ((plain, PlainGradients()), (cached, GradCache(2))):
        model.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        strategy(model, objective, batch, Precision("fp32", CPU))
        named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
        grads.update({n: p.grad.clone() for n, p in named if p.grad is not None})
    assert "objective.pooler.query" in plain and "objective.pooler_projection" in plain
    assert cached.keys() == plain.keys() and relative_error(cached, plain) <= 1e-5


def test_the_direction_weights_are_keys():
    model, objective = prepared_objective("coca", image_weight=0.2, text_weight=0.8, **SMALL)
    reps = objective.represent(model, objective_batch(model, objective, size=4))
    parts = objective.loss(reps, model)
    logits = model.temperature_scale() * reps["image_features"] @ reps["text_features"].T
    labels = torch.arange(4)
    expected = 0.2 * F.cross_entropy(logits, labels) + 0.8 * F.cross_entropy(logits.T, labels)
    torch.testing.assert_close(parts["contrastive_loss"], expected.detach())


@pytest.mark.parametrize("key", ["contrastive_weight", "caption_weight", "image_weight", "text_weight"])
def test_a_negative_weight_is_refused_naming_its_key(key):
    from vlhub.objectives import CocaObjective

    with pytest.raises(ValueError, match=f"^{key} must be >= 0"):
        CocaObjective(**{key: -0.5})


def test_coca_matches_open_clip_coca_loss():
    model, objective = prepared_objective(
        "coca", contrastive_weight=0.7, caption_weight=1.3, decoder_layers=1, decoder_heads=4
    )
    batch = objective_batch(model, objective, size=4)
    text = batch["text"]
    assert (text == 0).any()  # padding present: it must be ignored
    parts = objective.loss(objective.represent(model, batch), model)
    with torch.no_grad():
        out = model(image=batch["image"], text=text, output_tokens=True)
        logits = objective.caption_logits(out)
    reference = open_clip.loss.CoCaLoss(caption_loss_weight=1.3, clip_loss_weight=0.7, pad_id=0)
    clip, caption = reference(
        F.normalize(out["image_features"], dim=-1),
        F.normalize(out["text_features"], dim=-1),
        logits,
        text[:, 1:],
        model.temperature_scale().detach(),
    )
    assert_close(parts["contrastive_loss"], clip / 0.7)
    assert_close(parts["caption_loss"], caption / 1.3)
    assert_close(parts["loss"].detach(), clip + caption)
