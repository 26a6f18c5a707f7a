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
from .._errors import CorruptEntryError, NotACheckpointStoreError
from ._base import Loader, Store
from ._directory import legacy_meta, unwrap_legacy
from ._fs import NotRegularFileError, fsync_dir, open_regular, temp_name
from ._inert import inert_load, inert_loads, remove_keys, shape
from ._shared import read_error
from ._sqlite import SQLITE_MAGIC, SQLiteStore

__all__ = ["LegacyFileStore", "migrate_legacy_file", "load_legacy_file", "read_legacy_file", "remove_from_legacy_file"]

logger = logging.getLogger("ai2_kit.core.checkpoint")


def _read(path: str, loader: Any) -> Any:
    try:
        with open_regular(path) as f:
            return loader(f)
    except NotRegularFileError as e:
        raise NotACheckpointStoreError(path, str(e.strerror), "Pick a checkpoint file") from e
    except OSError as e:
        raise read_error(path, e) from e
    except Exception as e:
        raise NotACheckpointStoreError(
            path,
            f"it looks like a reference pickle file but cannot be read ({type(e).__name__}: {e})",
            "It may be truncated; restore it from a backup. The file is left untouched",
        ) from e


def _check_shape(path: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise NotACheckpointStoreError(
            path, f"the pickle holds a {type(data).__name__}, not a dict of checkpoint entries",
            "Pick another path; the file is left untouched",
        )
    return data


def read_legacy_file(path: str) -> dict[str, Any]:
    """A reference 2023 file's ``{key: record}`` through the inert unpickler: nothing runs.

    Values come back as structure with placeholders where objects were;
    strings, numbers and flags (function name, call site, is_awaitable) as
    they are. Raises NotACheckpointStoreError for anything else.
    """
    return _check_shape(path, _read(path, inert_load))


def load_legacy_file(path: str) -> dict[str, Any]:
    """Unpickle a reference 2023 checkpoint file: ``{key: record}``. This runs the file's code."""
    return _check_shape(path, _read(path, pickle.load))


def backup_path(path: str) -> str:
    """A new name beside ``path`` for a backup of a reference-format store."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = f"{path}.legacy-{stamp}.bak"
    n = 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.legacy-{stamp}-{n}.bak"
    return candidate


@contextlib.contextmanager
def _edit_lock(path: str) -> Iterator[str]:
    """Hold the lock file beside a reference file: one process at a time converts or rewrites it.

    Yields the lock file's path (migration removes it once the file is SQLite).
    """
    head, tail = os.path.split(path)
    lock_path = os.path.join(head, f".{tail}.migrate.lock")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield lock_path
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _backup(path: str) -> str:
    """A durable copy of ``path`` beside it (``PATH.legacy-<time>.bak``), before it changes."""
    backup = backup_path(path)
    shutil.copy2(path, backup)
    with open(backup, "rb") as f:
        os.fsync(f.fileno())
    return backup


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
    with _edit_lock(path) as lock_path:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                store = SQLiteStore(path)
                return store, None, len(store)
        data = load_legacy_file(path)
        for key, record in data.items():
            if not isinstance(record, dict) or "return" not in record:
                # Checked before anything is written: a half-converted file helps nobody.
                raise CorruptEntryError(path, str(key), "its record has no 'return' field, so the file is "
                                        "not a reference checkpoint as written (nothing was changed)")
        backup = _backup(path)
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


def remove_from_legacy_file(path: str, keys: list[str]) -> tuple[int, str | None]:
    """Remove ``keys`` from a reference 2023 file in place, without unpickling it.

    Under the same lock file as migration, the file is re-read, a backup is
    written beside it (``PATH.legacy-<time>.bak``), the new bytes are built
    opcode by opcode (``_inert.remove_keys``), checked through the inert
    unpickler (the keys left, and each kept record's structure unchanged),
    written under a temporary name, fsynced and renamed over the file.
    Returns (number removed, backup path or None when nothing matched).
    If someone migrated the file to SQLite meanwhile, the keys are removed
    there.
    """
    path = os.path.abspath(path)
    head = os.path.dirname(path)
    with _edit_lock(path):
        with open_regular(path) as f:
            data = f.read()
        if data.startswith(SQLITE_MAGIC):
            with SQLiteStore(path) as store:
                return store.delete_many(keys), None
        before = _check_shape(path, _read(path, inert_load))
        drop = {k for k in keys if k in before}
        if not drop:
            return 0, None
        hint = f"Convert it first with 'ai2-kit tool checkpoint migrate {path}' (which unpickles it)"
        try:
            new, left = remove_keys(data, drop)
            after = _check_shape(path, inert_loads(new))
            # Read back: the keys left, and each kept record exactly as it was.
            same = list(after) == left and all(shape(after[k]) == shape(before[k]) for k in left)
        except Exception as e:  # a layout remove_keys does not follow, or too deep to compare
            raise NotACheckpointStoreError(
                path, f"its layout is not one this tool can edit without unpickling ({type(e).__name__}: {e})",
                hint,
            ) from e
        if not same:
            raise NotACheckpointStoreError(
                path, "removing entries would change the ones that stay; nothing was changed", hint
            )
        backup = _backup(path)
        tmp = temp_name(path)
        try:
            with open(tmp, "xb") as f:
                f.write(new)
                f.flush()
                os.fsync(f.fileno())
            shutil.copystat(path, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(head)
        logger.warning(
            "Removed %d %s from reference checkpoint file %s without unpickling it; "
            "the original is kept at %s", len(drop), "entry" if len(drop) == 1 else "entries", path, backup,
        )
        return len(drop), backup


class LegacyFileStore(Store):
    """A reference 2023 file (one cloudpickle dict), read without running it.

    Opening, listing, showing and verifying read the file through the inert
    unpickler (``_inert``): keys and each record's function, call site and
    flags, never a call. A hit unpickles the whole file for real (the
    format holds all values in one pickle), and is refused when a signing
    key is set: the format has no signatures. Removing entries rewrites the file without them, still
    without unpickling, after a backup. A new entry (put) migrates the file
    to the SQLite store first, with a backup, and from then on this object
    forwards everything to that store.
    """

    kind = "legacy-file"
    reference_format = True
    # Not before it is migrated: a first read loads and unpickles the whole
    # file, which is no small work for an event loop's thread.
    is_local = False
    # It becomes an SQLite store with its first save, and forwards to it.
    storage_errors = SQLiteStore.storage_errors
    damage_errors = SQLiteStore.damage_errors
    not_damage_errors = SQLiteStore.not_damage_errors

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        path = os.path.abspath(path)
        super().__init__(path, readonly=readonly)
        self.path = path
        self._data = read_legacy_file(path)
        self._loaded: dict[str, Any] | None = None  # the real unpickled dict, after a hit
        self._created = os.stat(path).st_mtime
        self._sqlite: SQLiteStore | None = None
        self.backup: str | None = None

    def _migrated(self) -> SQLiteStore:
        if self._sqlite is None:
            self._sqlite, self.backup, _ = migrate_legacy_file(self.path)
            self._data, self._loaded = {}, None
            self.kind = "sqlite"
            self.is_local = self.counts_cheaply = True
        return self._sqlite

    def describe(self) -> Optional[tuple[str, tuple[tuple[str, Any], ...]]]:
        return self.path, ()

    def _meta(self, key: str, record: Any) -> dict[str, Any]:
        meta = legacy_meta(key, record, {"key": key, "legacy": "reference-file", "created": self._created})
        if not isinstance(record, dict) or "return" not in record:
            meta["damaged"] = "the reference record has no 'return' field"
        return meta

    def _real(self) -> dict[str, Any]:
        if self._loaded is None:
            self._loaded = load_legacy_file(self.path)
        return self._loaded

    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        if self._sqlite is not None:
            return self._sqlite._get(key)
        if key not in self._data:
            return None

        def load(signer: Any) -> Any:
            # The one place this file is unpickled: a hit the caller asked for.
            record = self._real().get(key)
            return unwrap_legacy(key, record)

        return self._meta(key, self._data[key]), load

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        if self._sqlite is not None:
            return self._sqlite._get_meta(key)
        return self._meta(key, self._data[key]) if key in self._data else None

    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        self._migrated()._put(key, meta, encoded)

    def _delete(self, key: str) -> bool:
        return self._delete_many([key]) == 1

    def _delete_many(self, keys: list[str]) -> int:
        if self._sqlite is not None:
            return self._sqlite._delete_many(keys)
        removed, backup = remove_from_legacy_file(self.path, keys)
        if backup is not None:
            self.backup = backup
        self._data, self._loaded = read_legacy_file(self.path), None
        return removed

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
