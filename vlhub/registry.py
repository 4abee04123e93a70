"""One small registry type, and the registries vlhub's components enrol in.

Configs build components with ``hydra.utils.instantiate`` from a ``_target_`` path; the
registries are what makes the set of components enumerable (``list_*``), buildable from a
name (``build``), and enrolled in the contract tests, one parametrised test per registry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> component table that refuses duplicates and explains misses."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(component: T) -> T:
            if name in self._entries:
                raise KeyError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); pick another name"
                )
            self._entries[name] = component
            return component

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        yield from sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


MODELS: Registry[Callable[..., Any]] = Registry("model builder")
OBJECTIVES: Registry[type] = Registry("objective")
DATASETS: Registry[type] = Registry("dataset")
EVAL_TASKS: Registry[type] = Registry("eval task")
SCHEDULES: Registry[Callable[..., Any]] = Registry("lr schedule")
TRANSFORMS: Registry[Callable[..., Any]] = Registry("image transform")
CAPTION_TRANSFORMS: Registry[type] = Registry("caption transform")


def list_models() -> list[str]:
    return MODELS.names()


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


def list_datasets() -> list[str]:
    return DATASETS.names()


def list_eval_tasks() -> list[str]:
    return EVAL_TASKS.names()


def list_caption_transforms() -> list[str]:
    return CAPTION_TRANSFORMS.names()
