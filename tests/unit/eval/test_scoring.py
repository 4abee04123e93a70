"""Every evaluation scores as the objective does: FILIP's retrieval is token-wise (against a loop over
pairs), blocks change nothing, and image-only objectives are skipped with one line, never scored."""

import logging
import os

import pytest
import torch

from tests.helpers.eval_folders import write_karpathy_set
from tests.helpers.objectives import prepared_objective
from vlhub.api import eval_transform
from vlhub.data.files import read_image
from vlhub.eval import EvalContext, RetrievalTask, SyntheticZeroShot
from vlhub.eval.retrieval import retrieval_recall
from vlhub.eval.scoring import PROBE_FEATURES, score_blocks
from vlhub.objectives.filip import _block_similarity

CPU = torch.device("cpu")


def _brute_force_recall(i2t, t2i, owners, k):
    """Recall@k from score tables built pair by pair: a text finds its image, an image any of its texts."""
    images, texts = range(len(i2t)), range(len(t2i))
    image_hits = [owners[t] in sorted(images, key=lambda i: -t2i[t][i])[:k] for t in texts]
    text_hits = [any(owners[t] == i for t in sorted(texts, key=lambda t: -i2t[i][t])[:k]) for i in images]
    return sum(image_hits) / len(image_hits), sum(text_hits) / len(text_hits)


@pytest.fixture(scope="module")
def filip():
    model, objective = prepared_objective("filip", block_size=4)
    return model.eval(), objective.eval()


def test_filip_retrieval_recall_is_its_token_wise_similarity(filip, tmp_path):
    model, objective = filip
    task = RetrievalTask(str(write_karpathy_set(tmp_path, num_test=12, image_size=32)), chunk_size=7)
    transform = eval_transform(model)
    context = EvalContext("retrieval", transform, CPU, batch_size=5, scoring=objective.scoring(model))
    ours = task.run(model, context)

    captions = [caption for captions in task.captions for caption in captions]
    owners = [i for i, image_captions in enumerate(task.captions) for _ in image_captions]
    with torch.no_grad():  # one sample at a time; each pair's similarity from its own tokens
        images = [objective.image_tokens(model, transform(read_image(p))[None])[0] for p in task.image_paths]
        texts = []
        for caption in captions:
            tokens, mask = objective.text_tokens(model, model.tokenize([caption]))
            texts.append(tokens[0][mask[0]])  # the real tokens only
        # image to text: mean over patches of the max over the text's tokens; text to image: the reverse
        i2t = [[(image @ text.T).max(dim=1).values.mean().item() for text in texts] for image in images]
        t2i = [[(text @ image.T).max(dim=1).values.mean().item() for image in images] for text in texts]
    for k in (1, 5, 10):
        image_recall, text_recall = _brute_force_recall(i2t, t2i, owners, k)
        assert ours[f"retrieval-image_retrieval_recall@{k}"] == pytest.approx(image_recall), k
        assert ours[f"retrieval-text_retrieval_recall@{k}"] == pytest.approx(text_recall), k
    pooled = task.run(model, EvalContext("retrieval", transform, CPU, batch_size=5))  # CLIP's scoring
    assert pooled != ours  # the data tell the two scorings apart


def test_blocked_scores_equal_one_block(filip):
    model, objective = filip
    scorer = objective.scoring(model).pairs
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = scorer.image_reps(torch.rand(7, 3, 32, 32, generator=generator))
        texts = scorer.text_reps(model.tokenize([f"a red circle number {i} " * (i % 3 + 1) for i in range(11)]))
        i2t, t2i = _block_similarity(images["tokens"], texts["tokens"], texts["mask"])  # no blocks at all
    for score, queries, keys, expected in (
        (scorer.image_to_text, images, texts, i2t),
        (scorer.text_to_image, texts, images, t2i.T),
    ):
        blocked = torch.cat([rows for _, rows in score_blocks(score, queries, keys, CPU, block_size=5)])
        torch.testing.assert_close(blocked, expected, rtol=0, atol=1e-6)
    owners = torch.arange(11) % 7
    assert retrieval_recall(texts, images, owners, chunk_size=2, scorer=scorer) == retrieval_recall(
        texts, images, owners, chunk_size=1024, scorer=scorer
    )


@pytest.mark.filterwarnings("ignore:The number of unique classes")  # simclr's probe: 30 classes, 30 images
@pytest.mark.parametrize("name", ["ce", "simclr"])
def test_image_only_objectives_skip_zero_shot_and_retrieval_with_one_line(name, tmp_path, caplog):
    model, objective = prepared_objective(name)
    scoring = objective.scoring(model.eval())
    task = RetrievalTask(str(write_karpathy_set(tmp_path, num_test=3, image_size=32)))
    with caplog.at_level(logging.INFO, logger="vlhub.eval"):
        retrieval = task.run(model, EvalContext("retrieval", None, CPU, scoring=scoring))
        synthetic = SyntheticZeroShot(num_samples=30, image_size=32).run(
            model, EvalContext("synthetic", eval_transform(model), CPU, batch_size=32, scoring=scoring)
        )
    assert retrieval == {}
    assert not any("zeroshot" in key for key in synthetic)
    assert ("synthetic-classifier-top1" in synthetic) == (name == "ce")  # ce reports its classifier
    why = f"objective {name} trains no text tower"
    skipped = [r.getMessage() for r in caplog.records if why in r.getMessage()]
    assert skipped == [
        f"eval retrieval: skipped: {scoring.absent}",
        f"eval synthetic: zero-shot skipped: {scoring.absent}",
    ]
    described = scoring.describe()
    assert described["zeroshot"] == described["retrieval"] == f"none: {scoring.absent}"
    assert described["linear_probe"] == PROBE_FEATURES


def test_eval_workers_default_to_the_machines_cores(monkeypatch):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from tests.helpers.configs import compose_evaluate, compose_train
    from vlhub.config_keys import build_at
    from vlhub.parallel.environment import loader_workers

    for variable in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert (loader_workers(1), loader_workers(4), loader_workers(16)) == (8, 3, 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    for cfg in (compose_train(), compose_evaluate([])):  # training-time evaluation and vlhub.evaluate alike
        evaluator = instantiate(cfg.eval)
        assert evaluator.context("synthetic", None, CPU).workers == 5  # what each task's DataLoader gets
    with pytest.raises(InstantiationException, match="eval.workers must be an integer >= 0 or 'auto', got 'many'"):
        build_at(compose_train(["eval.workers=many"]), "eval")  # as the commands build it
