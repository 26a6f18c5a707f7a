"""What the commands print: escaped fields, counts, one-line errors, and the library's log lines.

Every field read from a store goes through ``printable`` (``_display.printable``,
the one escaping function) before it reaches a terminal, and every error the
CLI shows is one line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
from typing import IO, Callable, Iterator, Optional, Sequence

from .. import _display
from .._errors import InvalidKeyError
from .._keys import validate_key
from ..stores import Store

__all__ = [
    "printable", "when", "shorten", "shell_path", "not_a_key", "entries", "one_line", "os_error", "dash",
    "is_migration_log", "quiet", "library_logs_to",
]


def printable(text: object) -> str:
    """Any field from a store on one terminal line (``_display.printable``: the one escaping function)."""
    return _display.printable(text)


when = _display.when


def shorten(keys: Sequence[str], head: int = 10, tail: int = 5) -> list[str]:
    shown = [printable(k) for k in keys]
    if len(shown) <= head + tail + 5:
        return shown
    return [*shown[:head], f"... ({len(shown) - head - tail} more) ...", *shown[-tail:]]


def shell_path(path: str) -> str:
    """``path`` as a shell word that names its exact bytes: ``$'...\\xe9...'`` for a name that is not UTF-8."""
    raw = os.fsencode(path)
    if raw.isascii() and path.isprintable():
        return shlex.quote(path)
    return "$'" + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b"'\\" else f"\\x{b:02x}" for b in raw) + "'"


def not_a_key(store: Store, key: str) -> Optional[str]:
    """Why a listed name cannot be used as a key, and what removes it; None for a valid key.

    A reference 2024 folder may hold a file whose name is not UTF-8 (or
    holds a control character): listing shows it escaped, but no workflow
    and no command can address it as a key, so its file is named for ``rm``
    the way a shell can type it.
    """
    try:
        validate_key(key)
        return None
    except InvalidKeyError as e:
        why = one_line(e.reason)
    root = getattr(store, "root", None)
    where = (f"; remove its file with: rm {shell_path(os.path.join(root, *key.split('/')))}"
             if isinstance(root, str) else "")
    return f"{printable(key)} is not a valid key ({why}), so no step can use it{where}"


def entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def one_line(text: object) -> str:
    return printable(" ".join(str(text).split()))


def os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    target = f" {e.filename!r}" if e.filename else ""
    hint = {
        errno.EACCES: "Check the permissions",
        errno.EPERM: "Check the permissions",
        errno.EROFS: "The file system is read-only",
        errno.ENOSPC: "Free some disk space and retry",
        errno.ENOENT: "Check the path",
    }.get(e.errno or 0, "")
    return f"{what}:{target}" + (f". {hint}" if hint else "")


def dash(value: object) -> str:
    return "-" if value is None else str(value)


# -- the library's log records -------------------------------------------------------------
class _OneLineLogs(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self._prog = prog

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._prog}: {record.levelname.lower()}: {one_line(record.getMessage())}"


def is_migration_log(record: logging.LogRecord) -> bool:
    return record.funcName == "migrate_legacy_file" and record.levelno == logging.WARNING


@contextlib.contextmanager
def quiet(drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """Leave out the library's log records that ``drop`` picks, for a moment."""
    logger = logging.getLogger("ai2_kit")

    def keep(record: logging.LogRecord) -> bool:
        return not drop(record)

    handlers = list(logger.handlers)
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


@contextlib.contextmanager
def library_logs_to(stream: IO[str], prog: str) -> Iterator[None]:
    """Show the library's warnings as one line each, for this run only.

    The CLI is the host application, so it may decide how logs look; the
    handler is removed afterwards so that callers of ``run`` keep theirs.
    """
    logger = logging.getLogger("ai2_kit")
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLineLogs(prog))
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
