"""Subset matching: which classes of a class list a caption names.

Used to turn captions into labels (``label_from_caption``), to keep only captions that
name a class (``filter_to_classes``) and by the ``simple`` caption transform.

Captions and class names are normalised the same way: lowercase, apostrophes dropped
("carpenter's" -> "carpenters"), every other non-alphanumeric character a word break, and each
word folded to a singular form by a few suffix rules (:func:`fold_plural`). A name's last word
is also indexed under its folded ``-s`` / ``-es`` plurals, so a rule that folds the plural but
not the singular ("moustaches" -> "moustach") still matches. The class list is read once into
a gram index (name as a tuple of words -> class) plus, per first word, the lengths of the names
starting with it; a caption is then one left-to-right scan taking, at each word, the longest
name that starts there ("a tiger shark" is class "tiger shark", never "tiger"). A name shared
by two classes belongs to the lower index.

Strategies: ``single`` (the first match), ``multiclass`` (every distinct class, in order of
first mention), ``strict`` (the class if exactly one distinct class matched, else none). An
empty list means "no match": the caller drops the caption and counts it.

    python -m vlhub.data.subset_match --classes imagenet1k --strategy multiclass captions.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

STRATEGIES = ("single", "multiclass", "strict")
NAMED_CLASS_LISTS = ("imagenet1k", "in100")

_WORD = re.compile(r"[^\W_]+")
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "people": "person",
    "oxen": "ox",
    "wolves": "wolf",
    "knives": "knife",
    "leaves": "leaf",
    "loaves": "loaf",
    "shelves": "shelf",
    "calves": "calf",
    "halves": "half",
}


def fold_plural(word: str) -> str:
    """A singular form of a lowercase word: the same rule for captions and names, so both agree."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word[-1] != "s" or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    return word[:-1]


_fold_cached = lru_cache(maxsize=1 << 18)(fold_plural)  # a C-level cache: most caption words repeat


def normalise(text: str) -> list[str]:
    """Lowercase words with punctuation as breaks, apostrophes dropped, plurals folded."""
    return list(map(_fold_cached, _WORD.findall(text.lower().replace("'", "").replace("\u2019", ""))))


# -- class lists --------------------------------------------------------------------------------
def imagenet1k_classes() -> list[list[str]]:
    """OpenAI's 1000 ImageNet names, each followed by its WordNet lemmas from timm's ImageNetInfo."""
    from open_clip import zero_shot_metadata
    from timm.data import ImageNetInfo

    lemmas = ImageNetInfo("imagenet-1k").label_descriptions()
    return [
        [name, *(lemma.strip() for lemma in synonyms.split(",") if lemma.strip())]
        for name, synonyms in zip(zero_shot_metadata.IMAGENET_CLASSNAMES, lemmas, strict=True)
    ]


def in100_classes() -> list[list[str]]:
    """ImageNet-100: labels 0-99 in the order of the package's index file."""
    text = resources.files("vlhub.resources").joinpath("imagenet_in100_indices.txt").read_text(encoding="utf-8")
    full = imagenet1k_classes()
    return [full[int(line)] for line in text.split()]


def read_class_file(path: str | Path) -> list[list[str]]:
    """One class per line, synonyms comma-separated ("tench, tinca tinca"); blank lines skipped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"classes={path}: not one of {'|'.join(NAMED_CLASS_LISTS)} and no such file "
            "(expected one class per line, synonyms comma-separated)"
        )
    classes = []
    for line in file.read_text(encoding="utf-8").splitlines():
        names = [name.strip() for name in line.split(",") if name.strip()]
        if names:
            classes.append(names)
    if not classes:
        raise ValueError(f"classes={path}: no class names in the file")
    return classes


def load_class_list(choice: str | Sequence[Sequence[str]]) -> list[list[str]]:
    """``imagenet1k``, ``in100``, a file of names, or the synonym lists themselves."""
    if isinstance(choice, str):
        if choice == "imagenet1k":
            return imagenet1k_classes()
        if choice == "in100":
            return in100_classes()
        return read_class_file(choice)
    classes = [list(names) for names in ([c] if isinstance(c, str) else c for c in choice)]
    if not classes or not all(classes):
        raise ValueError(f"classes={classes}: need at least one class, each with at least one name")
    return classes


def _distinct(names: list[str]) -> list[str]:
    """Synonyms without repeats (OpenAI's name often equals the first lemma), first spelling kept."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for name in names:
        gram = tuple(normalise(name))
        if gram and gram not in seen:
            seen.add(gram)
            kept.append(name)
    return kept


# -- the matcher --------------------------------------------------------------------------------
class SubsetMatcher:
    """Maps a caption to the classes it names (positions in the class list)."""

    def __init__(self, classes: str | Sequence[Sequence[str]], strategy: str = "single") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"match_strategy must be one of {'|'.join(STRATEGIES)}; got {strategy!r}")
        self.strategy = strategy
        self.synonyms = [_distinct(names) or names for names in load_class_list(classes)]
        self.class_names = [names[0] for names in self.synonyms]
        self._index: dict[tuple[str, ...], int] = {}
        aliases: list[tuple[tuple[str, ...], int]] = []
        for label, names in enumerate(self.synonyms):  # in class order: a shared name keeps the lower index
            for name in names:
                gram = tuple(normalise(name))
                if not gram:
                    continue
                self._index.setdefault(gram, label)
                head, last = gram[:-1], gram[-1]
                aliases += [((*head, fold_plural(last + suffix)), label) for suffix in ("s", "es")]
        for gram, label in aliases:  # plural spellings never displace a real name
            self._index.setdefault(gram, label)
        starts: dict[str, set[int]] = {}
        for gram in self._index:
            starts.setdefault(gram[0], set()).add(len(gram))
        self._lengths = {word: tuple(sorted(lengths, reverse=True)) for word, lengths in starts.items()}

    @property
    def num_classes(self) -> int:
        return len(self.synonyms)

    def matches(self, caption: str, first_only: bool = False) -> list[int]:
        """Every class mention, left to right, longest name first at each word (repeats kept)."""
        words, found = normalise(caption), []
        index, lengths_of = self._index, self._lengths
        position, count = 0, len(words)
        while position < count:
            step = 1
            for length in lengths_of.get(words[position], ()):
                label = index.get(tuple(words[position : position + length]))
                if label is not None:
                    found.append(label)
                    if first_only:
                        return found
                    step = length
                    break
            position += step
        return found

    def labels(self, caption: str) -> list[int]:
        """The caption's labels under the strategy; empty when it names no class (or, strict, several)."""
        if self.strategy == "single":
            return self.matches(caption, first_only=True)
        distinct = list(dict.fromkeys(self.matches(caption)))
        if self.strategy == "strict":
            return distinct if len(distinct) == 1 else []
        return distinct


def _read_captions(paths: Iterable[str]) -> Iterable[str]:
    for path in paths:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
        with handle:
            for line in handle:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the labels subset matching gives each caption (JSON lines).")
    parser.add_argument("--classes", default="imagenet1k", help="imagenet1k | in100 | FILE (one class per line)")
    parser.add_argument("--strategy", default="single", choices=STRATEGIES)
    parser.add_argument("files", nargs="+", help="caption files, one caption per line ('-': stdin)")
    args = parser.parse_args(argv)
    matcher = SubsetMatcher(args.classes, args.strategy)
    for caption in _read_captions(args.files):
        print(json.dumps({"caption": caption, "labels": matcher.labels(caption)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
