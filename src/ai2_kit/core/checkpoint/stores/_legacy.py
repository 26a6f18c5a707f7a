"""The reference's 2023 single-file format, and its migration to the SQLite store."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import shutil
import time
from typing import Any, Iterator, Optional

from .._codec import Encoded
from .._errors import NotACheckpointStoreError, StoreOpenError
from ._base import Loader, Store
from ._directory import legacy_meta, unwrap_legacy
from ._fs import fsync_dir, temp_name
from ._sqlite import SQLITE_MAGIC, SQLiteStore

__all__ = ["LegacyFileStore", "migrate_legacy_file", "load_legacy_file"]

logger = logging.getLogger("ai2_kit.core.checkpoint")


def load_legacy_file(path: str) -> dict[str, Any]:
    """Unpickle a reference 2023 checkpoint file: ``{key: record}``."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except PermissionError as e:
        raise StoreOpenError(path, "permission denied", "Check the file's permissions") from e
    except Exception as e:
        raise NotACheckpointStoreError(
            path,
            f"it looks like a reference pickle file but cannot be read ({type(e).__name__}: {e})",
            "It may be truncated; restore it from a backup. The file is left untouched",
        ) from e
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise NotACheckpointStoreError(
            path, f"the pickle holds a {type(data).__name__}, not a dict of checkpoint entries",
            "Pick another path; the file is left untouched",
        )
    return data


def backup_path(path: str) -> str:
    """A new name beside ``path`` for a backup of a reference-format store."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = f"{path}.legacy-{stamp}.bak"
    n = 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.legacy-{stamp}-{n}.bak"
    return candidate


def migrate_legacy_file(path: str) -> tuple[SQLiteStore, Optional[str], int]:
    """Convert a reference 2023 file in place into an SQLite store.

    A backup copy is written beside it first (``PATH.legacy-<time>.bak``),
    the new store is built under a temporary name, every entry is read back
    and checked, and only then is it renamed over the old file. Concurrent
    migrations of one file serialize on a lock file; the loser finds the
    SQLite store already in place. Returns (store, backup path or None if
    someone else migrated, number of entries).
    """
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    lock_path = os.path.join(head, f".{tail}.migrate.lock")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                    store = SQLiteStore(path)
                    return store, None, len(store)
            data = load_legacy_file(path)
            backup = backup_path(path)
            shutil.copy2(path, backup)
            with open(backup, "rb") as f:
                os.fsync(f.fileno())
            created = os.stat(path).st_mtime
            tmp = temp_name(path)
            tmp_store = SQLiteStore(tmp, journal="delete")
            try:
                for key, record in data.items():
                    meta = legacy_meta(key, record, {"legacy": "reference-file", "created": created})
                    meta.pop("key", None)
                    tmp_store.put(key, unwrap_legacy(key, record), **meta)
                for key in data:  # verify: every entry reads back with its checksum
                    if tmp_store.lookup(key) is None:
                        raise RuntimeError(f"entry {key!r} missing after migration")
                tmp_store.close()
                if os.path.isdir(tmp + ".blobs"):
                    os.replace(tmp + ".blobs", path + ".blobs")
                os.replace(tmp, path)
                fsync_dir(os.path.dirname(path))
            except BaseException:
                tmp_store.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                shutil.rmtree(tmp + ".blobs", ignore_errors=True)
                raise
            logger.warning(
                "Migrated reference checkpoint file %s (%d entries) to the SQLite format; "
                "the original is kept at %s",
                path, len(data), backup,
            )
            # Safe to remove while locked: whoever locks the old inode next
            # re-checks the header above and finds the SQLite store.
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            return SQLiteStore(path), backup, len(data)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class LegacyFileStore(Store):
    """Reads a reference 2023 file (one cloudpickle dict); the first write migrates it.

    Reading needs the whole dict unpickled, as the reference did. Any write
    (put or delete) first migrates the file to the SQLite store, with a
    backup, and from then on this object forwards everything to that store.
    """

    kind = "legacy-file"

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        path = os.path.abspath(path)
        super().__init__(path, readonly=readonly)
        self.path = path
        self._data = load_legacy_file(path)
        self._created = os.stat(path).st_mtime
        self._sqlite: SQLiteStore | None = None
        self.backup: str | None = None

    def _migrated(self) -> SQLiteStore:
        if self._sqlite is None:
            self._sqlite, self.backup, _ = migrate_legacy_file(self.path)
            self._data = {}
            self.kind = "sqlite"
        return self._sqlite

    def _meta(self, key: str, record: Any) -> dict[str, Any]:
        return legacy_meta(key, record, {"key": key, "legacy": "reference-file", "created": self._created})

    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        if self._sqlite is not None:
            return self._sqlite._get(key)
        if key not in self._data:
            return None
        record = self._data[key]
        return self._meta(key, record), lambda signer: unwrap_legacy(key, record)

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        if self._sqlite is not None:
            return self._sqlite._get_meta(key)
        return self._meta(key, self._data[key]) if key in self._data else None

    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        self._migrated()._put(key, meta, encoded)

    def _delete(self, key: str) -> bool:
        return self._migrated()._delete(key)

    def _delete_many(self, keys: list[str]) -> int:
        return self._migrated()._delete_many(keys)

    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]:
        if self._sqlite is not None:
            yield from self._sqlite._iter_meta(prefix)
            return
        for key in sorted(self._data):
            if key.startswith(prefix):
                yield self._meta(key, self._data[key])

    def _close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
