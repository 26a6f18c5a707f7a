"""The single-file store: one SQLite database, one transaction per entry (``SQLiteStore``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from typing import Any, Iterator, Optional, Tuple

from ..._codec import Encoded, meta_from_json, meta_to_json, settle_crc
from ..._errors import NewerFormatError, NotACheckpointStoreError, StoreDamagedError, StoreOpenError
from .._base import FORMAT_VERSION, LARGE, MAX_RUN_BYTES, MISSING, Loader, Store, parse_run
from .._conns import GroupCommit, ThreadConnections
from .._fs import ensure_durable, fix_for, gone_reason, identity, is_network_fs, left_by_dead_writer, store_path
from .._shared import iter_meta_pages
from ._blobs import (
    INLINE_MAX,
    FileLoader,
    InlineLoader,
    MissingLoader,
    blob_path,
    folder_missing_fix,
    frame_names,
    unlink_blob,
    write_blob,
    writer_of,
)
from ._connect import (
    BUSY_TIMEOUT_S,
    close_quietly,
    connect,
    connect_readonly,
    end_transaction,
    immediate,
    is_busy,
    journal_mode,
    set_journal_mode,
    wal_at_rest,
)
from ._hits import (
    FAST_SELECT,
    FAST_SELECT_ANY,
    HAS_UPSERT,
    INSERT,
    INSERT_OLD,
    SMALL_SELECT,
    SMALL_SELECT_ANY,
    UPSERT,
    fast_value,
    hit_columns,
)
from ._schema import (
    APPLICATION_ID,
    RUNS_TABLE,
    add_hit_columns,
    check_journal,
    check_sqlite_header,
    create_database,
    has_hit_columns,
)

__all__ = ["SQLiteStore", "PAGE_SIZE", "RUN_BUSY_TIMEOUT_S"]

logger = logging.getLogger("ai2_kit.core.checkpoint")

#: How long a run record's write waits for another process's write lock.
RUN_BUSY_TIMEOUT_S = 0.5
#: Rows read per query when listing (keyset pages: no statement stays open
#: between pages, so a caller may write while iterating, and a fork between
#: two pages finds no connection in use).
PAGE_SIZE = 1000
#: How many times a reader whose side file vanished reads the row again.
_REREADS = 5

#: A row of ``entries``: key, created, meta, inline value, side-file name, then the hit columns.
_Row = Tuple[str, float, str, Optional[bytes], Optional[str], Optional[str], Optional[int], Optional[float], int]


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
    is_local = True
    counts_cheaply = True
    storage_errors = (OSError, sqlite3.Error)
    damage_errors = (sqlite3.DatabaseError,)
    not_damage_errors = (sqlite3.OperationalError,)  # locked, busy, read-only, I/O: not the bytes

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
        self._ro_plain: bool | None = None  # see _connect
        self._hit_cols = False  # whether ``entries`` has the hit columns (see _check_schema)
        self._wal = False  # whether the file is in WAL mode (see _open_conn)
        self._runs_table = False  # whether ``runs`` is known to exist (see _put_run)
        # Connections per thread, closed with their thread and before any fork;
        # saves that arrive together share one commit (stores/_conns.py).
        self._conns = ThreadConnections(self._open_conn, close_quietly, close_at_fork=True)
        self._commits: GroupCommit[_Row, str | None] = GroupCommit(
            self._write_rows, write_one=self._write_one, shared_failure=is_busy)
        if os.path.isdir(path):
            raise NotACheckpointStoreError(
                path, "it is a directory", "Use set_checkpoint_dir() for a directory store"
            )
        if not os.path.exists(path):
            if not create or readonly:
                raise StoreOpenError(path, "no such file", "Check the path")
            # At the real path: a name that is a symbolic link to a file not there
            # yet gets the file where the link points (and its side files beside it).
            create_database(self.path, self.real_path, self._wanted_journal() == "wal")
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

    def describe(self) -> Optional[tuple[str, tuple[tuple[str, Any], ...]]]:
        return self.path, ()

    # -- connections ------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if not self.readonly:
            return connect(self.path)
        if self._ro_plain is None:
            self._ro_plain = wal_at_rest(self.real_path)  # its -wal file is beside the real file
        return connect_readonly(self.path, self._ro_plain)

    def _open_conn(self) -> sqlite3.Connection:
        if self.closed:
            raise StoreOpenError(self.path, "the store is closed", "Open it again")
        conn = self._connect()
        # Whether a hit's read may hold the fork gate's lock (``fetchone(held=)``):
        # only in WAL mode, where a read never waits for a writer. Asked at each
        # open: nobody can take a file out of WAL while a connection of ours is open.
        try:
            self._wal = journal_mode(conn) == "wal"
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
                close_quietly(conn)
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
            end_transaction(conn)
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
        self._hit_cols = has_hit_columns(conn)
        if not self.readonly:
            set_journal_mode(conn, self._wanted_journal(), self.path)
            self._wal = journal_mode(conn) == "wal"
            self._reclaim_at_open()

    def _info(self, name: str) -> str:
        with contextlib.suppress(sqlite3.Error):
            row = self._conn().execute("SELECT value FROM store_info WHERE name=?", (name,)).fetchone()
            if row:
                return str(row[0])
        return ""

    def _wanted_journal(self) -> str:
        return self._journal or ("delete" if is_network_fs(self.path) else "wal")

    # -- reading ------------------------------------------------------------------
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
                return meta, InlineLoader(value, meta)
            path = blob_path(self.blob_dir, blob)
            try:
                # Opened now, before the row can change again: an open file
                # stays readable when an overwrite or rm unlinks it.
                f = open(path, "rb", buffering=0)
            except FileNotFoundError:
                if blob == missing:
                    # The row did not change and its file is still gone:
                    # removed by hand, not by a writer. That is damage.
                    return meta, MissingLoader(path)
                # An overwrite or rm unlinked it after we read the row (it
                # always commits the row first): the entry changed, read again.
                missing = blob
                continue
            return meta, FileLoader(f, path, meta)
        # The entry changed under every read: as good as a miss.
        logger.debug("%s: %r kept changing while being read; treated as missing", self.path, key)
        return None

    def lookup_fast(self, key: str, digest: Optional[str], limit: Optional[int] = None) -> Any:
        """A hit's short way: ``(value, duration, is_awaitable)``, ``MISSING``, None (go the full way), or
        ``LARGE`` (with ``limit``: a value over ``limit`` bytes or in a side file, not read).

        ``key`` must be valid already. One indexed SELECT of the hit columns,
        one CRC over key, digest, flag and frame (``hit_crc``), one comparison
        of the fingerprint digest (none when ``digest`` is None:
        stale="ignore"), one ``loads``. Anything else (a side file, a signed
        store, a row written by an older library, a digest that differs, a
        frame with buffers) answers None, and ``lookup`` reads and checks the
        whole record.
        """
        if not self._hit_cols or self.signer is not None or self.closed:
            return None
        if limit is not None:
            return self._lookup_small(key, digest, limit)
        if digest is None:
            row = self._conns.fetchone(FAST_SELECT_ANY, (key,), self._wal)
        else:
            row = self._conns.fetchone(FAST_SELECT, (digest, key), self._wal)
        if row is None:
            return MISSING
        return fast_value(row, key)

    def _lookup_small(self, key: str, digest: Optional[str], limit: int) -> Any:
        # The value is read only when it is small (SQLite gets a blob's length
        # from the record header): a large one is left to a thread.
        if digest is None:
            row = self._conns.fetchone(SMALL_SELECT_ANY, (limit, key), self._wal)
        else:
            row = self._conns.fetchone(SMALL_SELECT, (limit, digest, key), self._wal)
        if row is None:
            return MISSING
        size = row[3]
        if row[0] is None and (size is None or size > limit):
            return LARGE
        return fast_value(row, key)

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        with self._session() as conn:
            row = conn.execute("SELECT meta FROM entries WHERE key=?", (key,)).fetchone()
        return None if row is None else meta_from_json(row[0])

    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]:
        def fetch(op: str, bound: str, upper: Optional[str], limit: int) -> list[Any]:
            sql = f"SELECT key, meta FROM entries WHERE key {op} ?"
            params: tuple[Any, ...] = (bound,)
            if upper is not None:
                sql += " AND key < ?"
                params += (upper,)
            try:
                with self._session() as conn:
                    return conn.execute(sql + " ORDER BY key LIMIT ?", (*params, limit)).fetchall()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):
                    raise
                raise StoreDamagedError(self.path, str(e)) from e

        return iter_meta_pages(fetch, prefix, PAGE_SIZE)

    def __len__(self) -> int:
        with self._session() as conn:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])

    # -- writing ------------------------------------------------------------------
    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        blob = None
        value: bytes | None = None
        if encoded.size > INLINE_MAX:
            # Written and fsynced by the caller, before its row joins a commit.
            blob = write_blob(self.blob_dir, encoded)
        else:
            value = encoded.to_bytes()
        settle_crc(meta, encoded)  # a side file's checksum was computed while it was written
        row: _Row = (key, meta["created"], meta_to_json(meta), value, blob,
                     *hit_columns(key, meta, value, self.signer is not None))
        try:
            # Saves arriving together from several threads share one
            # transaction and one fsync; this returns once ours is committed.
            old = self._commits.submit(row, len(value) if value is not None else 0)
        except Exception:
            if blob is not None:  # our row was rolled back: nothing refers to the file
                unlink_blob(self.blob_dir, blob)
            raise
        # (Interrupted while waiting, the row may still be committed by the
        # batch it was in: the file is kept; at worst an orphan for 'verify'.)
        if old is not None:
            unlink_blob(self.blob_dir, old)

    def _write_one(self, row: _Row) -> str | None:
        """``_write_rows([row])[0]`` for a lone save, in one statement where it can be.

        An INSERT outside ``BEGIN`` is a transaction of its own, as atomic and
        as durable (the same commit, the same one fsync) as one between
        ``BEGIN IMMEDIATE`` and ``COMMIT``, and takes the write lock the same
        way (waiting on a busy writer with the busy timeout). It cannot say
        which side file it replaced, so it changes no row that names one
        (``UPSERT``): that case, a file without the hit columns yet, and an
        SQLite older than 3.24 go through ``_write_rows``.
        """
        if not self._hit_cols or not HAS_UPSERT or self.closed:
            return self._write_rows([row])[0]  # (which also says that the store is closed)
        if self._conns.change(UPSERT, row) == 1:
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
        with self._session() as conn, immediate(conn):
            # Set only once committed: a rolled-back ALTER leaves the old columns.
            cols = self._hit_cols or add_hit_columns(conn)
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
                conn.execute(INSERT, rows[0])
            elif cols:
                conn.executemany(INSERT, rows)
            else:  # a file we may not change the schema of: the columns it has
                conn.executemany(INSERT_OLD, [row[:5] for row in rows])
        self._hit_cols = cols  # committed: ``immediate`` raised otherwise
        olds: list[str | None] = []
        for key, _, _, _, blob, *_ in rows:  # in order: a key twice replaces its own earlier row
            old = current.get(key)
            current[key] = blob
            # The same row written again (a batch retried) must not report
            # its own file as the one to remove.
            olds.append(old if old != blob else None)
        return olds

    def _delete_many(self, keys: list[str]) -> int:
        blobs: list[str] = []
        removed = 0
        with self._session() as conn, immediate(conn):
            for key in keys:
                row = conn.execute("SELECT blob FROM entries WHERE key=?", (key,)).fetchone()
                if row is None:
                    continue
                conn.execute("DELETE FROM entries WHERE key=?", (key,))
                removed += 1
                if row[0] is not None:
                    blobs.append(row[0])
        for name in blobs:  # after the commit: a crash here only leaves orphans
            unlink_blob(self.blob_dir, name)
        return removed

    def _delete(self, key: str) -> bool:
        return self._delete_many([key]) == 1

    # -- leases (one host: the local clock is the only clock) -----------------
    def _one_statement(self, sql: str, params: tuple[Any, ...], busy_timeout: Optional[float] = None) -> int:
        """Run one writing statement as a transaction of its own; returns the rows it changed.

        Claims, lease renewals and run records commit exactly as entries do
        (``synchronous=EXTRA``, set once per connection and never changed):
        they share the database and its WAL with the entries (see
        ``_connect._configure``). One statement outside ``BEGIN`` is atomic on
        its own, so no transaction is left open, whatever exception arrives.
        ``busy_timeout``: how long to wait for another process's write lock,
        when shorter than the store's own (restored whatever exception arrives).
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
            self._one_statement(RUNS_TABLE, (), RUN_BUSY_TIMEOUT_S)
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
        removed = []
        for name in frame_names(self.blob_dir):
            path = os.path.join(self.blob_dir, name)
            if not left_by_dead_writer(path, *writer_of(name), min_age):
                continue
            with self._session() as conn:
                used = conn.execute("SELECT 1 FROM entries WHERE blob = ?", (name,)).fetchone()
            if used is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
        return removed

    def _reclaim_at_open(self, min_age: float = 86400.0) -> None:
        """Remove side files whose writer died before committing them (see ``remove_dead_writers_files``).

        One listing of the folder and one read transaction that asks which
        of the listed names rows refer to, whatever the number of side
        files; only a file that no row names is then judged by its writer
        (the process table on this host, its age, a stat, for another
        host's). A file-system operation per side file would be a round trip
        each on NFS and Lustre, and a finished run leaves hundreds.
        """
        names = frame_names(self.blob_dir)
        if not names:
            return
        used: set[str] = set()
        with self._session() as conn:
            conn.execute("BEGIN")  # one read transaction (one lock) for every chunk
            try:
                for i in range(0, len(names), 500):  # within SQLite's oldest limit of 999 variables
                    chunk = names[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    used.update(r[0] for r in conn.execute(f"SELECT blob FROM entries WHERE blob IN ({marks})", chunk))
            finally:
                conn.execute("COMMIT")
        for name in names:
            if name in used:
                continue
            path = os.path.join(self.blob_dir, name)
            # Not referenced a moment ago: a dead writer's leftover, or a live
            # writer's file before its commit, which its writer's check keeps.
            if left_by_dead_writer(path, *writer_of(name), min_age):
                with self._session() as conn:  # committed since the query above: kept
                    again = conn.execute("SELECT 1 FROM entries WHERE blob = ?", (name,)).fetchone()
                if again is None:
                    unlink_blob(self.blob_dir, name)

    def orphan_blobs(self) -> list[str]:
        """Side files that no entry refers to (a writer was killed before its commit)."""
        names = set(frame_names(self.blob_dir))
        with self._session() as conn:
            used = {r[0] for r in conn.execute("SELECT blob FROM entries WHERE blob IS NOT NULL")}
        return sorted(os.path.join(self.blob_dir, n) for n in names - used)

    def integrity_check(self) -> list[str]:
        """SQLite's own integrity check; an empty list means the file is sound."""
        with self._session() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return [] if rows == [("ok",)] else [r[0] for r in rows]

    def structure_problems(self) -> list[str]:
        try:
            return self.integrity_check()
        except sqlite3.DatabaseError as e:
            return [str(e)]

    def orphan_files(self) -> list[str]:
        return self.orphan_blobs()

    def missing_side_files(self) -> Optional[str]:
        if os.path.isdir(self.blob_dir):
            return None
        with self._session() as conn:
            n = conn.execute("SELECT count(*) FROM entries WHERE blob IS NOT NULL").fetchone()[0]
        if not n:
            return None
        return (f"{n} {'entry keeps its value' if n == 1 else 'entries keep their values'} in side files, "
                f"and their folder {self.blob_dir}/ is missing (the store was copied or moved without it?). "
                f"{folder_missing_fix(self.blob_dir)}")

    def probe_keys(self) -> Optional[Iterator[str]]:
        """Every key, row by row: one damaged page costs only the rows on it."""
        return self._probe_keys()

    def _probe_keys(self) -> Iterator[str]:
        try:
            with self._session() as conn:
                top = conn.execute("SELECT max(rowid) FROM entries").fetchone()[0] or 0
        except sqlite3.DatabaseError:
            top = 1_000_000
        for rowid in range(1, top + 1):
            try:
                with self._session() as conn:
                    row = conn.execute("SELECT key FROM entries WHERE rowid = ?", (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row:
                yield row[0]
