"""What several engines share: key ranges, keyset listing, and opening errors as one-line messages."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from .._codec import meta_from_json
from .._errors import StoreOpenError
from ._base import own_key
from ._fs import fix_for

__all__ = ["successor", "iter_meta_pages", "read_error", "stat_error"]


def successor(prefix: str) -> Optional[str]:
    """The smallest string greater than every string that starts with ``prefix``."""
    while prefix:
        c = ord(prefix[-1])
        if c < 0x10FFFF:
            nxt = c + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be stored: skip them
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


#: ``fetch(op, bound, upper, limit)``: rows ``(key, meta JSON)`` with ``key <op> bound``
#: (``op`` is ``>=`` or ``>``) and, when ``upper`` is not None, ``key < upper``, in
#: key order, at most ``limit`` of them.
Fetch = Callable[[str, str, Optional[str], int], "list[Any]"]


def iter_meta_pages(fetch: Fetch, prefix: str, page_size: int) -> Iterator[dict[str, Any]]:
    """Every entry's metadata under ``prefix``, in key order, read in keyset pages.

    Each page is a query of its own and nothing stays open between two:
    the caller may write (remove what it lists) or fork while it iterates.
    A record that cannot be read is listed as damaged and the listing goes on.
    """
    upper = successor(prefix) if prefix else None
    op, bound = ">=", prefix
    while True:
        rows = fetch(op, bound, upper, page_size)
        for key, text in rows:
            try:
                yield own_key(key, meta_from_json(text))
            except ValueError as e:
                yield {"key": key, "damaged": f"unreadable metadata ({e})"}
        if len(rows) < page_size:
            return
        op, bound = ">", rows[-1][0]


def read_error(path: str, e: OSError) -> StoreOpenError:
    """The error for a store file that could not be read (its head, or the whole of it)."""
    if isinstance(e, PermissionError):
        return StoreOpenError(path, "permission denied", "Check the file's permissions")
    return StoreOpenError(path, f"cannot read it ({e.strerror or e})", fix_for(e))


def stat_error(path: str, e: OSError) -> StoreOpenError:
    """The error for a store location that could not be looked at (``stat``), a missing one aside."""
    if isinstance(e, NotADirectoryError):
        return StoreOpenError(path, "a parent of the path is a file, not a folder", "Check the path")
    if isinstance(e, PermissionError):
        return StoreOpenError(path, "permission denied", "Check the permissions of its folders")
    return StoreOpenError(path, e.strerror or str(e), fix_for(e))  # a loop of links, a name too long...
