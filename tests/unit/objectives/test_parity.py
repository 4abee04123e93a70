"""Each objective's loss against an independent reference, on identical inputs, in one process.

References: open_clip's SigLipLoss and CoCaLoss; x_clip's CLIP (DCL, FILIP, multi-view), its MLM
and its SimSiam modules, driven on the same features by replacing their encoders with modules that
return given tensors; CLOOB from the paper's equations and from the authors' code's logic;
brute-force NT-Xent, token similarity and cross-entropy written here. fp32, tiny tensors.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
import x_clip
import x_clip.mlm
from torch import nn
from x_clip.visual_ssl import SimSiam, nt_xent_loss

from tests.helpers.models import micro_model
from tests.helpers.objectives import objective_batch, prepared_objective
from vlhub.objectives.dcl import DclObjective
from vlhub.objectives.draws import sample_uniform
from vlhub.objectives.filip import FilipObjective, token_similarity
from vlhub.objectives.mlm import REPLACE_STREAM, MaskedLanguageModel
from vlhub.objectives.siglip import SiglipObjective
from vlhub.objectives.ssl import nt_xent

TOL = {"rtol": 1e-5, "atol": 1e-5}


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


class IdentityTowers(nn.Module):
    """A model whose towers return their inputs: what ``represent`` is given are the features."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.logit_bias = None

    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, image=None, text=None, output_tokens=False):
        out = {}
        if image is not None:
            out["image_features"] = image
        if text is not None:
            out["text_features"] = text
        return out


class Given(nn.Module):
    """An encoder that ignores its inputs and returns a given tensor."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_xclip(dim: int, text_ids: torch.Tensor, text_output: torch.Tensor, scale: float, **kwargs) -> x_clip.CLIP:
    """x_clip's CLIP with ``text_output`` as its text encoding, its image input as its image encoding,
    and identity latent projections (x_clip l2-normalises the latents itself)."""
    clip = x_clip.CLIP(
        dim_text=dim,
        dim_image=dim,
        dim_latent=dim,
        num_text_tokens=int(text_ids.max()) + 1,
        text_enc_depth=1,
        text_seq_len=text_ids.shape[1],
        text_heads=1,
        text_dim_head=4,
        visual_enc_depth=1,
        visual_heads=1,
        visual_dim_head=4,
        visual_image_size=4,
        visual_patch_size=2,
        use_mlm=False,
        use_visual_ssl=False,
        **kwargs,
    )
    clip.text_transformer = Given(text_output)
    clip.visual_transformer = nn.Identity()
    clip.to_text_latent = nn.Identity()
    clip.to_visual_latent = nn.Identity()
    with torch.no_grad():
        clip.temperature.fill_(math.log(scale))  # x_clip's temperature is log-scale: its scale is exp(temperature)
    assert clip.text_ssl_loss_weight == 0 and clip.image_ssl_loss_weight == 0
    return clip.train()


def text_ids(batch: int, length: int, seed: int = 0, padded: bool = False) -> torch.Tensor:
    """Token ids in [1, 10); with ``padded``, each row i ends in zeros after its first (length - i % length) ids."""
    ids = torch.randint(1, 10, (batch, length), generator=torch.Generator().manual_seed(seed))
    if padded:
        for row in range(batch):
            ids[row, max(1, length - row % length) :] = 0
    return ids


# -- 1. SigLIP -------------------------------------------------------------------------------


def test_siglip_starts_at_temperature_10_bias_minus_10_and_matches_open_clip():
    model, objective = prepared_objective("siglip")
    assert model.temperature_scale().item() == pytest.approx(10.0, rel=1e-6)
    assert model.logit_bias is None and objective.bias(model).item() == -10.0
    image, text = F.normalize(randn(6, 64), dim=-1), F.normalize(randn(6, 64, seed=1), dim=-1)
    reference = open_clip.loss.SigLipLoss(rank=0, world_size=1)
    for logit_scale, bias in ((None, None), (2.0, -1.5)):  # the paper's start, then a moved one
        if logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(logit_scale)
                objective.logit_bias.fill_(bias)
        ours_image, ours_text = image.clone().requires_grad_(), text.clone().requires_grad_()
        theirs_image, theirs_text = image.clone().requires_grad_(), text.clone().requires_grad_()
        ours = objective.loss({"image_features": ours_image, "text_features": ours_text}, model)["loss"]
        scale, bias = model.temperature_scale().detach(), objective.bias(model).detach()
        theirs = reference(theirs_image, theirs_text, scale, bias)
        assert_close(ours, theirs)
        ours.backward()
        theirs.backward()
        assert_close(ours_image.grad, theirs_image.grad)
        assert_close(ours_text.grad, theirs_text.grad)


def test_siglip_trains_the_models_own_bias_when_it_has_one():
    torch.manual_seed(0)
    model = micro_model()
    model.logit_bias = nn.Parameter(torch.tensor(-4.0))  # as an open_clip SigLIP checkpoint carries
    objective = SiglipObjective()
    objective.apply_to_model(model)
    assert objective.logit_bias is None and objective.bias(model) is model.logit_bias
    image, text = F.normalize(randn(5, 64), dim=-1), F.normalize(randn(5, 64, seed=1), dim=-1)
    ours = objective.loss({"image_features": image, "text_features": text}, model)["loss"]
    their_bias = torch.tensor(-4.0, requires_grad=True)
    theirs = open_clip.loss.SigLipLoss()(image, text, model.temperature_scale().detach(), their_bias)
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert_close(model.logit_bias.grad, their_bias.grad)


# -- 2. DCL ----------------------------------------------------------------------------------


def test_dcl_matches_x_clip_decoupled_contrastive_learning():
    image, text, ids = randn(6, 8), randn(6, 8, seed=1), text_ids(6, 5)
    scale = 4.0
    clip = tiny_xclip(8, ids, text, scale, decoupled_contrastive_learning=True)
    theirs = clip(ids, image, return_loss=True)
    ours = DclObjective().loss(
        {"image_features": F.normalize(image, dim=-1), "text_features": F.normalize(text, dim=-1)},
        IdentityTowers(scale),
    )
    assert_close(ours["loss"], theirs)


# -- 3. CLOOB ---------------------------------------------------------------------------------


def paper_cloob(x, y, beta, inv_tau, image_weight, text_weight):
    """CLOOB from the paper's equations, one sample at a time: x, y normalised [N, D]; memories U = x, V = y.

    U_x_i = U softmax(beta U^T x_i), renormalised (likewise U_y, V_x, V_y), and
    InfoLOOB(a, b) = -1/N sum_i ln exp(s a_i.b_i) / sum_{j != i} exp(s a_i.b_j).
    """
    count = x.shape[0]

    def retrieve(state, memory):
        weights = torch.stack([beta * torch.dot(memory[j], state) for j in range(count)]).softmax(dim=0)
        retrieved = sum(weights[j] * memory[j] for j in range(count))
        return retrieved / retrieved.norm()

    def info_loob(anchors, others):
        total = 0.0
        for i in range(count):
            negatives = torch.stack([inv_tau * torch.dot(anchors[i], others[j]) for j in range(count) if j != i])
            total = total - (inv_tau * torch.dot(anchors[i], others[i]) - negatives.logsumexp(dim=0))
        return total / count

    u_x = torch.stack([retrieve(x[i], x) for i in range(count)])
    u_y = torch.stack([retrieve(y[i], x) for i in range(count)])
    v_x = torch.stack([retrieve(x[i], y) for i in range(count)])
    v_y = torch.stack([retrieve(y[i], y) for i in range(count)])
    return image_weight * info_loob(u_x, u_y) + text_weight * info_loob(v_y, v_x)


def authors_cloob(image_features, text_features, inv_tau, scale_hopfield):
    """The logic of ml-jku/cloob's ``src/training/methods.py`` (``cloob``, ``hopfield_retrieval``,
    ``infoLOOB_loss``), transcribed; its hflayers ``Hopfield`` layer (one head, no projections nor
    normalisations, ``scaling=scale_hopfield``) computes softmax(scaling state stored^T) stored."""

    def hopfield(state_patterns, stored_patterns):
        retrieved = (scale_hopfield * state_patterns @ stored_patterns.T).softmax(dim=-1) @ stored_patterns
        return retrieved / retrieved.norm(dim=1, keepdim=True)

    def info_loob(x, y, i):
        tau = 1 / inv_tau
        k = x @ y.T / tau
        positives = -torch.mean(torch.sum(k * i, dim=1))
        arg_lse = k * torch.logical_not(i) + i * -1000.0
        negatives = torch.mean(torch.logsumexp(arg_lse, dim=1))
        return tau * (positives + negatives)

    p_xx, p_yy = hopfield(image_features, image_features), hopfield(text_features, text_features)
    p_xy, p_yx = hopfield(text_features, image_features), hopfield(image_features, text_features)
    i = torch.eye(p_xx.shape[0]) > 0.5
    return info_loob(p_xx, p_xy, i) + info_loob(p_yy, p_yx, i)


def cloob_case(objective, image, text):
    """(our loss, our input gradients, logit_scale's gradient) on raw features that ``represent`` normalises."""
    towers = IdentityTowers(1.0)
    objective.apply_init(towers)
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    parts = objective.loss(objective.represent(towers, {"image": image, "text": text}), towers)
    parts["loss"].backward()
    return parts, (image.grad, text.grad), towers.logit_scale.grad


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta": 3.0, "inv_tau": 12.0, "image_weight": 0.7, "text_weight": 0.2}],
)
def test_cloob_loss_and_gradients_are_the_papers_equations(kwargs):
    from vlhub.objectives.cloob import CloobObjective

    objective = CloobObjective(**kwargs)
    image, text = randn(6, 8), randn(6, 8, seed=1)
    parts, grads, scale_grad = cloob_case(objective, image, text)
    assert objective.inv_tau == kwargs.get("inv_tau", 14.3) and objective.beta == kwargs.get("beta", 14.3)
    assert scale_grad is None  # 1/tau is fixed: the model's logit_scale is read, never trained

    # The reference runs in fp64 on the same (upcast) inputs, so what is compared is our fp32 rounding alone.
    raw = image.double().requires_grad_(), text.double().requires_grad_()
    weights = kwargs.get("image_weight", 0.5), kwargs.get("text_weight", 0.5)
    x, y = F.normalize(raw[0], dim=-1), F.normalize(raw[1], dim=-1)
    expected = paper_cloob(x, y, objective.beta, objective.inv_tau, *weights)
    expected.backward()
    assert abs(parts["loss"].double() - expected).item() <= 1e-6
    for ours, theirs in zip(grads, (raw[0].grad, raw[1].grad), strict=True):
        assert ((ours.double() - theirs).norm() / theirs.norm()).item() <= 1e-6


def test_cloob_is_the_authors_code_with_their_loss_weights_in_any_batch_order():
    from vlhub.objectives.cloob import CloobObjective

    inv_tau, beta = 30.0, 8.0  # their CC run's
    objective = CloobObjective(beta=beta, inv_tau=inv_tau, image_weight=1 / inv_tau, text_weight=1 / inv_tau)
    image, text = randn(8, 16, seed=4), randn(8, 16, seed=5)
    parts, grads, _ = cloob_case(objective, image, text)
    # Their gather puts this rank's rows first: rank 1 of 2 sees the batch rotated by 4.
    raw = image.roll(4, 0).requires_grad_(), text.roll(4, 0).requires_grad_()
    theirs = authors_cloob(F.normalize(raw[0], dim=-1), F.normalize(raw[1], dim=-1), inv_tau, beta)
    theirs.backward()
    exact = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(parts["loss"], theirs, **exact)
    torch.testing.assert_close(grads[0], raw[0].grad.roll(-4, 0), **exact)
    torch.testing.assert_close(grads[1], raw[1].grad.roll(-4, 0), **exact)


def test_cloob_starts_at_the_authors_temperature_and_scores_zero_shot_as_the_paper():
    from vlhub.eval.scoring import EmbeddingScorer

    model, objective = prepared_objective("cloob")
    assert model.temperature_scale().item() == pytest.approx(14.3, rel=1e-6)  # the authors' --init-inv-tau, fixed
    scorer = objective.scoring(model).zero_shot  # cosine of the normalised embeddings, no retrieval
    assert type(scorer) is EmbeddingScorer and scorer.text_head is None and scorer.image_head is None
    with pytest.raises(ValueError, match="objective.inv_tau=200.0 is above the model's max_logit_scale"):
        type(objective)(inv_tau=200.0).apply_to_model(model)
    with pytest.raises(ValueError, match="objective.beta must be a positive number"):
        type(objective)(beta=0)


# -- 4. FILIP --------------------------------------------------------------------------------


def brute_force_similarity(image_tokens, text_tokens, text_mask):
    """Loops over every (image, text) pair: (mean over patches of max over real tokens, the reverse)."""
    images, texts = image_tokens.shape[0], text_tokens.shape[0]
    i2t, t2i = torch.zeros(images, texts), torch.zeros(images, texts)
    for a in range(images):
        for b in range(texts):
            real = text_tokens[b][text_mask[b]]  # [l, D]
            cos = image_tokens[a] @ real.T  # [N, l]
            i2t[a, b] = cos.max(dim=1).values.mean()
            t2i[a, b] = cos.max(dim=0).values.mean()
    return i2t, t2i


def filip_inputs(batch=5, patches=4, length=6, dim=8):
    image_tokens, text_tokens = randn(batch, patches, dim), randn(batch, length, dim, seed=1)
    ids = text_ids(batch, length, padded=True)
    assert (ids == 0).any() and (ids != 0).any(dim=1).all()
    return image_tokens, text_tokens, ids


def test_filip_token_similarity_is_the_brute_force_one_at_every_block_size():
    image_tokens, text_tokens, ids = filip_inputs()
    image_tokens, text_tokens, mask = F.normalize(image_tokens, dim=-1), F.normalize(text_tokens, dim=-1), ids != 0
    expected_i2t, expected_t2i = brute_force_similarity(image_tokens, text_tokens, mask)
    for block_size in (1, 2, 64):
        i2t, t2i = token_similarity(image_tokens, text_tokens, mask, block_size)
        assert_close(i2t, expected_i2t)
        assert_close(t2i, expected_t2i)
    # With gradients (the activation-checkpointed path) too.
    i2t, t2i = token_similarity(image_tokens.clone().requires_grad_(), text_tokens, mask, 2)
    assert_close(i2t.detach(), expected_i2t)
    assert_close(t2i.detach(), expected_t2i)


def test_filip_similarities_match_x_clip_and_the_loss_is_image_row_cross_entropy():
    image_tokens, text_tokens, ids = filip_inputs()
    scale = 5.0
    clip = tiny_xclip(
        8, ids, text_tokens, scale, use_all_token_embeds=True, text_has_cls_token=False, visual_has_cls_token=False
    )
    theirs = clip(ids, image_tokens, return_loss=True)

    reps = {
        "image_tokens": F.normalize(image_tokens, dim=-1),
        "text_tokens": F.normalize(text_tokens, dim=-1),
        "text_mask": ids != 0,
    }
    i2t, t2i = token_similarity(reps["image_tokens"], reps["text_tokens"], reps["text_mask"])
    labels = torch.arange(ids.shape[0])
    # x_clip's matrices are [texts, images] in both directions, and its cross-entropy runs over each
    # row: right for text-to-image; for image-to-text it normalises over images per text (its bug).
    assert_close(theirs, 0.5 * (F.cross_entropy(scale * t2i.T, labels) + F.cross_entropy(scale * i2t.T, labels)))

    for block_size in (1, 64):
        ours = FilipObjective(block_size=block_size).loss(reps, IdentityTowers(scale))
        i2t_loss, t2i_loss = F.cross_entropy(scale * i2t, labels), F.cross_entropy(scale * t2i.T, labels)
        assert_close(ours["loss"], 0.5 * (i2t_loss + t2i_loss))
        assert_close(ours["image_to_text_loss"], i2t_loss)
        assert_close(ours["text_to_image_loss"], t2i_loss)
    assert not torch.allclose(ours["loss"], theirs, **TOL)  # the image-row loss is not x_clip's


# -- 5. MLM ----------------------------------------------------------------------------------


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


# -- 6. DeCLIP -------------------------------------------------------------------------------


class Passthrough(nn.Module):
    """x_clip's SimSiam net: returns its input (a parameter, because x_clip reads its device)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


def test_declip_simsiam_and_multiview_terms_match_x_clip():
    model, objective = prepared_objective("declip", ssl_projection_dim=8, ssl_hidden_dim=16)
    dim, batch, scale = model.image_tower.output_dim, 6, 7.0
    base, text, ids = randn(batch, dim, seed=3), randn(batch, dim, seed=2), text_ids(6, 5)
    view2, view3, text_view = randn(batch, dim), randn(batch, dim, seed=1), randn(batch, dim, seed=4)
    reps = {
        "image_features": F.normalize(base, dim=-1),
        "text_features": F.normalize(text, dim=-1),
        "text_view_features": F.normalize(text_view, dim=-1),
        "view2_features": view2,
        "view3_features": view3,
        "mlm_nll": torch.ones(batch),
        "mlm_tokens": torch.ones(batch),
    }
    objective.train()
    parts = objective.loss(reps, IdentityTowers(scale))

    # SimSiam on the two strong views: x_clip's module on the stacked views, each "augmentation" picking
    # one; its mock forward on [2, channels, D, D] sizes the projector for inputs of width D.
    simsiam = SimSiam(
        Passthrough(),
        image_size=dim,
        channels=2,
        hidden_layer=-1,
        projection_size=8,
        projection_hidden_size=16,
        augment_fn=lambda x: x[:, 0],
        augment_fn2=lambda x: x[:, 1],
    ).train()
    simsiam.online_encoder.projector.load_state_dict(objective.ssl_head.projector.state_dict())
    simsiam.online_predictor.load_state_dict(objective.ssl_head.predictor.state_dict())
    assert_close(parts["ssl_loss"], simsiam(torch.stack([view2, view3], dim=1)))

    # CLIP on the base view; multi-view: the mean of x_clip's CLIP over {view2, view3} x {caption, text view}.
    clip = tiny_xclip(dim, ids, text, scale)
    assert_close(parts["contrastive_loss"], clip(ids, base, return_loss=True))
    clips = [clip, tiny_xclip(dim, ids, text_view, scale)]
    pairs = [one(ids, view, return_loss=True) for view in (view2, view3) for one in clips]
    assert_close(parts["multiview_loss"], torch.stack(pairs).mean())


# -- 7. SimCLR and SLIP ----------------------------------------------------------------------


def brute_force_nt_xent(first, second, temperature):
    """For each of the 2N views, -log softmax over the other 2N - 1 views of cos / temperature, at its partner."""
    views, count = torch.cat([first, second]), first.shape[0]
    total = torch.zeros(())
    for a in range(2 * count):
        others = [b for b in range(2 * count) if b != a]
        logits = torch.stack([F.cosine_similarity(views[a], views[b], dim=0) / temperature for b in others])
        partner = others.index((a + count) % (2 * count))
        total = total - (logits[partner] - logits.logsumexp(dim=0))
    return total / (2 * count)


def test_nt_xent_is_the_brute_force_one_and_x_clips():
    first, second = randn(5, 6), randn(5, 6, seed=1)
    for temperature in (0.1, 0.5):
        expected = brute_force_nt_xent(first, second, temperature)
        assert_close(nt_xent(first, second, temperature), expected)
        normalized = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
        assert_close(nt_xent_loss(*normalized, temperature=temperature), expected)


@pytest.mark.parametrize("name", ["simclr", "slip"])
def test_simclr_and_slip_ssl_terms_are_nt_xent_on_the_projections(name):
    if name == "simclr":
        model, objective = prepared_objective("simclr", projection_dim=8, hidden_dim=16, temperature=0.2)
        head, dim = objective.head, model.image_tower.output_dim
    else:
        model, objective = prepared_objective(
            "slip", ssl_projection_dim=8, ssl_hidden_dim=16, clip_weight=0.3, ssl_weight=0.6
        )
        head, dim = objective.ssl_head, model.image_tower.unprojected_dim  # the encoder's own features
    batch, scale, width = 6, 9.0, model.image_tower.output_dim
    view2, view3 = randn(batch, dim), randn(batch, dim, seed=1)
    base, text = randn(batch, width, seed=3), randn(batch, width, seed=2)
    reps = {"view2_features": view2, "view3_features": view3}
    if name == "slip":
        reps |= {"image_features": F.normalize(base, dim=-1), "text_features": F.normalize(text, dim=-1)}
    objective.train()
    parts = objective.loss(reps, IdentityTowers(scale))
    # The projector (BatchNorm in training mode: batch statistics) runs on each strong view's batch.
    expected = brute_force_nt_xent(head.projector(view2), head.projector(view3), head.temperature)
    assert_close(parts["ssl_loss"], expected)
    if name == "simclr":
        assert head.temperature == 0.2
        assert_close(parts["loss"], expected)
    else:
        assert head.temperature == 0.1
        clip = open_clip.ClipLoss()(reps["image_features"], reps["text_features"], torch.tensor(scale))
        assert_close(parts["contrastive_loss"], clip)
        assert_close(parts["loss"], 0.3 * clip + 0.6 * expected)


def test_slips_projector_is_the_papers_and_x_clips_at_two_layers():
    from x_clip.visual_ssl import MLP

    from vlhub.objectives.ssl import mlp_projector

    # SLIP's _build_mlp(in, 4096, 256): Linear, BN, ReLU, Linear, BN, ReLU, Linear, on the encoder's width.
    from vlhub.registry import OBJECTIVES

    model, objective = micro_model(), OBJECTIVES.build("slip")  # its defaults, not the tests' narrow head
    objective.apply_to_model(model)
    layers = list(objective.ssl_head.projector)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    widths = [(layer.in_features, layer.out_features) for layer in layers if isinstance(layer, nn.Linear)]
    assert widths == [(model.image_tower.unprojected_dim, 4096), (4096, 4096), (4096, 256)]
    assert objective.ssl_head.temperature == 0.1
    # At two layers it is x_clip's MLP: the same keys, the same outputs.
    ours, theirs = mlp_projector(6, 3, 5, layers=2).train(), MLP(6, 3, 5).train()
    theirs.load_state_dict(ours.state_dict())
    assert_close(ours(randn(4, 6)), theirs(randn(4, 6)))


# -- 8. CoCa ---------------------------------------------------------------------------------


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


# -- 9. CE -----------------------------------------------------------------------------------


def test_ce_single_labels_match_torch_cross_entropy_and_multi_hot_rows_average_their_classes():
    model, objective = prepared_objective("ce")
    classes, dim = objective.num_classes, model.image_tower.output_dim
    assert classes >= 4
    features, towers = randn(6, dim), IdentityTowers(1.0)
    logits = objective.head(features)

    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    parts = objective.loss(objective.represent(towers, {"image": features, "label": labels}), towers)
    assert_close(parts["loss"], F.cross_entropy(logits, labels))

    multi_hot = torch.zeros(6, classes)
    for row, hot in enumerate([[0], [1, 3], [0, 1, 2], [2], [3, 0], list(range(classes))]):
        multi_hot[row, hot] = 1.0
    parts = objective.loss(objective.represent(towers, {"image": features, "labels": multi_hot}), towers)
    probs = logits.softmax(dim=-1)
    rows = [
        -sum(math.log(probs[row, k].item()) for k in hot.nonzero().flatten()) / hot.sum().item()
        for row, hot in enumerate(multi_hot)
    ]
    assert_close(parts["loss"], torch.tensor(sum(rows) / len(rows)))
