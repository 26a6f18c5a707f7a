"""Connections to a store file: how one is opened (read-write, read-only, immutable), the sync
setting every commit runs at, the journal mode, and the one write-transaction helper."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from typing import Iterator
from urllib.parse import quote

from .._fs import read_head

__all__ = [
    "BUSY_TIMEOUT_S", "connect", "connect_readonly", "wal_at_rest", "journal_mode", "set_journal_mode",
    "immediate", "end_transaction", "close_quietly", "is_busy",
]

logger = logging.getLogger("ai2_kit.core.checkpoint")

BUSY_TIMEOUT_S = 120.0
#: How SQLite syncs a commit (see ``connect``).
_SYNC = "EXTRA"


def connect(path: str) -> sqlite3.Connection:
    """A read-write connection: autocommit, usable from the thread that holds it under the fork gate."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    return _configure(conn)


def connect_readonly(path: str, plain: bool) -> sqlite3.Connection:
    """A connection that never writes; ``plain``: the file is a WAL database at rest (``wal_at_rest``)."""
    if plain:
        # A WAL database nobody has open: a read-only connection would
        # create -wal and -shm files and leave them behind (it may not
        # remove them). A normal connection that may not write removes
        # them when it closes, so reading leaves the folder as it was.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=1")
        return _configure(conn)
    base = "file:" + quote(path) + "?mode=ro"
    conn = sqlite3.connect(base, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return _configure(conn)
    except sqlite3.OperationalError as e:
        conn.close()
        # A WAL database on a read-only file system (or in a folder we may
        # not write) cannot create its shared-memory file; nobody can be
        # writing it then, so reading it as immutable is safe.
        logger.info("opening %s as immutable (%s)", path, e)
    return _configure(sqlite3.connect(base + "&immutable=1", uri=True, timeout=BUSY_TIMEOUT_S,
                                      isolation_level=None, check_same_thread=False))


def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    # EXTRA, not FULL: with a rollback journal (network file systems), FULL
    # does not fsync the folder after the journal's unlink, which is the
    # commit, so a power cut brings the journal back and rolls an
    # acknowledged entry back (tests/test_powercut.py). In WAL mode EXTRA
    # is FULL. Every statement on the connection commits at this setting:
    # claims and run records share the WAL with the entries, and one commit
    # at a lower setting could checkpoint the WAL unsynced.
    conn.execute(f"PRAGMA synchronous={_SYNC}")
    # A damaged byte in a text column must surface as a damaged entry
    # (the metadata checksum then fails), not as a decoding error.
    conn.text_factory = _lenient_text
    return conn


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def wal_at_rest(path: str) -> bool:
    """A WAL-mode database with no -wal file (nobody has it open), in a place we may write."""
    try:
        head = read_head(path, 20)
    except OSError:
        return False
    return (
        len(head) == 20 and head[18] == 2 and not os.path.lexists(path + "-wal")
        and os.access(path, os.W_OK) and os.access(os.path.dirname(path), os.W_OK)
    )


def journal_mode(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def set_journal_mode(conn: sqlite3.Connection, want: str, path: str) -> None:
    """Switch to ``want`` if another mode is set; left as it is when another connection holds the file."""
    mode = journal_mode(conn)
    if mode != want:
        try:
            got = conn.execute(f"PRAGMA journal_mode={want}").fetchone()[0].lower()
        except sqlite3.OperationalError as e:  # another connection holds it
            logger.debug("journal mode of %s left at %s: %s", path, mode, e)
            return
        if got != want:
            logger.debug("journal mode of %s is %s (wanted %s)", path, got, want)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction (``BEGIN IMMEDIATE``), committed when the block ends, else rolled back.

    ``BEGIN`` is inside the ``try``: an exception arriving as it returns (a
    KeyboardInterrupt that came while it waited for the lock) is undone too,
    instead of leaving the thread's connection in a transaction that holds
    the write lock. A failed ``COMMIT`` is rolled back the same way.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    finally:
        end_transaction(conn)


def end_transaction(conn: sqlite3.Connection) -> None:
    """Roll back the connection's open transaction, if any (a commit clears it first).

    Called from ``finally`` blocks: an error of the rollback is logged, not
    raised, so that the exception that led here is the one the caller sees;
    the next ``_conn`` of the thread tries again.
    """
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            logger.warning("could not roll back an unfinished transaction: %s", e)


def close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error as e:
        logger.debug("closing an SQLite connection: %s", e)


def is_busy(e: BaseException) -> bool:
    """Whether a failed batch failed for a lock held elsewhere, not for its rows."""
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))
