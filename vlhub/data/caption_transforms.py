"""Caption transforms (``caption_transforms``): a text stage, then a token stage.

*Text transforms* map a caption string to a string before tokenization: ``clean``, ``simple``,
``word_scramble``, ``shift_cipher``. *Token transforms* map a caption's content tokens (those
between the tokenizer's start and end tokens, never SOT, EOT or padding) to a new list:
``token_scramble``, ``token_strip``, ``token_trunc``. :class:`vlhub.data.captions.CaptionPipeline`
runs them in list order, all text transforms first. Randomness comes from a ``random.Random``
the pipeline seeds with the sample's stream position, so a resumed run scrambles alike.

Evaluation agrees with training through :func:`caesar_shift` (``eval.classnames.shift_cipher``
uses this function) and :meth:`TextTransform.on_class_name`, which says what a text transform
does to a class name (``token_strip`` keeps the tokens of the names as the transforms before it
left them, so ``[shift_cipher, token_strip]`` keeps ciphered class-name tokens).
"""

from __future__ import annotations

import html
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlhub.registry import CAPTION_TRANSFORMS

_TAG = re.compile(r"<[^>]*>")
_URL = re.compile(r"(?:\bhttps?://|\bwww\.)\S+", re.IGNORECASE)
_APOSTROPHE = re.compile(r"['\u2019`]")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def caesar_shift(text: str, k: int) -> str:
    """Shift each ASCII letter ``k`` places, keeping its case; everything else is unchanged."""
    shifted = []
    for char in text:
        if "a" <= char <= "z" or "A" <= char <= "Z":
            base = ord("a") if char.islower() else ord("A")
            char = chr(base + (ord(char) - base + k) % 26)
        shifted.append(char)
    return "".join(shifted)


def clean_caption(text: str) -> str:
    """Lowercase; HTML entities decoded; tags and URLs removed; apostrophes dropped; other punctuation a space."""
    text = _URL.sub(" ", _TAG.sub(" ", html.unescape(text)))
    text = _PUNCTUATION.sub(" ", _APOSTROPHE.sub("", text.lower()))
    return _SPACES.sub(" ", text).strip()


class TextTransform:
    """Caption string -> string, before tokenization."""

    uses_labels = False  # True: needs the caption's matched class names (subset matching runs)

    def __call__(self, text: str, rng: random.Random, names: Sequence[str]) -> str:
        raise NotImplementedError

    def on_class_name(self, name: str) -> str:
        """What this transform makes of an evaluation class name (identity unless it rewrites words)."""
        return name


class TokenTransform:
    """A caption's content token ids -> new content ids (the pipeline keeps SOT, EOT and padding)."""

    uses_class_tokens = False  # True: needs the token ids of the class names

    def __call__(self, content: list[int], rng: random.Random, class_tokens: frozenset[int]) -> list[int]:
        raise NotImplementedError


@CAPTION_TRANSFORMS.register("clean")
@dataclass(frozen=True)
class Clean(TextTransform):
    """``clean``: lowercase, strip markup, URLs and punctuation."""

    def __call__(self, text: str, rng: random.Random, names: Sequence[str]) -> str:
        return clean_caption(text)

    def on_class_name(self, name: str) -> str:
        return clean_caption(name)


@CAPTION_TRANSFORMS.register("simple")
@dataclass(frozen=True)
class Simple(TextTransform):
    """``simple``: "An image of CLASS1, CLASS2" from the matched classes (first name of each)."""

    prefix: str = "An image of"
    uses_labels = True

    def __call__(self, text: str, rng: random.Random, names: Sequence[str]) -> str:
        return f"{self.prefix} {', '.join(names)}" if names else text


@CAPTION_TRANSFORMS.register("word_scramble")
@dataclass(frozen=True)
class WordScramble(TextTransform):
    """``word_scramble``: the caption's whitespace-separated words in a random order."""

    def __call__(self, text: str, rng: random.Random, names: Sequence[str]) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)


@CAPTION_TRANSFORMS.register("shift_cipher")
@dataclass(frozen=True)
class ShiftCipher(TextTransform):
    """``shift_cipher`` (``k``): Caesar-shift every ASCII letter by k, as ``eval.classnames.shift_cipher``."""

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool):
            raise ValueError(f"caption transform shift_cipher: k must be an integer, got {self.k!r}")

    def __call__(self, text: str, rng: random.Random, names: Sequence[str]) -> str:
        return caesar_shift(text, self.k)

    def on_class_name(self, name: str) -> str:
        return caesar_shift(name, self.k)


@CAPTION_TRANSFORMS.register("token_scramble")
@dataclass(frozen=True)
class TokenScramble(TokenTransform):
    """``token_scramble``: a random permutation of the content tokens."""

    def __call__(self, content: list[int], rng: random.Random, class_tokens: frozenset[int]) -> list[int]:
        content = list(content)
        rng.shuffle(content)
        return content


@CAPTION_TRANSFORMS.register("token_strip")
@dataclass(frozen=True)
class TokenStrip(TokenTransform):
    """``token_strip``: keep only the content tokens that occur in the evaluation class names, in order."""

    uses_class_tokens = True

    def __call__(self, content: list[int], rng: random.Random, class_tokens: frozenset[int]) -> list[int]:
        return [token for token in content if token in class_tokens]


@CAPTION_TRANSFORMS.register("token_trunc")
@dataclass(frozen=True)
class TokenTrunc(TokenTransform):
    """``token_trunc`` (``k``): keep the first k content tokens."""

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise ValueError(f"caption transform token_trunc: k must be a positive integer, got {self.k!r}")

    def __call__(self, content: list[int], rng: random.Random, class_tokens: frozenset[int]) -> list[int]:
        return list(content[: self.k])


@dataclass(frozen=True)
class TokenLayout:
    """Where a tokenizer puts its special tokens, read from what it makes of "" and "a".

    A row is ``head + content + [end] + padding`` (open_clip: ``[SOT] ... [EOT] 0 0 ...``); a
    row truncated by the tokenizer keeps its ``end`` at the last position.
    """

    head: tuple[int, ...]
    end: int | None
    pad: int
    length: int

    @classmethod
    def of(cls, tokenizer: Callable[[list[str]], torch.Tensor]) -> TokenLayout:
        empty, one = (row.tolist() for row in tokenizer(["", "a"]))
        split = next((i for i, (x, y) in enumerate(zip(empty, one)) if x != y), len(empty))
        pad = empty[-1]
        end = empty[split] if split < len(empty) and empty[split] != pad else None
        return cls(tuple(empty[:split]), end, pad, len(empty))

    def content(self, row: list[int]) -> list[int]:
        start = len(self.head)
        if self.end is not None and self.end in row[start:]:
            return row[start : row.index(self.end, start)]
        stop = len(row)
        while stop > start and row[stop - 1] == self.pad:
            stop -= 1
        return row[start:stop]

    def row(self, content: list[int]) -> list[int]:
        tail = [] if self.end is None else [self.end]
        room = self.length - len(self.head) - len(tail)
        tokens = [*self.head, *content[:room], *tail]
        return tokens + [self.pad] * (self.length - len(tokens))

    def class_tokens(self, tokenizer: Callable[[list[str]], torch.Tensor], names: list[str]) -> frozenset[int]:
        """Every content token of the names (tokenized in chunks: ImageNet has ~2,000 synonyms)."""
        tokens: set[int] = set()
        for start in range(0, len(names), 512):
            for row in tokenizer(names[start : start + 512]).tolist():
                tokens.update(self.content(row))
        return frozenset(tokens)


def apply_token_transforms(
    tokens: torch.Tensor,
    transforms: Sequence[TokenTransform],
    rngs: Sequence[random.Random],
    layout: TokenLayout,
    class_tokens: frozenset[int],
) -> torch.Tensor:
    """Each row's content through the transforms in order; special tokens and padding stay put."""
    rows = []
    for row, rng in zip(tokens.tolist(), rngs, strict=True):
        content = layout.content(row)
        for transform in transforms:
            content = transform(content, rng, class_tokens)
        rows.append(layout.row(content))
    return torch.tensor(rows, dtype=tokens.dtype)
