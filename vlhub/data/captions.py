"""The caption pipeline: subset matching, caption transforms, tokenization, labels from captions.

One object, used the same way by every loader (map-style slots and streamed shards):

- ``prepare(caption, seed)`` per sample, in the worker: matches the raw caption against
  ``classes`` when something needs it, drops it (``None``, counted as *filtered*, never as a
  bad sample) when it names no class (or, ``strict``, several), and runs the text transforms.
  ``seed`` is the sample's stream position (the slot that also seeds its image augmentation),
  so scrambles are a pure function of the position and a resumed run repeats them exactly.
- ``collate(captions, tokenizer)`` per batch: tokenizes, runs the token transforms, and with
  ``label_from_caption`` returns ``label`` (the class, or -1 on a multi-label row) and ``labels``
  (a ``[B, num_classes]`` multi-hot float tensor): see :class:`vlhub.data.batch.Batch`.

Matching runs on the raw caption, before any transform, when ``filter_to_classes`` or
``label_from_caption`` is on or a transform uses the matched classes (``simple``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlhub.data.caption_transforms import TextTransform, TokenLayout, TokenTransform, apply_token_transforms
from vlhub.data.subset_match import STRATEGIES, SubsetMatcher
from vlhub.registry import CAPTION_TRANSFORMS

Tokenizer = Callable[[list[str]], torch.Tensor]
TransformEntry = str | Mapping[str, Any]
_TOKEN_SEED_SALT = 0x9E3779B1  # token-stage randomness: its own stream, still a function of the seed


@dataclass(frozen=True)
class Caption:
    """One sample's caption after the text stage: the text to tokenize, its matched labels, its seed."""

    text: str
    labels: tuple[int, ...]
    seed: int


def build_caption_transform(entry: TransformEntry, where: str) -> TextTransform | TokenTransform:
    """``NAME`` or ``{name: NAME, KEY: VALUE, ...}`` -> the registered transform with those keys."""
    if isinstance(entry, str):
        name, keys = entry, {}
    elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        name, keys = entry["name"], {key: value for key, value in entry.items() if key != "name"}
    else:
        raise ValueError(f"{where}: expected a transform name or {{name: NAME, key: value}}, got {entry!r}")
    try:
        return CAPTION_TRANSFORMS.build(name, **keys)
    except KeyError as error:
        raise ValueError(f"{where}: {error.args[0]}") from None
    except TypeError as error:
        raise ValueError(f"{where} ({name}): {error}") from None


def _name_of(transform: TextTransform | TokenTransform) -> str:
    """The registry name a built transform was asked for by."""
    return next(
        (name for name, kind in CAPTION_TRANSFORMS.items() if type(transform) is kind), type(transform).__name__
    )


def _names(stage: type) -> list[str]:
    """The registered caption transforms of one stage (text or token), from the registry."""
    return [name for name, kind in CAPTION_TRANSFORMS.items() if issubclass(kind, stage)]


class CaptionPipeline:
    """``caption_transforms``, ``classes``, ``match_strategy``, ``label_from_caption``,
    ``filter_to_classes``: what happens to a caption between the source and the batch."""

    def __init__(
        self,
        caption_transforms: Sequence[TransformEntry] = (),
        classes: str | Sequence[Sequence[str]] | None = "imagenet1k",
        match_strategy: str = "single",
        label_from_caption: bool = False,
        filter_to_classes: bool = False,
    ) -> None:
        if match_strategy not in STRATEGIES:
            raise ValueError(f"match_strategy must be one of {'|'.join(STRATEGIES)}; got {match_strategy!r}")
        built = [
            build_caption_transform(entry, f"caption_transforms[{i}]") for i, entry in enumerate(caption_transforms)
        ]
        self.text_transforms = [t for t in built if isinstance(t, TextTransform)]
        self.token_transforms = [t for t in built if isinstance(t, TokenTransform)]
        if built != self.text_transforms + self.token_transforms:
            raise ValueError(
                f"caption_transforms={[_name_of(t) for t in built]}: text transforms "
                f"({', '.join(_names(TextTransform))}) must come before token transforms "
                f"({', '.join(_names(TokenTransform))})"
            )
        self.classes, self.match_strategy = classes, match_strategy
        self.label_from_caption, self.filter_to_classes = label_from_caption, filter_to_classes
        self.filters = label_from_caption or filter_to_classes or any(t.uses_labels for t in self.text_transforms)
        needs_classes = self.filters or any(t.uses_class_tokens for t in self.token_transforms)
        if needs_classes and classes is None:
            flags = {"label_from_caption": label_from_caption, "filter_to_classes": filter_to_classes}
            asking = [f"{key}=True" for key, on in flags.items() if on]
            asking += [
                _name_of(t) for t in built if getattr(t, "uses_labels", False) or getattr(t, "uses_class_tokens", False)
            ]
            raise ValueError(f"classes=None, but {', '.join(asking)} needs a class list (imagenet1k | in100 | FILE)")
        self.matcher = SubsetMatcher(classes, match_strategy) if needs_classes and classes is not None else None
        self._bound: tuple[Tokenizer, TokenLayout, frozenset[int]] | None = None

    @property
    def num_classes(self) -> int:
        return self.matcher.num_classes if self.matcher is not None else 0

    def keeps(self, caption: str) -> bool:
        """Whether ``prepare`` keeps this caption (cheap: subset matching only)."""
        return not self.filters or bool(self.matcher.labels(caption))  # type: ignore[union-attr]

    def prepare(self, caption: str, seed: int) -> Caption | None:
        """The text stage for one sample; ``None`` when the caption is filtered out."""
        labels: tuple[int, ...] = ()
        if self.filters:
            labels = tuple(self.matcher.labels(caption))  # type: ignore[union-attr]
            if not labels:
                return None
        if self.text_transforms:
            rng = random.Random(seed)
            names = [self.matcher.class_names[label] for label in labels] if self.matcher is not None else []
            for transform in self.text_transforms:
                caption = transform(caption, rng, names)
        return Caption(caption, labels, seed)

    def _bind(self, tokenizer: Tokenizer) -> tuple[TokenLayout, frozenset[int]]:
        """The tokenizer's layout and the class-name tokens, computed once per tokenizer."""
        if self._bound is None or self._bound[0] is not tokenizer:
            layout, class_tokens = TokenLayout.of(tokenizer), frozenset()
            if any(t.uses_class_tokens for t in self.token_transforms):
                class_tokens = layout.class_tokens(tokenizer, self.class_name_vocabulary())
            self._bound = (tokenizer, layout, class_tokens)
        return self._bound[1], self._bound[2]

    def class_name_vocabulary(self) -> list[str]:
        """The class names evaluation prompts use (each class's first name), as the text transforms
        would leave them: ``token_strip`` keeps the tokens of these."""
        names = list(self.matcher.class_names)  # type: ignore[union-attr]
        for transform in self.text_transforms:
            names = [transform.on_class_name(name) for name in names]
        return names

    def tokenize(self, captions: Sequence[Caption], tokenizer: Tokenizer) -> torch.Tensor:
        tokens = tokenizer([caption.text for caption in captions])
        if not self.token_transforms:
            return tokens
        layout, class_tokens = self._bind(tokenizer)
        rngs = [random.Random(caption.seed ^ _TOKEN_SEED_SALT) for caption in captions]
        return apply_token_transforms(tokens, self.token_transforms, rngs, layout, class_tokens)

    def collate(self, captions: Sequence[Caption], tokenizer: Tokenizer | None) -> dict[str, Any]:
        """``text_raw``, ``text`` (with a tokenizer) and, with ``label_from_caption``, ``label``/``labels``."""
        fields: dict[str, Any] = {"text_raw": [caption.text for caption in captions]}
        if tokenizer is not None:
            fields["text"] = self.tokenize(captions, tokenizer)
        if self.label_from_caption:
            labels = torch.zeros(len(captions), self.num_classes)
            for row, caption in enumerate(captions):
                labels[row, list(caption.labels)] = 1.0
            fields["labels"] = labels
            fields["label"] = torch.tensor(
                [caption.labels[0] if len(caption.labels) == 1 else -1 for caption in captions], dtype=torch.long
            )
        return fields

    def __getstate__(self) -> dict[str, Any]:  # the bound tokenizer is rebuilt in each worker
        return {**self.__dict__, "_bound": None}
