"""The resolvers the YAML uses to read the code instead of repeating it.

- ``${default:}``: the default of the parameter this key sets, read from the signature of the
  node's ``_target_`` (following ``**kwargs`` into base classes, as the launch-time type check
  does). A component's defaults have one home, its signature; its YAML names each key (so the
  command line can set it and ``--help`` lists it) and writes a value only where the option
  means something else than the Python default (``objective=lit``: ``lock_image: true``).
- ``${vlhub_objectives:}``: every registered objective, comma-separated (the comparison
  preset's sweep), so a new objective joins the comparison by registering.

Registered when the config package is imported (``vlhub/configs/__init__.py``), i.e. whenever
Hydra composes vlhub's configs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, Node, OmegaConf


def init_chain(target: Any) -> Iterator[tuple[Callable, inspect.Signature]]:
    """Each callable whose parameters ``target`` takes, with its signature: a function itself; a class's
    ``__init__`` and, while one passes ``**kwargs`` on, its bases' ``__init__`` (the MRO's order)."""
    chain = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if isinstance(target, type) else [target]
    for function in chain:
        signature = inspect.signature(function)
        yield function, signature
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return


def signature_defaults(target: Any) -> dict[str, Any]:
    """Parameter name -> default of ``target`` (a class: its ``__init__`` chain through ``**kwargs``)."""
    found: dict[str, Any] = {}
    for _, signature in init_chain(target):
        for name, parameter in signature.parameters.items():
            if parameter.default is not parameter.empty:
                found.setdefault(name, parameter.default)
    return found


def component_defaults(config: Any) -> dict[str, Any]:
    """Every component's signature defaults, nested where it sits in ``config`` (a plain, resolved
    config; a component is a mapping with a ``_target_``): what a key a later vlhub added to a component
    holds when a run folder's stored config lacks it (``vlhub.run.config_changes``)."""
    if not isinstance(config, dict):
        return {}
    found: dict[str, Any] = {}
    target = config.get("_target_")
    if isinstance(target, str):
        try:
            found = {name: _as_stored(value) for name, value in signature_defaults(get_object(target)).items()}
        except (ImportError, ValueError, TypeError):  # no importable target or signature: building it says so
            found = {}
    for key, value in config.items():
        inner = component_defaults(value)
        if inner:
            found[key] = inner
    return found


def _as_stored(value: Any) -> Any:
    """A default as a stored config holds it (a tuple is a list)."""
    return [_as_stored(item) for item in value] if isinstance(value, (tuple, list)) else value


def _plain(value: Any) -> Any:
    """A default as YAML holds it: a tuple or list is a ListConfig (a plain list cannot be resolved
    in place, as ``--cfg job --resolve`` and ``OmegaConf.resolve`` do)."""
    if isinstance(value, (tuple, list)):
        return OmegaConf.create(list(value))
    return value


def default_of(*, _parent_: DictConfig, _node_: Node) -> Any:
    name, target = _node_._key(), _parent_.get("_target_")
    if not isinstance(target, str):
        raise ValueError(f"{name}: ${{default:}} needs a _target_ beside it to read the default from")
    defaults = signature_defaults(get_object(target))
    if name not in defaults:
        raise ValueError(f"{name}: ${{default:}}, but {target} has no default for {name}")
    return _plain(defaults[name])


def registered_objectives() -> str:
    import vlhub.objectives  # noqa: F401  (registers every objective)
    from vlhub.registry import list_objectives

    return ",".join(list_objectives())


OmegaConf.register_new_resolver("default", default_of, replace=True)
OmegaConf.register_new_resolver("vlhub_objectives", registered_objectives, replace=True)
