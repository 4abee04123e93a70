"""FILIP: token similarity against brute force at every block size, the loss against x_clip's, and its
zero-shot scoring (the mean over templates of the token similarity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers.objectives import prepared_objective
from tests.helpers.references import TOL, IdentityTowers, assert_close, randn, text_ids, tiny_xclip
from vlhub.objectives.filip import FilipObjective, token_similarity

CPU = torch.device("cpu")


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
