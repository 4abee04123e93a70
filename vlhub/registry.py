"""One small registry type, and the registries vlhub's components enrol in.

Configs build components with ``hydra.utils.instantiate`` from a ``_target_`` path; the
registries are what makes the set of components enumerable (``list_*``), buildable from a
name (``build``), and enrolled in the contract tests, one parametrised test per registry.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterator, Mapping
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

    def targets(self) -> dict[str, str]:
        """The allow-list of ``_target_`` paths: each entry's dotted import path, and the same
        object re-exported by a parent package (``vlhub.models.build_open_clip_model``) -> name.
        Nothing is imported: only modules already loaded are looked at."""
        found: dict[str, str] = {}
        for name, entry in self._entries.items():
            module, attr = getattr(entry, "__module__", ""), getattr(entry, "__qualname__", "")
            found[f"{module}.{attr}"] = name
            parts = module.split(".")
            for end in range(1, len(parts)):
                package = ".".join(parts[:end])
                if getattr(sys.modules.get(package), attr, None) is entry:
                    found[f"{package}.{attr}"] = name
        return found

    def build_node(self, node: Mapping[str, Any], key: str, **overrides: Any) -> Any:
        """Build from a stored config node without instantiating anything it names: its
        ``_target_`` must be a registered entry's path, and its arguments plain data (no nested
        ``_target_``). The entry is called directly; ``key`` names the node in errors."""
        if not isinstance(node, Mapping):
            raise UnsafeConfigError(f"{key} must be a mapping with a _target_, got {type(node).__name__}")
        target = node.get("_target_")
        allowed = self.targets()
        if target not in allowed:
            raise UnsafeConfigError(
                f"{key}._target_={target!r} is not a registered {self.kind}; refusing to build it "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        kwargs = {k: v for k, v in node.items() if k != "_target_"}
        for name, value in kwargs.items():
            check_plain_data(value, f"{key}.{name}")
        return self.build(allowed[target], **{**kwargs, **overrides})

    def items(self) -> Iterator[tuple[str, T]]:
        yield from sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class UnsafeConfigError(ValueError):
    """A stored config asks for something vlhub will not build from a file."""


PLAIN_SCALARS = (str, int, float, bool, type(None))


def check_plain_data(value: Any, key: str) -> None:
    """Refuse anything but dicts, lists, strings, numbers, booleans and None, and any nested
    ``_target_``/``_partial_``/``_args_`` (what ``instantiate`` would act on), naming the key."""
    if isinstance(value, PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain_data(item, f"{key}[{index}]")
        return
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str):
                raise UnsafeConfigError(f"{key} has a non-string key {name!r}")
            if name in ("_target_", "_partial_", "_args_", "_recursive_", "_convert_"):
                raise UnsafeConfigError(f"{key}.{name}: a nested {name} is refused (arguments must be plain data)")
            check_plain_data(item, f"{key}.{name}")
        return
    raise UnsafeConfigError(f"{key} holds a {type(value).__name__}; arguments must be plain data")


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
