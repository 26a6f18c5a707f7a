"""Fields of a store's records as text for people and for JSON lines, whatever they hold.

Shared by the CLI, the HTML report and scripts. Every field shown comes from
a store, which anyone with write access to it (or a crafted file) controls:
these helpers accept any value and never raise, so a strange record costs a
'-' and never a traceback. ``printable`` is the one escaping function for
every field shown; ``unescape`` turns its form back into the name.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

__all__ = [
    "MAX_TIME",
    "number",
    "count",
    "when",
    "format_size",
    "format_duration",
    "json_safe",
    "json_line",
    "printable",
    "printable_key",
    "unescape",
]


#: Seconds since 1970 that a timestamp shown may take: up to the end of the
#: year 9999 (what strftime can write); anything else is shown as '-'.
MAX_TIME = 253402300799.0


def number(x: object, *, low: float = 0.0, high: float = float("inf")) -> float | None:
    """``x`` as a finite float within [low, high], or None (booleans and huge ints included)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except OverflowError:  # an int beyond float range
        return None
    if not math.isfinite(f) or not low <= f <= high:
        return None
    return f


def count(x: object) -> int | None:
    """``x`` when it is a whole number from 0 to 2**63, else None."""
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63:
        return x
    return None


def when(t: object) -> str:
    """A timestamp as local ``YYYY-MM-DD HH:MM:SS``; '-' for anything that is not one."""
    f = number(t, high=MAX_TIME)
    if f is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f))
    except (OverflowError, OSError, ValueError):  # outside the platform's time_t or tz tables
        return "-"


def format_size(n: object) -> str:
    """Bytes as a short human string: ``format_size(1536) == '1.5 KiB'``; '-' when not a size."""
    size = number(n)
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def format_duration(seconds: object) -> str:
    """Seconds as a short human string: ``format_duration(75) == '1m15s'``; '-' when not a duration."""
    s = number(seconds)
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.2f}s" if s < 10 else f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with what JSON cannot hold replaced: NaN and infinities by None, other types by text."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 50:
        return "(nested too deeply to show)"  # no record of ours nests this deep
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return str(value)


def json_line(record: Any) -> str:
    """``record`` as one line of valid JSON that every line splitter and terminal keeps whole.

    Non-finite numbers become null (``json.dumps`` would write ``NaN``,
    which is not JSON). ``json.dumps`` leaves U+2028 and U+2029 raw (they
    are valid in JSON strings), and ``str.splitlines()`` (and JavaScript)
    break lines there; escaped, a key holding them stays on its line. C1
    and bidi controls are escaped the same way, and so are lone surrogates
    (the bytes of a name that is not UTF-8), which no encoder could write.
    """
    try:
        text = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError):  # NaN, Infinity, a type JSON has not: the careful way
        text = json.dumps(json_safe(record), sort_keys=True, ensure_ascii=False, allow_nan=False)
    if _HIDDEN.search(text) is None:
        return text
    return _HIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


#: Characters never shown raw: controls (C0, DEL, C1: category Cc), the
#: characters that reorder the text around them (bidi embeddings, overrides,
#: isolates and marks: a key holding U+202E prints reversed), the line and
#: paragraph separators (Zl, Zp), and lone surrogates (Cs: the bytes of a
#: name that is not UTF-8). One regular expression: a listing of a million
#: keys checks each in C.
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
                     "\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:
        return f"\\x{n - 0xDC00:02x}"  # a byte of a name that is not UTF-8 (surrogateescape)
    if n < 0x80:
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{n:02x}")
    return f"\\u{n:04x}"


def printable(text: object) -> str:
    r"""Any value as text safe to print on one terminal line.

    The one escaping function for every field printed from a store (keys,
    function names, call sites, hosts, users, arguments, messages), and for
    the report before its HTML escaping. Escaped: C0 and C1 controls and DEL
    (``\n``, ``\t``, ``\x1b``, ``\u0085``), bidi controls (``\u202e``), line
    and paragraph separators (``\u2028``), and the bytes of names that are
    not UTF-8 (``\xff``; ``unescape`` turns that form back into the name).
    Everything else, a backslash included, stays as it is.

    >>> printable("a\u2028b/\u00e9\x1b[31m")
    'a\\u2028b/é\\x1b[31m'
    """
    s = text if isinstance(text, str) else str(text)
    if _HIDDEN.search(s) is None:
        return s
    return _HIDDEN.sub(_escape_char, s)


def printable_key(key: str) -> str:
    """A key on one line for people (``printable``)."""
    return printable(key)


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|n|t|r)")


def unescape(text: str) -> str:
    r"""The name that ``printable`` showed as ``text`` (``\xff``: the byte 0xff of a file name).

    >>> unescape("caf\\xe9") == "caf\udce9"
    True
    """
    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] == "x":
            n = int(e[1:], 16)
            return chr(n if n < 0x80 else 0xDC00 + n)
        if e[0] == "u":
            return chr(int(e[1:], 16))
        return {"n": "\n", "t": "\t", "r": "\r"}[e]

    return _ESCAPE.sub(one, text)
