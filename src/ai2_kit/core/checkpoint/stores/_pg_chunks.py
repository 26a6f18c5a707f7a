"""How the PostgreSQL store moves a large frame: chunks streamed out with a binary
COPY from the value's own memory, and read back one chunk at a time."""

from __future__ import annotations

import struct
from typing import Any, Callable

import psycopg
from psycopg import sql

from .._codec import Encoded

__all__ = ["CHUNK_SIZE", "ChunkReader", "copy_chunks"]

#: Size of the pieces a larger frame is stored in (the last one may be shorter).
CHUNK_SIZE = 8 << 20


class ChunkReader:
    """A read-only file over the chunks of one frame, fetched one at a time.

    ``read_frame`` reads into preallocated buffers through ``readinto``, so a
    frame never exists twice in memory: at most one chunk is in flight.
    """

    def __init__(self, fetch: Callable[[int], bytes], count: int) -> None:
        self._fetch = fetch
        self._count = count
        self._seq = 0
        self._buf = memoryview(b"")
        self._pos = 0

    def _fill(self) -> bool:
        while self._pos >= self._buf.nbytes:
            if self._seq >= self._count:
                return False
            self._buf.release()
            self._buf = memoryview(self._fetch(self._seq))
            self._seq += 1
            self._pos = 0
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        while done < view.nbytes and self._fill():
            n = min(view.nbytes - done, self._buf.nbytes - self._pos)
            view[done : done + n] = self._buf[self._pos : self._pos + n]
            done += n
            self._pos += n
        return done

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out = bytearray()
            while self._fill():
                out += self._buf[self._pos :]
                self._pos = self._buf.nbytes
            return bytes(out)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])


# Binary COPY framing (see the PostgreSQL COPY documentation, "Binary Format").
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)


def copy_chunks(cur: psycopg.Cursor[Any], statement: sql.Composed, key: str, encoded: Encoded, nchunks: int) -> None:
    """Stream the frame into ``chunks`` with a binary COPY, from the value's own memory.

    The COPY rows are framed here rather than with ``write_row``, which
    would first copy each chunk into a buffer of its own: the bytes go
    from the array to libpq's send buffer, a slice at a time.
    """
    k = key.encode("utf-8")
    head = struct.pack("!hi", 3, len(k)) + k + struct.pack("!i", 4)
    with cur.copy(statement) as copy:
        copy.write(_COPY_SIGNATURE)
        seq, room = 0, 0
        for piece in encoded.chunks():
            while piece.nbytes:
                if room == 0:
                    size = min(CHUNK_SIZE, encoded.size - seq * CHUNK_SIZE)
                    copy.write(head + struct.pack("!ii", seq, size))
                    seq, room = seq + 1, size
                n = min(room, piece.nbytes)
                copy.write(piece[:n])
                piece, room = piece[n:], room - n
        if seq != nchunks or room:
            raise ValueError(f"frame of {encoded.size} bytes gave {seq} chunks, expected {nchunks}")
        copy.write(_COPY_TRAILER)
