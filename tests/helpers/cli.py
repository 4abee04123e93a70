"""A command line run in this process (``python -m MODULE ARGS``): seconds, where a subprocess pays
for importing torch and vlhub again."""

from __future__ import annotations

import contextlib
import logging
import runpy
import sys

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig


def run_module(module: str, args: list[str]) -> int | str | None:
    """``python -m module *args`` here (its ``__main__``); returns the exit code it stopped with (None: it
    returned). Hydra's global state and the process's logging are put back afterwards."""
    saved, hydra_config = sys.argv, HydraConfig.instance().cfg
    sys.argv = [module, *args]
    try:
        with logging_restored():
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = hydra_config  # the last job's hydra node (a sweep's too) is not left behind
    return None


@contextlib.contextmanager
def logging_restored():
    """Hydra's main configures logging for the process (handlers on this test's captured streams,
    existing loggers disabled); put every logger back afterwards, so later tests log as before."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, handlers, level, propagate, disabled in saved:
            lg.handlers[:] = handlers
            lg.level, lg.propagate, lg.disabled = level, propagate, disabled
        known = {id(lg) for lg in loggers}
        for name in list(logging.Logger.manager.loggerDict):  # loggers the command made: no handlers of its own
            made = logging.getLogger(name)
            if id(made) not in known:
                made.handlers[:] = []
