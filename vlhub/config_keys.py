"""The launcher's half of an error message: the config key of the parameter the library named.

Library errors name the argument they were given, the way a Python caller wrote it
(``CsvPairs(root="/x")`` fails with ``root=/x: no such CSV file``). The commands know the
config path of every node they instantiate, so :func:`naming_keys` rewrites those names into
keys on the way out: under ``naming_keys(cfg, "data")`` the same error reads
``data.root=/x: no such CSV file``. One mechanism for every group, so the library never
carries key strings (no ``root_key=`` parameters) and a message reads right from Python and
from the command line alike.

A name is rewritten when it is written ``name=value``, ``name[i]`` or starts the message, and
the node holds a key of that name. When several keys share the name (``data.root`` and
``data.val.root``, or one ``root`` per eval task) the one whose value the message quotes wins;
a value that only one key holds names that key (``FolderProbeTask`` builds its ``train``
folder as an ``ImageFolderPairs(root=...)``: the value says it was ``eval.probe.train``).
Anything else is left as the library wrote it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

_NAME = re.compile(r"(?<![\w.\-/$'\"{])([A-Za-z_]\w*)((?:\[\d+\])*)(=|(?=\[)|)")
_FULL_KEY = re.compile(r"\nfull_key: (\S+)")


def build_at(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """``instantiate`` the node at ``key`` (``"data"``, ``"eval"``), its errors naming ``key.<param>``."""
    with naming_keys(cfg, key):
        return instantiate(OmegaConf.select(cfg, key), *args, **kwargs)


@contextlib.contextmanager
def naming_keys(cfg: DictConfig, key: str) -> Iterator[None]:
    """Errors raised inside name ``key.<param>`` where the library named ``<param>``; the same
    exception objects propagate (types and tracebacks unchanged), with their messages rewritten."""
    try:
        yield
    except Exception as error:
        node = OmegaConf.select(cfg, key)
        leaves = _leaves(_container(node), "") if isinstance(node, DictConfig) else {}
        _rewrite_chain(error, key, leaves)
        raise


def name_keys(message: str, key: str, leaves: dict[str, Any], scope: str = "") -> str:
    """``message`` with the parameter names it mentions replaced by their keys under ``key``.
    ``leaves``: relative path -> value of every key under the node; ``scope``: the relative path
    of the call that raised (Hydra's ``full_key``), preferred when several keys share a name."""

    def replace(match: re.Match) -> str:
        name, index, equals = match.groups()
        if not equals and not index and match.start() != 0:
            return match.group(0)  # a bare word mid-sentence is prose, not a parameter
        quoted = _quoted_value(message[match.end() :]) if equals else None
        path = _pick(name, quoted, leaves, scope)
        return match.group(0) if path is None else f"{key}.{path}{index}{equals}"

    rewritten = _NAME.sub(replace, message)
    # A value Python wrote as None is a YAML null on the command line.
    return re.sub(rf"(?<![\w.])({re.escape(key)}\.[\w.\[\]]+)=None\b", r"\1=null", rewritten)


def _quoted_value(rest: str) -> str | None:
    found = re.match(r"""('[^']*'|"[^"]*"|[^\s,;]*)""", rest)
    value = found.group(1) if found else ""
    return value.strip("'\"") if value[:1] in "'\"" else value.rstrip(":).")


def _pick(name: str, quoted: str | None, leaves: dict[str, Any], scope: str) -> str | None:
    named = [path for path in leaves if path.rsplit(".", 1)[-1] == name]
    if quoted is not None:
        same = [path for path in named if _same(leaves[path], quoted)]
        if same:
            named = same
        elif not named and len(quoted) > 1:  # the library's own name for a value a key holds
            named = [path for path, value in leaves.items() if isinstance(value, str) and value == quoted]
    if scope and len(named) > 1:
        named = [path for path in named if path.startswith(f"{scope}.")] or named
    if len(named) > 1:  # the node's own key before a nested one (data.root before data.val.root)
        shallowest = min(path.count(".") for path in named)
        named = [path for path in named if path.count(".") == shallowest]
    return named[0] if len(named) == 1 else None


def _same(value: Any, quoted: str) -> bool:
    if value is None:
        return quoted in ("None", "null")
    return str(value) == quoted or repr(value) == quoted


def _container(node: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 (an interpolation that itself fails: name what can be named)
        return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def _leaves(node: Any, path: str) -> dict[str, Any]:
    """Relative path -> value of every key (nested nodes and lists included, ``_target_`` & co. not)."""
    found: dict[str, Any] = {}
    if isinstance(node, dict):
        for name, value in node.items():
            if isinstance(name, str) and not name.startswith("_"):
                full = f"{path}.{name}" if path else name
                found[full] = value
                found.update(_leaves(value, full))
    return found


def _rewrite_chain(error: BaseException, key: str, leaves: dict[str, Any]) -> None:
    """Rewrite ``error``, and the errors Hydra's instantiate wrapped inside it, in place."""
    scope = ""
    seen: set[int] = set()
    current: BaseException | None = error
    chain = []
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        if isinstance(current, InstantiationException):
            found = _FULL_KEY.search(str(current))
            scope = found.group(1).removeprefix(f"{key}.") if found and found.group(1) != key else scope
        current = current.__cause__ if isinstance(current, InstantiationException) else None
    for raised in reversed(chain):  # the innermost first: a wrapper quotes its message
        _rewrite_args(raised, key, leaves, scope)


def _rewrite_args(error: BaseException, key: str, leaves: dict[str, Any], scope: str) -> None:
    if not error.args or not isinstance(error.args[0], str):
        return
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        cause = error.__cause__
        inner = cause.args[0] if cause.args and isinstance(cause.args[0], str) else None
        if inner is not None:  # Hydra quoted the cause's repr: quote the rewritten one instead
            head, _, tail = error.args[0].partition("\n")
            error.args = (f"{head}\n{type(cause).__name__}({inner!r}){_tail_of(tail)}", *error.args[1:])
        return
    error.args = (name_keys(error.args[0], key, leaves, scope), *error.args[1:])
    hint = getattr(error, "hint", None)
    if isinstance(hint, str):
        error.hint = name_keys(hint, key, leaves, scope)  # type: ignore[attr-defined]


def _tail_of(rest: str) -> str:
    """What Hydra wrote after the quoted cause (its ``full_key`` line), if anything."""
    found = _FULL_KEY.search("\n" + rest)
    return f"\nfull_key: {found.group(1)}" if found else ""
