"""Launch-time checks of a composed config, and how the commands report a mistake.

``check_config`` checks every value's type at launch, naming its key (Hydra's struct mode already
refuses unknown keys). A node with a structured schema (``trainer``: ``TrainerConfig``) is typed by
it when Hydra composes, and its command-line values before that (``check_typed_overrides``, one line).
A group node is checked against its ``_target_``'s signature: the type annotations of the parameters
it names (a target taking ``**kwargs`` also answers for its base classes' parameters). The other
plain keys (``checkpoint.*``, ``logger.*``, ``run.*``) are checked against the signatures of the
code they are handed to, which the command lists (``vlhub.train.PLAIN_KEYS``). A parameter without
an annotation, or annotated with a class (a nested component), is not checked here: a nested
``_target_`` node is checked on its own.

``errors_reported`` turns an expected mistake into one line and a hint (exit code 1); anything
else keeps its traceback. Expected: :class:`~vlhub.errors.ConfigError`, ``FileNotFoundError``, a
missing mandatory value (``???``), and the ``ValueError``/``KeyError`` checks vlhub's own code
raises (the error was raised in a vlhub source file). ``HYDRA_FULL_ERROR=1`` shows every traceback.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import inspect
import logging
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

from vlhub.config_resolvers import init_chain
from vlhub.errors import ConfigError

VLHUB_ROOT = Path(__file__).resolve().parent
PlainKeys = dict[str, list[tuple[Callable, str]]]  # node path -> (callable its keys go to, parameter prefix)


def check_config(cfg: DictConfig, plain: PlainKeys) -> None:
    """Every mandatory value is set and every checked value has its annotated type; else ConfigError."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is not set", hint=f"give it on the command line: {missing[0]}=...")
    _check_node(OmegaConf.to_container(cfg, resolve=True), "", plain)  # type: ignore[arg-type]


def check_device(device: str, key: str) -> None:
    """A ``cuda`` device needs a visible GPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={device}: no CUDA GPU is visible to this process",
            hint=f"use {key}=cpu, or {key}=auto to take a GPU when there is one",
        )


def _check_node(node: dict, path: str, plain: PlainKeys) -> None:
    target = node.get("_target_")
    if isinstance(target, str):
        try:
            params = _typed_params(get_object(target), "")
        except Exception:  # noqa: BLE001 (an unknown target is reported by instantiate, naming it)
            params = {}
    else:
        params = {}
        for function, prefix in plain.get(path, []):
            params.update(_typed_params(function, prefix))
    for key, value in node.items():
        if not isinstance(key, str) or key.startswith("_"):
            continue
        full = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            _check_node(value, full, plain)
            continue
        if isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    _check_node(item, f"{full}[{index}]", plain)
        hint = params.get(key, inspect.Parameter.empty)
        if not _matches(value, hint):
            raise ConfigError(
                f"{full}={value!r}: expected {_describe(hint)}, got {type(value).__name__}",
                hint=f"give {full} a value of that type (quote a string that looks like a number: {full}='\"5\"')",
            )


def _typed_params(function: Callable, prefix: str) -> dict[str, Any]:
    """Parameter name (less ``prefix``) -> annotation, following ``**kwargs`` into base classes."""
    found: dict[str, Any] = {}
    for init, signature in init_chain(function):
        hints = _hints(init)
        for name, parameter in signature.parameters.items():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name.startswith(prefix):
                found.setdefault(name[len(prefix) :], hints.get(name, inspect.Parameter.empty))
    return found


def _hints(function: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 (a name only imported for type checking): resolve one by one
        namespace = vars(sys.modules[function.__module__])
        hints = {}
        for name, annotation in getattr(function, "__annotations__", {}).items():
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
            except Exception:  # noqa: BLE001,S112
                continue
        return hints


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if hint is type(None) or hint is None:
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and (
            not args or origin is tuple or all(_matches(item, args[0]) for item in value)
        )
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True  # Any, no annotation, a component class, a callable: not a plain value to check


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, collections.abc.Sequence) and typing.get_args(hint):
        return f"a list of {_describe(typing.get_args(hint)[0])}"  # not just "list": the items are wrong
    return getattr(hint, "__name__", None) or str(hint)


def check_shard_overrides(argv: list[str], key: str = "data.root") -> None:
    """The shard spec on the command line, before Hydra parses it: one ``key=`` word, whose braces Hydra
    can parse. An unquoted brace pattern is what bash expands into several ``key=`` words (the last
    would win silently) and what Hydra's grammar rejects (its error names neither key nor fix)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    pattern = re.compile(rf"^\+{{0,2}}{re.escape(key)}=")
    given = [word for word in argv if pattern.match(word)]
    if len(given) > 1:
        shown = " ".join(given[:2]) + (" ..." if len(given) > 2 else "")
        raise ConfigError(
            f"{key} is given {len(given)} times ({shown}): the shell expanded an unquoted brace pattern",
            hint=f"quote it for the shell and for Hydra: '{key}=\"/data/shard-{{00000..00009}}.tar\"'",
        )
    for word in given:
        try:
            OverridesParser.create().parse_overrides([word])
        except OverrideParseException:
            value = pattern.sub("", word)
            raise ConfigError(
                f"{key}={value}: Hydra cannot parse its braces unquoted",
                hint=f"quote the pattern inside the shell's quotes: '{key}=\"{value.strip(chr(34) + chr(39))}\"'",
            ) from None


def check_typed_overrides(argv: list[str], schemas: dict[str, type]) -> None:
    """A command-line value that a node's structured schema (a dataclass) refuses: one line naming the key,
    before Hydra's several-line merge error. Each value of a sweep is checked; what Hydra cannot parse,
    Hydra reports."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for word in argv:
        node = word.lstrip("+").split(".", 1)[0]
        if node not in schemas or "=" not in word:
            continue
        try:
            (override,) = parser.parse_overrides([word])
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # noqa: BLE001,S112 (Hydra's parser names it)
            continue
        for value in values:
            try:
                OmegaConf.update(OmegaConf.create({node: schemas[node]}), override.key_or_group, value, merge=True)
            except (ValidationError, ConfigAttributeError, ConfigKeyError) as error:  # a wrong type, an unknown key
                raise ConfigError(
                    f"{override.key_or_group}={value!r}: {str(error).splitlines()[0]}",
                    hint=f"--help lists {node}'s keys with their types and defaults",
                ) from None


def overrides_checked(schemas: dict[str, type]) -> Callable[[Callable], Callable]:
    """Run :func:`check_shard_overrides` and :func:`check_typed_overrides` on ``sys.argv`` before
    the decorated ``hydra.main`` entry point."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            with errors_reported():
                check_shard_overrides(sys.argv[1:])
                check_typed_overrides(sys.argv[1:], schemas)
            return function(*args, **kwargs)

        return checked

    return decorate


# -- reporting ---------------------------------------------------------------------------------


def _cause(error: BaseException) -> BaseException:
    """The error itself, or the one Hydra's instantiate wrapped."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def is_expected(error: BaseException) -> bool:
    if isinstance(error, (ConfigError, FileNotFoundError, MissingMandatoryValue)):
        return True
    if isinstance(error, (ValueError, KeyError)):  # one of vlhub's own checks: raised in vlhub's code
        frames = traceback.extract_tb(error.__traceback__)
        return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(VLHUB_ROOT)
    return False


def describe_error(error: BaseException) -> tuple[str, str]:
    """(one line saying what is wrong, a hint saying what to do)."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if isinstance(error, MissingMandatoryValue) and error.full_key:
        line = f"{error.full_key} is not set"
        return line, f"give it on the command line: {error.full_key}=..."
    if isinstance(error, ConfigError) and error.hint:
        return line, error.hint
    if isinstance(error, FileNotFoundError):
        return line, "check the path (a relative path is read from the folder the command runs in)"
    return line, "fix the key named above; --help lists every group's options (HYDRA_FULL_ERROR=1: the traceback)"


class RunLogHandler(logging.FileHandler):
    """The run's log file (``hydra.job_logging.handlers.file``): a run folder where it cannot be
    written ends the launch with one line, not Hydra's "Unable to configure handler 'file'"
    (SystemExit passes through ``logging.config`` and Hydra, which catch Exception)."""

    def __init__(self, filename: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(filename, *args, **kwargs)
        except OSError as error:
            raise SystemExit(
                f"error: the run folder {Path(filename).parent} is not writable: its log {filename} cannot be "
                f"opened ({error.strerror or error})\nhint: fix its permissions, or use another run folder "
                "(run.name=... or hydra.run.dir=...)"
            ) from None


@contextlib.contextmanager
def errors_reported() -> Iterator[None]:
    """Expected mistakes: one line and a hint on stderr, exit code 1. Others propagate unchanged."""
    try:
        yield
    except Exception as raised:  # noqa: BLE001
        error = _cause(raised)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_expected(error):
            raise
        line, hint = describe_error(error)
        print(f"error: {line}\nhint: {hint}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
