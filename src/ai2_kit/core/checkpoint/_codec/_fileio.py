"""Frames to and from files: whole writes, write-out hints, exact reads, buffers to read into.

``write_all`` writes every byte or raises (a short write is not success).
A big frame's slices are handed to the disk as they are written
(``sync_file_range`` on Linux, a hint only: the caller's fsync still makes
the entry durable). Reads fill each part's final buffer exactly, or report
the file as truncated.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any, BinaryIO, Callable

from ._checksum import _import_lock

# Private names: shared within the codec only, except ``write_all``.
__all__ = ["write_all", "_bytes_view", "_Writeback", "_fill", "_buffer", "_read_exact"]

_MMAP_MIN = 1 << 20

# <linux/fs.h>: start write-out of the range's dirty pages, do not wait. Never with a WAIT flag:
# waiting checks (and so consumes) a write error of the file, which the caller's fsync must see.
_SYNC_FILE_RANGE_WRITE = 2
_Starter = Callable[[int, int, int, int], int]
_WRITEBACK_MIN = 1 << 20
#: ``sync_file_range`` from the C library once looked up; False where there is none.
_sync_file_range: Any = None


def _writeback_starter() -> _Starter | None:
    """Linux's ``sync_file_range`` through ctypes, or None (another system, or no such symbol).

    Looked up on the first big write (ctypes is costly to import, and most
    processes never write a big frame), under the same lock as the fast
    checksum's import, which fork() waits for.
    """
    global _sync_file_range
    if _sync_file_range is None:
        with _import_lock:
            if _sync_file_range is None:
                found: Any = False
                if sys.platform.startswith("linux"):
                    try:
                        import ctypes

                        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                        fn.restype = ctypes.c_int
                        found = fn
                    except (ImportError, OSError, AttributeError):
                        pass
                _sync_file_range = found
    return _sync_file_range or None


class _Writeback:
    """Asks the kernel to start writing each slice of a big frame to disk as soon as it is written.

    Left alone, the kernel starts writing a file's dirty pages only once
    they are old or many (10% of memory), so a 512 MB frame sits in memory
    until the caller's fsync, which then waits for all of it: the copy into
    the page cache and the disk's write run one after the other. Started
    slice by slice, they overlap. Only a hint: it makes nothing durable (the
    caller still fsyncs before the entry becomes visible), and a failure
    here just stops the hints for this file.
    """

    __slots__ = ("_fn", "_fd", "_pos")

    def __init__(self, fn: _Starter, fd: int, pos: int) -> None:
        self._fn: _Starter | None = fn
        self._fd = fd
        self._pos = pos

    @classmethod
    def start(cls, f: BinaryIO) -> _Writeback | None:
        """Hints for the writes that follow on ``f``; None where they cannot be given."""
        fn = _writeback_starter()
        if fn is None:
            return None
        try:
            fd = f.fileno()
            pos = f.tell()
        except (AttributeError, OSError, ValueError):  # not a file of the OS (io.UnsupportedOperation)
            return None
        return cls(fn, fd, pos)

    def written(self, n: int) -> None:
        """The next ``n`` bytes were written: start writing them out."""
        # A small piece (the pickle stream ahead of an array) is not worth a
        # system call: the caller's fsync writes it out with the rest.
        fn = self._fn
        if n >= _WRITEBACK_MIN and fn is not None and fn(self._fd, self._pos, n, _SYNC_FILE_RANGE_WRITE) != 0:
            self._fn = None  # refused here (a pipe, a file system without it): no more hints
        self._pos += n


def _bytes_view(view: memoryview) -> memoryview:
    """``view`` as flat bytes, so that slices count bytes."""
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def write_all(f: BinaryIO, view: memoryview) -> None:
    """Write all of ``view``: an unbuffered file may write less than asked.

    A short write is what a file-size limit or a nearly full disk produces
    first (the error comes only on the next call); ignoring it would leave a
    truncated entry that claims to be complete.
    """
    view = _bytes_view(view)
    done = 0
    while done < view.nbytes:
        n = f.write(view[done:])
        if n is None:  # a non-blocking file that would block: not ours
            raise OSError("write would block")
        if n == 0:
            raise OSError(f"no progress writing {view.nbytes - done} more bytes")
        done += n


def _fill(f: BinaryIO, chunk: memoryview, source: str) -> None:
    """Read exactly ``chunk.nbytes`` bytes into ``chunk``."""
    got = f.readinto(chunk)  # type: ignore[attr-defined]
    while got is not None and got < chunk.nbytes:
        more = f.readinto(chunk[got:])  # type: ignore[attr-defined]
        if not more:
            raise ValueError(f"{source} is truncated")
        got += more


def _buffer(length: int) -> Any:
    """Writable memory for one part.

    Large parts are not zero-filled first (``bytearray(n)`` writes n zeros
    that ``readinto`` then overwrites). Where numpy is already loaded (the
    usual case for a large part: it is an array) its allocator is used: it
    asks the kernel for huge pages, which load faster than anonymous mmap
    memory (docs/performance.md, "The codec's figures").
    """
    if length >= _MMAP_MIN:
        np = sys.modules.get("numpy")
        if np is not None:
            return np.empty(length, dtype=np.uint8)
        return mmap.mmap(-1, length)
    return bytearray(length)


def _read_exact(f: BinaryIO, n: int, source: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{source} is truncated")
    return data
