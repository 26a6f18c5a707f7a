"""Values to frames and back: the pickling, the frame layout, the checks before unpickling.

A value is pickled with cloudpickle at protocol 5; large contiguous buffers
(numpy arrays, bytearrays) are taken out of band, so they are written from
and read into their own memory without an intermediate copy. Plain data
(built-in scalars and containers of exact types) takes the standard
pickler, which writes the same bytes. The pieces are laid out in a *frame*:

    b"A2KF" | u32 n | n x u64 part lengths | part 0 (pickle stream) | part 1..n-1

Decoding checks the CRC-32 over all parts (and the MAC, when a verifier is
given) before anything is unpickled: a flipped byte is reported, never
returned, and a value from someone without the key is never run.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import struct
import threading
import zlib
from typing import Any, BinaryIO, Iterable, Iterator

# At import, not on first save: an import holds a per-module lock, and a fork()
# that lands while another thread imports leaves the child's first save waiting
# for ever on a lock whose holder does not exist there. The cost falls on
# commands such as `ls` that would not need a pickler otherwise.
import cloudpickle

from ._checksum import _CHUNK, _FAST_MIN, _THREAD_MIN, _check, _crc_update, _Summer
from ._fileio import _buffer, _bytes_view, _fill, _read_exact, _Writeback, write_all
from ._signing import Verifier

__all__ = [
    "FRAME_MAGIC",
    "Encoded",
    "encode",
    "settle_crc",
    "decode_bytes",
    "read_frame",
    "checking_only",
    "CHECKED",
    "_PLAIN_MAX",
    "_is_plain",
]

FRAME_MAGIC = b"A2KF"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ONE_PART = FRAME_MAGIC + b"\x01\x00\x00\x00"  # the header's start for a frame of one part


class Encoded:
    """A pickled value as a list of parts, ready to be written anywhere.

    The CRC-32 of a small frame is computed at once; a big frame's (at least
    ``_THREAD_MIN`` bytes) is left for ``write_to``, which computes it in a
    second thread while the parts are written, or for the first read of
    ``crc``. A store that writes the frame before it serializes the metadata
    record fills the record in with ``settle_crc``.
    """

    __slots__ = ("parts", "header", "size", "_crc")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.header = (
            FRAME_MAGIC + _U32.pack(len(parts)) + b"".join(_U64.pack(p.nbytes) for p in parts)
        )
        self.size = len(self.header) + sum(p.nbytes for p in parts)
        self._crc: str | None = None
        if self.size < _THREAD_MIN:
            self._crc = self._compute_crc()

    @classmethod
    def one(cls, data: bytes) -> Encoded:
        """``Encoded([memoryview(data)])``, built directly (a plain value's one small part)."""
        self = cls.__new__(cls)
        self.parts = [memoryview(data)]
        self.header = _ONE_PART + _U64.pack(len(data))
        self.size = len(data) + 16
        if self.size < _FAST_MIN:
            self._crc = f"{zlib.crc32(data):08x}"
        else:
            self._crc = f"{_crc_update(0, self.parts[0]):08x}" if self.size < _THREAD_MIN else None
        return self

    def _compute_crc(self) -> str:
        crc = 0
        for p in self.parts:
            crc = _crc_update(crc, p)
        return f"{crc:08x}"

    @property
    def crc(self) -> str:
        """The CRC-32 of all parts, as 8 hex digits (computed now if still unknown)."""
        if self._crc is None:
            self._crc = self._compute_crc()
        return self._crc

    @property
    def crc_known(self) -> bool:
        return self._crc is not None

    def to_bytes(self) -> bytes:
        """The whole frame as one bytes object (for small values kept inline)."""
        if len(self.parts) == 1:
            return self.header + self.parts[0]
        return b"".join([self.header, *self.parts])

    def write_to(self, f: BinaryIO) -> None:
        """Write the frame to an open binary file, each part from its own memory.

        When the checksum is still unknown, a second thread computes it slice
        by slice alongside the writes (both only read the value's memory), so
        a big save costs one pass over the value, not two. A big frame's
        slices are handed to the disk as soon as they are written (see
        ``_Writeback``): the caller's fsync then waits for the last slices
        only, not for the whole frame.
        """
        write_all(f, memoryview(self.header))
        if self.size < _THREAD_MIN:
            for p in self.parts:
                write_all(f, p)
            if self._crc is None:  # cannot happen (computed at once below _THREAD_MIN); kept exact
                self._crc = self._compute_crc()
            return
        summer = _Summer(None, threaded=True) if self._crc is None else None
        writeback = _Writeback.start(f)
        try:
            for p in self.parts:
                p = _bytes_view(p)
                for i in range(0, p.nbytes, _CHUNK):
                    piece = p[i : i + _CHUNK]
                    if summer is not None:
                        summer.add(piece)
                    write_all(f, piece)
                    if writeback is not None:
                        writeback.written(piece.nbytes)
            if summer is not None:
                self._crc = f"{summer.result():08x}"
        finally:
            if summer is not None:
                summer.stop()

    def chunks(self) -> Iterable[memoryview]:
        """The frame as a sequence of byte views (for streaming writers)."""
        yield memoryview(self.header)
        for p in self.parts:
            p = _bytes_view(p)
            for i in range(0, p.nbytes, _CHUNK):
                yield p[i : i + _CHUNK]


def settle_crc(meta: dict[str, Any], encoded: Encoded) -> None:
    """Put the frame's checksum in ``meta`` if ``make_meta`` left it to be filled in (None)."""
    if meta.get("crc32") is None:
        meta["crc32"] = encoded.crc


# Types whose pickle is the same bytes from the standard pickler as from
# cloudpickle (which only changes how functions, classes and modules are
# written, by value instead of by name), and none of which refers to a module.
_ATOMS = frozenset({str, bytes, int, float, bool, type(None)})
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
# The most items a value may have for the check below: beyond, cloudpickle
# (whose own cost per container then no longer matters next to the value's).
_PLAIN_MAX = 4096


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is made only of built-in scalars and containers (exact types).

    Such a value pickles to the same bytes with ``pickle`` as with cloudpickle,
    and the standard C pickler is faster for a small value (cloudpickle
    calls back into Python for every container and builds its pickler in
    Python). Subclasses (OrderedDict, an IntEnum), instances, functions,
    arrays: not plain, so cloudpickle writes them.
    """
    t = type(value)
    if t in _ATOMS:
        return True
    if t not in _CONTAINERS:
        return False
    atoms, containers = _ATOMS, _CONTAINERS
    stack = [value]
    left = _PLAIN_MAX
    while stack:
        v = stack.pop()
        left -= len(v)
        if left < 0:
            return False  # large, or a container that contains itself
        for x in (itertools.chain(v, v.values()) if type(v) is dict else v):
            t = type(x)
            if t in atoms:
                continue
            if t not in containers:
                return False
            stack.append(x)
    return True


def encode(value: Any) -> Encoded:
    """Pickle ``value``; raises whatever the pickler raises for unpicklable values."""
    if _is_plain(value):
        # Plain data: the standard pickler writes the same bytes, faster; no
        # buffers can be out of band (bytearray and arrays are not plain).
        return Encoded.one(pickle.dumps(value, protocol=5))
    buffers: list[memoryview] = []

    def take(buf: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buf.raw())
        except BufferError:
            return True  # not contiguous: let the pickler keep it in band
        return False

    data = cloudpickle.dumps(value, protocol=5, buffer_callback=take)
    return Encoded([memoryview(data), *buffers])


def _parse_header(head: bytes, source: str) -> list[int]:
    if head[:4] != FRAME_MAGIC:
        raise ValueError(f"bad frame magic in {source}")
    (n,) = _U32.unpack_from(head, 4)
    return [_U64.unpack_from(head, 8 + 8 * i)[0] for i in range(n)]


_mode = threading.local()
#: What a decode returns instead of a value inside ``checking_only()``.
CHECKED = object()


@contextlib.contextmanager
def checking_only() -> Iterator[None]:
    """Within this block (this thread), decoding checks checksums and MACs but unpickles nothing."""
    before = getattr(_mode, "check_only", False)
    _mode.check_only = True
    try:
        yield
    finally:
        _mode.check_only = before


def _unpickle(data: Any, buffers: list[Any]) -> Any:
    if getattr(_mode, "check_only", False):
        return CHECKED
    return pickle.loads(data, buffers=buffers)


def decode_bytes(frame: bytes | memoryview, expected_crc: str | None, verifier: Verifier | None = None) -> Any:
    """Check (checksum, and MAC when a verifier is given) and unpickle a frame held in memory."""
    view = memoryview(frame)
    if view.nbytes < 8:
        raise ValueError("frame too short")
    (n,) = _U32.unpack_from(view, 4)
    if n == 1 and verifier is None and view.nbytes >= 16 and view[:4] == FRAME_MAGIC:
        # The common small value, no buffers out of band: one checksum, one loads.
        (length,) = _U64.unpack_from(view, 8)
        if 16 + length != view.nbytes:
            raise ValueError(f"frame length {view.nbytes} does not match its header")
        body = view[16:]
        _check(zlib.crc32(body), expected_crc)
        return CHECKED if getattr(_mode, "check_only", False) else pickle.loads(body)
    lengths = _parse_header(bytes(view[: 8 + 8 * n]), "memory")
    pos = 8 + 8 * n
    if verifier is not None:
        verifier.update(view[:pos])
    if pos + sum(lengths) != view.nbytes:
        raise ValueError(f"frame length {view.nbytes} does not match its header")
    parts = []
    crc = 0
    for length in lengths:
        part = view[pos : pos + length]
        crc = _crc_update(crc, part)
        if verifier is not None:
            verifier.update(part)
        parts.append(part)
        pos += length
    _check(crc, expected_crc)
    if verifier is not None:
        verifier.check()
    # Out-of-band buffers get their own writable memory, as read from a file:
    # an array that comes back is writable wherever it was stored.
    if getattr(_mode, "check_only", False):
        return CHECKED
    return pickle.loads(parts[0], buffers=[bytearray(p) for p in parts[1:]])


def read_frame(f: BinaryIO, expected_crc: str | None, source: str, verifier: Verifier | None = None) -> Any:
    """Check (checksum, and MAC when a verifier is given) and unpickle a frame read from a file.

    Each part is read straight into its final buffer, in slices; a big frame's
    slices are checksummed (and MACed) in a second thread while the next one
    is read. Nothing is unpickled before that thread has checked every byte.
    """
    head = _read_exact(f, 8, source)
    (n,) = _U32.unpack_from(head, 4)
    if n > 1 << 20:
        raise ValueError(f"implausible part count {n} in {source}")
    header = head + _read_exact(f, 8 * n, source)
    lengths = _parse_header(header, source)
    if verifier is not None:
        verifier.update(header)
    parts: list[Any] = []
    summer = _Summer(verifier, threaded=sum(lengths) >= _THREAD_MIN)
    try:
        for length in lengths:
            buf = _buffer(length)
            view = memoryview(buf).cast("B")
            for i in range(0, length, _CHUNK):
                chunk = view[i : i + _CHUNK]
                _fill(f, chunk, source)
                summer.add(chunk)
            parts.append(buf)
        if f.read(1):
            raise ValueError(f"{source} has trailing bytes after its frame")
        crc = summer.result()
    finally:
        summer.stop()
    _check(crc, expected_crc)
    if verifier is not None:
        verifier.check()
    return _unpickle(parts[0], parts[1:])
