"""CRC-32 of frames: the fast implementation for big buffers, and the checksum thread.

Every frame's CRC-32 is the standard one (``zlib.crc32``'s values). Big
buffers use zlib-ng's implementation when it is installed and gives the
standard check value; it is imported on the first big buffer, under a lock
that fork() waits for. A big frame's checksum (and MAC) runs in a second
thread, slice by slice, while the next slice is read or written.
"""

from __future__ import annotations

import queue
import threading
import zlib
from typing import Any, Callable, Optional

from .._forking import at_fork
from ._signing import Verifier

# Private names, shared within the codec (and ``_fast_crc32`` with the SQLite
# store's hit checksum, through ``_codec``).
__all__ = ["_CHUNK", "_THREAD_MIN", "_FAST_MIN", "_import_lock", "_fast_crc32", "_crc_update", "_check", "_Summer"]

# Read, write and checksum big buffers in slices: the checksum thread works
# on one slice while the next is read or written. Smaller slices made cold
# reads slower (docs/performance.md, "The codec's figures").
_CHUNK = 16 << 20
# Frames at least this big are checksummed in a second thread: below, the
# cost of starting a thread is not repaid by the overlap.
_THREAD_MIN = 8 << 20
# Buffers at least this big use the fast CRC-32 (loaded on first use: see _fast_crc32).
_FAST_MIN = 1 << 16

_Crc32 = Callable[[Any, int], int]
_fast: Optional[_Crc32] = None
# Held while an optional module (zlib-ng, ctypes) is imported, and by fork()
# (see _fast_crc32 and _fileio._writeback_starter).
_import_lock = threading.Lock()
at_fork(before=_import_lock.acquire, after_in_parent=_import_lock.release, after_in_child=_import_lock.release)


def _fast_crc32() -> _Crc32:
    """zlib-ng's CRC-32 if installed and correct here, else the standard library's.

    Imported on the first big buffer, not with this module: it adds to the
    memory of every process, and commands such as ``ls`` never checksum a
    value. An import holds a per-module lock that a fork() landing
    mid-import would leave held for ever in the child; the fork hooks above
    make fork() wait for this import instead.
    """
    global _fast
    if _fast is None:
        with _import_lock:
            if _fast is None:
                fn: _Crc32 = zlib.crc32
                try:
                    from zlib_ng import zlib_ng

                    # The standard check value of CRC-32: a broken build must not
                    # make every entry look damaged.
                    if zlib_ng.crc32(b"123456789") == 0xCBF43926 == zlib_ng.crc32(b"56789", zlib.crc32(b"1234")):
                        fn = zlib_ng.crc32
                except ImportError:
                    pass
                _fast = fn
    return _fast


def _crc_update(crc: int, view: memoryview) -> int:
    if view.nbytes < _FAST_MIN:
        return zlib.crc32(view, crc)
    fn = _fast_crc32()
    for i in range(0, view.nbytes, _CHUNK):
        crc = fn(view[i : i + _CHUNK], crc)
    return crc


def _check(crc: int, expected: str | None) -> None:
    if expected is None:
        # Every entry this library writes records one: its absence is damage.
        raise ValueError("the entry's metadata has no checksum")
    if f"{crc:08x}" != expected:
        raise ValueError(f"checksum mismatch (stored {expected}, computed {crc:08x})")


class _Summer:
    """The CRC-32 (and MAC) of a frame's slices, in order, in a thread of its own if asked.

    Slices are views of the final buffers: the thread adds no copy, only a
    second core reading what the first has just written.
    """

    def __init__(self, verifier: Verifier | None, threaded: bool) -> None:
        self._crc = 0
        self._verifier = verifier
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue[memoryview | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="ai2-kit-checksum", daemon=True
            )
            self._thread.start()

    def add(self, chunk: memoryview) -> None:
        if self._queue is not None:
            self._queue.put(chunk)
        else:
            self._sum(chunk)

    def _sum(self, chunk: memoryview) -> None:
        self._crc = _crc_update(self._crc, chunk)
        if self._verifier is not None:
            self._verifier.update(chunk)

    def _run(self, chunks: queue.SimpleQueue[memoryview | None]) -> None:
        while True:
            chunk = chunks.get()
            if chunk is None:
                return
            if self._error is None:  # after a failure, only drain
                try:
                    self._sum(chunk)
                except BaseException as e:  # handed to the reader in result()
                    self._error = e

    def stop(self) -> None:
        """Wait for the thread (if any) to finish; safe to call twice."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def result(self) -> int:
        """The checksum of every slice added, once all are summed."""
        self.stop()
        if self._error is not None:
            raise self._error
        return self._crc
