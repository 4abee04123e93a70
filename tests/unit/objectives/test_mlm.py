"""MLM: the loss against x_clip's MLM on open_clip's own tower, masks as a function of the sample (BERT's
rates), attention that sees the right context, padding, and its key."""

from __future__ import annotations

import open_clip
import pytest
import torch
import x_clip
import x_clip.mlm
from torch import nn

from tests.helpers.objectives import objective_batch, prepared_objective
from tests.helpers.references import assert_close
from vlhub.objectives.draws import sample_uniform
from vlhub.objectives.mlm import REPLACE_STREAM, MaskedLanguageModel
from vlhub.registry import OBJECTIVES

CAPTIONS = [
    "a red circle on a blue background",
    "two green squares",
    "a small yellow triangle next to a large purple circle in the corner",
    "blue",
    "an orange star and a white square over a black field",
    "three red triangles",
]


class OpenClipMaskedText(nn.Module):
    """x_clip's MLM transformer: open_clip's own ``TextTransformer`` built causal or, with
    ``both_ways``, with ``no_causal_mask=True, use_pad_mask=True`` (open_clip's bidirectional tower,
    padding masked as keys), holding the vlhub text tower's weights; vlhub's mask embedding where
    x_clip wrote ``mask_token_id``; the token features projected as vlhub's tower projects them,
    behind one dummy leading position (x_clip drops it)."""

    def __init__(self, model, mlm: MaskedLanguageModel, mask_token_id: int, both_ways: bool):
        super().__init__()
        tower = model.text_tower.module
        self.text = open_clip.transformer.TextTransformer(
            context_length=tower.context_length,
            vocab_size=tower.vocab_size,
            width=tower.width,
            heads=tower.heads,
            layers=len(tower.transformer.resblocks),
            output_dim=model.embed_dim,
            no_causal_mask=both_ways,
            use_pad_mask=both_ways,
            output_tokens=True,
        )
        self.text.load_state_dict(tower.state_dict())
        self.mlm, self.mask_token_id = mlm, mask_token_id

    def forward(self, masked_seq, **kwargs):
        replaced = masked_seq == self.mask_token_id

        def overwrite(module, inputs, output):
            return torch.where(replaced[..., None], self.mlm.mask_embedding, output)

        handle = self.text.token_embedding.register_forward_hook(overwrite)
        try:
            _, tokens = self.text(masked_seq)
        finally:
            handle.remove()
        tokens = tokens @ self.text.text_projection
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_mlm_matches_x_clip_mlm_on_open_clips_own_tower_attending_the_same_way(monkeypatch, attention):
    model, objective = prepared_objective("mlm", mlm_attention=attention)
    mlm = objective.mlm
    text = model.tokenize(CAPTIONS)
    assert (text == 0).any()  # padding present: bidirectional, it must be masked as a key
    sample_id = torch.arange(len(CAPTIONS)) + 1000
    chosen, replaced = mlm.masks(text, sample_id)
    assert replaced.any() and (chosen & ~replaced).any()  # both kinds of chosen token present
    replace_draw = sample_uniform(sample_id, text.shape[1], REPLACE_STREAM) < mlm.replace_prob
    maskable = (text != 0) & ~torch.isin(text, torch.tensor(mlm.special_ids))

    def choose(mask, prob):
        assert torch.equal(mask, maskable) and prob == mlm.mask_prob  # x_clip's maskable tokens are vlhub's
        return chosen

    def replace(t, prob):
        assert prob == mlm.replace_prob
        return replace_draw

    monkeypatch.setattr(x_clip.mlm, "get_mask_subset_with_prob", choose)
    monkeypatch.setattr(x_clip.mlm, "prob_mask_like", replace)
    mask_token_id = 1
    assert not (text == mask_token_id).any()
    reference = x_clip.mlm.MLM(
        OpenClipMaskedText(model, mlm, mask_token_id, both_ways=attention == "bidirectional"),
        dim=model.text_tower.token_dim,
        num_tokens=model.text_tower.vocab_size,
        mask_prob=mlm.mask_prob,
        replace_prob=mlm.replace_prob,
        mask_token_id=mask_token_id,
        pad_token_id=0,
        mask_ignore_token_ids=list(mlm.special_ids),
    )
    reference.to_logits.load_state_dict(mlm.head.state_dict())
    theirs = reference(text)
    reps = mlm.represent(model, {"text": text, "sample_id": sample_id})
    ours = MaskedLanguageModel.loss(reps["mlm_nll"], reps["mlm_tokens"])
    assert_close(ours, theirs)


def test_mlm_masks_are_a_function_of_the_sample_with_bert_rates():
    mlm = MaskedLanguageModel()
    sot, eot = 49406, 49407
    mlm.special_ids = (sot, eot)
    batch, length = 512, 40
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, 49000, (batch, length), generator=generator)
    ends = torch.randint(3, length, (batch,), generator=generator)  # EOT position; zeros after it
    positions = torch.arange(length)
    text[:, 0] = sot
    text[positions[None] == ends[:, None]] = eot
    text[positions[None] > ends[:, None]] = 0
    sample_id = torch.arange(batch) * 7 + 3

    chosen, replaced = mlm.masks(text, sample_id)
    for start, stop in ((0, 5), (5, 17), (100, 356)):  # any chunk draws its rows' masks
        chunk_chosen, chunk_replaced = mlm.masks(text[start:stop], sample_id[start:stop])
        assert torch.equal(chunk_chosen, chosen[start:stop]) and torch.equal(chunk_replaced, replaced[start:stop])
    shuffled = torch.randperm(batch, generator=generator)
    assert torch.equal(mlm.masks(text[shuffled], sample_id[shuffled])[0], chosen[shuffled])

    maskable = (text != 0) & (text != sot) & (text != eot)
    assert not (chosen & ~maskable).any()  # never padding, SOT or EOT
    assert torch.equal(chosen.sum(dim=1), (maskable.sum(dim=1) * 0.15).ceil().long())
    rate = chosen.sum() / maskable.sum()
    assert 0.15 <= rate < 0.15 + 1 / maskable.sum(dim=1).float().mean()  # ceil's excess only
    assert not (replaced & ~chosen).any()
    assert replaced.sum() / chosen.sum() == pytest.approx(0.9, abs=0.03)
    assert chosen.float().std(dim=0)[1:5].min() > 0  # positions differ between samples


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
    with pytest.raises(ValueError, match="^mlm_attention must be one of bidirectional, causal"):
        OBJECTIVES.build("mlm", mlm_attention="both")
