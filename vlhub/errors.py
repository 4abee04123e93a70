"""The error a config value that cannot work raises: it names the key, and says what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """A launch-time mistake in the config (a wrong type, a missing file, no GPU for ``cuda``).

    ``python -m vlhub.train`` and ``python -m vlhub.evaluate`` print it as one line and its
    ``hint`` instead of a traceback (``vlhub.launch.errors_reported``).
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
