"""Values to bytes and back, independent of where the bytes are stored.

A value is pickled with cloudpickle at protocol 5. Large contiguous buffers
(numpy arrays, bytearrays) are taken out of band, so they are written from
and read into their own memory without an intermediate copy. The pieces are
laid out in a *frame*:

    b"A2KF" | u32 n | n x u64 part lengths | part 0 (pickle stream) | part 1..n-1

A CRC-32 over all parts is recorded in the entry's metadata and checked before
anything is unpickled, so a flipped byte is reported, never returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import mmap
import pickle
import struct
import sys
import threading
import zlib
from typing import Any, BinaryIO, Iterable, Iterator

# At import, not on first save: an import holds a per-module lock, and a fork()
# that lands while another thread imports leaves the child's first save waiting
# for ever on a lock whose holder does not exist there. Costs ~6 ms and ~0.3 MB
# (measured with `ls`, which otherwise would not need a pickler).
import cloudpickle

__all__ = [
    "Encoded",
    "encode",
    "decode_bytes",
    "read_frame",
    "meta_to_json",
    "meta_from_json",
    "FRAME_MAGIC",
    "write_all",
    "Signer",
    "Verifier",
    "SignatureError",
    "checking_only",
    "verifier_for",
    "CHECKED",
]

FRAME_MAGIC = b"A2KF"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Read and checksum big buffers in slices: bounded extra memory, and the
# CRC runs on data that is still hot in the cache.
_CHUNK = 16 << 20
_MMAP_MIN = 1 << 20


class Encoded:
    """A pickled value as a list of parts, ready to be written anywhere."""

    __slots__ = ("parts", "header", "size", "crc")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.header = (
            FRAME_MAGIC + _U32.pack(len(parts)) + b"".join(_U64.pack(p.nbytes) for p in parts)
        )
        self.size = len(self.header) + sum(p.nbytes for p in parts)
        crc = 0
        for p in parts:
            crc = _crc_update(crc, p)
        self.crc = f"{crc:08x}"

    def to_bytes(self) -> bytes:
        """The whole frame as one bytes object (for small values kept inline)."""
        return b"".join([self.header, *self.parts])

    def write_to(self, f: BinaryIO) -> None:
        """Write the frame to an open binary file, each part from its own memory."""
        write_all(f, memoryview(self.header))
        for p in self.parts:
            write_all(f, p)

    def chunks(self) -> Iterable[memoryview]:
        """The frame as a sequence of byte views (for streaming writers)."""
        yield memoryview(self.header)
        for p in self.parts:
            for i in range(0, p.nbytes, _CHUNK):
                yield p[i : i + _CHUNK]


def write_all(f: BinaryIO, view: memoryview) -> None:
    """Write all of ``view``: an unbuffered file may write less than asked.

    A short write is what a file-size limit or a nearly full disk produces
    first (the error comes only on the next call); ignoring it would leave a
    truncated entry that claims to be complete.
    """
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    done = 0
    while done < view.nbytes:
        n = f.write(view[done:])
        if n is None:  # a non-blocking file that would block: not ours
            raise OSError("write would block")
        if n == 0:
            raise OSError(f"no progress writing {view.nbytes - done} more bytes")
        done += n


def _crc_update(crc: int, view: memoryview) -> int:
    for i in range(0, view.nbytes, _CHUNK):
        crc = zlib.crc32(view[i : i + _CHUNK], crc)
    return crc


def encode(value: Any) -> Encoded:
    """Pickle ``value``; raises whatever the pickler raises for unpicklable values."""
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


def _check(crc: int, expected: str | None) -> None:
    if expected is None:
        # Every entry this library writes records one: its absence is damage.
        raise ValueError("the entry's metadata has no checksum")
    if f"{crc:08x}" != expected:
        raise ValueError(f"checksum mismatch (stored {expected}, computed {crc:08x})")


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
    # Out-of-band buffers get their own writable memory, as the original had.
    if getattr(_mode, "check_only", False):
        return CHECKED
    return pickle.loads(parts[0], buffers=[bytearray(p) for p in parts[1:]])


def read_frame(f: BinaryIO, expected_crc: str | None, source: str, verifier: Verifier | None = None) -> Any:
    """Check (checksum, and MAC when a verifier is given) and unpickle a frame read from a file."""
    head = _read_exact(f, 8, source)
    (n,) = _U32.unpack_from(head, 4)
    if n > 1 << 20:
        raise ValueError(f"implausible part count {n} in {source}")
    header = head + _read_exact(f, 8 * n, source)
    lengths = _parse_header(header, source)
    if verifier is not None:
        verifier.update(header)
    parts: list[Any] = []
    crc = 0
    for length in lengths:
        buf = _buffer(length)
        view = memoryview(buf)
        for i in range(0, length, _CHUNK):
            chunk = view[i : i + _CHUNK]
            got = f.readinto(chunk)  # type: ignore[attr-defined]
            while got is not None and got < chunk.nbytes:
                more = f.readinto(chunk[got:])  # type: ignore[attr-defined]
                if not more:
                    raise ValueError(f"{source} is truncated")
                got += more
            crc = zlib.crc32(chunk, crc)
            if verifier is not None:
                verifier.update(chunk)
        parts.append(buf)
    if f.read(1):
        raise ValueError(f"{source} has trailing bytes after its frame")
    _check(crc, expected_crc)
    if verifier is not None:
        verifier.check()
    return _unpickle(parts[0], parts[1:])


def _buffer(length: int) -> Any:
    """Writable memory for one part.

    Large parts are not zero-filled first (``bytearray(n)`` writes n zeros
    that ``readinto`` then overwrites). Where numpy is already loaded (the
    usual case for a large part: it is an array) its allocator is used: it
    asks the kernel for huge pages, which made a warm 512 MB load 2.5x
    faster than anonymous mmap memory here.
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


_META_HEAD = '{"_crc":"'


def meta_to_json(meta: dict[str, Any]) -> str:
    """Serialize a metadata record, with a CRC-32 of itself as its first field.

    Keys are sorted (stable for MACs). The record checks itself because a
    damaged field is as dangerous as a damaged value: a flipped byte in
    ``"crc32"`` would otherwise switch the value's check off, and one in
    ``"is_awaitable"`` would change what a hit returns. The checksum stays
    inside valid JSON (``{"_crc":"...",...}``) so SQL users can still query it.
    """
    body = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if body == "{}":
        return f'{_META_HEAD}{zlib.crc32(body.encode("utf-8")):08x}"}}'
    return f'{_META_HEAD}{zlib.crc32(body.encode("utf-8")):08x}",{body[1:]}'


def meta_from_json(text: str | bytes) -> dict[str, Any]:
    """Check and parse a record written by ``meta_to_json``; ValueError on damage."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    n = len(_META_HEAD)
    if not text.startswith(_META_HEAD) or text[n + 8 : n + 10] not in ('",', '"}'):
        raise ValueError("the metadata record has no checksum header")
    body = "{" + text[n + 10 :] if text[n + 8 : n + 10] == '",' else "{}"
    if f"{zlib.crc32(body.encode('utf-8', 'surrogatepass')):08x}" != text[n : n + 8]:
        raise ValueError("the metadata record fails its checksum")
    meta = json.loads(body)
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


# -- signing: HMAC-SHA256 over the metadata record and the frame -----------


class Verifier:
    """Accumulates an entry's bytes and checks its MAC before anything is unpickled."""

    def __init__(self, secret: bytes, meta: dict[str, Any]) -> None:
        self._mac = _mac_start(secret, meta)
        self._expected = meta.get("mac")

    def update(self, data: bytes | memoryview) -> None:
        self._mac.update(data)

    def check(self) -> None:
        if not isinstance(self._expected, str):
            raise SignatureError("the entry is not signed, and a signing key is in use")
        if not hmac.compare_digest(self._mac.hexdigest(), self._expected):
            raise SignatureError("its signature (HMAC) does not match: it was altered or signed with another key")


class SignatureError(ValueError):
    """Raised inside the codec; the store reports it as a damaged entry."""


def _mac_start(secret: bytes, meta: dict[str, Any]) -> Any:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    body = {k: v for k, v in meta.items() if k != "mac"}
    mac.update(meta_to_json(body).encode("utf-8"))
    return mac


class Signer:
    """Signs entries with a secret key, and makes verifiers for reading them."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("a signing key must not be empty")
        self._secret = secret

    def sign(self, meta: dict[str, Any], encoded: Encoded) -> str:
        mac = _mac_start(self._secret, meta)
        mac.update(encoded.header)
        for part in encoded.parts:
            mac.update(part)
        return str(mac.hexdigest())

    def verifier(self, meta: dict[str, Any]) -> Verifier:
        return Verifier(self._secret, meta)


def verifier_for(signer: Signer | None, meta: dict[str, Any]) -> Verifier | None:
    """The verifier a loader hands to the decoder: None when no signing key is in use."""
    return None if signer is None else signer.verifier(meta)
