"""Subset matching (SPEC section 5): hand-written captions against small lists and ImageNet-1k."""

from __future__ import annotations

import json

import pytest

from vlhub.data.subset_match import SubsetMatcher, fold_plural, main, normalise

ANIMALS = [
    ["tiger", "panthera tigris"],
    ["tiger shark", "galeocerdo cuvieri"],
    ["tabby cat", "tabby"],
    ["golden retriever"],
    ["box"],
    ["butterfly"],
    ["goose"],
    ["crane"],  # a bird
    ["crane", "derrick"],  # a machine: the shared name belongs to the lower index
]


@pytest.fixture(scope="module")
def imagenet():
    return SubsetMatcher("imagenet1k", "multiclass")


def test_normalisation_lowercases_breaks_on_punctuation_and_folds_plurals():
    assert normalise("Two TABBY-cats, sitting!") == ["two", "tabby", "cat", "sitting"]
    assert normalise("carpenter's kit") == ["carpenter", "kit"]
    assert [fold_plural(w) for w in ("boxes", "butterflies", "geese", "glasses", "bus", "cats")] == [
        "box",
        "butterfly",
        "goose",
        "glass",
        "bus",
        "cat",
    ]


def test_the_longest_name_wins_at_each_position():
    matcher = SubsetMatcher(ANIMALS, "multiclass")
    assert matcher.labels("a tiger shark near the reef") == [1]  # not "tiger"
    assert matcher.labels("a tiger chasing a tiger shark") == [0, 1]
    assert matcher.labels("A Tiger.") == [0]


def test_synonyms_plurals_and_no_match():
    matcher = SubsetMatcher(ANIMALS, "multiclass")
    assert matcher.labels("Panthera tigris in the snow") == [0]
    assert matcher.labels("two golden retrievers and three tabbies") == [3, 2]
    assert matcher.labels("boxes of butterflies, geese overhead") == [4, 5, 6]
    assert matcher.labels("a photo of the sea") == []
    assert matcher.labels("") == []
    assert matcher.labels("tigerish stripes") == []  # whole words only


def test_a_name_shared_by_two_classes_gives_the_lower_index():
    matcher = SubsetMatcher(ANIMALS, "multiclass")
    assert matcher.labels("a crane on a building site") == [7]
    assert matcher.labels("a derrick") == [8]


def test_strategies_single_multiclass_strict():
    caption = "a tabby cat watching a golden retriever and another tabby"
    single, multi, strict = (SubsetMatcher(ANIMALS, s) for s in ("single", "multiclass", "strict"))
    assert single.labels(caption) == [2]
    assert multi.labels(caption) == [2, 3]  # distinct, in order of first mention
    assert strict.labels(caption) == []  # two classes: dropped
    assert strict.labels("a tabby cat and another tabby") == [2]  # one class, twice: kept
    assert single.labels("nothing") == multi.labels("nothing") == strict.labels("nothing") == []
    with pytest.raises(ValueError, match="^match_strategy must be one of"):
        SubsetMatcher(ANIMALS, "greedy")


def test_a_file_of_names_with_comma_separated_synonyms(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("tench, tinca tinca\n\ngoldfish, carassius auratus\n")
    matcher = SubsetMatcher(str(path), "multiclass")
    assert matcher.class_names == ["tench", "goldfish"]
    assert matcher.labels("Tinca tinca and two goldfishes") == [0, 1]
    with pytest.raises(FileNotFoundError, match="^classes=nope.txt"):
        SubsetMatcher("nope.txt")


def test_imagenet1k_openai_names_and_timm_synonyms(imagenet):
    assert imagenet.num_classes == 1000
    assert imagenet.labels("a tiger shark in the aquarium") == [3]
    assert imagenet.labels("a tiger in the zoo") == [292]
    assert imagenet.labels("Galeocerdo cuvieri, Panthera tigris") == [3, 292]  # WordNet lemmas via timm
    assert imagenet.labels("Golden Retrievers playing with a tabby cat") == [207, 281]
    assert imagenet.labels("an empty room with white walls") == []


def test_in100_labels_are_positions_in_the_index_file():
    from vlhub.eval.prompts import read_index_list

    indices = read_index_list("imagenet_in100_indices.txt")
    matcher = SubsetMatcher("in100", "single")
    assert matcher.num_classes == 100
    name = SubsetMatcher("imagenet1k").class_names[indices[7]]
    assert matcher.labels(f"a photo of a {name}") == [7]


def test_the_command_prints_one_json_line_per_caption(tmp_path, capsys):
    path, classes = tmp_path / "captions.txt", tmp_path / "classes.txt"
    classes.write_text("\n".join(", ".join(names) for names in ANIMALS))
    path.write_text("a tiger shark\n\nno animal here\na tabby and a goose\n")
    main(["--classes", str(classes), "--strategy", "multiclass", str(path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"caption": "a tiger shark", "labels": [1]},
        {"caption": "no animal here", "labels": []},
        {"caption": "a tabby and a goose", "labels": [2, 6]},
    ]
