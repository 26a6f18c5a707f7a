"""The directory store: one file per key, written under a temporary name then renamed
(``DirectoryStore``: entry files read, written, removed and listed; leftovers of killed writers)."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import stat
from typing import Any, Iterator, Optional

from ..._codec import Encoded, Signer, meta_from_json, meta_to_json, read_frame, settle_crc, verifier_for, write_all
from ..._errors import NotACheckpointStoreError, StoreOpenError
from .._base import Loader, Store
from .._fs import (
    HOST,
    NotRegularFileError,
    ensure_durable,
    folders_between,
    fsync_dir,
    fsync_file,
    identity,
    left_by_dead_writer,
    make_dirs,
    open_regular,
    store_path,
    temp_name,
)
from .._inert import inert_load
from .._shared import stat_error
from ._claims import ClaimsAndRuns
from ._names import (
    ENTRY_MAGIC,
    MARKER,
    SHORT,
    SUFFIX,
    U32,
    encode_part,
    is_our_entry_file,
    is_reference_entry,
    is_regular,
    legacy_meta,
    unquote,
    unwrap_legacy,
)

__all__ = ["DirectoryStore"]


def _rewrite_record(f: Any, meta: dict[str, Any], width: int) -> None:
    """Write ``meta``'s record over the one of the same width at the head of the open entry ``f``."""
    record = meta_to_json(meta).encode("utf-8")
    if len(record) != width:  # only hex digits changed: cannot happen
        raise RuntimeError(f"the metadata record changed width ({width} -> {len(record)} bytes)")
    view = memoryview(record)
    done = 0
    while done < width:
        n = os.pwrite(f.fileno(), view[done:], len(ENTRY_MAGIC) + U32.size + done)
        if n <= 0:
            raise OSError(f"no progress writing {width - done} more bytes")
        done += n


class DirectoryStore(ClaimsAndRuns, Store):
    """A checkpoint store as a directory tree (the default of ``set_checkpoint_dir``).

    Key ``a/b/c`` lives in ``DIR/a/b/c.ckpt``: magic, metadata JSON, then the
    value's frame. Writers write a temporary file whose name carries host and
    pid, fsync it and rename it into place: readers see the old entry or the
    new one, never half of one, with no lock at all, which is what keeps it
    safe on NFS and Lustre. Leftover temporary files of killed writers are
    hidden names and ignored.

    Trust: the store reads, lists, overwrites and deletes only what it can
    recognise as its own (the marker file ``DIR/.ai2-kit-checkpoint``, the
    ``.ckpt`` suffix and the entry magic) or as a per-key file of the
    reference's 2024 layout (a pickle whose first bytes are the reference's
    record, recognised without unpickling). An existing folder that holds
    neither, nor is empty, is refused untouched (``adopt=True`` takes it
    anyway; its other files stay invisible to the store).
    """

    kind = "directory"
    supports_claims = True
    checksum_while_writing = True
    is_local = True
    prefer = "dir"

    def __init__(self, path: str, *, readonly: bool = False, create: bool = True, adopt: bool = False) -> None:
        path = store_path(path)
        super().__init__(path, readonly=readonly)
        self.root = path
        self._marker_ok = False
        #: (st_dev, st_ino) of the folder when opened: a flush must not write into a replacement.
        self._opened_id: tuple[int, int] | None = None
        #: "current" (marked, or holding our entries), "reference-dir", or "new" (empty).
        self.layout = "current"
        #: True when the marker says the store was made empty by this library, so
        #: no reference per-key file can be in it: their look-ups are skipped.
        self._no_reference = False
        #: Keys whose reference per-key file this process saw absent or removed:
        #: not looked up again (the store never writes such files).
        self._no_reference_for: set[str] = set()
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise stat_error(path, e) from e
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise NotACheckpointStoreError(
                path, "it is a file, not a directory",
                "Use set_checkpoint_file() for a single-file store",
            )
        if st is None:
            if not create or readonly:
                raise StoreOpenError(path, "no such directory", "Check the path")
            self._create_root()
            self._opened_id = identity(path)
            return
        self._opened_id = (st.st_dev, st.st_ino)
        if not os.access(path, os.R_OK | os.X_OK):
            raise StoreOpenError(path, "permission denied", "Check the directory's permissions")
        marker = os.path.join(path, MARKER)
        if os.path.lexists(marker):
            self._read_marker(marker)
        else:
            self._classify(adopt)
        if not self.readonly and not os.access(path, os.W_OK):
            self.readonly, self.readonly_reason = True, "no write permission on the directory"
        if adopt and not self.readonly:
            self._ensure_marker()

    # -- paths ----------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        return [encode_part(p) for p in key.split("/")]

    def _path(self, key: str) -> str:
        parts = self._parts(key)
        parts[-1] += SUFFIX
        return os.path.join(self.root, *parts)

    def _legacy_path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    # -- reading ----------------------------------------------------------------
    @staticmethod
    def _read_head(f: Any, path: str) -> dict[str, Any]:
        head = f.read(8)
        if len(head) < 8 or head[:4] != ENTRY_MAGIC:
            raise ValueError(f"{path} is not a checkpoint entry file")
        (n,) = U32.unpack_from(head, 4)
        text = f.read(n)
        if len(text) != n:
            raise ValueError(f"{path} is truncated")
        return meta_from_json(text)

    def _open_entry(self, path: str) -> Any:
        """Our entry file at ``path`` opened for reading, or None when there is none.

        One open (``O_NOFOLLOW | O_NONBLOCK``) and the type checked on the
        open descriptor: no look-up before it, which on NFS and Lustre would
        be one more round trip per hit.
        """
        try:
            return open_regular(path, nofollow=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except NotRegularFileError as e:
            if e.errno == errno.ELOOP:
                # We never write links; following one would read (and a
                # rerun replace) something outside the store.
                raise ValueError(f"{path} is a symbolic link, not an entry file") from e
            raise ValueError(f"{path}: {e.strerror}") from e
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                return None
            raise

    def _read_meta_file(self, path: str) -> dict[str, Any] | None:
        f = self._open_entry(path)
        if f is None:
            return None
        with f:
            return self._read_head(f, path)

    def _reference_file(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """(path, listing fields) of ``key``'s reference per-key file, or None; no look-up
        when the store cannot hold one or this process saw it absent."""
        if self._no_reference or key in self._no_reference_for:
            return None
        path = self._legacy_path(key)
        base = self._legacy_base(key, path)
        if base is None:
            self._seen_without_reference(key)
            return None
        return path, base

    def _seen_without_reference(self, key: str) -> None:
        if len(self._no_reference_for) >= 1 << 16:
            self._no_reference_for.clear()  # the memory only spares look-ups: start again
        self._no_reference_for.add(key)

    def _legacy_base(self, key: str, path: str) -> dict[str, Any] | None:
        """Listing fields of a reference per-key file at ``path``, or None if there is none."""
        try:
            st = os.lstat(path)
        except OSError:  # missing, a file where a folder is, a name too long...
            return None
        if not stat.S_ISREG(st.st_mode) or not is_reference_entry(path):
            return None
        return {"key": key, "legacy": "reference-dir", "size": st.st_size, "created": st.st_mtime}

    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        path = self._path(key)
        f = self._open_entry(path)
        if f is None:
            return self._get_legacy(key)
        try:
            meta = self._read_head(f, path)
        except Exception:
            f.close()
            raise

        def load(signer: Signer | None) -> Any:
            return read_frame(f, meta.get("crc32"), path, verifier_for(signer, meta))

        load.close = f.close  # type: ignore[attr-defined]
        return meta, load

    def _get_legacy(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        found = self._reference_file(key)
        if found is None:
            return None
        path, base = found
        meta = dict(base)

        def load(signer: Signer | None) -> Any:
            # The one place a reference file is unpickled: a hit the workflow
            # asked for (Store._load refuses it first when a signing key is set).
            with open_regular(path) as f:
                record = pickle.load(f)  # cloudpickle's output needs no cloudpickle to load
            meta.update(legacy_meta(key, record, meta))
            return unwrap_legacy(key, record)

        return meta, load

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        meta = self._read_meta_file(self._path(key))
        if meta is None:
            found = self._reference_file(key)
            if found is not None:
                meta = self._legacy_details(key, *found)
        return meta

    @staticmethod
    def _legacy_details(key: str, path: str, base: dict[str, Any]) -> dict[str, Any]:
        """A reference file's own fields, read through the inert unpickler (nothing runs)."""
        try:
            with open_regular(path) as f:
                record = inert_load(f)
            unwrap_legacy(key, record)
        except Exception as e:  # any failure to parse is damage of that file
            return {**base, "damaged": f"the reference file cannot be read ({type(e).__name__}: {e})"}
        return legacy_meta(key, record, base)

    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        self._ensure_marker()
        final = self._path(key)
        parent = os.path.dirname(final)
        late = meta.get("crc32") is None
        if late:
            # A big frame's checksum is computed while the frame is written
            # (Encoded.write_to); the record goes before the frame, so it is
            # written with a placeholder of the same width and rewritten in
            # place once the checksum is known, before the fsync.
            meta["crc32"] = "0" * 8
        meta_bytes = meta_to_json(meta).encode("utf-8")
        for attempt in range(5):
            tmp = temp_name(final)
            try:
                f = open(tmp, "xb", buffering=0)
            except FileNotFoundError:
                # The folder is missing (a new one, or a concurrent rm pruned it
                # just now): made only then, so a save into an existing folder
                # looks nothing up first.
                if attempt == 4:
                    raise
                make_dirs(parent, self.root)
                continue
            try:
                with f:
                    try:
                        write_all(f, memoryview(ENTRY_MAGIC + U32.pack(len(meta_bytes)) + meta_bytes))
                        encoded.write_to(f)
                        if late:
                            meta["crc32"] = None
                            settle_crc(meta, encoded)
                            _rewrite_record(f, meta, len(meta_bytes))
                    except OSError as e:
                        if e.filename is not None:
                            raise
                        # A failed write names no file by itself: name the entry.
                        raise OSError(e.errno, f"{e.strerror or e} while writing the entry", final) from e
                    fsync_file(f.fileno(), final)
                # Rename, not rewrite: a kill mid-write must leave the old entry.
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            break
        fsync_dir(parent)
        # Every folder above the entry holds the name of the next one: all of
        # them must be durable before the save returns, whoever created them
        # (another writer may have made ``parent`` a moment ago and not yet
        # fsynced its parent). Known-durable folders cost one stat each.
        ensure_durable(folders_between(self.root, parent), outside=1)
        found = self._reference_file(key)
        if found is not None:
            # Ours now shadows the reference file; remove it so ls shows one entry.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(found[0])
            self._seen_without_reference(key)

    def _delete(self, key: str) -> bool:
        return self._delete_many([key]) == 1

    def _unlink_entry(self, key: str) -> str | None:
        """Remove ``key``'s files; the folder they were in, or None when there were none."""
        removed = False
        path = self._path(key)
        # Only a file that is ours by its marks: the suffix and the magic, or
        # the suffix in a folder we marked (then a bad magic is damage).
        if is_regular(path) and (self._marker_ok or is_our_entry_file(path)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)
                removed = True
        found = self._reference_file(key)
        if found is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(found[0])
                removed = True
            self._seen_without_reference(key)
        return os.path.dirname(path) if removed else None

    def _delete_many(self, keys: list[str]) -> int:
        folders: dict[str, None] = {}
        removed = 0
        for key in keys:
            folder = self._unlink_entry(key)
            if folder is not None:
                removed += 1
                folders.setdefault(folder)
        # A removal that a power cut undid would bring a stale result back:
        # each folder that lost names is fsynced, once, before returning.
        for folder in folders:
            fsync_dir(folder, missing_ok=True)  # gone: another rm removed it and all in it
        for folder in sorted(folders, key=len, reverse=True):
            self._prune(folder)
        return removed

    def _prune(self, folder: str) -> None:
        """Remove folders left empty by a delete, up to the root."""
        while os.path.abspath(folder) != self.root and folder.startswith(self.root):
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = os.path.dirname(folder)

    def describe(self) -> Optional[tuple[str, tuple[tuple[str, Any], ...]]]:
        return self.root, ()

    # -- leftovers of killed writers ---------------------------------------------
    def orphan_files(self) -> list[str]:
        return self.leftover_temp_files()

    def leftover_temp_files(self, min_age: float = 86400.0) -> list[str]:
        """Temporary files whose writer died (a dead pid of this host, or old and from another host).

        Listing ignores them; this finds them so they can be removed. It walks
        the whole tree, so it is not run on every open.
        """
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not (name.startswith(".") and name.endswith(".tmp")):
                    continue
                # .{name}.{host}.{pid}.{token}.tmp, where name and host may hold dots
                head, pid, _token, _ = name.rsplit(".", 3) if name.count(".") >= 4 else ("", "", "", "")
                host = HOST if head.endswith("." + HOST) else ""
                path = os.path.join(dirpath, name)
                if left_by_dead_writer(path, host, pid, min_age):
                    found.append(path)
        return sorted(found)

    def remove_dead_writers_files(self, min_age: float = 86400.0) -> list[str]:
        """Remove what ``leftover_temp_files`` finds; returns the removed paths."""
        removed = []
        for path in self.leftover_temp_files(min_age):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed

    # -- listing ----------------------------------------------------------------
    def _scan(self, prefix: str) -> list[tuple[str | None, str, bool]]:
        """(key, path, is_ours) for every entry whose key may start with ``prefix``.

        Names only, no file is opened: sorting needs every key first, because
        walk order is not key order ('a-c' sorts before 'a/b'). The key is
        None for our files under a shortened (too long) name: only their
        metadata knows it.
        """
        found: dict[str, tuple[str, bool]] = {}
        unknown: list[str] = []
        top = self.root
        if "/" in prefix:
            # Start at the deepest folder the prefix names; keys with '%', a
            # leading '.', a '.ckpt' part or a long part are encoded on disk,
            # so only plain folder names narrow the walk.
            folders = prefix.rsplit("/", 1)[0].split("/")
            if all(encode_part(p) == p for p in folders):
                top = os.path.join(self.root, *folders)

        def unreadable(e: OSError) -> None:
            if isinstance(e, (FileNotFoundError, NotADirectoryError)):
                return  # no such folder (an empty prefix), or removed while we walk
            # A folder we may not read would silently hide its entries.
            raise StoreOpenError(e.filename or self.root, f"cannot read a folder of the store ({e.strerror})",
                                 "Check the permissions of the store's folders")

        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            rel_parts = [] if rel == "." else rel.split(os.sep)
            short_dir = any(SHORT in p for p in rel_parts)
            for name in filenames:
                if name.startswith("."):
                    continue  # the marker, temporary files of killed writers
                path = os.path.join(dirpath, name)
                if name.endswith(SUFFIX):
                    if short_dir or SHORT in name:
                        unknown.append(path)
                        continue
                    key = "/".join(unquote(p) for p in [*rel_parts, name[: -len(SUFFIX)]])
                    if key.startswith(prefix):
                        found[key] = (path, True)
                        continue
                if short_dir or self._no_reference:
                    continue  # the reference never wrote names this long, nor into this store
                key = "/".join([*rel_parts, name])
                if key.startswith(prefix):
                    found.setdefault(key, (path, False))
        out: list[tuple[str | None, str, bool]] = [(k, p, ours) for k, (p, ours) in sorted(found.items())]
        return out + [(None, p, True) for p in sorted(unknown)]

    def _entry_meta(self, key: str | None, path: str) -> dict[str, Any] | None:
        """The metadata of our entry file at ``path``, or a damage record; None if not ours."""
        shown = key if key is not None else os.path.relpath(path, self.root)
        try:
            # One open per entry, the type checked on the descriptor.
            f = open_regular(path, nofollow=True)
        except NotRegularFileError:
            return None  # we write only regular files: a FIFO, socket or link is someone else's
        except (FileNotFoundError, NotADirectoryError):
            return None  # removed while listing
        except OSError as e:
            return {"key": shown, "damaged": f"cannot read {path} ({e.strerror or e})"}
        try:
            with f:
                meta: dict[str, Any] | None = self._read_head(f, path)
        except ValueError as e:
            if not self._marker_ok and not is_our_entry_file(path):
                return None  # someone else's '.ckpt' file in a folder we did not mark
            return {"key": shown, "damaged": str(e)}
        except OSError as e:
            return {"key": shown, "damaged": f"cannot read {path} ({e.strerror or e})"}
        if meta is None:
            return None  # removed while listing
        real = meta.get("key")
        if key is None:
            if not isinstance(real, str) or self._path(real) != path:
                return {"key": shown, "damaged": f"{path} holds entry {real!r}"}
        elif real != key:
            return {"key": key, "damaged": f"{path} holds entry {real!r}"}
        return meta

    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]:
        scanned = self._scan(prefix)
        # Entries under shortened names: their key, hence their place in the
        # order, is known only from their metadata.
        resolved: list[tuple[str, str, bool, dict[str, Any] | None]] = []
        for key, path, ours in scanned:
            if key is None:
                meta = self._entry_meta(None, path)
                if meta is not None and str(meta["key"]).startswith(prefix):
                    resolved.append((str(meta["key"]), path, ours, meta))
            else:
                resolved.append((key, path, ours, None))
        if any(k is None for k, _, _ in scanned):
            resolved.sort(key=lambda r: r[0])
        for key, path, ours, meta in resolved:
            if meta is None:
                meta = self._entry_meta(key, path) if ours else self._legacy_base(key, path)
            if meta is not None:
                yield meta
