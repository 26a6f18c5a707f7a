"""The shared store: PostgreSQL tables, for several machines writing one store.

Layout, in one schema (``ai2_kit_checkpoint`` unless the ``schema`` option or
the URL's ``?schema=`` parameter says otherwise)::

    store_info (name, value)                       application, format, created_by
    entries    (key, created, meta, value, nchunks)  one row per entry
    chunks     (key, seq, data)                    frames larger than INLINE_MAX
    claims     (key, owner, expires)               leases for same-key dedup

A frame of at most ``INLINE_MAX`` bytes lives in ``entries.value``. A larger
one is cut into ``CHUNK_SIZE`` rows of ``chunks``: one ``bytea`` is limited to
1 GB and must sit whole in client memory, twice over once the driver has
copied it, while chunks stream from the value's own memory to the socket and
back into preallocated buffers, so a 1 GB array costs about 1 GB, not 3.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from typing import Any, BinaryIO, Callable, Iterator, Optional, Tuple, TypeVar, cast
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .._codec import Encoded, Signer, Verifier, decode_bytes, meta_from_json, meta_to_json, read_frame
from .._errors import NewerFormatError, NotACheckpointStoreError, SaveError, StoreOpenError, StoreTimeoutError
from ._base import FORMAT_VERSION, MAX_RUN_BYTES, Loader, Store, check_seconds, library_version, parse_run
from ._conns import GroupCommit, ThreadConnections
from ._pg_chunks import CHUNK_SIZE, ChunkReader, copy_chunks
from ._pg_connect import QUERY_CANCELED, first_line, liveness_params, lost, split_url, unreachable
from ._pg_schema import CREATE_STATEMENTS, RUNS_TABLE
from ._shared import iter_meta_pages

__all__ = ["PostgresStore", "DEFAULT_SCHEMA", "INLINE_MAX", "CHUNK_SIZE"]

logger = logging.getLogger("ai2_kit.core.checkpoint")

APPLICATION = "ai2-kit-checkpoint"
DEFAULT_SCHEMA = "ai2_kit_checkpoint"
#: Frames up to this size are kept in the entry's row.
INLINE_MAX = 1 << 20
CONNECT_TIMEOUT_S = 10
#: The longest any call waits on the server before it raises StoreTimeoutError
#: (the ``timeout=`` option): a statement's deadline on the server, and the
#: TCP keepalives and user timeout that detect a connection gone silent.
TIMEOUT_S = 30
#: Rows fetched per query when listing (keyset pages: no long transaction).
PAGE_SIZE = 1000
#: Attempts of a transaction the server rolled back to break a deadlock.
ROLLBACK_ATTEMPTS = 5

T = TypeVar("T")
#: A small entry waiting for its commit: key, created, metadata JSON, frame.
_Row = Tuple[str, float, str, bytes]

_HINT_CONNECT = (
    "Check that the server is running and reachable from this host, and the user, "
    "password and database in the URL (or PGPASSWORD / ~/.pgpass); see docs/postgres.md"
)


def _verifier(signer: Signer | None, meta: dict[str, Any]) -> Verifier | None:
    return signer.verifier(meta) if signer is not None else None


class PostgresStore(Store):
    """A checkpoint store in a PostgreSQL database, shared by several machines.

    ``url`` is a libpq URL, ``postgresql://user:password@host:port/dbname``,
    with optional libpq parameters (``?sslmode=require``) and our own
    ``schema`` parameter. Tables are created on first use, in one transaction
    under an advisory lock, so several processes may start at once.

    Every ``put`` is one transaction, durable when it returns
    (``synchronous_commit`` is turned on for our sessions if the server has it off).

    Parameters:
        url: the database to connect to.
        readonly: refuse writes (the session is also made read-only).
        schema: the PostgreSQL schema holding the tables; overrides ``?schema=``.
        connect_timeout: seconds to wait for the server, unless the URL says
            (at most ``timeout``).
        timeout: seconds any call may wait on the server (default 30, or the
            URL's ``?timeout=``): past it the call raises StoreTimeoutError,
            the connection is dropped and the next call reconnects. See
            docs/postgres.md, "Timeouts".

    Raises StoreOpenError (server unreachable, permission denied),
    NotACheckpointStoreError (the schema holds something else).
    """

    counts_cheaply = True
    dedup_default = True

    kind = "postgres"
    supports_claims = True
    # A dropped connection while reading chunks is not a damaged entry.
    transient_errors = (psycopg.OperationalError,)

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        schema: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        timeout: float | None = None,
    ) -> None:
        from . import _redact

        connect_timeout = check_seconds("connect_timeout", connect_timeout)
        conninfo, url_schema = split_url(url)
        conninfo, url_timeout = split_url(conninfo, "timeout")
        if timeout is None and url_timeout is not None:
            try:
                timeout = float(url_timeout)
            except ValueError:
                raise ValueError(f"the URL's timeout must be a number of seconds, not {url_timeout!r}") from None
            self.timeout = check_seconds("the URL's timeout", timeout)
        else:
            self.timeout = check_seconds("timeout", TIMEOUT_S if timeout is None else timeout)
        self.schema = schema or url_schema or DEFAULT_SCHEMA
        super().__init__(_redact(url), readonly=readonly)
        self.url = self.location
        self._conninfo = conninfo
        self._secret = urlsplit(url).password or ""
        self._connect_args: dict[str, Any] = {}
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as e:
            raise StoreOpenError(self.location, f"not a valid PostgreSQL URL ({self._scrub(e)})",
                                 "Use postgresql://user@host:port/dbname") from e
        if "connect_timeout" not in params and "PGCONNECT_TIMEOUT" not in os.environ:
            self._connect_args["connect_timeout"] = max(1, round(min(connect_timeout, self.timeout)))
        self._connect_args.update(
            (name, value) for name, value in liveness_params(self.timeout).items() if name not in params
        )
        # The statement deadline travels with the startup packet (no round
        # trip of its own) unless the URL or PGOPTIONS has options of its own.
        self._set_deadline = "options" in params or "PGOPTIONS" in os.environ
        if not self._set_deadline:
            self._connect_args["options"] = f"-c statement_timeout={self._timeout_ms}"
        # Small saves whose outcome a lost connection left unknown (sent, no
        # reply), re-sent once a connection works again (see _settle).
        self._unsettled: dict[str, _Row] = {}
        self._unsettled_lock = threading.Lock()
        if "application_name" not in params and "PGAPPNAME" not in os.environ:
            self._connect_args["application_name"] = APPLICATION
        if len(self.schema.encode("utf-8")) > 63:
            # PostgreSQL would silently truncate it, and two names would meet.
            raise StoreOpenError(self.location, f"the schema name {self.schema!r} is longer than 63 bytes",
                                 "Pick a shorter schema name")
        self._s = sql.Identifier(self.schema)
        # One session per thread, closed once its thread has ended; a forked
        # child leaves the parent's sessions alone and opens its own
        # (stores/_conns.py: never closed there, since closing sends a
        # Terminate on the socket the parent still uses).
        self._conns: ThreadConnections[psycopg.Connection[Any]] = ThreadConnections(
            self._open_conn, self._close_conn, close_at_fork=False
        )
        # Small saves arriving together share one transaction, one round trip.
        # A lost server fails the whole batch and its waiting callers at once
        # (each retried alone would wait out its own connect timeout).
        self._commits: GroupCommit[_Row, None] = GroupCommit(self._write_rows, shared_failure=unreachable)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- connections ------------------------------------------------------------
    def describe(self) -> Optional[tuple[str, tuple[tuple[str, Any], ...]]]:
        # The URL as given (password included: another process must log in
        # too), and the schema, which the URL may not name.
        options: tuple[tuple[str, Any], ...] = (("schema", self.schema),)
        if self.timeout != TIMEOUT_S:
            options += (("timeout", self.timeout),)
        return self._conninfo, options

    def _scrub(self, e: BaseException | str) -> str:
        """An error message without the password (libpq may echo parameters)."""
        text = e if isinstance(e, str) else first_line(e)
        for secret in {self._secret, unquote(self._secret)} - {""}:
            text = text.replace(secret, "***")
        return text

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._connect_args)
        except psycopg.Error as e:
            raise StoreOpenError(self.location, f"cannot connect to the database ({self._scrub(e)})",
                                 _HINT_CONNECT) from e
        try:
            if self.readonly:
                conn.execute("SET default_transaction_read_only TO on")
            if self._set_deadline:
                conn.execute(f"SET statement_timeout TO {self._timeout_ms}")
            # A checkpoint is worth keeping only if it survives a crash of the
            # server: 'off' could lose the last commits, the others cannot.
            if conn.execute("SELECT current_setting('synchronous_commit')").fetchone() == ("off",):
                conn.execute("SET synchronous_commit TO on")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_conn(self) -> psycopg.Connection[Any]:
        if self.closed:
            raise StoreOpenError(self.location, "the store is closed", "Open it again")
        return self._connect()

    def _conn(self) -> psycopg.Connection[Any]:
        """One connection per thread, reopened in a forked child or after a break."""
        conn = self._conns.get()
        if conn.closed:
            self._conns.drop(conn)
            conn = self._conns.get()
        return conn

    @property
    def _all(self) -> list[psycopg.Connection[Any]]:
        """The open connections (of live threads, and of ended ones not yet swept)."""
        return self._conns.connections()

    def _close_orphans(self) -> None:
        """Close the connections of threads that have ended.

        Short-lived threads (a lease's heartbeat, a thread pool's workers)
        would otherwise each leave a session open on the server until the
        store is closed, and a long workflow would exhaust max_connections.
        (Done whenever a thread opens its connection.)
        """
        self._conns.sweep()

    def _close_conn(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.close()
        except psycopg.Error as e:
            logger.debug("closing a connection to %s: %s", self.location, e)

    def _drop(self, conn: psycopg.Connection[Any]) -> None:
        self._conns.drop(conn)

    @property
    def _timeout_ms(self) -> int:
        return max(1, int(self.timeout * 1000))

    def _timed_out(
        self, conn: psycopg.Connection[Any], e: psycopg.OperationalError, started: float, doing: str
    ) -> StoreTimeoutError | None:
        """The error to raise if ``e`` means the server went silent (the connection is then dropped).

        A statement past its deadline, or a connection the kernel ended after
        the keepalives or the user timeout went unanswered: retrying at once
        would wait as long again, so the call ends here and the next call
        reconnects. A connection that broke at once (a server restart) is not
        a silence: the caller retries it.
        """
        waited = time.monotonic() - started
        if e.sqlstate != QUERY_CANCELED and not (lost(conn) and waited >= self.timeout / 2):
            return None
        self._drop(conn)
        return StoreTimeoutError(
            self.location,
            f"the server did not answer for {waited:.1f} s while {doing} (timeout {self.timeout:g} s; "
            f"{self._scrub(e)}); the connection was dropped and the next call reconnects",
            "Check the network between this host and the server, or raise the timeout= option "
            "if the server is just slow (see docs/postgres.md)",
        )

    def _once(self, fn: Callable[[psycopg.Connection[Any]], T], doing: str) -> T:
        """``fn(conn)`` on this thread's connection, as a StoreTimeoutError if the server went silent."""
        conn = self._conn()
        started = time.monotonic()
        try:
            return fn(conn)
        except psycopg.OperationalError as e:
            timed_out = self._timed_out(conn, e, started, doing)
            if timed_out is not None:
                raise timed_out from e
            raise

    def _settle(self) -> None:
        """Re-send the small saves whose outcome a silent server left unknown.

        Each was one upsert of the whole row, so sending it again is
        idempotent: it lands once, whether or not the first one committed.
        It is written only if the entry is missing or older than it, so a
        newer value saved meanwhile (here or on another host) stays.
        """
        with self._unsettled_lock:
            rows, self._unsettled = list(self._unsettled.values()), {}
        if not rows:
            return

        def resend(conn: psycopg.Connection[Any]) -> None:
            with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                for row in sorted(rows, key=lambda row: row[0]):
                    cur.execute(self._q(self._RESEND), row)

        try:
            self._attempts(resend, f"re-sending {len(rows)} save(s) cut off earlier")
        except Exception as e:
            if not unreachable(e):
                # Refused by the server itself (e.g. the schema was dropped):
                # trying again would fail every later call the same way. Each
                # of these saves already raised to its caller.
                logger.warning("could not re-send %d save(s) cut off earlier on %s (%s): %s", len(rows),
                               self.location, self._scrub(e), ", ".join(repr(row[0]) for row in rows[:5]))
                return
            self._keep_unsettled(rows)
            raise
        except BaseException:  # interrupted: left to the next call
            self._keep_unsettled(rows)
            raise
        logger.info("%d save(s) cut off by a lost connection to %s were settled", len(rows), self.location)

    def _keep_unsettled(self, rows: list[_Row]) -> None:
        with self._unsettled_lock:
            for row in rows:
                self._unsettled.setdefault(row[0], row)

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T], doing: str = "reading") -> T:
        """Run ``fn(conn)``; once more on a new connection if the old one broke,
        up to ``ROLLBACK_ATTEMPTS`` times if the server rolled it back.

        A server restart or an idle timeout must not end a workflow that runs
        for days. Every ``fn`` here is one transaction, or a read, so running
        it again is safe (a put rewrites the same entry). A server that went
        silent ends the call with StoreTimeoutError instead (``_timed_out``).
        """
        if self._unsettled:
            self._settle()
        return self._attempts(fn, doing)

    def _attempts(self, fn: Callable[[psycopg.Connection[Any]], T], doing: str) -> T:
        for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
            conn = self._conn()
            started = time.monotonic()
            try:
                return fn(conn)
            except psycopg.OperationalError as e:
                timed_out = self._timed_out(conn, e, started, doing)
                if timed_out is not None:
                    raise timed_out from e
                if (e.sqlstate or "").startswith("40") and not conn.closed and attempt < ROLLBACK_ATTEMPTS:
                    # Class 40, a deadlock or a serialization failure: the
                    # server rolled our transaction back whole, so running it
                    # again is the remedy (after a short random pause, so the
                    # two sides part ways).
                    logger.debug("%s on %s; attempt %d", type(e).__name__, self.location, attempt + 1)
                    time.sleep(random.uniform(0.005, 0.05) * attempt)
                    continue
                if not lost(conn):
                    raise
                logger.info("connection to %s lost; reconnecting", self.location)
                self._drop(conn)
                return self._once(fn, doing)
        raise AssertionError("unreachable")

    def _close(self) -> None:
        self._conns.close_all()  # in a forked child: the parent's are left alone

    # -- schema -------------------------------------------------------------------
    def _q(self, text: str) -> sql.Composed:
        """A statement with ``{s}`` standing for our schema."""
        return sql.SQL(text).format(s=self._s)

    def _open(self) -> None:
        conn = self._conn()
        info = self._read_info(conn)
        if info is None:
            if self.readonly:
                raise StoreOpenError(
                    self.location, f"there is no checkpoint store in schema {self.schema!r}",
                    "Check the URL's database and the schema name",
                )
            self._create(conn)
            info = self._read_info(conn) or {}
        where = f"schema {self.schema!r} of {self.location}"
        if info.get("application") != APPLICATION:
            raise NotACheckpointStoreError(
                self.location, f"schema {self.schema!r} holds a store_info table of another application",
                "Pick another schema (the 'schema' option or ?schema=...); nothing was changed",
            )
        try:
            version = int(info.get("format", ""))
        except ValueError:
            raise NotACheckpointStoreError(
                self.location, f"{where} has no valid format version", "Pick another schema"
            ) from None
        if version > FORMAT_VERSION:
            err = NewerFormatError(self.location, version, FORMAT_VERSION, info.get("created_by", ""))
            self.readonly, self.readonly_reason, self.newer_format = True, str(err), err

    def _read_info(self, conn: psycopg.Connection[Any]) -> dict[str, str] | None:
        try:
            found = conn.execute(
                "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = %s AND tablename = 'store_info'",
                (self.schema,),
            ).fetchone()
            if found is None:
                return None
            rows = conn.execute(self._q("SELECT name, value FROM {s}.store_info")).fetchall()
        except psycopg.errors.InsufficientPrivilege as e:
            raise StoreOpenError(
                self.location, f"permission denied on schema {self.schema!r} ({self._scrub(e)})",
                f"Ask the database owner to GRANT USAGE ON SCHEMA {self.schema} and "
                "SELECT, INSERT, UPDATE, DELETE on its tables to your user (see docs/postgres.md)",
            ) from e
        return {str(k): str(v) for k, v in rows}

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        """Create the schema and tables, idempotently, one creator at a time."""
        lock_id = int.from_bytes(
            hashlib.blake2b(f"{APPLICATION}:{self.schema}".encode(), digest_size=8).digest(),
            "big", signed=True,
        )
        try:
            with conn.transaction():
                # Without the lock two processes can both pass IF NOT EXISTS
                # and one fails on a unique violation in the catalogs.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
                if self._read_info(conn) is not None:
                    return  # another process created it while we waited
                for stmt in CREATE_STATEMENTS:
                    conn.execute(self._q(stmt))
                conn.execute(
                    self._q("INSERT INTO {s}.store_info (name, value) VALUES (%s, %s), (%s, %s), (%s, %s) "
                            "ON CONFLICT (name) DO NOTHING"),
                    ("application", APPLICATION, "format", str(FORMAT_VERSION),
                     "created_by", library_version()),
                )
        except psycopg.errors.InsufficientPrivilege as e:
            raise StoreOpenError(
                self.location, f"permission denied creating schema {self.schema!r} ({self._scrub(e)})",
                "Ask the database owner to create it once (open the store as a user with CREATE "
                "on the database) or to GRANT CREATE ON DATABASE to your user; see docs/postgres.md",
            ) from e

    # -- hooks ----------------------------------------------------------------------
    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None:
        def fetch(conn: psycopg.Connection[Any]) -> Any:
            with conn.cursor(binary=True) as cur:
                return cur.execute(
                    self._q("SELECT meta, value, nchunks FROM {s}.entries WHERE key = %s"), (key,)
                ).fetchone()

        row = self._run(fetch, f"looking up {key!r}")
        if row is None:
            return None
        text, value, nchunks = row
        meta = meta_from_json(text)
        if nchunks == 0:
            return meta, lambda signer: decode_bytes(value, meta.get("crc32"), _verifier(signer, meta))
        return meta, lambda signer: self._load_chunked(key, text, meta, signer)

    def _load_chunked(self, key: str, text: str, meta: dict[str, Any], signer: Signer | None) -> Any:
        """Read a chunked frame within one snapshot, so all its chunks belong together.

        If the entry was overwritten since ``_get`` read its metadata, the
        caller's ``meta`` is updated in place to the version actually read:
        a record and a value from two different puts would fail the checksum
        and be reported as damage that is not there.
        """
        conn = self._conn()
        started = time.monotonic()
        try:
            return self._read_chunked(conn, key, text, meta, signer)
        except psycopg.OperationalError as e:
            timed_out = self._timed_out(conn, e, started, f"reading the chunks of {key!r}")
            if timed_out is not None:
                raise timed_out from e
            raise

    def _read_chunked(
        self, conn: psycopg.Connection[Any], key: str, text: str, meta: dict[str, Any], signer: Signer | None
    ) -> Any:
        source = f"{self.location} entry {key!r}"
        with conn.transaction(), conn.cursor(binary=True) as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = cur.execute(
                self._q("SELECT meta, value, nchunks FROM {s}.entries WHERE key = %s"), (key,)
            ).fetchone()
            if row is None:
                raise LookupError(f"{key!r} was removed while it was being read")
            if row[0] != text:
                meta.clear()
                meta.update(meta_from_json(row[0]))
            if row[2] == 0:
                return decode_bytes(row[1], meta.get("crc32"), _verifier(signer, meta))
            query = self._q("SELECT data FROM {s}.chunks WHERE key = %s AND seq = %s")

            def chunk(seq: int) -> bytes:
                got = cur.execute(query, (key, seq)).fetchone()
                if got is None:
                    raise ValueError(f"chunk {seq} of {row[2]} is missing in {source}")
                return cast(bytes, got[0])

            reader = cast(BinaryIO, ChunkReader(chunk, row[2]))
            # The verifier is made from the record actually read (see above).
            return read_frame(reader, meta.get("crc32"), source, _verifier(signer, meta))

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        row = self._run(
            lambda conn: conn.execute(
                self._q("SELECT meta FROM {s}.entries WHERE key = %s"), (key,)
            ).fetchone()
        )
        return None if row is None else meta_from_json(row[0])

    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        text = meta_to_json(meta)
        inline = encoded.size <= INLINE_MAX
        try:
            if inline:
                # Saves arriving together from several threads share one
                # transaction (one round trip); this returns once ours is committed.
                value = encoded.to_bytes()
                self._commits.submit((key, float(meta["created"]), text, value), len(value))
            else:
                self._run(lambda conn: self._write_chunked(conn, key, meta, text, encoded), f"saving {key!r}")
        except psycopg.Error as e:
            raise SaveError(key, f"{type(e).__name__}: {self._scrub(e)} (store {self.location})") from e

    _UPSERT = (
        "INSERT INTO {s}.entries (key, created, meta, value, nchunks) "
        "VALUES (%s, %s, %s, %b, %s) ON CONFLICT (key) DO UPDATE SET "
        "created = EXCLUDED.created, meta = EXCLUDED.meta, "
        "value = EXCLUDED.value, nchunks = EXCLUDED.nchunks"
    )
    # A save re-sent after a lost reply (_settle): the same upsert, skipped
    # where a newer value is already there, with the chunk clean-up in the
    # same statement.
    _RESEND = (
        "WITH up AS (INSERT INTO {s}.entries AS e (key, created, meta, value, nchunks) "
        "VALUES (%s, %s, %s, %b, 0) ON CONFLICT (key) DO UPDATE SET "
        "created = EXCLUDED.created, meta = EXCLUDED.meta, value = EXCLUDED.value, nchunks = 0 "
        "WHERE e.created < EXCLUDED.created RETURNING e.key) "
        "DELETE FROM {s}.chunks WHERE key IN (SELECT key FROM up)"
    )

    def _write_rows(self, rows: list[_Row]) -> list[None]:
        """Commit small entries in one transaction, sent as one pipeline (one round trip)."""

        def put(conn: psycopg.Connection[Any]) -> None:
            # BEGIN, the statements and COMMIT in one round trip: against a
            # remote server the network latency, not the server, would
            # otherwise set the pace.
            with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                # In key order: two processes whose batches hold the same keys
                # then lock them in the same order and cannot deadlock. The sort
                # is stable, so of two saves of one key the later still wins.
                for key, created, text, value in sorted(rows, key=lambda row: row[0]):
                    # The upsert first: it locks the key's row until commit, so a
                    # concurrent put of the same key waits here, and the DELETE
                    # below (a new snapshot) then sees the other put's chunks.
                    cur.execute(self._q(self._UPSERT), (key, created, text, value, 0))
                    cur.execute(self._q("DELETE FROM {s}.chunks WHERE key = %s"), (key,))

        doing = f"saving {rows[0][0]!r}" + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")
        try:
            self._run(put, doing)
        except StoreTimeoutError:
            # Sent, and no reply: committed or not, nobody can tell. Kept to
            # be re-sent by the next call (_settle), so the save lands once.
            with self._unsettled_lock:
                self._unsettled.update((row[0], row) for row in rows)
            raise
        if self._unsettled:
            with self._unsettled_lock:
                for row in rows:  # saved again since: the older row must not be re-sent
                    if row[0] in self._unsettled and self._unsettled[row[0]][1] <= row[1]:
                        del self._unsettled[row[0]]
        return [None] * len(rows)

    def _write_chunked(
        self, conn: psycopg.Connection[Any], key: str, meta: dict[str, Any], text: str, encoded: Encoded
    ) -> None:
        # COPY cannot run in a pipeline (nor join a batch); a large put is
        # dominated by its bytes anyway.
        nchunks = -(-encoded.size // CHUNK_SIZE)
        with conn.transaction(), conn.cursor() as cur:
            # A big value may take longer than the timeout to send: its
            # statements get no deadline, and a silent server is caught by
            # the TCP user timeout and keepalives instead.
            cur.execute("SET LOCAL statement_timeout TO 0")
            cur.execute(self._q(self._UPSERT), (key, float(meta["created"]), text, None, nchunks))
            cur.execute(self._q("DELETE FROM {s}.chunks WHERE key = %s"), (key,))
            copy = self._q("COPY {s}.chunks (key, seq, data) FROM STDIN (FORMAT BINARY)")
            copy_chunks(cur, copy, key, encoded, nchunks)

    def _delete_many(self, keys: list[str]) -> int:
        if not keys:
            return 0
        # One statement is one transaction; the chunks go with their entries.
        cur = self._run(
            lambda conn: conn.execute(self._q("DELETE FROM {s}.entries WHERE key = ANY(%s)"), (keys,))
        )
        return cur.rowcount

    def _delete(self, key: str) -> bool:
        return self._delete_many([key]) == 1

    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]:
        def fetch(op: str, bound: str, upper: str | None, limit: int) -> list[Any]:
            where = [f"key {op} %s"]
            params: list[Any] = [bound]
            if upper is not None:
                where.append("key < %s")
                params.append(upper)
            query = self._q(
                "SELECT key, meta FROM {s}.entries WHERE " + " AND ".join(where) + " ORDER BY key LIMIT %s"
            )
            params.append(limit)
            return self._run(lambda conn: conn.execute(query, params).fetchall())

        # No transaction stays open between two pages.
        return iter_meta_pages(fetch, prefix, PAGE_SIZE)

    # -- runs (the table is created with the schema, or on first use in older schemas) ---
    def _put_run(self, run_id: str, record: dict[str, Any]) -> None:
        def put(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(self._q(RUNS_TABLE))
                conn.execute(
                    self._q("INSERT INTO {s}.runs (id, record) VALUES (%s, %s) "
                            "ON CONFLICT (id) DO UPDATE SET record = excluded.record"),
                    (run_id, json.dumps(record)),
                )

        self._run(put)

    def _iter_runs(self) -> Iterator[dict[str, Any]]:
        def read(conn: psycopg.Connection[Any]) -> list[Any]:
            with conn.transaction():
                if conn.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = %s "
                                "AND table_name = 'runs'", (self.schema,)).fetchone() is None:
                    return []  # a schema made before runs were recorded
                # A record beyond the bound reads as NULL: counted as not a run record.
                return conn.execute(self._q("SELECT CASE WHEN length(record) <= %s THEN record END FROM {s}.runs"),
                                    (MAX_RUN_BYTES,)).fetchall()

        for (text,) in self._run(read):
            yield parse_run(text)  # checked field by field by iter_runs

    def __len__(self) -> int:
        row = self._run(lambda conn: conn.execute(self._q("SELECT count(*) FROM {s}.entries")).fetchone())
        return int(row[0]) if row else 0

    # -- claims (leases for same-key dedup across hosts) -------------------------
    # The server's clock decides expiry, so the hosts' clocks need not agree.
    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        """Take the claim on ``key`` if it is free, expired, or already ``owner``'s."""
        row = self._run(
            lambda conn: conn.execute(
                self._q(
                    "INSERT INTO {s}.claims AS c (key, owner, expires) "
                    "VALUES (%s, %s, clock_timestamp() + make_interval(secs => %s)) "
                    "ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires = EXCLUDED.expires "
                    "WHERE c.expires < clock_timestamp() OR c.owner = EXCLUDED.owner "
                    "RETURNING c.owner"
                ),
                (key, owner, float(ttl)),
            ).fetchone()
        )
        return row is not None

    def _renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s claim on ``key``; False if someone else holds it now."""
        row = self._run(
            lambda conn: conn.execute(
                self._q(
                    "UPDATE {s}.claims SET expires = clock_timestamp() + make_interval(secs => %s) "
                    "WHERE key = %s AND owner = %s RETURNING 1"
                ),
                (float(ttl), key, owner),
            ).fetchone()
        )
        return row is not None

    def _release_claim(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key`` (nothing if someone else holds it)."""
        self._run(
            lambda conn: conn.execute(
                self._q("DELETE FROM {s}.claims WHERE key = %s AND owner = %s"), (key, owner)
            )
        )
