"""The remote store of ``checkpoint.remote=URL`` (any fsspec URL: s3://, gs://, file://).

The remote mirrors the run folder: ``checkpoints/step_<N>.pt``, the logs (``results.jsonl``,
``run.json``, ``config.yaml``, ``tensorboard/``) and the small pointer ``<URL>/latest.json``
(``{"step", "path", "size", "run_id"}``), rewritten only once the checkpoint it names is whole
(``run/remote_uploader.py``); a requeued job on a new node restores from it
(``run/remote_restore.py``). Every file is written under a temporary name and renamed, so a name
on the remote is whole or absent. The launch probes the remote with a small write, so an
unreachable or read-only remote fails before anything trains.

Endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...) or ``checkpoint.remote_options`` (keyword arguments of the fsspec filesystem), never from
the URL; ``run/secrets.py`` hides the options' values wherever the config is stored or logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from vlhub.errors import ConfigError

log = logging.getLogger(__name__)
POINTER = "latest.json"
REMOTE_CHECKPOINT = re.compile(r"^checkpoints/step_\d+\.pt$")  # the only form a pointer may name
LOGS = ("results.jsonl", "run.json", "config.yaml")  # with every file under tensorboard/


class RemoteError(ConfigError):
    """The remote cannot be used (unreachable, not writable, credentials in the URL, another run's),
    or the run's last checkpoint never reached it: one line naming ``checkpoint.remote``."""


class RemoteStore:
    """One fsspec filesystem and the run's prefix on it; every call names ``checkpoint.remote``."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        parts = urlsplit(url)
        if "@" in parts.netloc or parts.query:
            raise RemoteError(
                "checkpoint.remote must not carry credentials or options (user:secret@ or ?key=): give them "
                "through the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or checkpoint.remote_options"
            )
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **_plain(options or {}))
        except (ImportError, ValueError, TypeError) as error:
            raise RemoteError(f"checkpoint.remote={self.url}: {error}") from None
        self.root = self.root.rstrip("/")
        if getattr(self.fs, "auto_mkdir", None) is False:  # a local or mounted folder: make parents
            self.fs.auto_mkdir = True

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def inside(self, relative: str) -> str:
        """The full path of ``relative``, refused unless it stays under the prefix once ``..`` and, on a
        local or mounted folder, symlinks are resolved: nothing read from the remote points elsewhere."""
        full = posixpath.normpath(self.path(relative))
        if relative.startswith("/") or not full.startswith(f"{self.root}/"):
            raise RemoteError(f"checkpoint.remote={self.url}: {relative!r} leads outside the remote prefix: refused")
        if self.local:
            real, root = os.path.realpath(full), os.path.realpath(self.root)
            if not real.startswith(f"{root}{os.sep}"):
                raise RemoteError(
                    f"checkpoint.remote={self.url}: {relative!r} is a link to {real}, outside the remote prefix: "
                    "refused"
                )
        return full

    @property
    def local(self) -> bool:
        """A local or mounted folder (file://), where a path can be a symlink."""
        return "file" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol)

    def probe(self) -> None:
        """A small write and delete under the prefix: fails at launch, not after the first checkpoint."""
        target = self.path(f".vlhub-probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(target, b"vlhub write probe\n")
            self.fs.rm_file(target)
        except Exception as error:  # noqa: BLE001 (network, permission, missing bucket: all the same to us)
            raise RemoteError(
                f"checkpoint.remote={self.url} is not writable ({type(error).__name__}: {error}); check the "
                "bucket, the endpoint (AWS_ENDPOINT_URL or checkpoint.remote_options) and the credentials"
            ) from None

    def read_pointer(self) -> dict[str, Any] | None:
        try:
            self.fs.invalidate_cache()
            pointer = json.loads(self.fs.cat_file(self.inside(POINTER)))
        except FileNotFoundError:
            return None
        except ValueError as error:
            log.warning("checkpoint.remote=%s: unreadable %s (%s): ignored", self.url, POINTER, error)
            return None
        return pointer if isinstance(pointer, dict) and "path" in pointer else None

    def put(self, local: Path, relative: str) -> None:
        """Upload under a temporary name, rename, and check the size: the name is whole or absent."""
        final, tmp = self.path(relative), self.path(f"{relative}.{uuid.uuid4().hex[:8]}.uploading")
        try:
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):  # nothing was written, or the remote is gone
                self.fs.rm_file(tmp)
            raise
        self.fs.invalidate_cache()
        size, expected = self.fs.size(final), local.stat().st_size
        if size != expected:
            raise OSError(f"{final} holds {size} bytes after the upload, expected {expected}")

    def write_pointer(self, pointer: dict[str, Any]) -> None:
        tmp = self.path(f"{POINTER}.{uuid.uuid4().hex[:8]}.uploading")
        self.fs.pipe_file(tmp, json.dumps(pointer).encode())
        self.fs.mv(tmp, self.path(POINTER))

    def get(self, relative: str, local: Path) -> None:
        """Download into a temporary file next to ``local``, then rename it into place."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download.tmp")
        try:
            self.fs.get_file(self.inside(relative), str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def list_files(self, relative: str, partial: bool = False) -> list[str]:
        """Paths (relative to the prefix) of the files under ``relative``, temporary ones only when
        ``partial``; none when it is absent."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.path(relative))
        except FileNotFoundError:
            return []
        start = len(self.root) + 1
        return [p[start:] for p in found if partial or not p.endswith(".uploading")]


def _plain(value: Any) -> Any:
    """Nested mappings (Hydra's DictConfig among them) as plain dicts, for the filesystem's kwargs."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, (list, tuple)) else value


def open_store(url: str, options: dict[str, Any] | None = None) -> RemoteStore:
    """At launch: the store of ``checkpoint.remote``, probed with a small write."""
    store = RemoteStore(url, options)
    store.probe()
    return store
