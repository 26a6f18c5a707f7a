"""The directory store: one file per key, written under a temporary name then renamed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import stat
import struct
import time
from typing import Any, Iterator

from .._codec import Encoded, Signer, meta_from_json, meta_to_json, read_frame, settle_crc, verifier_for, write_all
from .._errors import NewerFormatError, NotACheckpointStoreError, StoreOpenError
from ._base import FORMAT_VERSION, MAX_RUN_BYTES, Loader, Store, library_version, parse_run
from ._fs import (
    HOST,
    DurabilityError,
    NotRegularFileError,
    ensure_durable,
    file_kind,
    fix_for,
    folders_between,
    fsync_dir,
    fsync_file,
    gone_reason,
    identity,
    left_by_dead_writer,
    make_dirs,
    open_regular,
    read_head,
    replace_file,
    store_path,
    temp_name,
)
from ._inert import HEAD_BYTES, inert_load, is_reference_record_head

logger = logging.getLogger(__name__)

__all__ = ["DirectoryStore", "ENTRY_MAGIC", "MARKER", "legacy_meta", "is_pickle_head", "is_reference_entry"]

ENTRY_MAGIC = b"A2KE"
SUFFIX = ".ckpt"
MARKER = ".ai2-kit-checkpoint"
CLAIMS = ".claims"
RUNS = ".runs"
_U32 = struct.Struct("<I")
_MAX_NAME = 250  # bytes; most file systems allow 255 per name
#: Marks a path component shortened to fit a file name: the head of the
#: quoted part, ``%L``, then a digest of the whole part. ``_quote`` turns every
#: '%' into '%25', so no unshortened component contains ``%L``.
_SHORT = "%L"
_SHORT_HEAD = 150  # bytes of the part kept in front of the digest, for people reading the tree


def is_pickle_head(head: bytes) -> bool:
    """True for the start of a pickle of protocol 2 or newer (what cloudpickle writes)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _quote(part: str) -> str:
    # '%' first, then anything that would make the name hidden or look like
    # one of our own entry files, so that every key maps to one file and back.
    part = part.replace("%", "%25")
    if part.startswith("."):
        part = "%2E" + part[1:]
    if part.endswith(SUFFIX):
        part = part[: -len(SUFFIX)] + "%2E" + SUFFIX[1:]
    return part


def _unquote(part: str) -> str:
    return part.replace("%2E", ".").replace("%25", "%")


def _encode_part(part: str) -> str:
    """The file name of one key part (without the suffix), shortened by a digest when too long.

    A valid key may be 1,024 bytes, a file name only 255: a long part keeps
    its head and gets a digest of the whole part; the full key is in the
    entry's metadata, which listing reads for such names.
    """
    quoted = _quote(part)
    if len(quoted.encode("utf-8")) + len(SUFFIX) <= _MAX_NAME:
        return quoted
    head = quoted.encode("utf-8")[:_SHORT_HEAD].decode("utf-8", "ignore")
    cut = head.rfind("%")
    if cut >= 0 and cut > len(head) - 3:  # never end inside a %XX escape
        head = head[:cut]
    return head + _SHORT + hashlib.sha256(part.encode("utf-8")).hexdigest()[:40]


def legacy_meta(key: str, record: object, base: dict[str, Any]) -> dict[str, Any]:
    """Metadata for a reference-format record ``{'return', 'is_awaitable', 'info'}``."""
    meta = dict(base)
    if isinstance(record, dict):
        info = record.get("info") or {}
        if isinstance(info, dict):
            for name in ("fn_name", "call_site"):
                value = info.get(name)
                # Only plain strings: under the inert reader anything else is a placeholder.
                meta.setdefault(name, value if isinstance(value, str) or value is None else repr(value))
        meta["is_awaitable"] = record.get("is_awaitable", False) is True
    return meta


def unwrap_legacy(key: str, record: object) -> Any:
    if not isinstance(record, dict) or "return" not in record:
        raise ValueError(f"reference record for {key!r} has no 'return' field")
    return record["return"]


def is_reference_entry(path: str) -> bool:
    """Whether ``path`` is a regular file that starts like a reference per-key record.

    Looks at the file's type (never opening a FIFO or device) and its first
    bytes; nothing is unpickled.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return is_reference_record_head(read_head(path, HEAD_BYTES))
    except OSError:
        return False


def _is_our_entry_file(path: str) -> bool:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return read_head(path, len(ENTRY_MAGIC)) == ENTRY_MAGIC
    except OSError:
        return False


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _rewrite_record(f: Any, meta: dict[str, Any], width: int) -> None:
    """Write ``meta``'s record over the one of the same width at the head of the open entry ``f``."""
    record = meta_to_json(meta).encode("utf-8")
    if len(record) != width:  # only hex digits changed: cannot happen
        raise RuntimeError(f"the metadata record changed width ({width} -> {len(record)} bytes)")
    view = memoryview(record)
    done = 0
    while done < width:
        n = os.pwrite(f.fileno(), view[done:], len(ENTRY_MAGIC) + _U32.size + done)
        if n <= 0:
            raise OSError(f"no progress writing {width - done} more bytes")
        done += n


def _is_our_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _read_run_file(path: str) -> bytes:
    """The bytes of a run record file: a regular file, not a link, of at most ``MAX_RUN_BYTES``.

    Like an entry file, never followed (``O_NOFOLLOW``: a link to another
    user's JSON is not this store's run), never waited on (``O_NONBLOCK``: a
    FIFO), and read only up to the bound (a link to /dev/zero, a huge file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"it is {file_kind(st.st_mode)}, not a run record file", path)
        if st.st_size > MAX_RUN_BYTES:
            raise OSError(errno.EFBIG, f"it holds {st.st_size} bytes, more than a run record may", path)
        data = f.read(MAX_RUN_BYTES + 1)
        if len(data) > MAX_RUN_BYTES:
            raise OSError(errno.EFBIG, "it grew beyond the size a run record may have", path)
        return data


def _run_file_problem(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "it is a symbolic link, not a run record file of this store"
    return e.strerror or str(e)


class DirectoryStore(Store):
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

    def __init__(self, path: str, *, readonly: bool = False, create: bool = True, adopt: bool = False) -> None:
        path = store_path(path)
        super().__init__(path, readonly=readonly)
        self.root = path
        self._marker_ok = False
        #: (st_dev, st_ino) of the folder when opened: a flush must not write into a replacement.
        self._opened_id: tuple[int, int] | None = None
        #: "current" (marked, or holding our entries), "reference-dir", or "new" (empty).
        self.layout = "current"
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except NotADirectoryError as e:
            raise StoreOpenError(path, "a parent of the path is a file, not a folder", "Check the path") from e
        except PermissionError as e:
            raise StoreOpenError(path, "permission denied", "Check the permissions of its folders") from e
        except OSError as e:  # a loop of links, a name too long...
            raise StoreOpenError(path, e.strerror or str(e), fix_for(e)) from e
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

    def _create_root(self) -> None:
        try:
            created = make_dirs(self.root, "")
            self._ensure_marker()
            # The new folders' names live in their parents: durable only once those are fsynced.
            for folder in created:
                fsync_dir(os.path.dirname(folder), outside=True)
        except OSError as e:
            raise StoreOpenError(self.root, f"cannot create the directory ({e})"
                                 if isinstance(e, DurabilityError) else
                                 f"cannot create the directory ({e.strerror or e})", fix_for(e)) from e
        self.layout = "current"

    def _read_marker(self, marker: str) -> None:
        try:
            with open_regular(marker) as f:
                info = json.loads(f.read(1 << 16).decode("utf-8"))
            found = int(info["format"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NotACheckpointStoreError(
                self.root, f"its marker file {MARKER} is unreadable ({e})",
                "Restore or remove the marker file",
            ) from e
        if found > FORMAT_VERSION:
            err = NewerFormatError(self.root, found, FORMAT_VERSION, str(info.get("created_by", "")))
            self.readonly, self.readonly_reason, self.newer_format = True, str(err), err
        self._marker_ok = True

    def _classify(self, adopt: bool) -> None:
        """Decide, without unpickling anything, whether an unmarked folder is a store.

        Every file is looked at. A folder with no file at all is a new, empty
        store. One holding our entries is a store only when nothing else is
        there: a marker of another store below it (a store lives below), or a
        file that is not ours beside our entries, makes it somebody's folder,
        refused untouched; taken as a store, ``rm "*"`` would remove the
        entries of every store below. A folder of the reference's 2024
        per-key files is a store with or without other files beside them (the
        reference wrote no marker, and users kept their files there); those
        stay invisible to the store.
        """
        foreign: str | None = None
        other_store: str | None = None
        ours = reference = False
        problem: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=problem.append):
            dirnames[:] = sorted(d for d in dirnames if not (dirpath == self.root and d == CLAIMS))
            for name in sorted(filenames):
                if _is_our_temp(name):
                    continue
                path = os.path.join(dirpath, name)
                if name == MARKER:
                    if dirpath == self.root:
                        # Written since ``__init__`` looked for it (another process creating
                        # this store at the same time): judged as the marker, not a stranger.
                        self._read_marker(path)
                        return
                    other_store = other_store or path
                elif name.endswith(SUFFIX) and _is_our_entry_file(path):
                    ours = True
                elif not name.startswith(".") and is_reference_entry(path):
                    reference = True
                else:
                    foreign = foreign or path
            if other_store is not None and not adopt:
                break
        if foreign is None and problem:
            foreign = problem[0].filename or self.root
        if adopt:
            self.layout = "current" if ours or not reference else "reference-dir"
            return
        if other_store is not None:
            reason = (f"another checkpoint store lives below it ({os.path.relpath(other_store, self.root)!r})"
                      f" and it has no marker file {MARKER} of its own")
        elif foreign is not None and (ours or not reference):
            reason = (f"the folder holds files that no checkpoint store wrote (such as "
                      f"{os.path.relpath(foreign, self.root)!r}) and no marker file {MARKER}")
        else:
            self.layout = "current" if ours else "reference-dir" if reference else "new"
            return
        raise NotACheckpointStoreError(
            self.root, reason,
            "Pick a new or empty folder for the checkpoint store (or the store's own folder);"
            " nothing in this one was changed",
        )

    # -- paths ----------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        return [_encode_part(p) for p in key.split("/")]

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
        (n,) = _U32.unpack_from(head, 4)
        text = f.read(n)
        if len(text) != n:
            raise ValueError(f"{path} is truncated")
        return meta_from_json(text)

    def _open_entry(self, path: str) -> Any:
        """Our entry file at ``path`` opened for reading, or None when there is none."""
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                # We never write links; following one would read (and a
                # rerun replace) something outside the store.
                raise ValueError(f"{path} is a symbolic link, not an entry file")
            return open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except NotRegularFileError as e:
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
        path = self._legacy_path(key)
        base = self._legacy_base(key, path)
        if base is None:
            return None
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
            path = self._legacy_path(key)
            meta = self._legacy_base(key, path)
            if meta is not None:
                meta = self._legacy_details(key, path, meta)
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

    # -- writing ----------------------------------------------------------------
    def _ensure_marker(self) -> None:
        if self._marker_ok:
            return
        marker = os.path.join(self.root, MARKER)
        if not os.path.lexists(marker):
            record = {"format": FORMAT_VERSION, "created_by": library_version()}
            replace_file(marker, json.dumps(record).encode("utf-8"), durable=True)
            fsync_dir(self.root)
        self._marker_ok = True
        self.layout = "current"

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
            make_dirs(parent, self.root)
            tmp = temp_name(final)
            try:
                f = open(tmp, "xb", buffering=0)
            except FileNotFoundError:
                # A concurrent rm pruned the empty parent just now: make it again.
                if attempt == 4:
                    raise
                continue
            try:
                with f:
                    try:
                        write_all(f, memoryview(ENTRY_MAGIC + _U32.pack(len(meta_bytes)) + meta_bytes))
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
        legacy = self._legacy_path(key)
        if self._legacy_base(key, legacy) is not None:
            # Ours now shadows the reference file; remove it so ls shows one entry.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(legacy)

    def _delete(self, key: str) -> bool:
        return self._delete_many([key]) == 1

    def _unlink_entry(self, key: str) -> str | None:
        """Remove ``key``'s files; the folder they were in, or None when there were none."""
        removed = False
        path = self._path(key)
        # Only a file that is ours by its marks: the suffix and the magic, or
        # the suffix in a folder we marked (then a bad magic is damage).
        if _is_regular(path) and (self._marker_ok or _is_our_entry_file(path)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)
                removed = True
        legacy = self._legacy_path(key)
        if self._legacy_base(key, legacy) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(legacy)
                removed = True
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

    # -- leases: numbered claim files, each created with link() ------------------
    # The claims on one key are files .claims/<digest>/<n>, n = 1, 2, ...; the
    # one with the highest number is the current claim. A caller takes a free,
    # released or expired claim by creating the next number with link(), which
    # creates a name only if it is free, with its whole content in place, on
    # local and NFS file systems alike: of all callers that saw claim n, exactly
    # one creates n + 1. No lock, no sleep, no read-back decides who won.
    # The owner renews or releases by renaming a new version over its own file
    # only; a file of another owner is never written or removed.
    def _claim_path(self, key: str) -> str:
        """The folder holding the numbered claims on ``key``."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
        return os.path.join(self.root, CLAIMS, digest)

    @staticmethod
    def _claim_numbers(folder: str) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(folder) if n.isdigit())
        except FileNotFoundError:
            return []

    def _read_claim(self, path: str) -> dict[str, Any] | None:
        """The claim record in ``path``; ``{}`` when unreadable (as good as expired); None when gone."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_claim_tmp(self, path: str, key: str, owner: str, ttl: float | None) -> str:
        """A complete claim record under a temporary name next to ``path`` (``ttl`` None: released)."""
        tmp = temp_name(path)
        record = {"key": key, "owner": owner, "expires": time.time() + ttl if ttl is not None else 0.0}
        if ttl is None:
            record["released"] = True
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return tmp

    def _current_claim(self, folder: str) -> tuple[int, dict[str, Any]] | None:
        """The highest-numbered claim and its record, or None when there is none."""
        for _ in range(10):
            numbers = self._claim_numbers(folder)
            if not numbers:
                return None
            held = self._read_claim(os.path.join(folder, str(numbers[-1])))
            if held is not None:
                return numbers[-1], held
            # Removed under us: only a lower number is ever removed, so a
            # higher one exists now. Look again.
        return None

    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        folder = self._claim_path(key)
        make_dirs(folder, self.root)  # never the store's own folder: one removed stays removed
        for _ in range(10):
            current = self._current_claim(folder)
            number = 1
            if current is not None:
                n, held = current
                live = not held.get("released") and float(held.get("expires", 0)) > time.time()
                if live and held.get("owner") == owner:
                    return self._renew_claim(key, owner, ttl)
                if live:
                    return False
                number = n + 1  # free: released, expired or unreadable
            path = os.path.join(folder, str(number))
            tmp = self._write_claim_tmp(path, key, owner, ttl)
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue  # another caller took it first: see whose it is now
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            # A caller that read an older state may have created a number that
            # a cleanup had removed; the highest number wins, so check.
            numbers = self._claim_numbers(folder)
            if numbers and numbers[-1] != number:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return False
            for old in numbers:  # the numbers below ours are over
                if old < number:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, str(old)))
            return True
        return False

    def _renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        folder = self._claim_path(key)
        current = self._current_claim(folder)
        if current is None:
            return False
        n, held = current
        if held.get("owner") != owner or held.get("released") or float(held.get("expires", 0)) <= time.time():
            # Not ours, or our lease ran out and another caller may have taken it.
            return False
        path = os.path.join(folder, str(n))
        os.replace(self._write_claim_tmp(path, key, owner, ttl), path)  # our own file only
        # Taken over meanwhile (right at expiry): the higher number is the owner.
        return self._claim_numbers(folder)[-1:] == [n]

    def _release_claim(self, key: str, owner: str) -> None:
        folder = self._claim_path(key)
        current = self._current_claim(folder)
        if current is None:
            return
        n, held = current
        if held.get("owner") == owner and not held.get("released"):
            # Marked released, not removed: the highest number must stay, so
            # that the next caller creates n + 1 and numbers never repeat.
            path = os.path.join(folder, str(n))
            os.replace(self._write_claim_tmp(path, key, owner, None), path)

    # -- runs: one small JSON file each in .runs/ -----------------------------------
    def _gone(self) -> str | None:
        reason = gone_reason(self.root, self._opened_id)
        if reason is None and self._marker_ok and not os.path.lexists(os.path.join(self.root, MARKER)):
            reason = f"its marker file {MARKER} was removed while this process used it; nothing is written there"
        return reason

    def _put_run(self, run_id: str, record: dict[str, Any]) -> None:
        self._ensure_marker()
        folder = os.path.join(self.root, RUNS)
        # mkdir, not makedirs: a store folder removed meanwhile stays removed.
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            # A link would send every run record (command lines, hosts) to
            # wherever it points; the store's own folder or nothing.
            kind = "a symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)
            raise OSError(errno.ENOTDIR, f"{RUNS} is {kind}, not the store's own folder; no run record written",
                          folder)
        # No fsync: a run record is a report; one lost to a power cut costs nothing.
        replace_file(os.path.join(folder, run_id + ".json"), json.dumps(record).encode("utf-8"), durable=False)

    def _iter_runs(self) -> Iterator[Any]:
        folder = os.path.join(self.root, RUNS)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                logger.warning("%s is not a folder of this store (a link or a file); its run records are not read",
                               folder)
                return
            names = [n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(folder, name)
            try:
                yield parse_run(_read_run_file(path))
            except FileNotFoundError:
                continue  # replaced or removed since the listing: nothing to report
            except OSError as e:
                logger.warning("skipped %s: %s", path, _run_file_problem(e))

    # -- leftovers of killed writers ---------------------------------------------
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
            if all(_encode_part(p) == p for p in folders):
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
            short_dir = any(_SHORT in p for p in rel_parts)
            for name in filenames:
                if name.startswith("."):
                    continue  # the marker, temporary files of killed writers
                path = os.path.join(dirpath, name)
                if name.endswith(SUFFIX):
                    if short_dir or _SHORT in name:
                        unknown.append(path)
                        continue
                    key = "/".join(_unquote(p) for p in [*rel_parts, name[: -len(SUFFIX)]])
                    if key.startswith(prefix):
                        found[key] = (path, True)
                        continue
                if short_dir:
                    continue  # the reference never wrote names this long
                key = "/".join([*rel_parts, name])
                if key.startswith(prefix):
                    found.setdefault(key, (path, False))
        out: list[tuple[str | None, str, bool]] = [(k, p, ours) for k, (p, ours) in sorted(found.items())]
        return out + [(None, p, True) for p in sorted(unknown)]

    def _entry_meta(self, key: str | None, path: str) -> dict[str, Any] | None:
        """The metadata of our entry file at ``path``, or a damage record; None if not ours."""
        shown = key if key is not None else os.path.relpath(path, self.root)
        if not _is_regular(path):
            return None  # we write only regular files: a FIFO, socket or link is someone else's
        try:
            meta = self._read_meta_file(path)
        except ValueError as e:
            if not self._marker_ok and not _is_our_entry_file(path):
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
