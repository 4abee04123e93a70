"""CLOOB: the loss and gradients from the paper's equations and the authors' code, its start and its zero-shot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.objectives import prepared_objective
from tests.helpers.references import IdentityTowers, randn


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
    with pytest.raises(ValueError, match="^inv_tau=200.0 is above the model's max_logit_scale"):
        type(objective)(inv_tau=200.0).apply_to_model(model)
    with pytest.raises(ValueError, match="^beta must be a positive number"):
        type(objective)(beta=0)
