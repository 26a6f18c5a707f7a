"""Side files: frames too large for a row, written beside the database before their row
commits; the loaders that read a value from a row or a side file; naming who wrote one."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any

from ..._codec import Encoded, Signer, decode_bytes, read_frame, verifier_for
from .._fs import HOST, ensure_durable, fsync_dir, fsync_file, make_dirs

__all__ = ["INLINE_MAX", "InlineLoader", "FileLoader", "MissingLoader", "blob_path", "write_blob", "unlink_blob",
           "frame_names", "writer_of", "MissingFolderError", "folder_missing_fix"]

#: Frames larger than this live in a side file next to the database, written
#: from the value's own memory, so the database (and its WAL) stays small.
INLINE_MAX = 1 << 20
_SUFFIX = ".frame"


class InlineLoader:
    """Decodes a frame kept in the row."""

    def __init__(self, value: bytes, meta: dict[str, Any]) -> None:
        self._value, self._meta = value, meta

    def __call__(self, signer: Signer | None) -> Any:
        return decode_bytes(self._value, self._meta.get("crc32"), verifier_for(signer, self._meta))


class FileLoader:
    """Reads a frame from a side file opened when its row was read."""

    def __init__(self, f: Any, path: str, meta: dict[str, Any]) -> None:
        self._f, self._path, self._meta = f, path, meta

    def __call__(self, signer: Signer | None) -> Any:
        return read_frame(self._f, self._meta.get("crc32"), self._path, verifier_for(signer, self._meta))

    def close(self) -> None:
        self._f.close()


class MissingLoader:
    """The side file of an unchanged row is gone: reported as a damaged entry."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __call__(self, signer: Signer | None) -> Any:
        folder = os.path.dirname(self._path)
        if os.path.isdir(folder):
            raise FileNotFoundError(f"its side file {self._path} is missing")
        raise MissingFolderError(folder)


def folder_missing_fix(folder: str) -> str:
    """What to do when the side-file folder is not beside the database (the values are likely elsewhere)."""
    name = os.path.basename(folder)
    return (f"Copy the store together with its folder {name}/ (put the original {name}/ beside it), "
            f"or make copies with 'ai2-kit tool checkpoint load SRC - copy DEST', which takes the values along.")


class MissingFolderError(FileNotFoundError):
    """The whole side-file folder is missing: a copy left it behind; the entry is not damaged."""

    def __init__(self, folder: str) -> None:
        super().__init__(f"its side-file folder {folder}/ is missing")
        self.fix = folder_missing_fix(folder)


def blob_path(blob_dir: str, name: str) -> str:
    """The path of side file ``name`` (as a row names it); ValueError for a name that leaves the folder."""
    if "/" in name or name.startswith("."):
        raise ValueError(f"bad side-file name {name!r}")
    return os.path.join(blob_dir, name)


def write_blob(blob_dir: str, encoded: Encoded) -> str:
    """Write and fsync ``encoded`` as a new side file in ``blob_dir``; its name, for the row."""
    if not os.path.isdir(blob_dir):
        make_dirs(blob_dir, "")
    # Who wrote it is in the name, so that a side file left by a writer
    # that died before its commit can be recognised and removed.
    name = f"{secrets.token_hex(12)}.{os.getpid()}.{HOST}{_SUFFIX}"
    path = os.path.join(blob_dir, name)
    # A unique name that nothing refers to until the row commits: a crash
    # before the commit leaves an orphan file, never a half-written value.
    try:
        with open(path, "xb", buffering=0) as f:
            try:
                encoded.write_to(f)
            except OSError as e:
                if e.filename is not None:
                    raise
                raise OSError(e.errno, f"{e.strerror or e} while writing a side file", path) from e
            fsync_file(f.fileno(), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    fsync_dir(blob_dir)
    # The folder's name lives in the database's folder: durable before the
    # row commits, whoever created the folder (another writer may have
    # made it a moment ago and not yet fsynced its parent).
    ensure_durable([os.path.dirname(blob_dir)])
    return name


def unlink_blob(blob_dir: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        os.unlink(blob_path(blob_dir, name))


def frame_names(blob_dir: str) -> list[str]:
    """The side files' names in ``blob_dir`` (none when it does not exist)."""
    try:
        return [n for n in os.listdir(blob_dir) if n.endswith(_SUFFIX)]
    except FileNotFoundError:
        return []


def writer_of(name: str) -> tuple[str, str]:
    """(host, pid) of the process that wrote side file ``name``, ("", "") when the name does not say."""
    parts = name[: -len(_SUFFIX)].split(".", 2)
    return (parts[2], parts[1]) if len(parts) == 3 else ("", "")
