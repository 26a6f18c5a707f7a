"""The directory store: one file per key, written under a temporary name then renamed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import struct
import time
from typing import Any, Iterator

from .._codec import Encoded, Signer, meta_from_json, meta_to_json, read_frame, verifier_for, write_all
from .._errors import InvalidKeyError, NewerFormatError, NotACheckpointStoreError, StoreOpenError
from ._base import FORMAT_VERSION, Loader, Store, library_version
from ._fs import HOST, fsync_dir, left_by_dead_writer, temp_name

__all__ = ["DirectoryStore", "ENTRY_MAGIC", "MARKER", "legacy_meta", "is_pickle_head"]

ENTRY_MAGIC = b"A2KE"
SUFFIX = ".ckpt"
MARKER = ".ai2-kit-checkpoint"
CLAIMS = ".claims"
_U32 = struct.Struct("<I")
_MAX_NAME = 250  # bytes; most file systems allow 255 per name


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


def legacy_meta(key: str, record: object, base: dict[str, Any]) -> dict[str, Any]:
    """Metadata for a reference-format record ``{'return', 'is_awaitable', 'info'}``."""
    meta = dict(base)
    if isinstance(record, dict):
        info = record.get("info") or {}
        if isinstance(info, dict):
            meta.setdefault("fn_name", info.get("fn_name"))
            meta.setdefault("call_site", info.get("call_site"))
        meta["is_awaitable"] = bool(record.get("is_awaitable", False))
    return meta


def unwrap_legacy(key: str, record: object) -> Any:
    if not isinstance(record, dict) or "return" not in record:
        raise ValueError(f"reference record for {key!r} has no 'return' field")
    return record["return"]


class DirectoryStore(Store):
    """A checkpoint store as a directory tree (the default of ``set_checkpoint_dir``).

    Key ``a/b/c`` lives in ``DIR/a/b/c.ckpt``: magic, metadata JSON, then the
    value's frame. Writers write a temporary file whose name carries host and
    pid, fsync it and rename it into place: readers see the old entry or the
    new one, never half of one, with no lock at all, which is what keeps it
    safe on NFS and Lustre. Leftover temporary files of killed writers are
    hidden names and ignored. Files of the reference's 2024 layout (a
    cloudpickle dict at ``DIR/a/b/c``) are read as they are.
    """

    kind = "directory"
    supports_claims = True

    def __init__(self, path: str, *, readonly: bool = False, create: bool = True) -> None:
        path = os.path.abspath(os.fspath(path))
        super().__init__(path, readonly=readonly)
        self.root = path
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotACheckpointStoreError(
                path, "it is a file, not a directory",
                "Use set_checkpoint_file() for a single-file store",
            )
        if not os.path.isdir(path):
            if not create or readonly:
                raise StoreOpenError(path, "no such directory", "Check the path")
            os.makedirs(path, exist_ok=True)
        self._marker_ok = False
        marker = os.path.join(path, MARKER)
        if os.path.exists(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    info = json.load(f)
                found = int(info["format"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise NotACheckpointStoreError(
                    path, f"its marker file {MARKER} is unreadable ({e})",
                    "Restore or remove the marker file",
                ) from e
            if found > FORMAT_VERSION:
                err = NewerFormatError(path, found, FORMAT_VERSION, str(info.get("created_by", "")))
                self.readonly, self.readonly_reason, self.newer_format = True, str(err), err
            self._marker_ok = True
        if not self.readonly and not os.access(path, os.W_OK):
            self.readonly, self.readonly_reason = True, "no write permission on the directory"

    # -- paths ----------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        parts = [_quote(p) for p in key.split("/")]
        for p in parts:
            if len(p.encode("utf-8")) + len(SUFFIX) > _MAX_NAME:
                raise InvalidKeyError(key, f"the part {p[:20]!r}... is too long for a file name")
        return parts

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

    def _read_meta_file(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                return self._read_head(f, path)
        except FileNotFoundError:
            return None

    def _legacy_base(self, key: str, path: str) -> dict[str, Any] | None:
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                head = f.read(2)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if not os.path.isfile(path) or not is_pickle_head(head):
            return None
        return {"key": key, "legacy": "reference-dir", "size": st.st_size, "created": st.st_mtime}

    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        path = self._path(key)
        try:
            f = open(path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError):
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
            with open(path, "rb") as f:
                record = pickle.load(f)  # cloudpickle's output needs no cloudpickle to load
            meta.update(legacy_meta(key, record, meta))
            return unwrap_legacy(key, record)

        return meta, load

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        meta = self._read_meta_file(self._path(key))
        if meta is None:
            return self._legacy_base(key, self._legacy_path(key))
        return meta

    # -- writing ----------------------------------------------------------------
    def _ensure_marker(self) -> None:
        if self._marker_ok:
            return
        marker = os.path.join(self.root, MARKER)
        if not os.path.exists(marker):
            tmp = temp_name(marker)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT_VERSION, "created_by": library_version()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
        self._marker_ok = True

    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        self._ensure_marker()
        final = self._path(key)
        parent = os.path.dirname(final)
        meta_bytes = meta_to_json(meta).encode("utf-8")
        for attempt in range(5):
            os.makedirs(parent, exist_ok=True)
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
                    write_all(f, memoryview(ENTRY_MAGIC + _U32.pack(len(meta_bytes)) + meta_bytes))
                    encoded.write_to(f)
                    os.fsync(f.fileno())
                # Rename, not rewrite: a kill mid-write must leave the old entry.
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            break
        fsync_dir(parent)
        legacy = self._legacy_path(key)
        if self._legacy_base(key, legacy) is not None:
            # Ours now shadows the reference file; remove it so ls shows one entry.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(legacy)

    def _delete(self, key: str) -> bool:
        removed = False
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(path)
            removed = True
        legacy = self._legacy_path(key)
        if self._legacy_base(key, legacy) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(legacy)
                removed = True
        if removed:
            self._prune(os.path.dirname(path))
        return removed

    def _prune(self, folder: str) -> None:
        """Remove folders left empty by a delete, up to the root."""
        while os.path.abspath(folder) != self.root and folder.startswith(self.root):
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = os.path.dirname(folder)

    # -- leases: one claim file per key, created with link() ---------------------
    # link() creates the name only if it is free, with the whole content in
    # place, on local and NFS file systems alike; rename() replaces an expired
    # or own claim. Two callers taking over the same expired claim in the same
    # instant both rename; each reads the file back and only the one whose
    # claim stayed proceeds.
    def _claim_path(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
        return os.path.join(self.root, CLAIMS, digest + ".claim")

    def _read_claim(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _write_claim_tmp(self, path: str, key: str, owner: str, ttl: float) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = temp_name(path)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "owner": owner, "expires": time.time() + ttl}, f)
        return tmp

    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        path = self._claim_path(key)
        tmp = self._write_claim_tmp(path, key, owner, ttl)
        try:
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                pass
            held = self._read_claim(path)
            if held is not None and held.get("owner") != owner and held.get("expires", 0) > time.time():
                return False
            os.replace(tmp, path)  # expired, unreadable, or ours: take it
            time.sleep(0.02)
            held = self._read_claim(path)
            return held is not None and held.get("owner") == owner
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        path = self._claim_path(key)
        held = self._read_claim(path)
        if held is None or held.get("owner") != owner:
            return False
        os.replace(self._write_claim_tmp(path, key, owner, ttl), path)
        return True

    def _release_claim(self, key: str, owner: str) -> None:
        path = self._claim_path(key)
        held = self._read_claim(path)
        if held is not None and held.get("owner") == owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

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
    def _scan(self, prefix: str) -> list[tuple[str, str, bool]]:
        """(key, path, is_ours) for every entry whose key starts with ``prefix``.

        Names only, no file is opened: sorting needs every key first, because
        walk order is not key order ('a-c' sorts before 'a/b').
        """
        found: dict[str, tuple[str, bool]] = {}
        top = self.root
        if "/" in prefix:
            # Start at the deepest folder the prefix names; keys with '%', a
            # leading '.' or a '.ckpt' part are quoted on disk, so only plain
            # folder names narrow the walk.
            folders = prefix.rsplit("/", 1)[0].split("/")
            if all(_quote(p) == p for p in folders):
                top = os.path.join(self.root, *folders)
        def unreadable(e: OSError) -> None:
            # A folder we may not read would silently hide its entries.
            raise StoreOpenError(e.filename or self.root, f"cannot read a folder of the store ({e.strerror})",
                                 "Check the permissions of the store's folders")

        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            rel_parts = [] if rel == "." else rel.split(os.sep)
            for name in filenames:
                if name.startswith("."):
                    continue  # the marker, temporary files of killed writers
                path = os.path.join(dirpath, name)
                if name.endswith(SUFFIX):
                    key = "/".join(_unquote(p) for p in [*rel_parts, name[: -len(SUFFIX)]])
                    if key.startswith(prefix):
                        found[key] = (path, True)
                        continue
                key = "/".join([*rel_parts, name])
                if key.startswith(prefix):
                    found.setdefault(key, (path, False))
        return [(k, p, ours) for k, (p, ours) in sorted(found.items())]

    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]:
        for key, path, ours in self._scan(prefix):
            if ours:
                try:
                    meta = self._read_meta_file(path)
                except ValueError as e:
                    meta = {"key": key, "damaged": str(e)}
                if meta is not None and meta.get("key") != key:
                    meta = {"key": key, "damaged": f"{path} holds entry {meta.get('key')!r}"}
            else:
                meta = self._legacy_base(key, path)
            if meta is not None:
                yield meta
