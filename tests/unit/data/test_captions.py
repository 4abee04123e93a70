"""Caption transforms on concrete strings and token tensors, and the caption pipeline."""

from __future__ import annotations

import random

import pytest
import torch
from hydra.errors import InstantiationException
from open_clip.tokenizer import SimpleTokenizer

from vlhub.data.caption_transforms import TokenLayout, caesar_shift, clean_caption
from vlhub.data.captions import Caption, CaptionPipeline, build_caption_transform
from vlhub.eval.prompts import ClassNameTransform

ANIMALS = [["tiger"], ["tiger shark"], ["tabby cat", "tabby"], ["golden retriever"]]
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer(context_length=12)


def _text(entries, caption, seed=0, classes=ANIMALS, **kwargs):
    prepared = CaptionPipeline(entries, classes, **kwargs).prepare(caption, seed)
    return None if prepared is None else prepared.text


def _content(row: list[int]) -> list[int]:
    return row[1 : row.index(EOT)]


def test_clean_strips_markup_urls_and_punctuation():
    caption = "<b>A Dog's  day</b> &amp; FUN: see https://x.com/a?b=1 or www.dogs.org!!"
    assert clean_caption(caption) == "a dogs day fun see or"
    assert _text(["clean"], "Hello,World_again") == "hello world again"


def test_simple_names_the_matched_classes():
    assert _text(["simple"], "my tabby and a golden retriever", match_strategy="multiclass") == (
        "An image of tabby cat, golden retriever"
    )
    assert _text(["simple"], "my tabby and a golden retriever") == "An image of tabby cat"  # single
    assert _text([{"name": "simple", "prefix": "A photo of"}], "a tiger shark") == "A photo of tiger shark"
    assert _text(["simple"], "no animal") is None  # nothing to name: filtered


def test_word_scramble_is_a_seeded_permutation_of_the_words():
    caption = "one two three four five six seven"
    first, again, other = (_text(["word_scramble"], caption, seed=s) for s in (5, 5, 6))
    assert first == again and first != caption and other != first
    assert sorted(first.split()) == sorted(caption.split())


def test_shift_cipher_matches_evaluation_class_names():
    assert _text([{"name": "shift_cipher", "k": 3}], "A Zebra!") == "D Cheud!"
    # training and evaluation use the same function, so a ciphered caption names ciphered classes
    names = ClassNameTransform(case="lower", shift_cipher=3).apply(["Tabby Cat"])
    assert _text(["clean", {"name": "shift_cipher", "k": 3}], "A photo of a Tabby-Cat.") == f"d skrwr ri d {names[0]}"
    assert caesar_shift(caesar_shift("Round Trip", 5), -5) == "Round Trip"


def test_token_transforms_touch_content_tokens_only(tokenizer):
    caption = Caption("one two three four five", (), seed=1)
    original = tokenizer([caption.text])[0].tolist()
    assert original[:1] == [SOT] and original[6:] == [EOT, 0, 0, 0, 0, 0]

    scrambled = CaptionPipeline(["token_scramble"]).tokenize([caption], tokenizer)[0].tolist()
    assert scrambled[0] == SOT and scrambled[6:] == original[6:]  # SOT, EOT and padding in place
    assert sorted(scrambled) == sorted(original) and scrambled != original  # a true permutation
    again = CaptionPipeline(["token_scramble"]).tokenize([caption], tokenizer)[0].tolist()
    assert again == scrambled  # seeded by the sample

    truncated = CaptionPipeline([{"name": "token_trunc", "k": 2}]).tokenize([caption], tokenizer)[0].tolist()
    assert truncated == [SOT, *original[1:3], EOT] + [0] * 8


def test_token_strip_keeps_class_name_tokens(tokenizer):
    pipeline = CaptionPipeline(["token_strip"], ANIMALS)
    caption = Caption("a big tiger near a golden tabby gate", (), seed=0)
    row = pipeline.tokenize([caption], tokenizer)[0].tolist()
    tiger, golden, tabby = (tokenizer([w])[0, 1].item() for w in ("tiger", "golden", "tabby"))
    assert row == [SOT, tiger, golden, tabby, EOT] + [0] * 7  # the names evaluation uses ("tabby cat")
    # after shift_cipher the kept tokens are those of the ciphered class names
    ciphered = CaptionPipeline([{"name": "shift_cipher", "k": 1}, "token_strip"], ANIMALS)
    prepared = ciphered.prepare("a big tiger", seed=0)
    assert prepared.text == "b cjh ujhfs"
    assert _content(ciphered.tokenize([prepared], tokenizer)[0].tolist()) == _content(tokenizer(["ujhfs"])[0].tolist())


def test_token_transforms_keep_a_truncated_row_valid(tokenizer):
    caption = Caption(" ".join(["word"] * 30), (), seed=3)
    row = CaptionPipeline(["token_scramble"]).tokenize([caption], tokenizer)[0].tolist()
    assert len(row) == 12 and row[0] == SOT and row[-1] == EOT


def test_token_layout_is_read_from_the_tokenizer(tokenizer):
    layout = TokenLayout.of(tokenizer)
    assert (layout.head, layout.end, layout.pad, layout.length) == ((SOT,), EOT, 0, 12)


def test_transform_entries_are_checked_naming_the_entry():
    with pytest.raises(ValueError, match=r"caption_transforms\[1\].*token_trunk.*token_trunc"):
        CaptionPipeline(["clean", "token_trunk"])
    with pytest.raises(ValueError, match=r"caption_transforms\[0\].*token_trunc.*k"):
        CaptionPipeline([{"name": "token_trunc"}])
    with pytest.raises(ValueError, match="positive"):
        build_caption_transform({"name": "token_trunc", "k": 0}, "x")
    with pytest.raises(ValueError, match="before token transforms"):
        CaptionPipeline(["token_scramble", "clean"])
    with pytest.raises(ValueError, match="^classes=None, but simple needs a class list"):
        CaptionPipeline(["simple"], classes=None)


def test_labels_from_captions_single_and_multi_label_rows(tokenizer):
    pipeline = CaptionPipeline([], ANIMALS, "multiclass", label_from_caption=True)
    captions = [pipeline.prepare(c, i) for i, c in enumerate(["a tiger", "a tabby and a tiger shark", "x"])]
    assert captions[2] is None  # names no class: filtered
    fields = pipeline.collate(captions[:2], tokenizer)
    assert fields["label"].tolist() == [0, -1]  # a multi-label row has no single label
    assert fields["labels"].tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    assert fields["text_raw"] == ["a tiger", "a tabby and a tiger shark"] and fields["text"].shape == (2, 12)


def test_the_default_pipeline_is_the_identity(tokenizer):
    pipeline = CaptionPipeline()
    assert pipeline.matcher is None and not pipeline.filters
    caption = pipeline.prepare("Keep ME as is!", seed=7)
    fields = pipeline.collate([caption], tokenizer)
    assert fields["text_raw"] == ["Keep ME as is!"] and set(fields) == {"text_raw", "text"}
    assert torch.equal(fields["text"], tokenizer(["Keep ME as is!"]))


def test_filter_to_classes_keeps_only_captions_naming_a_class():
    pipeline = CaptionPipeline([], ANIMALS, "strict", filter_to_classes=True)
    kept = [c for c in ["a tiger", "a tiger and a tabby", "a cloud", "two tigers"] if pipeline.keeps(c)]
    assert kept == ["a tiger", "two tigers"]
    assert pipeline.prepare("a tiger", 0) == Caption("a tiger", (0,), 0)  # original text kept


def test_random_streams_depend_only_on_the_seed():
    pipeline = CaptionPipeline(["word_scramble"])
    random.seed(123)
    first = pipeline.prepare("a b c d e f g h", seed=42)
    random.seed(999)
    assert pipeline.prepare("a b c d e f g h", seed=42) == first  # global random state is irrelevant


# -- through the real YAML and the map-style loader ------------------------------------------------
def _synthetic_source(tmp_path, *overrides):
    from hydra.utils import instantiate

    from tests.helpers.configs import compose_train
    from vlhub.data.synthetic import class_names

    classes = tmp_path / "shapes.txt"
    classes.write_text("\n".join(class_names()))
    cfg = compose_train(["data.workers=0", "data.num_samples=48", f"data.classes={classes}", *overrides])
    return instantiate(cfg.data)


def _batches(source, tokenizer, count, batch_size=8, start_sample=0):
    loader = iter(source.build_loader(lambda image: torch.zeros(1), tokenizer, batch_size, 0, start_sample))
    return [next(loader) for _ in range(count)]


def test_label_from_caption_through_the_loader(tmp_path, tokenizer, caplog):
    source = _synthetic_source(tmp_path, "data.label_from_caption=true", "data.match_strategy=strict")
    with caplog.at_level("INFO", logger="vlhub.data.loader"):
        batches = _batches(source, tokenizer, 3)
    assert "kept" in caplog.text and "dropped" in caplog.text
    for loaded in batches:
        batch = loaded.batch
        assert len(batch["text_raw"]) == 8 and loaded.bad_samples == loaded.filtered == 0  # full batches
        truth = [source.load(i).label for i in _source_indices(source, batch["sample_id"])]
        assert batch["label"].tolist() == truth  # the caption names the shape the image shows
        assert batch["labels"].shape == (8, 30) and batch["labels"].sum(1).tolist() == [1.0] * 8


def _source_indices(source, sample_ids):
    from vlhub.data.loader import _SlotDataset

    dataset = _SlotDataset(source, 0, lambda image: image, 1)
    return [dataset.position(int(slot))[1] for slot in sample_ids]


def test_filter_to_classes_keeps_captions_naming_a_class_and_resumes_exactly(tmp_path, tokenizer):
    source = _synthetic_source(
        tmp_path, "data.filter_to_classes=true", "data.caption_transforms=[clean,token_scramble]"
    )
    kept = [i for i in range(len(source)) if source.caption_pipeline.keeps(source.caption(i))]
    assert 0 < len(kept) < len(source)  # "a small square coloured red" names no class: dropped
    first = _batches(source, tokenizer, 8)
    seen = {i for loaded in first for i in _source_indices(source, loaded.batch["sample_id"])}
    assert seen == set(kept)  # every kept sample is read, no dropped one
    assert "label" in first[0].batch and "labels" not in first[0].batch  # labels stay the source's
    resumed = _batches(source, tokenizer, 1, start_sample=3 * 8)[0]
    assert torch.equal(resumed.batch["text"], first[3].batch["text"])  # the same scrambles after resume
    assert resumed.batch["text_raw"] == first[3].batch["text_raw"]


def test_caption_keys_compose_from_the_command_line(tmp_path):
    source = _synthetic_source(
        tmp_path, "data.caption_transforms=[clean,{name:shift_cipher,k:1},{name:token_trunc,k:4}]"
    )
    pipeline = source.caption_pipeline
    assert [type(t).__name__ for t in pipeline.text_transforms + pipeline.token_transforms] == [
        "Clean",
        "ShiftCipher",
        "TokenTrunc",
    ]
    assert pipeline.prepare("A Red Circle!", 0).text == "b sfe djsdmf"
    with pytest.raises(InstantiationException, match=r"caption_transforms\[0\].*Did you mean 'word_scramble'"):
        _synthetic_source(tmp_path, "data.caption_transforms=[word_scrambel]")


def test_collate_counts_filtered_samples_apart_from_bad_ones(tokenizer):
    from vlhub.data.batch import BadSample, Filtered
    from vlhub.data.loader import Collate

    pipeline = CaptionPipeline([], ANIMALS, filter_to_classes=True)
    good = {"views": [torch.zeros(1)], "caption": pipeline.prepare("a tiger", 0), "label": -1, "epoch": 0, "slot": 0}
    loaded = Collate(tokenizer, 1, pipeline)([good, Filtered("a cloud"), BadSample("unreadable")])
    assert (loaded.samples_read, loaded.bad_samples, loaded.filtered) == (3, 1, 1)
    assert loaded.batch["text_raw"] == ["a tiger"]
