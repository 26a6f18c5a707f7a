"""Key rules, and prefix / glob matching over keys."""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Callable

from ._errors import InvalidKeyError

__all__ = ["validate_key", "is_glob", "key_matcher", "prefix_of", "MAX_KEY_BYTES"]

_GLOB_CHARS = frozenset("*?[")
#: Longest key, in UTF-8 bytes: every engine indexes keys (PostgreSQL's
#: b-tree refuses entries over about 2.7 KB), so all share one limit.
MAX_KEY_BYTES = 1024
# Control characters break line-by-line listings and shell use of keys.
_CONTROL = re.compile("[\x01-\x1f\x7f]")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid checkpoint key, else raise InvalidKeyError.

    >>> validate_key("iters-000/deepmd/red")
    'iters-000/deepmd/red'
    """
    if type(key) is str:
        if len(key) <= MAX_KEY_BYTES and _PLAIN(key) is not None:
            return key  # the common shape, valid by construction (a workflow's keys are new each call)
        return _validate_str(key)  # cached: a call checks its key several times
    return _validate(key)


#: Keys that pass every rule of ``_validate`` on sight: ASCII letters, digits,
#: ``_-.``, parts joined by ``/``, no part starting with a dot (so none is
#: "." or ".."), at most MAX_KEY_BYTES characters (one byte each). Checking
#: one regular expression costs a third of the rules, and far less than
#: the cache of ``_validate_str`` misses cost.
_PLAIN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*").fullmatch


@functools.lru_cache(maxsize=1 << 16)
def _validate_str(key: str) -> str:
    return _validate(key)


def _validate(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidKeyError(key, f"a key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, "the key is empty")
    if "\x00" in key:
        raise InvalidKeyError(key, "the key contains a NUL character")
    if _CONTROL.search(key):
        raise InvalidKeyError(key, "the key contains a control character (newline, tab, ...)")
    if key.startswith("/"):
        raise InvalidKeyError(key, "absolute keys are not allowed")
    for part in key.split("/"):
        if part == "":
            raise InvalidKeyError(key, "a part between '/' is empty")
        if part in (".", ".."):
            raise InvalidKeyError(key, f"the part {part!r} is not allowed")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKeyError(key, "the key is not valid unicode (lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(key[:40] + "...", f"the key is {size} bytes long; the limit is {MAX_KEY_BYTES}")
    return key


def is_glob(pattern: str) -> bool:
    """True when ``pattern`` has any of the glob characters ``* ? [``."""
    return any(c in _GLOB_CHARS for c in pattern)


def prefix_of(pattern: str) -> str:
    """The literal text before the first glob character (for narrowing a scan)."""
    for i, c in enumerate(pattern):
        if c in _GLOB_CHARS:
            return pattern[:i]
    return pattern


def key_matcher(pattern: str | None) -> Callable[[str], bool]:
    """A predicate for ``ls``/``rm`` patterns.

    Without glob characters the pattern names a key and everything below it
    (``a/b`` matches ``a/b`` and ``a/b/c`` but not ``a/bc``). With ``* ? [``
    it is a glob over whole keys, where ``*`` also crosses ``/``.

    >>> m = key_matcher("iters-000/deepmd")
    >>> m("iters-000/deepmd/red"), m("iters-000/deepmd-old")
    (True, False)
    """
    if pattern is None or pattern == "":
        return lambda key: True
    if is_glob(pattern):
        rx = re.compile(fnmatch.translate(pattern), re.DOTALL)
        return lambda key: rx.match(key) is not None
    base = pattern.rstrip("/")
    below = base + "/"
    return lambda key: key == base or key.startswith(below)
