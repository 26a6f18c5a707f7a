"""Storage engines behind one contract (``Store``), and the choice among them."""

from __future__ import annotations

import os
import stat
from typing import Any, Optional, Union

from .._errors import NotACheckpointStoreError, StoreOpenError
from ._base import FORMAT_VERSION, Hit, Store
from ._directory import DirectoryStore, is_pickle_head
from ._fs import file_kind, read_head, store_path
from ._legacy import LegacyFileStore, migrate_legacy_file
from ._shared import read_error, stat_error
from ._sqlite import SQLITE_MAGIC, SQLiteStore

__all__ = [
    "Store",
    "Hit",
    "FORMAT_VERSION",
    "SQLiteStore",
    "DirectoryStore",
    "LegacyFileStore",
    "migrate_legacy_file",
    "open_store",
    "is_postgres_url",
    "SIGNING_KEY_ENV",
]


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


#: Environment variable holding the signing key (see docs/security.md).
SIGNING_KEY_ENV = "AI2_KIT_CHECKPOINT_KEY"


def open_store(
    location: Any,
    *,
    prefer: str = "file",
    readonly: bool = False,
    signing_key: Optional[Union[bytes, str]] = None,
    **options: Any,
) -> Store:
    """Open the store that ``location`` names, choosing the engine from what is there.

    - a ``postgresql://`` URL: the PostgreSQL store (needs the ``postgres`` extra);
    - an existing directory: the directory store, when it is one (its marker,
      or reference 2024 per-key files recognised without unpickling) or is
      empty; any other folder is refused untouched (``adopt=True`` takes it);
    - an existing file: the SQLite store, or a reference 2023 pickle file;
    - a path that does not exist yet: created as ``prefer`` says, ``"file"``
      (SQLite) or ``"dir"`` (directory).

    ``signing_key`` (default: the ``AI2_KIT_CHECKPOINT_KEY`` environment
    variable) signs new entries with an HMAC and refuses, before unpickling,
    any entry whose MAC is missing or wrong.

    Raises StoreOpenError (or NotACheckpointStoreError) naming the location.
    """
    secret = signing_key if signing_key is not None else os.environ.get(SIGNING_KEY_ENV)
    store = _open(location, prefer, readonly, options, signed=bool(secret))
    if secret:
        store.set_signing_key(secret)
    return store


def _open(location: Any, prefer: str, readonly: bool, options: dict[str, Any], signed: bool) -> Store:
    if is_postgres_url(location):
        try:
            from ._postgres import PostgresStore
        except ImportError as e:
            raise StoreOpenError(
                _redact(location), f"the PostgreSQL driver is missing ({e})",
                'Install it with: pip install "ai2-kit-checkpoint[postgres]"',
            ) from e
        return PostgresStore(location, readonly=readonly, **options)
    if not isinstance(location, (str, os.PathLike)):
        raise StoreOpenError(repr(location), "a store location must be a path or a postgresql:// URL")
    path = store_path(location)
    adopt = bool(options.pop("adopt", False))
    st = _stat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return DirectoryStore(path, readonly=readonly, adopt=adopt)
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            # Never opened: a FIFO would block the open for ever, a device answer anything.
            raise NotACheckpointStoreError(path, f"it is {file_kind(st.st_mode)}",
                                           "Pick a regular file or a folder; it is left untouched")
        try:
            head = read_head(path, 16)
        except OSError as e:
            raise read_error(path, e) from e
        if head.startswith(SQLITE_MAGIC):
            return SQLiteStore(path, readonly=readonly, **options)
        if is_pickle_head(head):
            if signed:
                # A hit would unpickle the whole file, which runs whatever it
                # holds: exactly what a signing key is for.
                raise StoreOpenError(
                    path, "it is a reference pickle file, which carries no signatures, "
                    "and a signing key is in use; it was not unpickled",
                    f"If you trust the file, migrate it without the key ({SIGNING_KEY_ENV} unset), "
                    "then re-sign it with 'ai2-kit tool checkpoint copy'",
                )
            return LegacyFileStore(path, readonly=readonly)
        if not head:
            raise NotACheckpointStoreError(
                path, "the file is empty (0 bytes)", "Remove it or pick another path; it is not overwritten"
            )
        raise NotACheckpointStoreError(
            path, "it is neither a checkpoint store nor a reference pickle file",
            "Pick another path; the file is left untouched",
        )
    if readonly:
        raise StoreOpenError(path, "no such file or directory", "Check the path")
    if prefer == "dir":
        return DirectoryStore(path)
    return SQLiteStore(path, **options)


def _stat(path: str) -> os.stat_result | None:
    """``os.stat(path)``, None when nothing is there; other failures as one-line errors."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise stat_error(path, e) from e


def _redact(url: str) -> str:
    """A URL with its password replaced, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
