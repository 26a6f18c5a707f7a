"""Values to bytes and back, independent of where the bytes are stored.

A value is pickled with cloudpickle at protocol 5. Large contiguous buffers
(numpy arrays, bytearrays) are taken out of band, so they are written from
and read into their own memory without an intermediate copy. The pieces are
laid out in a *frame*:

    b"A2KF" | u32 n | n x u64 part lengths | part 0 (pickle stream) | part 1..n-1

A CRC-32 over all parts is recorded in the entry's metadata and checked before
anything is unpickled, so a flipped byte is reported, never returned. Big
buffers are checksummed with zlib-ng's CRC-32 when it is installed (the same
function as ``zlib.crc32``, same values, about 8x faster here), and read with
the checksum of one slice running in a second thread while the next slice is
read; the value is handed to pickle only once the whole checksum matched.
Written, each slice of a big frame is handed to the disk at once, so that
the caller's fsync waits for the last slices only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import mmap
import operator
import os
import pickle
import queue
import struct
import sys
import threading
import zlib
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

# At import, not on first save: an import holds a per-module lock, and a fork()
# that lands while another thread imports leaves the child's first save waiting
# for ever on a lock whose holder does not exist there. Costs ~6 ms and ~0.3 MB
# (measured with `ls`, which otherwise would not need a pickler).
import cloudpickle

__all__ = [
    "Encoded",
    "encode",
    "settle_crc",
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
_ONE_PART = FRAME_MAGIC + b"\x01\x00\x00\x00"  # the header's start for a frame of one part
# Read, write and checksum big buffers in slices: the checksum thread works
# on one slice while the next is read or written. Smaller slices made cold
# reads slower here (4 MB: ~1.07x np.load's single read; 16 MB and up: 1.00x).
_CHUNK = 16 << 20
_MMAP_MIN = 1 << 20
# Frames at least this big are checksummed in a second thread while being
# read (starting the thread costs ~0.1 ms, reading 8 MB ~1.5 ms warm).
_THREAD_MIN = 8 << 20
# Buffers at least this big use the fast CRC-32 (loaded on first use: see _fast_crc32).
_FAST_MIN = 1 << 16

_Crc32 = Callable[[Any, int], int]
_fast: Optional[_Crc32] = None
# Held while the fast CRC module is imported, and by fork() (see _fast_crc32).
_import_lock = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_import_lock.acquire,
        after_in_parent=_import_lock.release,
        after_in_child=_import_lock.release,
    )


def _fast_crc32() -> _Crc32:
    """zlib-ng's CRC-32 if installed and correct here, else the standard library's.

    Imported on the first big buffer, not with this module: it adds ~0.6 MB
    to every process, and commands such as ``ls`` never checksum a value.
    An import holds a per-module lock that a fork() landing mid-import would
    leave held for ever in the child; the fork hooks above make fork() wait
    for this import instead.
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


# <linux/fs.h>: start write-out of the range's dirty pages, do not wait. Never with a WAIT flag:
# waiting checks (and so consumes) a write error of the file, which the caller's fsync must see.
_SYNC_FILE_RANGE_WRITE = 2
_Starter = Callable[[int, int, int, int], int]
_WRITEBACK_MIN = 1 << 20
#: ``sync_file_range`` from the C library once looked up; False where there is none.
_sync_file_range: Any = None


def _writeback_starter() -> _Starter | None:
    """Linux's ``sync_file_range`` through ctypes, or None (another system, or no such symbol).

    Looked up on the first big write (ctypes costs ~4 ms to import, and most
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
    slice by slice, they overlap (512 MB here: 0.68x the time of writing it
    and then fsyncing). Only a hint: it makes nothing durable (the caller
    still fsyncs before the entry becomes visible), and a failure here just
    stops the hints for this file.
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


def _crc_update(crc: int, view: memoryview) -> int:
    if view.nbytes < _FAST_MIN:
        return zlib.crc32(view, crc)
    fn = _fast_crc32()
    for i in range(0, view.nbytes, _CHUNK):
        crc = fn(view[i : i + _CHUNK], crc)
    return crc


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
    and the standard C pickler is ~2x faster for a small value (cloudpickle
    calls back into Python for every container and builds its pickler in
    Python). Subclasses (OrderedDict, an IntEnum), instances, functions,
    arrays: not plain, and cloudpickle writes them as before.
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


def _fill(f: BinaryIO, chunk: memoryview, source: str) -> None:
    """Read exactly ``chunk.nbytes`` bytes into ``chunk``."""
    got = f.readinto(chunk)  # type: ignore[attr-defined]
    while got is not None and got < chunk.nbytes:
        more = f.readinto(chunk[got:])  # type: ignore[attr-defined]
        if not more:
            raise ValueError(f"{source} is truncated")
        got += more


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
# One encoder for every record: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- a save's usual record, written without the general encoder ------------------
# What the checkpointer saves for a step (the store's fields, the wrapper's and
# a fingerprint record): in sorted order, with the type each must have. The
# general encoder sorts and inspects ~40 keys and values per save; these are
# known, and the fingerprint's parts that are the same for every call of a
# step (code, helpers, environment) are encoded once (``_STATIC_JSON``).
# Anything else (other fields, other types, a non-finite float) takes the
# general encoder; both give the same text (tests/test_save_path.py).
_SAVE_FIELDS = (
    ("call_site", str), ("crc32", str), ("created", float), ("duration", float), ("fingerprint", dict),
    ("fn_name", str), ("format", int), ("fpd", str), ("host", str), ("is_awaitable", bool),
    ("key", str), ("pid", int), ("run", str), ("size", int), ("version", str),
)
_SAVE_KEYS = frozenset(name for name, _ in _SAVE_FIELDS)
_save_values = operator.itemgetter(*(name for name, _ in _SAVE_FIELDS))
#: The types of the fields but the fingerprint (a dict or a subclass).
_SAVE_TYPES = tuple(t for name, t in _SAVE_FIELDS if name != "fingerprint")
_STATIC_FP = ("bc", "code", "env", "fn", "helpers")
_FP_KEYS = frozenset(("args", "unhashable", "v", *_STATIC_FP))
_FP_KEYS_NO_HELPERS = _FP_KEYS - {"helpers"}
#: code digest -> (copy of the static parts, their JSON text between "args" and "unhashable").
_STATIC_JSON: dict[Any, tuple[tuple[Any, ...], str]] = {}
_enc_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
_float_repr = float.__repr__
_int_repr = int.__repr__
_INF = float("inf")


def _str_map(d: Any) -> Optional[str]:
    """JSON of a dict of str to str, keys sorted (an argument fingerprint map); None if not one."""
    if type(d) is not dict:
        return None
    parts = []
    for k in sorted(d) if len(d) > 1 else d:
        v = d[k]
        if type(k) is not str or type(v) is not str:
            return None
        parts.append(_enc_str(k) + ":" + _enc_str(v))
    return "{" + ",".join(parts) + "}"


def _fingerprint_json(fp: Any) -> Optional[str]:
    if not isinstance(fp, dict) or type(fp.get("v")) is not int:
        return None
    keys = fp.keys()
    if keys != _FP_KEYS and keys != _FP_KEYS_NO_HELPERS:
        return None
    args, unhashable = fp["args"], fp["unhashable"]
    # The usual: one argument, none unhashable (written out: a save's every call).
    if type(args) is dict and len(args) == 1:
        (name, value), = args.items()
        args = "{" + _enc_str(name) + ":" + _enc_str(value) + "}" if type(name) is str and type(value) is str else None
    else:
        args = _str_map(args)
    unhashable = "{}" if type(unhashable) is dict and not unhashable else _str_map(unhashable)
    if args is None or unhashable is None:
        return None
    static = (fp.get("bc"), fp.get("code"), fp.get("env"), fp.get("fn"), fp.get("helpers"))  # _STATIC_FP
    got = _STATIC_JSON.get(static[1]) if type(static[1]) is str else None
    # Equal to a fresh copy (not the same objects): a record changed in place
    # is never written with the text of what it was.
    if got is None or got[0] != static:
        text = _JSON.encode({k: v for k, v in zip(_STATIC_FP, static) if v is not None or k != "helpers"})
        # Copied through JSON: only a record that encodes the same compares equal
        # (JSON keeps str, int, list, dict; anything else is not cached).
        copy = tuple(json.loads(text).get(k) for k in _STATIC_FP)
        if copy != static or "helpers" in keys and static[4] is None:
            return None
        if type(static[1]) is str:
            if len(_STATIC_JSON) >= 256:
                _STATIC_JSON.clear()
            _STATIC_JSON[static[1]] = (copy, text[1:-1])
        got = (copy, text[1:-1])
    return '{"args":' + args + "," + got[1] + ',"unhashable":' + unhashable + ',"v":' + _int_repr(fp["v"]) + "}"


def _save_record(meta: Any) -> Optional[str]:
    """``_JSON.encode(meta)`` for a save's usual record, or None (use the encoder)."""
    if type(meta) is not dict or meta.keys() != _SAVE_KEYS:
        return None
    (site, crc, created, duration, fp, fn_name, fmt, fpd, host, awaitable, key, pid, run, size,
     version) = _save_values(meta)
    if (type(site), type(crc), type(created), type(duration), type(fn_name), type(fmt), type(fpd), type(host),
            type(awaitable), type(key), type(pid), type(run), type(size), type(version)) != _SAVE_TYPES:
        return None
    if not (-_INF < created < _INF and -_INF < duration < _INF):
        return None  # the encoder's NaN and Infinity
    fp_text = _fingerprint_json(fp)
    if fp_text is None:
        return None
    return (
        f'{{"call_site":{_enc_str(site)},"crc32":{_enc_str(crc)},"created":{_float_repr(created)},'
        f'"duration":{_float_repr(duration)},"fingerprint":{fp_text},"fn_name":{_enc_str(fn_name)},'
        f'"format":{_int_repr(fmt)},"fpd":{_enc_str(fpd)},"host":{_enc_str(host)},'
        f'"is_awaitable":{"true" if awaitable else "false"},"key":{_enc_str(key)},"pid":{_int_repr(pid)},'
        f'"run":{_enc_str(run)},"size":{_int_repr(size)},"version":{_enc_str(version)}}}'
    )


def meta_to_json(meta: dict[str, Any]) -> str:
    """Serialize a metadata record, with a CRC-32 of itself as its first field.

    Keys are sorted (stable for MACs). The record checks itself because a
    damaged field is as dangerous as a damaged value: a flipped byte in
    ``"crc32"`` would otherwise switch the value's check off, and one in
    ``"is_awaitable"`` would change what a hit returns. The checksum stays
    inside valid JSON (``{"_crc":"...",...}``) so SQL users can still query it.
    """
    body = _save_record(meta)
    if body is None:
        body = _JSON.encode(meta)
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
    try:
        meta = json.loads(body)
    except RecursionError:  # a crafted record: listing goes on past it as a damaged one
        raise ValueError("the metadata record is nested too deeply") from None
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
