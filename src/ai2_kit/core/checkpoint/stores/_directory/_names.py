"""Names and recognition: how a key maps to a file name and back, and what a file in a store
folder is (ours, the reference's, a temporary file), from its name and first bytes alone."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from typing import Any

from .._fs import read_head
from .._inert import HEAD_BYTES, is_reference_record_head

__all__ = [
    "ENTRY_MAGIC", "SUFFIX", "MARKER", "CLAIMS", "RUNS", "SHORT", "U32", "is_pickle_head", "encode_part",
    "unquote", "legacy_meta", "unwrap_legacy", "is_reference_entry", "is_our_entry_file", "is_regular",
    "is_our_temp",
]

ENTRY_MAGIC = b"A2KE"
SUFFIX = ".ckpt"
MARKER = ".ai2-kit-checkpoint"
CLAIMS = ".claims"
RUNS = ".runs"
U32 = struct.Struct("<I")
_MAX_NAME = 250  # bytes; most file systems allow 255 per name
#: Marks a path component shortened to fit a file name: the head of the
#: quoted part, ``%L``, then a digest of the whole part. ``_quote`` turns every
#: '%' into '%25', so no unshortened component contains ``%L``.
SHORT = "%L"
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


def unquote(part: str) -> str:
    return part.replace("%2E", ".").replace("%25", "%")


def encode_part(part: str) -> str:
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
    return head + SHORT + hashlib.sha256(part.encode("utf-8")).hexdigest()[:40]


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


def is_our_entry_file(path: str) -> bool:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return read_head(path, len(ENTRY_MAGIC)) == ENTRY_MAGIC
    except OSError:
        return False


def is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_our_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")

