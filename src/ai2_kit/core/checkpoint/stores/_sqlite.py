"""The single-file store: one SQLite database, one transaction per entry."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import secrets
import sqlite3
import struct
import time
import zlib
from typing import Any, Callable, Iterator, Optional, Tuple

from .._codec import (
    FRAME_MAGIC,
    Encoded,
    Signer,
    _fast_crc32,
    decode_bytes,
    meta_from_json,
    meta_to_json,
    read_frame,
    settle_crc,
    verifier_for,
)
from .._errors import NewerFormatError, NotACheckpointStoreError, StoreDamagedError, StoreOpenError
from ._base import FORMAT_VERSION, LARGE, MAX_RUN_BYTES, MISSING, Loader, Store, library_version, own_key, parse_run
from ._conns import GroupCommit, ThreadConnections
from ._fs import (
    HOST,
    NotRegularFileError,
    ensure_durable,
    fix_for,
    fsync_dir,
    fsync_file,
    fsync_parents,
    gone_reason,
    identity,
    is_network_fs,
    left_by_dead_writer,
    make_dirs,
    read_head,
    store_path,
    temp_name,
)

__all__ = ["SQLiteStore", "APPLICATION_ID", "SQLITE_MAGIC", "INLINE_MAX"]

logger = logging.getLogger("ai2_kit.core.checkpoint")

#: Marks our files: PRAGMA application_id = 'A2KC'.
APPLICATION_ID = 0x41324B43
SQLITE_MAGIC = b"SQLite format 3\x00"
#: Frames larger than this live in a side file next to the database, written
#: from the value's own memory, so a big array costs about what np.save costs
#: and the database (and its WAL) stays small.
INLINE_MAX = 1 << 20
BUSY_TIMEOUT_S = 120.0
#: How long a run record's write waits for another process's write lock.
RUN_BUSY_TIMEOUT_S = 0.5
#: Rows read per query when listing (keyset pages: no statement stays open
#: between pages, so a caller may write while iterating, and a fork between
#: two pages finds no connection in use).
PAGE_SIZE = 1000
#: How many times a reader whose side file vanished reads the row again.
_REREADS = 5

# ``created`` is a column for people querying the file with SQL, deliberately
# without an index: every commit would write one more b-tree page, and
# ``rm --from`` scans the metadata anyway.
_RUNS_TABLE = "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY NOT NULL, record TEXT NOT NULL)"
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


def _successor(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``."""
    while prefix:
        c = ord(prefix[-1])
        if c < 0x10FFFF:
            nxt = c + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


#: How SQLite syncs a commit (see _connect).
_SYNC = "EXTRA"

#: What a hit reads instead of the metadata record (``lookup_fast``): the
#: call's fingerprint digest, a CRC-32 binding the key, the awaitable flag and
#: the frame together, the original duration, and whether the value was an
#: awaitable's. Files made before these columns existed get
#: them with their first save (``ALTER TABLE``; older libraries name their
#: columns, so they keep reading and writing such files, leaving these NULL,
#: which sends hits of those rows down the full path).
_HIT_COLUMNS = (("fpd", "TEXT"), ("hcrc", "INTEGER"), ("dur", "REAL"), ("aw", "INTEGER"))
_INSERT = ("INSERT OR REPLACE INTO entries (key, created, meta, value, blob, fpd, hcrc, dur, aw) "
           "VALUES (?,?,?,?,?,?,?,?,?)")
_INSERT_OLD = "INSERT OR REPLACE INTO entries (key, created, meta, value, blob) VALUES (?,?,?,?,?)"
#: A lone save's one statement (its own transaction): a new row, or one that
#: replaces a row without a side file; a row that names one is left as it was
#: (no change counted) for ``_write_rows``, which reads the name to remove the
#: file once the replacing row has committed. (UPSERT: SQLite 3.24.)
_UPSERT = (
    "INSERT INTO entries (key, created, meta, value, blob, fpd, hcrc, dur, aw) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (key) DO UPDATE SET created=excluded.created, meta=excluded.meta, value=excluded.value, "
    "blob=excluded.blob, fpd=excluded.fpd, hcrc=excluded.hcrc, dur=excluded.dur, aw=excluded.aw "
    "WHERE entries.blob IS NULL"
)
_HAS_UPSERT = sqlite3.sqlite_version_info >= (3, 24, 0)
# The digest is compared by SQLite, on the row the key's index found; no
# row is a miss, settled by this one query (a miss runs a step and saves).
# The third column is ``hcrc * 2 + aw`` when the digest matches and the
# flag is sane, else NULL (the full way): fewer columns to convert, and
# converting them is a good part of a hit's query.
_FAST_SELECT = ("SELECT value, dur, CASE WHEN (fpd IS ? OR fpd = '-') AND aw IN (0, 1) THEN hcrc * 2 + aw END "
                "FROM entries WHERE key=?")
#: ``fpd`` of an entry saved without fingerprints (stale="ignore", a migrated
#: reference entry): any call may have it, as ``Checkpointer.accept`` says.
ANY_CALL = "-"
_FAST_SELECT_ANY = "SELECT value, dur, CASE WHEN aw IN (0, 1) THEN hcrc * 2 + aw END FROM entries WHERE key=?"
#: The same for a read on the event loop: the value only up to a size (``lookup_fast(limit=)``).
_SMALL_SELECT = ("SELECT CASE WHEN length(value) <= ? THEN value END, dur, "
                 "CASE WHEN (fpd IS ? OR fpd = '-') AND aw IN (0, 1) THEN hcrc * 2 + aw END, "
                 "length(value) FROM entries WHERE key=?")
_SMALL_SELECT_ANY = ("SELECT CASE WHEN length(value) <= ? THEN value END, dur, "
                     "CASE WHEN aw IN (0, 1) THEN hcrc * 2 + aw END, length(value) FROM entries WHERE key=?")
_FAST_HEAD = FRAME_MAGIC + b"\x01\x00\x00\x00"  # one part: no out-of-band buffers
_LEN = struct.Struct("<Q").unpack_from


def key_crc(key: str) -> int:
    """The start of a hit CRC: the key's (kept per key by the checkpointer)."""
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
#: values, ~5x faster on a 1 KB frame: a tenth of a small hit's Python time
#: with the standard library's), set on first use (``_fast_crc32``).
_frame_crc: Optional[Callable[..., int]] = None


def _set_frame_crc() -> Callable[..., int]:
    global _frame_crc
    _frame_crc = _fast_crc32()
    return _frame_crc


def _fast_value(row: Any, kcrc: int) -> Any:
    """What ``lookup_fast`` answers for the row it read (see there)."""
    frame, dur, code = row[0], row[1], row[2]
    # Saved for another call (maybe stale: the full way judges it), before
    # the columns, with a side file, or damaged: the full way.
    if type(code) is not int or type(frame) is not bytes:
        return None
    # Checked before anything is unpickled.
    if hit_crc(kcrc, code & 1, frame) != code >> 1:
        return None
    if not frame.startswith(_FAST_HEAD) or len(frame) < 16 or _LEN(frame, 8)[0] + 16 != len(frame):
        return None
    return pickle.loads(memoryview(frame)[16:]), dur, code & 1 == 1


class SQLiteStore(Store):
    """A checkpoint store in one SQLite file (the default of ``set_checkpoint_file``).

    Every entry is written in a transaction of its own (a lone save's one
    statement, or ``BEGIN IMMEDIATE`` ... ``COMMIT``) with
    ``synchronous=EXTRA`` (FULL, plus a sync of the folder after a rollback
    journal is removed): once ``put`` returns, the entry survives a kill or a
    power cut. Saves that arrive together from several threads share one
    transaction (group commit), each still returning only once its own entry
    is committed. WAL is used unless the file lives on a network file system,
    where SQLite's shared-memory index cannot work across hosts.

    Connections are per thread, closed when their thread has ended, and
    closed before any ``fork()`` (which waits for the SQLite calls in
    flight): see ``stores/_conns.py``.
    """

    kind = "sqlite"
    supports_claims = True
    checksum_while_writing = True

    def __init__(
        self, path: str, *, readonly: bool = False, create: bool = True, journal: Optional[str] = None
    ) -> None:
        path = store_path(path)
        self._journal = check_journal(path, journal)
        super().__init__(path, readonly=readonly)
        self.path = path
        # Side files beside the database itself, not beside the name it was
        # opened by: a store reached through a symbolic link (or through
        # another one, or by its real path) finds the same side files.
        # (SQLite puts its -wal and -journal files beside the real file too.)
        self.real_path = os.path.realpath(path)
        self.blob_dir = self.real_path + ".blobs"
        self._ro_plain: bool | None = None  # see _connect_readonly
        self._hit_cols = False  # whether ``entries`` has the _HIT_COLUMNS (see _check_schema)
        self._wal = False  # whether the file is in WAL mode (see _open_conn)
        self._runs_table = False  # whether ``runs`` is known to exist (see _put_run)
        # Connections per thread, closed with their thread and before any fork;
        # saves that arrive together share one commit (stores/_conns.py).
        self._conns = ThreadConnections(self._open_conn, _close_quietly, close_at_fork=True)
        self._commits: GroupCommit[_Row, str | None] = GroupCommit(
            self._write_rows, write_one=self._write_one, shared_failure=_is_busy)
        if os.path.isdir(path):
            raise NotACheckpointStoreError(
                path, "it is a directory", "Use set_checkpoint_dir() for a directory store"
            )
        if not os.path.exists(path):
            if not create or readonly:
                raise StoreOpenError(path, "no such file", "Check the path")
            self._create()
        else:
            check_sqlite_header(path)
        #: (st_dev, st_ino) of the file when opened: a run-record flush must not
        #: re-create it (a connection would make a bare database) once removed.
        self._opened_id = identity(path)
        if not readonly and not os.access(path, os.W_OK):
            self.readonly, self.readonly_reason = True, "no write permission on the file"
        elif not readonly and not os.access(os.path.dirname(self.real_path), os.W_OK):
            # SQLite needs its folder for the journal or the WAL's side files.
            self.readonly, self.readonly_reason = True, "no write permission on the file's folder"
        with self._conns.gate.shared():  # no fork lands inside the first queries
            self._check_schema()

    # -- opening ------------------------------------------------------------
    def _create(self) -> None:
        """Create the database under a temporary name, then link it into place.

        A half-initialised file must never be visible at ``path``: a second
        process would see a 0-byte or foreign-looking file and refuse it.
        ``link`` fails if someone else won the race, and we use theirs.
        """
        # At the real path: a name that is a symbolic link to a file not there
        # yet gets the file where the link points (and its side files beside it).
        target = self.real_path
        parent = os.path.dirname(target)
        tmp = temp_name(target)
        try:
            created = make_dirs(parent, "")
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                # No syncs while the file is built: nobody sees it before the
                # fsync below, and a crash meanwhile leaves only a temporary
                # file. (Synced, each statement was a commit of its own with
                # four fsyncs: ~30 fsyncs, 10-30 ms, before a first save.)
                conn.execute("PRAGMA synchronous=OFF")
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("BEGIN")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO store_info VALUES ('created_by', ?)", (library_version(),)
                )
                conn.execute("COMMIT")
                if self._wanted_journal() == "wal":
                    # Born in WAL mode: opening it then has no mode to switch
                    # (a switch is one more synced commit). Closing checkpoints
                    # and removes the temporary name's -wal file. Where WAL
                    # cannot work, the open below says so, as before.
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
            raise StoreOpenError(self.path, *_cannot_create(parent, e)) from e
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
            raise StoreOpenError(self.path, str(e), fix_for(e)) from e

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            conn = self._connect_readonly()
        else:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        # EXTRA, not FULL: with a rollback journal (network file systems), FULL
        # does not fsync the folder after the journal's unlink, which is the
        # commit, so a power cut brings the journal back and rolls an
        # acknowledged entry back (tests/test_powercut.py). In WAL mode EXTRA
        # is FULL.
        conn.execute(f"PRAGMA synchronous={_SYNC}")
        # A damaged byte in a text column must surface as a damaged entry
        # (the metadata checksum then fails), not as a decoding error.
        conn.text_factory = _lenient_text
        return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        if self._ro_plain is None:
            self._ro_plain = _wal_at_rest(self.real_path)  # its -wal file is beside the real file
        if self._ro_plain:
            # A WAL database nobody has open: a read-only connection would
            # create -wal and -shm files and leave them behind (it may not
            # remove them). A normal connection that may not write removes
            # them when it closes, so reading leaves the folder as it was.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            return conn
        base = "file:" + _uri_path(self.path) + "?mode=ro"
        conn = sqlite3.connect(base, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            # A WAL database on a read-only file system (or in a folder we may
            # not write) cannot create its shared-memory file; nobody can be
            # writing it then, so reading it as immutable is safe.
            logger.info("opening %s as immutable (%s)", self.path, e)
        return sqlite3.connect(base + "&immutable=1", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)

    def _open_conn(self) -> sqlite3.Connection:
        if self.closed:
            raise StoreOpenError(self.path, "the store is closed", "Open it again")
        conn = self._connect()
        # Whether a hit's read may hold the fork gate's lock (``fetchone(held=)``):
        # only in WAL mode, where a read never waits for a writer. Asked at each
        # open: nobody can take a file out of WAL while a connection of ours is open.
        try:
            self._wal = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
        except sqlite3.Error:
            self._wal = False
        if self._wal and not self.readonly:
            # The WAL file exists now. SQLite fsyncs the folder after creating
            # it but ignores that fsync's errors, and a commit into a WAL whose
            # name a power cut can take is not durable: made durable here, or
            # the connection is refused with the errno.
            try:
                ensure_durable([os.path.dirname(self.path)])
            except OSError as e:
                _close_quietly(conn)
                raise StoreOpenError(self.path, str(e), fix_for(e)) from e
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (use it inside ``_session``, so that a fork waits for it)."""
        if self.closed:
            raise StoreOpenError(self.path, "the store is closed", "Open it again")
        conn = self._conns.get()
        if conn.in_transaction:
            # No transaction of ours outlives the call that began it; one open
            # now was left by an exception that struck its cleanup (a second
            # Ctrl-C). Its statements would join it and never commit.
            _end_transaction(conn)
        return conn

    @contextlib.contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, with the fork gate held: no fork() lands inside."""
        with self._conns.gate.shared():
            yield self._conn()

    def _check_schema(self) -> None:
        try:
            conn = self._conn()
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            self.close()
            raise NotACheckpointStoreError(
                self.path, f"SQLite cannot read it ({e})", "Is the file damaged? Try 'verify'"
            ) from e
        if app_id != APPLICATION_ID:
            self.close()
            raise NotACheckpointStoreError(
                self.path,
                "it is an SQLite database of another application",
                "Pick a new file name for the checkpoint store; this file is left untouched",
            )
        if version > FORMAT_VERSION:
            err = NewerFormatError(self.path, version, FORMAT_VERSION, self._info("created_by"))
            self.readonly, self.readonly_reason, self.newer_format = True, str(err), err
            return
        self._hit_cols = _has_hit_columns(conn)
        if not self.readonly:
            self._set_journal_mode(conn)
            self._wal = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
            if os.path.isdir(self.blob_dir):
                # Cheap (one listdir); reclaims what killed writers left behind.
                self.remove_dead_writers_files()

    def _info(self, name: str) -> str:
        with contextlib.suppress(sqlite3.Error):
            row = self._conn().execute("SELECT value FROM store_info WHERE name=?", (name,)).fetchone()
            if row:
                return str(row[0])
        return ""

    def _wanted_journal(self) -> str:
        return self._journal or ("delete" if is_network_fs(self.path) else "wal")

    def _set_journal_mode(self, conn: sqlite3.Connection) -> None:
        want = self._wanted_journal()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
        if mode != want:
            try:
                got = conn.execute(f"PRAGMA journal_mode={want}").fetchone()[0].lower()
            except sqlite3.OperationalError as e:  # another connection holds it
                logger.debug("journal mode of %s left at %s: %s", self.path, mode, e)
                return
            if got != want:
                logger.debug("journal mode of %s is %s (wanted %s)", self.path, got, want)

    # -- hooks ----------------------------------------------------------------
    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        missing = None
        for _ in range(_REREADS):
            with self._session() as conn:
                row = conn.execute("SELECT meta, value, blob FROM entries WHERE key=?", (key,)).fetchone()
            if row is None:
                return None
            meta = meta_from_json(row[0])
            value, blob = row[1], row[2]
            if blob is None:
                return meta, _InlineLoader(value, meta)
            path = self._blob_path(blob)
            try:
                # Opened now, before the row can change again: an open file
                # stays readable when an overwrite or rm unlinks it.
                f = open(path, "rb", buffering=0)
            except FileNotFoundError:
                if blob == missing:
                    # The row did not change and its file is still gone:
                    # removed by hand, not by a writer. That is damage.
                    return meta, _MissingLoader(path)
                # An overwrite or rm unlinked it after we read the row (it
                # always commits the row first): the entry changed, read again.
                missing = blob
                continue
            return meta, _FileLoader(f, path, meta)
        # The entry changed under every read: as good as a miss.
        logger.debug("%s: %r kept changing while being read; treated as missing", self.path, key)
        return None

    def lookup_fast(self, key: str, digest: Optional[str], kcrc: int, limit: Optional[int] = None) -> Any:
        """A hit's short way: ``(value, duration, is_awaitable)``, ``MISSING``, None (go the full way), or
        ``LARGE`` (with ``limit``: a value over ``limit`` bytes or in a side file, not read).

        ``key`` must be valid already and ``kcrc`` be ``key_crc(key)``. One
        indexed SELECT of the hit columns, one CRC over key, digest, flag and
        frame (``hit_crc``), one comparison of the fingerprint digest (none
        when ``digest`` is None: stale="ignore"), one ``loads``. Anything
        else (a side file, a signed store, a row written by an older
        library, a digest that differs, a frame with buffers) answers None,
        and ``lookup`` reads and checks the whole record.
        """
        if not self._hit_cols or self.signer is not None or self.closed:
            return None
        if limit is not None:
            return self._lookup_small(key, digest, kcrc, limit)
        if digest is None:
            row = self._conns.fetchone(_FAST_SELECT_ANY, (key,), self._wal)
        else:
            row = self._conns.fetchone(_FAST_SELECT, (digest, key), self._wal)
        if row is None:
            return MISSING
        return _fast_value(row, kcrc)

    def _lookup_small(self, key: str, digest: Optional[str], kcrc: int, limit: int) -> Any:
        # The value is read only when it is small (SQLite gets a blob's length
        # from the record header): a large one is left to a thread.
        if digest is None:
            row = self._conns.fetchone(_SMALL_SELECT_ANY, (limit, key), self._wal)
        else:
            row = self._conns.fetchone(_SMALL_SELECT, (limit, digest, key), self._wal)
        if row is None:
            return MISSING
        size = row[3]
        if row[0] is None and (size is None or size > limit):
            return LARGE
        return _fast_value(row, kcrc)

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        with self._session() as conn:
            row = conn.execute("SELECT meta FROM entries WHERE key=?", (key,)).fetchone()
        return None if row is None else meta_from_json(row[0])

    def _blob_path(self, name: str) -> str:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad side-file name {name!r}")
        return os.path.join(self.blob_dir, name)

    def _write_blob(self, encoded: Encoded) -> str:
        if not os.path.isdir(self.blob_dir):
            make_dirs(self.blob_dir, "")
        # Who wrote it is in the name, so that a side file left by a writer
        # that died before its commit can be recognised and removed.
        name = f"{secrets.token_hex(12)}.{os.getpid()}.{HOST}.frame"
        path = os.path.join(self.blob_dir, name)
        # A unique name that nothing refers to until the row commits: a crash
        # before the commit leaves an orphan file, never a half-written value.
        try:
            with open(path, "xb", buffering=0) as f:
                try:
                    encoded.write_to(f)
                except OSError as e:
                    if e.filename is not None:
                        raise
                    raise OSError(e.errno, f"{e.strerror or e} while writing a side file", path) from e
                fsync_file(f.fileno(), path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        fsync_dir(self.blob_dir)
        # The folder's name lives in the database's folder: durable before the
        # row commits, whoever created the folder (another writer may have
        # made it a moment ago and not yet fsynced its parent).
        ensure_durable([os.path.dirname(self.blob_dir)])
        return name

    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        blob = None
        value: bytes | None = None
        if encoded.size > INLINE_MAX:
            # Written and fsynced by the caller, before its row joins a commit.
            blob = self._write_blob(encoded)
        else:
            value = encoded.to_bytes()
        settle_crc(meta, encoded)  # a side file's checksum was computed while it was written
        fpd = meta.get("fpd") if meta.get("fingerprint") else ANY_CALL
        aw = 1 if meta.get("is_awaitable") else 0
        dur = meta.get("duration")
        hcrc = None
        if value is not None and self.signer is None and (fpd is None or isinstance(fpd, str)):
            hcrc = hit_crc(key_crc(key), aw, value)
        row: _Row = (key, meta["created"], meta_to_json(meta), value, blob, fpd, hcrc,
                     dur if isinstance(dur, (int, float)) else None, aw)
        try:
            # Saves arriving together from several threads share one
            # transaction and one fsync; this returns once ours is committed.
            old = self._commits.submit(row, len(value) if value is not None else 0)
        except Exception:
            if blob is not None:  # our row was rolled back: nothing refers to the file
                self._unlink_blob(blob)
            raise
        # (Interrupted while waiting, the row may still be committed by the
        # batch it was in: the file is kept; at worst an orphan for 'verify'.)
        if old is not None:
            self._unlink_blob(old)

    def _write_one(self, row: _Row) -> str | None:
        """``_write_rows([row])[0]`` for a lone save, in one statement where it can be.

        An INSERT outside ``BEGIN`` is a transaction of its own, as atomic and
        as durable (the same commit, the same one fsync) as one between
        ``BEGIN IMMEDIATE`` and ``COMMIT``, and takes the write lock the same
        way (waiting on a busy writer with the busy timeout): two statements
        fewer. It cannot say which side file it replaced, so it changes no
        row that names one (``_UPSERT``): that case, a file without the hit
        columns yet, and an SQLite older than 3.24 go through ``_write_rows``.
        """
        if not self._hit_cols or not _HAS_UPSERT or self.closed:
            return self._write_rows([row])[0]  # (which also says that the store is closed)
        if self._conns.change(_UPSERT, row) == 1:
            return None  # inserted, or replaced a row without a side file
        # The row it would replace names a side file (or a transaction was left
        # open on this connection: ``_conn`` rolls it back before BEGIN IMMEDIATE).
        return self._write_rows([row])[0]

    def _write_rows(self, rows: list[_Row]) -> list[str | None]:
        """Commit ``rows`` in one transaction; returns each one's replaced side file (or None)."""
        keys = list({row[0] for row in rows})
        # The fork gate and the connection through ``_session``: taken and
        # given back by one context manager, so that an interrupt arriving
        # as the gate is entered cannot leave it counted (a later fork would
        # wait for ever). Every lone save goes the short way (``_write_one``).
        with self._session() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                # Set only once committed: a rolled-back ALTER leaves the old columns.
                cols = self._hit_cols or _add_hit_columns(conn)
                # One query for the side files being replaced and one prepared
                # INSERT for all rows: a batch costs little more than one entry.
                current: dict[str, str | None] = {}
                # Side files live in blob_dir, made before their row commits: with
                # none there (seen inside this write transaction), no row being
                # replaced can name one, and the query is saved.
                for i in range(0, len(keys) if os.path.isdir(self.blob_dir) else 0, 200):
                    part = keys[i : i + 200]
                    current.update(conn.execute(
                        f"SELECT key, blob FROM entries WHERE key IN ({','.join('?' * len(part))})", part
                    ).fetchall())
                if cols and len(rows) == 1:  # a lone save: execute() costs less than executemany()
                    conn.execute(_INSERT, rows[0])
                elif cols:
                    conn.executemany(_INSERT, rows)
                else:  # a file we may not change the schema of: the columns it has
                    conn.executemany(_INSERT_OLD, [row[:5] for row in rows])
                conn.execute("COMMIT")
                self._hit_cols = cols
            finally:
                # BEGIN inside the try: an exception arriving as BEGIN returns
                # (a KeyboardInterrupt that came while it waited for the lock)
                # is undone here too, instead of leaving the thread's
                # connection in a transaction that holds the write lock.
                _end_transaction(conn)
        olds: list[str | None] = []
        for key, _, _, _, blob, *_ in rows:  # in order: a key twice replaces its own earlier row
            old = current.get(key)
            current[key] = blob
            # The same row written again (a batch retried) must not report
            # its own file as the one to remove.
            olds.append(old if old != blob else None)
        return olds

    def _unlink_blob(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            os.unlink(self._blob_path(name))

    def _delete_many(self, keys: list[str]) -> int:
        blobs: list[str] = []
        removed = 0
        with self._session() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for key in keys:
                    row = conn.execute("SELECT blob FROM entries WHERE key=?", (key,)).fetchone()
                    if row is None:
                        continue
                    conn.execute("DELETE FROM entries WHERE key=?", (key,))
                    removed += 1
                    if row[0] is not None:
                        blobs.append(row[0])
                conn.execute("COMMIT")
            finally:
                _end_transaction(conn)  # whatever arrived before COMMIT, KeyboardInterrupt included
        for name in blobs:  # after the commit: a crash here only leaves orphans
            self._unlink_blob(name)
        return removed

    def _delete(self, key: str) -> bool:
        return self._delete_many([key]) == 1

    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]:
        upper = _successor(prefix) if prefix else None
        # Keyset pages, each its own query: nothing stays open while the
        # caller works between two entries (it may remove them, or fork).
        op, bound = ">=", prefix
        while True:
            sql = f"SELECT key, meta FROM entries WHERE key {op} ?"
            params: tuple[Any, ...] = (bound,)
            if upper is not None:
                sql += " AND key < ?"
                params += (upper,)
            sql += " ORDER BY key LIMIT ?"
            try:
                with self._session() as conn:
                    rows = conn.execute(sql, (*params, PAGE_SIZE)).fetchall()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):
                    raise
                raise StoreDamagedError(self.path, str(e)) from e
            for key, text in rows:
                try:
                    yield own_key(key, meta_from_json(text))
                except ValueError as e:  # listing goes on past one damaged record
                    yield {"key": key, "damaged": f"unreadable metadata ({e})"}
            if len(rows) < PAGE_SIZE:
                return
            op, bound = ">", rows[-1][0]

    # -- leases (one host: the local clock is the only clock) -----------------
    def _one_statement(self, sql: str, params: tuple[Any, ...], busy_timeout: Optional[float] = None) -> int:
        """Run one writing statement as a transaction of its own; returns the rows it changed.

        Claims, lease renewals and run records commit exactly as entries do
        (``synchronous=EXTRA``, set once per connection and never changed).
        They share the database and its WAL with the entries: a commit of
        theirs at a lower setting that crossed the WAL's auto-checkpoint
        threshold copied the WAL into the database unsynced, and the next
        synced save restarted the WAL over pages the database did not
        durably hold, losing acknowledged entries and damaging indexes in a
        power cut (docs/reliability.md). One statement outside ``BEGIN`` is
        atomic on its own, so no transaction is left open, whatever
        exception arrives. ``busy_timeout``: how long to wait for another
        process's write lock, when shorter than the store's own (restored
        whatever exception arrives).
        """
        with self._session() as conn:
            if busy_timeout is None:
                return int(conn.execute(sql, params).rowcount)
            # Restored on both ways out, not in ``finally``: an interrupt that
            # strikes after the statement, while a ``finally`` restores,
            # would skip the restore; here it lands in ``except``, which
            # restores (again: idempotent) before it propagates.
            restore = f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}"
            try:
                conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
                n = int(conn.execute(sql, params).rowcount)
                conn.execute(restore)
                return n
            except BaseException:
                conn.execute(restore)
                raise

    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        now = time.time()
        return self._one_statement(
            "INSERT INTO claims (key, owner, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
            "WHERE claims.expires < ? OR claims.owner = excluded.owner",
            (key, owner, now + ttl, now),
        ) == 1

    def _renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        return self._one_statement(
            "UPDATE claims SET expires = ? WHERE key = ? AND owner = ?", (time.time() + ttl, key, owner)
        ) == 1

    def _release_claim(self, key: str, owner: str) -> None:
        self._one_statement("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def _gone(self) -> str | None:
        return gone_reason(self.path, self._opened_id)

    # -- runs (a table added on first use: older stores simply have none) -------
    def _put_run(self, run_id: str, record: dict[str, Any]) -> None:
        # A report, written best effort: it waits for another process's write
        # lock a short while only (an exit must not wait out the busy timeout).
        if not self._runs_table:
            self._one_statement(_RUNS_TABLE, (), RUN_BUSY_TIMEOUT_S)
            self._runs_table = True
        self._one_statement("INSERT OR REPLACE INTO runs (id, record) VALUES (?, ?)", (run_id, json.dumps(record)),
                            RUN_BUSY_TIMEOUT_S)

    def _iter_runs(self) -> Iterator[dict[str, Any]]:
        try:
            with self._session() as conn:
                # A record beyond the bound reads as NULL: counted as not a run record.
                rows = conn.execute("SELECT CASE WHEN length(record) <= ? THEN record END FROM runs",
                                    (MAX_RUN_BYTES,)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return  # written before runs were recorded
            raise
        for (text,) in rows:
            yield parse_run(text)  # checked field by field by iter_runs

    def __len__(self) -> int:
        with self._session() as conn:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])

    def _close(self) -> None:
        with self._conns.gate.shared():
            self._conns.close_all()

    # -- maintenance ------------------------------------------------------------
    def remove_dead_writers_files(self, min_age: float = 86400.0) -> list[str]:
        """Remove side files left by writers that died before committing them.

        A file counts when no entry refers to it and its writer is a process
        of this host that no longer runs, or (another host's) it is older than
        ``min_age`` seconds. A live writer's file is never touched, so this is
        safe while others write. Returns the removed paths.
        """
        try:
            names = [n for n in os.listdir(self.blob_dir) if n.endswith(".frame")]
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            path = os.path.join(self.blob_dir, name)
            parts = name[: -len(".frame")].split(".", 2)
            host, pid = (parts[2], parts[1]) if len(parts) == 3 else ("", "")
            if not left_by_dead_writer(path, host, pid, min_age):
                continue
            with self._session() as conn:
                used = conn.execute("SELECT 1 FROM entries WHERE blob = ?", (name,)).fetchone()
            if used is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
        return removed

    def orphan_blobs(self) -> list[str]:
        """Side files that no entry refers to (a writer was killed before its commit)."""
        try:
            names = {n for n in os.listdir(self.blob_dir) if n.endswith(".frame")}
        except FileNotFoundError:
            return []
        with self._session() as conn:
            used = {r[0] for r in conn.execute("SELECT blob FROM entries WHERE blob IS NOT NULL")}
        return sorted(os.path.join(self.blob_dir, n) for n in names - used)

    def integrity_check(self) -> list[str]:
        """SQLite's own integrity check; an empty list means the file is sound."""
        with self._session() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return [] if rows == [("ok",)] else [r[0] for r in rows]


#: A row of ``entries``: key, created, meta, inline value, side-file name, then the hit columns.
_Row = Tuple[str, float, str, Optional[bytes], Optional[str], Optional[str], Optional[int], Optional[float], int]


def _has_hit_columns(conn: sqlite3.Connection) -> bool:
    try:
        names = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
    except sqlite3.DatabaseError:
        return False
    return all(name in names for name, _ in _HIT_COLUMNS)


def _add_hit_columns(conn: sqlite3.Connection) -> bool:
    """Add the hit columns inside the caller's write transaction; whether the table has them now."""
    names = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
    try:
        for name, kind in _HIT_COLUMNS:
            if name not in names:
                conn.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")
    except sqlite3.OperationalError as e:  # e.g. a read-only schema: keep the old columns
        logger.debug("entries of this store keep their old columns: %s", e)
        return False
    return True


def _end_transaction(conn: sqlite3.Connection) -> None:
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


#: Journal modes a store may be asked for: each keeps a committed entry
#: through a power cut at ``synchronous=EXTRA``. (``memory`` and ``off`` keep
#: no journal on the disk: a crash mid-commit damages the file.)
JOURNAL_MODES = ("wal", "delete", "truncate", "persist")
JOURNAL_ENV = "AI2_KIT_CHECKPOINT_JOURNAL"


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


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error as e:
        logger.debug("closing an SQLite connection: %s", e)


def _is_busy(e: BaseException) -> bool:
    """Whether a failed batch failed for a lock held elsewhere, not for its rows."""
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


class _InlineLoader:
    """Decodes a frame kept in the row."""

    def __init__(self, value: bytes, meta: dict[str, Any]) -> None:
        self._value, self._meta = value, meta

    def __call__(self, signer: Signer | None) -> Any:
        return decode_bytes(self._value, self._meta.get("crc32"), verifier_for(signer, self._meta))


class _FileLoader:
    """Reads a frame from a side file opened when its row was read."""

    def __init__(self, f: Any, path: str, meta: dict[str, Any]) -> None:
        self._f, self._path, self._meta = f, path, meta

    def __call__(self, signer: Signer | None) -> Any:
        return read_frame(self._f, self._meta.get("crc32"), self._path, verifier_for(signer, self._meta))

    def close(self) -> None:
        self._f.close()


class _MissingLoader:
    """The side file of an unchanged row is gone: reported as a damaged entry."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __call__(self, signer: Signer | None) -> Any:
        raise FileNotFoundError(f"its side file {self._path} is missing")


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path)


def check_sqlite_header(path: str) -> None:
    """Refuse anything at ``path`` that is not an SQLite file, naming the path.

    Never blocks: a FIFO or device is refused from its type, unopened.
    """
    try:
        head = read_head(path, 100)
    except NotRegularFileError as e:
        raise NotACheckpointStoreError(path, str(e.strerror), "Pick a regular file; it is left untouched") from e
    except PermissionError as e:
        raise StoreOpenError(path, "permission denied", "Check the file's permissions") from e
    except OSError as e:
        raise StoreOpenError(path, f"cannot read it ({e.strerror or e})", fix_for(e)) from e
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


def _wal_at_rest(path: str) -> bool:
    """A WAL-mode database with no -wal file (nobody has it open), in a place we may write."""
    try:
        head = read_head(path, 20)
    except OSError:
        return False
    return (
        len(head) == 20 and head[18] == 2 and not os.path.lexists(path + "-wal")
        and os.access(path, os.W_OK) and os.access(os.path.dirname(path), os.W_OK)
    )


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
