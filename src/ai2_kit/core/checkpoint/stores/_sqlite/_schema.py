"""What an SQLite store file is: its header, tables, hit columns and journal modes, and creating one."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from typing import Optional

from ..._errors import NotACheckpointStoreError, StoreOpenError
from .._base import FORMAT_VERSION, library_version
from .._fs import NotRegularFileError, fix_for, fsync_dir, fsync_parents, make_dirs, read_head, temp_name
from .._shared import read_error
from ._connect import immediate

__all__ = [
    "APPLICATION_ID", "SQLITE_MAGIC", "RUNS_TABLE", "HIT_COLUMNS", "JOURNAL_MODES", "JOURNAL_ENV",
    "has_hit_columns", "add_hit_columns", "check_journal", "check_sqlite_header", "create_database",
]

logger = logging.getLogger("ai2_kit.core.checkpoint")

#: Marks our files: PRAGMA application_id = 'A2KC'.
APPLICATION_ID = 0x41324B43
SQLITE_MAGIC = b"SQLite format 3\x00"

# ``created`` is a column for people querying the file with SQL, deliberately
# without an index: every commit would write one more b-tree page, and
# ``rm --from`` scans the metadata anyway.
RUNS_TABLE = "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY NOT NULL, record TEXT NOT NULL)"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key     TEXT PRIMARY KEY NOT NULL,
    created REAL NOT NULL,
    meta    TEXT NOT NULL,
    value   BLOB,
    blob    TEXT,
    fpd     TEXT,
    hcrc    INTEGER,
    dur     REAL,
    aw      INTEGER
);
CREATE INDEX IF NOT EXISTS entries_blob ON entries (blob) WHERE blob IS NOT NULL;
CREATE TABLE IF NOT EXISTS store_info (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL);
"""

#: What a hit reads instead of the metadata record (``lookup_fast``): the
#: call's fingerprint digest, a CRC-32 binding the key, the awaitable flag and
#: the frame together, the original duration, and whether the value was an
#: awaitable's. Files made before these columns existed get
#: them with their first save (``ALTER TABLE``; older libraries name their
#: columns, so they keep reading and writing such files, leaving these NULL,
#: which sends hits of those rows down the full path).
HIT_COLUMNS = (("fpd", "TEXT"), ("hcrc", "INTEGER"), ("dur", "REAL"), ("aw", "INTEGER"))

#: Journal modes a store may be asked for: each keeps a committed entry
#: through a power cut at ``synchronous=EXTRA``. (``memory`` and ``off`` keep
#: no journal on the disk: a crash mid-commit damages the file.)
JOURNAL_MODES = ("wal", "delete", "truncate", "persist")
JOURNAL_ENV = "AI2_KIT_CHECKPOINT_JOURNAL"


def has_hit_columns(conn: sqlite3.Connection) -> bool:
    try:
        names = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
    except sqlite3.DatabaseError:
        return False
    return all(name in names for name, _ in HIT_COLUMNS)


def add_hit_columns(conn: sqlite3.Connection) -> bool:
    """Add the hit columns inside the caller's write transaction; whether the table has them now."""
    names = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
    try:
        for name, kind in HIT_COLUMNS:
            if name not in names:
                conn.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")
    except sqlite3.OperationalError as e:  # e.g. a read-only schema: keep the old columns
        logger.debug("entries of this store keep their old columns: %s", e)
        return False
    return True


def check_journal(path: str, journal: Optional[str]) -> Optional[str]:
    """The journal mode asked for by ``journal=`` or else $AI2_KIT_CHECKPOINT_JOURNAL (lower case), or None.

    Anything but ``JOURNAL_MODES`` is refused before the file is touched,
    with one line naming where the value came from.
    """
    source = "journal="
    if not journal:  # None or "": the variable decides
        journal, source = os.environ.get(JOURNAL_ENV, ""), JOURNAL_ENV
        if not journal.strip():
            return None
    want = journal.strip().lower() if isinstance(journal, str) else journal
    if want not in JOURNAL_MODES:
        raise StoreOpenError(
            path, f"journal mode {journal!r} (from {source}) is not accepted",
            f"Use one of: {', '.join(JOURNAL_MODES)}" + (f", or unset {JOURNAL_ENV}" if source == JOURNAL_ENV else ""),
        )
    return str(want)


def check_sqlite_header(path: str) -> None:
    """Refuse anything at ``path`` that is not an SQLite file, naming the path.

    Never blocks: a FIFO or device is refused from its type, unopened.
    """
    try:
        head = read_head(path, 100)
    except NotRegularFileError as e:
        raise NotACheckpointStoreError(path, str(e.strerror), "Pick a regular file; it is left untouched") from e
    except OSError as e:
        raise read_error(path, e) from e
    if not head:
        raise NotACheckpointStoreError(
            path, "the file is empty (0 bytes)",
            "Remove it or pick another path; it is not overwritten",
        )
    if not head.startswith(SQLITE_MAGIC):
        raise NotACheckpointStoreError(
            path, "it is not an SQLite checkpoint store nor a reference pickle file",
            "Pick another path; the file is left untouched",
        )


def create_database(path: str, target: str, wal: bool) -> None:
    """Create the store ``path`` names at ``target`` (its real path): built under a temporary name, linked in.

    A half-initialised file must never be visible at ``target``: a second
    process would see a 0-byte or foreign-looking file and refuse it.
    ``link`` fails if someone else won the race, and theirs is used.
    ``wal``: born in WAL mode, so that opening it has no mode to switch.
    """
    parent = os.path.dirname(target)
    tmp = temp_name(target)
    try:
        created = make_dirs(parent, "")
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            # No syncs while the file is built: nobody sees it before the
            # fsync below, and a crash meanwhile leaves only a temporary file.
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA journal_mode=DELETE")
            with immediate(conn):
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO store_info VALUES ('created_by', ?)", (library_version(),))
            if wal:
                # Closing checkpoints and removes the temporary name's -wal
                # file. Where WAL cannot work, the first open says so.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        except OSError:
            # File systems without hard links: rename, accepting a tiny race.
            if not os.path.exists(target):
                os.replace(tmp, target)
    except (OSError, sqlite3.Error) as e:
        raise StoreOpenError(path, *_cannot_create(parent, e)) from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        for suffix in ("-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(tmp + suffix)
    try:
        fsync_dir(parent)
        # New folders on the way: their names are durable only once their parents are fsynced.
        fsync_parents(created)
    except OSError as e:
        raise StoreOpenError(path, str(e), fix_for(e)) from e


def _cannot_create(parent: str, e: BaseException) -> tuple[str, str]:
    """(reason, fix) for a store that could not be created in ``parent``."""
    if isinstance(e, OSError):
        return f"cannot create it ({e.strerror or e})", fix_for(e)
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return "cannot create it: the file system is read-only", "Pick a path on a writable file system"
    except OSError:
        pass
    if not os.access(parent, os.W_OK):
        return "cannot create it: no write permission on its folder", "Pick a folder you may write to"
    return f"cannot create it ({e})", "Pick a path on an ordinary, writable file system"
