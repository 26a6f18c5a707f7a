"""The state the commands share: the output streams, the store opened on first use, progress bars, prompts.

The commands themselves live in ``_inspect`` and ``_change``, each beside
its declaration; this base holds only what every command needs.
"""

from __future__ import annotations

from typing import IO, Iterable, Optional

from .. import _maintenance, _ops
from ..stores import Store, is_postgres_url
from ._declare import PROG, UsageError

__all__ = ["ToolBase"]


class ToolBase:
    """The store the line works on, opened when a command first needs it, and where lines go."""

    def __init__(self, out: IO[str], err: IO[str], stdin: Optional[IO[str]], prog: str = PROG) -> None:
        self._prog = prog
        self._out = out
        self._err = err
        self._stdin = stdin
        self._location: str | None = None
        self._store: Store | None = None
        self._writable = False
        self._ran = False
        self._warned: str | None = None  # the location whose side-file folder was checked

    def _emit(self, line: str = "") -> None:
        self._out.write(line + "\n")

    def _note(self, line: str) -> None:
        self._err.write(line + "\n")

    def _open(self, write: bool = False) -> Store:
        if self._location is None:  # plan() always puts a load first
            raise UsageError("no store: start with 'load STORE'")
        if self._store is not None and (self._writable or not write):
            return self._store
        self.close()
        # Read-only for ls/show: they must never create, migrate or lock anything.
        self._store = _ops.open_existing(self._location, readonly=not write, allow_newer=False)
        self._writable = write
        if self._warned != self._location:
            # Said where it is first noticed: a copy made without the side-file
            # folder lists every entry but reads none of those kept there.
            self._warned = self._location
            problem = self._store.missing_side_files()
            if problem is not None:
                self._note(f"warning: {self._store.location}: {problem}")
        return self._store

    def _progress(self) -> _maintenance.Progress:
        """A progress bar on stderr when it is a terminal; nothing when piped or redirected."""
        try:
            tty = self._err.isatty()
        except (ValueError, OSError):
            tty = False
        if not tty:
            return _maintenance.no_progress
        from tqdm import tqdm  # only interactive runs pay for the import

        err = self._err

        def bar(items: Iterable[str], total: Optional[int], label: str) -> Iterable[str]:
            return tqdm(items, total=total, desc=label, unit=" entries", file=err, leave=False,
                        dynamic_ncols=True, mininterval=0.2)

        return bar

    def _shown(self) -> str:
        """The store as the user named it, for hints; a URL without its password."""
        if self._location is not None and is_postgres_url(self._location) and self._store is not None:
            return self._store.location
        return self._location or ""

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()
