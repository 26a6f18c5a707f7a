"""What a hit reads: the statements that write and read the hit columns, the hit CRC binding
key, flag and frame, and the short look-up's answer from the row it read."""

from __future__ import annotations

import pickle
import sqlite3
import struct
import zlib
from typing import Any, Callable, Optional

from ..._codec import FRAME_MAGIC, _fast_crc32

__all__ = [
    "ANY_CALL", "INSERT", "INSERT_OLD", "UPSERT", "HAS_UPSERT", "FAST_SELECT", "FAST_SELECT_ANY",
    "SMALL_SELECT", "SMALL_SELECT_ANY", "key_crc", "hit_crc", "hit_columns", "fast_value",
]

#: ``fpd`` of an entry saved without fingerprints (stale="ignore", a migrated
#: reference entry): any call may have it, as ``Checkpointer.accept`` says.
ANY_CALL = "-"

INSERT = ("INSERT OR REPLACE INTO entries (key, created, meta, value, blob, fpd, hcrc, dur, aw) "
          "VALUES (?,?,?,?,?,?,?,?,?)")
#: For a file whose schema may not be changed: the columns it has.
INSERT_OLD = "INSERT OR REPLACE INTO entries (key, created, meta, value, blob) VALUES (?,?,?,?,?)"
#: A lone save's one statement (its own transaction): a new row, or one that
#: replaces a row without a side file; a row that names one is left as it was
#: (no change counted) for the batch path, which reads the name to remove the
#: file once the replacing row has committed. (UPSERT: SQLite 3.24.)
UPSERT = (
    "INSERT INTO entries (key, created, meta, value, blob, fpd, hcrc, dur, aw) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (key) DO UPDATE SET created=excluded.created, meta=excluded.meta, value=excluded.value, "
    "blob=excluded.blob, fpd=excluded.fpd, hcrc=excluded.hcrc, dur=excluded.dur, aw=excluded.aw "
    "WHERE entries.blob IS NULL"
)
HAS_UPSERT = sqlite3.sqlite_version_info >= (3, 24, 0)
# The digest is compared by SQLite, on the row the key's index found; no
# row is a miss, settled by this one query (a miss runs a step and saves).
# The third column is ``hcrc * 2 + aw`` when the digest matches and the
# flag is sane, else NULL (the full way): fewer columns to convert, and
# converting them is a good part of a hit's query.
FAST_SELECT = ("SELECT value, dur, CASE WHEN (fpd IS ? OR fpd = '-') AND aw IN (0, 1) THEN hcrc * 2 + aw END "
               "FROM entries WHERE key=?")
FAST_SELECT_ANY = "SELECT value, dur, CASE WHEN aw IN (0, 1) THEN hcrc * 2 + aw END FROM entries WHERE key=?"
#: The same for a read on the event loop: the value only up to a size (``lookup_fast(limit=)``).
SMALL_SELECT = ("SELECT CASE WHEN length(value) <= ? THEN value END, dur, "
                "CASE WHEN (fpd IS ? OR fpd = '-') AND aw IN (0, 1) THEN hcrc * 2 + aw END, "
                "length(value) FROM entries WHERE key=?")
SMALL_SELECT_ANY = ("SELECT CASE WHEN length(value) <= ? THEN value END, dur, "
                    "CASE WHEN aw IN (0, 1) THEN hcrc * 2 + aw END, length(value) FROM entries WHERE key=?")
_FAST_HEAD = FRAME_MAGIC + b"\x01\x00\x00\x00"  # one part: no out-of-band buffers
_LEN = struct.Struct("<Q").unpack_from


def key_crc(key: str) -> int:
    """The start of a hit CRC: the key's."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass"))


def hit_crc(kcrc: int, aw: int, frame: Any) -> int:
    """CRC-32 of the key, the awaitable flag and the frame, in that order.

    A damaged byte in any of them, or an index entry that leads to another
    key's row, fails it, and the hit goes the full way (metadata checksum,
    key check, frame checksum), which reports the damage. (A damaged digest
    only makes a fresh entry look different: the full way then judges it.)
    """
    crc = _frame_crc or _set_frame_crc()
    return crc(frame, kcrc if aw == 0 else crc(b"\x01", kcrc))


#: The CRC-32 of frames: zlib-ng's when it is installed and right (the same
#: values), set on first use (``_fast_crc32``).
_frame_crc: Optional[Callable[..., int]] = None


def _set_frame_crc() -> Callable[..., int]:
    global _frame_crc
    _frame_crc = _fast_crc32()
    return _frame_crc


def hit_columns(key: str, meta: dict[str, Any], value: Optional[bytes],
                signed: bool) -> tuple[Any, Optional[int], Optional[float], int]:
    """``(fpd, hcrc, dur, aw)`` of a row being written: no ``hcrc`` for a side file or a signed store."""
    fpd = meta.get("fpd") if meta.get("fingerprint") else ANY_CALL
    aw = 1 if meta.get("is_awaitable") else 0
    dur = meta.get("duration")
    hcrc = None
    if value is not None and not signed and (fpd is None or isinstance(fpd, str)):
        hcrc = hit_crc(key_crc(key), aw, value)
    return fpd, hcrc, dur if isinstance(dur, (int, float)) else None, aw


def fast_value(row: Any, key: str) -> Any:
    """What ``lookup_fast`` answers for the row it read of ``key``: ``(value, duration, is_awaitable)`` or None."""
    frame, dur, code = row[0], row[1], row[2]
    # Saved for another call (maybe stale: the full way judges it), before
    # the columns, with a side file, or damaged: the full way.
    if type(code) is not int or type(frame) is not bytes:
        return None
    # Checked before anything is unpickled.
    crc = _frame_crc or _set_frame_crc()
    kcrc = zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if crc(frame, kcrc if code & 1 == 0 else crc(b"\x01", kcrc)) != code >> 1:
        return None
    if not frame.startswith(_FAST_HEAD) or len(frame) < 16 or _LEN(frame, 8)[0] + 16 != len(frame):
        return None
    return pickle.loads(memoryview(frame)[16:]), dur, code & 1 == 1
