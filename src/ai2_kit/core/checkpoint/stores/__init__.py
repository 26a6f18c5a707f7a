"""Storage engines behind one contract (``Store``), and the choice among them."""

from __future__ import annotations

import os
from typing import Any

from .._errors import NotACheckpointStoreError, StoreOpenError
from ._base import FORMAT_VERSION, Hit, Store
from ._directory import DirectoryStore, is_pickle_head
from ._legacy import LegacyFileStore, migrate_legacy_file
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
]


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_store(location: Any, *, prefer: str = "file", readonly: bool = False, **options: Any) -> Store:
    """Open the store that ``location`` names, choosing the engine from what is there.

    - a ``postgresql://`` URL: the PostgreSQL store (needs the ``postgres`` extra);
    - an existing directory: the directory store (reads reference 2024 directories);
    - an existing file: the SQLite store, or a reference 2023 pickle file;
    - a path that does not exist yet: created as ``prefer`` says, ``"file"``
      (SQLite) or ``"dir"`` (directory).

    Raises StoreOpenError (or NotACheckpointStoreError) naming the location.
    """
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
    path = os.path.abspath(os.fspath(location))
    if os.path.isdir(path):
        return DirectoryStore(path, readonly=readonly)
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except PermissionError as e:
            raise StoreOpenError(path, "permission denied", "Check the file's permissions") from e
        if head.startswith(SQLITE_MAGIC):
            return SQLiteStore(path, readonly=readonly, **options)
        if is_pickle_head(head):
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


def _redact(url: str) -> str:
    """A URL with its password replaced, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
