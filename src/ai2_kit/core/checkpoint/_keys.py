"""Key rules, and prefix / glob matching over keys."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable

from ._errors import InvalidKeyError

__all__ = ["validate_key", "is_glob", "key_matcher", "prefix_of"]

_GLOB_CHARS = frozenset("*?[")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid checkpoint key, else raise InvalidKeyError.

    >>> validate_key("iters-000/deepmd/red")
    'iters-000/deepmd/red'
    """
    if not isinstance(key, str):
        raise InvalidKeyError(key, f"a key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, "the key is empty")
    if "\x00" in key:
        raise InvalidKeyError(key, "the key contains a NUL character")
    if key.startswith("/"):
        raise InvalidKeyError(key, "absolute keys are not allowed")
    for part in key.split("/"):
        if part == "":
            raise InvalidKeyError(key, "a part between '/' is empty")
        if part in (".", ".."):
            raise InvalidKeyError(key, f"the part {part!r} is not allowed")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(key, "the key is not valid unicode (lone surrogate)") from None
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
