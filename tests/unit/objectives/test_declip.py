"""DeCLIP's text views, its queue of text embeddings and its nearest-neighbour term.

References: EDA written as a loop over Python lists, the nearest-neighbour term as a loop over
rows, and the training step (one process, plain gradients) for the gradient cache and a resume.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from x_clip.visual_ssl import SimSiam

from tests.helpers.configs import run_train
from tests.helpers.objectives import objective_batch, prepared_objective
from tests.helpers.references import IdentityTowers, assert_close, randn, text_ids, tiny_xclip
from tests.helpers.tensors import relative_error
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.objectives.draws import sample_uniform
from vlhub.objectives.text_views import CHOICE_STREAM, DELETE_STREAM, SWAP_STREAM, eda_view

CPU = torch.device("cpu")
SMALL = {"ssl_projection_dim": 8, "ssl_hidden_dim": 16}
SOT, EOT = 49406, 49407


def _eda_by_hand(row: list[int], sample_id: int, swaps: int, prob: float) -> list[int]:
    """EDA's swap or deletion on one caption's content tokens, as lists, from the same draws."""
    ids = torch.tensor([sample_id])
    content = [t for t in row if t not in (0, SOT, EOT)]
    if sample_uniform(ids, 1, CHOICE_STREAM)[0, 0] < 0.5:
        draws = sample_uniform(ids, 2 * swaps, SWAP_STREAM)[0].tolist()
        for k in range(swaps):
            n = len(content)
            if n < 2:
                break
            first = min(int(draws[2 * k] * n), n - 1)
            others = [i for i in range(n) if i != first]
            second = others[min(int(draws[2 * k + 1] * (n - 1)), n - 2)]
            content[first], content[second] = content[second], content[first]
    else:
        draws = sample_uniform(ids, len(row), DELETE_STREAM)[0].tolist()
        columns = [c for c, t in enumerate(row) if t not in (0, SOT, EOT)]
        kept = [c for c in columns if draws[c] >= prob]
        if columns and not kept:  # EDA keeps one word: here the one with the largest draw
            kept = [max(columns, key=lambda c: draws[c])]
        content = [row[c] for c in kept]
    out = [SOT, *content, EOT]
    return out + [0] * (len(row) - len(out))


def test_text_views_swap_or_delete_content_tokens_only_as_eda_by_hand():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in [0, 1, 2, 3, 5, 9, 12, 12, 7, 4, 6, 10] * 4:  # empty and one-token captions included
        content = torch.randint(1, 40000, (length,), generator=generator).tolist()
        rows.append([SOT, *content, EOT] + [0] * (16 - length - 2))
    text, sample_id = torch.tensor(rows), torch.arange(100, 100 + len(rows))
    for swaps, prob in ((1, 0.1), (3, 0.5)):
        view = eda_view(text, sample_id, (SOT, EOT), swaps, prob)
        expected = [_eda_by_hand(r, int(i), swaps, prob) for r, i in zip(rows, sample_id)]
        assert view.tolist() == expected
        assert (view[:, 0] == SOT).all()
        assert not torch.equal(view, text)
    # The same sample gets the same view whenever it is seen (replays, ranks): drawn from its id.
    assert torch.equal(eda_view(text[5:9], sample_id[5:9], (SOT, EOT), 3, 0.5), view[5:9])


class _Scale(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(scale).log())

    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.exp()


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_nearest_neighbour_term_is_the_hand_computed_one():
    model, objective = prepared_objective("declip", queue_size=20, **SMALL)
    batch, dim, scale = 5, model.embed_dim, 4.0
    text, text_view = _unit(batch, dim, seed=1), _unit(batch, dim, seed=2)
    # A queue whose nearest neighbours are known: a slightly moved copy of each text (and of each text
    # view, reversed), among far-away entries; 12 of 20 entries filled, the rest never searched.
    near = F.normalize(text + 0.05 * _unit(batch, dim, seed=3), dim=-1)
    near_view = F.normalize(text_view + 0.05 * _unit(batch, dim, seed=4), dim=-1)
    objective.text_queue.push(torch.cat([-text[:2], near, near_view.flip(0)]))
    assert int(objective.text_queue.filled) == 12
    assert torch.equal(objective.text_queue.nearest(text), near)
    assert torch.equal(objective.text_queue.nearest(text_view), near_view)
    view2, view3 = torch.randn(batch, dim), torch.randn(batch, dim, generator=torch.Generator().manual_seed(5))
    reps = {
        "image_features": _unit(batch, dim, seed=6),
        "text_features": text,
        "text_view_features": text_view,
        "view2_features": view2,
        "view3_features": view3,
        "mlm_nll": torch.ones(batch),
        "mlm_tokens": torch.ones(batch),
    }
    objective.train()
    parts = objective.loss(reps, _Scale(scale))
    expected = []
    for image in (F.normalize(view2, dim=-1), F.normalize(view3, dim=-1)):
        for neighbours in (near, near_view):
            rows = [-(scale * image[i] @ neighbours.T).log_softmax(dim=0)[i] for i in range(batch)]
            expected.append(sum(rows) / batch)
    torch.testing.assert_close(parts["nn_loss"], sum(expected) / 4)
    full = objective.loss(reps, _Scale(scale))["loss"]
    objective.nn_weight = 0.0
    without = objective.loss(reps, _Scale(scale))["loss"]
    torch.testing.assert_close(full - without, 0.2 * parts["nn_loss"])  # nn_weight's default


def _optimizer(model, objective):
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_the_queue_takes_the_gathered_texts_once_per_applied_step_and_nothing_from_a_skipped_one():
    model, objective = prepared_objective("declip", queue_size=40, **SMALL)
    optimizer, scheduler = _optimizer(model, objective)
    precision, queue = Precision("fp32", CPU), objective.text_queue
    batches = [objective_batch(model, objective, size=8, seed=seed) for seed in range(3)]
    batches[1] = {**batches[1], "image": torch.full_like(batches[1]["image"], float("nan"))}  # not finite

    def step(batch):
        return train_step(model, objective, batch, optimizer, scheduler, precision, PlainGradients(), None)

    def texts(batch):  # what the step's loss saw: the text views, then the captions
        with torch.no_grad():
            reps = objective.represent(model, batch)
        return torch.cat([reps["text_view_features"], reps["text_features"]])

    seen = texts(batches[0])
    assert step(batches[0]) is not None
    assert int(queue.filled) == 16 and int(queue.pointer) == 16
    torch.testing.assert_close(queue.entries[:16], seen)
    assert step(batches[1]) is None  # skipped: no weight moved, nothing enqueued
    assert int(queue.filled) == 16 and not queue.entries[16:].any()
    seen = texts(batches[2])
    assert step(batches[2]) is not None
    assert int(queue.filled) == 32
    torch.testing.assert_close(queue.entries[16:32], seen)
    step(batches[0])  # 48 rows into 40: the oldest 8 are overwritten, the pointer wraps
    assert int(queue.filled) == 40 and int(queue.pointer) == 8


def test_the_gradient_cache_gives_the_plain_gradient_and_queue_with_a_filled_queue():
    results = []
    for strategy in (PlainGradients(), GradCache(2)):
        model, objective = prepared_objective("declip", queue_size=24, **SMALL)
        objective.text_queue.push(_unit(20, model.embed_dim, seed=0))  # neighbours from the start
        batch = objective_batch(model, objective, size=4)
        parts = strategy(model, objective, batch, Precision("fp32", CPU))
        assert parts["nn_loss"] > 0
        objective.after_step()
        named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
        grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        results.append((grads, parts["loss"], {k: v.clone() for k, v in objective.text_queue.state_dict().items()}))
    (plain, plain_loss, plain_queue), (cached, cached_loss, cached_queue) = results
    assert cached.keys() == plain.keys() and relative_error(cached, plain) <= 1e-5
    torch.testing.assert_close(cached_loss, plain_loss)
    assert int(plain_queue["filled"]) == 24 and int(plain_queue["pointer"]) == 4
    for key, value in plain_queue.items():
        torch.testing.assert_close(cached_queue[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_resumed_declip_run_continues_bitwise_queue_included(tmp_path):
    args = [
        "objective=declip",
        "objective.queue_size=24",  # 16 texts per step: the queue wraps in the second step, after the resume
        "objective.ssl_hidden_dim=16",
        "objective.ssl_projection_dim=8",
        "optim.scheduler=constant",
        "checkpoint.every_n_steps=1",
        "eval=none",
    ]
    run_train([*args, "trainer.max_steps=2"], tmp_path / "straight")
    run_train([*args, "trainer.max_steps=1"], tmp_path / "resumed")
    run_train([*args, "trainer.max_steps=2"], tmp_path / "resumed")
    straight, resumed = (
        torch.load(tmp_path / f"{run}/checkpoints/latest.pt", weights_only=True) for run in ("straight", "resumed")
    )
    assert resumed["step"] == 2
    assert (
        int(straight["objective"]["text_queue.filled"]) == 24 and int(straight["objective"]["text_queue.pointer"]) == 8
    )
    for part in ("state_dict", "objective"):
        assert straight[part].keys() == resumed[part].keys()
        for key in straight[part]:
            assert torch.equal(straight[part][key], resumed[part][key]), key


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


def test_a_step_the_fp16_scaler_skips_enqueues_nothing():
    model, objective = prepared_objective("declip", queue_size=40, **SMALL)
    optimizer, scheduler = _optimizer(model, objective)
    precision, queue = Precision("amp_fp16", CPU), objective.text_queue
    batch = objective_batch(model, objective, size=8, seed=0)
    weight = next(model.parameters())
    # The loss stays finite; one gradient overflows, as fp16 gradients do: the scaler skips the step.
    overflow = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before, scale = weight.detach().clone(), precision.scaler.get_scale()
    assert train_step(model, objective, batch, optimizer, scheduler, precision, PlainGradients(), None) is not None
    assert torch.equal(weight.detach(), before) and precision.scaler.get_scale() == scale / 2  # skipped
    assert int(queue.filled) == 0
    overflow.remove()
    train_step(model, objective, batch, optimizer, scheduler, precision, PlainGradients(), None)
    assert not torch.equal(weight.detach(), before) and int(queue.filled) == 16  # applied: enqueued
