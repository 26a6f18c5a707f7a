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
import struct
import time
from typing import Any, BinaryIO, Callable, Iterator, Optional, Tuple, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .._codec import Encoded, Signer, Verifier, decode_bytes, meta_from_json, meta_to_json, read_frame
from .._errors import NewerFormatError, NotACheckpointStoreError, SaveError, StoreOpenError
from ._base import FORMAT_VERSION, MAX_RUN_BYTES, Loader, Store, check_seconds, library_version, parse_run
from ._conns import GroupCommit, ThreadConnections
from ._shared import iter_meta_pages

__all__ = ["PostgresStore", "DEFAULT_SCHEMA", "INLINE_MAX", "CHUNK_SIZE"]

logger = logging.getLogger("ai2_kit.core.checkpoint")

APPLICATION = "ai2-kit-checkpoint"
DEFAULT_SCHEMA = "ai2_kit_checkpoint"
_RUNS_TABLE = "CREATE TABLE IF NOT EXISTS {s}.runs (id text PRIMARY KEY, record text NOT NULL)"
#: Frames up to this size are kept in the entry's row.
INLINE_MAX = 1 << 20
#: Size of the pieces a larger frame is stored in (the last one may be shorter).
CHUNK_SIZE = 8 << 20
CONNECT_TIMEOUT_S = 10
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _verifier(signer: Signer | None, meta: dict[str, Any]) -> Verifier | None:
    return signer.verifier(meta) if signer is not None else None


def split_url(url: str) -> tuple[str, str | None]:
    """Split our own ``schema`` parameter off a URL: (URL for libpq, schema or None).

    >>> split_url("postgresql://u@h/db?schema=team_a&sslmode=require")
    ('postgresql://u@h/db?sslmode=require', 'team_a')
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in pairs if k == "schema"]
    if not schemas:
        return url, None
    rest = [(k, v) for k, v in pairs if k != "schema"]
    # quote, not quote_plus: libpq decodes %XX but not '+'.
    query = urlencode(rest, quote_via=quote, safe="")
    return urlunsplit(parts._replace(query=query)), schemas[-1]


class _ChunkReader:
    """A read-only file over the chunks of one frame, fetched one at a time.

    ``read_frame`` reads into preallocated buffers through ``readinto``, so a
    frame never exists twice in memory: at most one chunk is in flight.
    """

    def __init__(self, fetch: Callable[[int], bytes], count: int) -> None:
        self._fetch = fetch
        self._count = count
        self._seq = 0
        self._buf = memoryview(b"")
        self._pos = 0

    def _fill(self) -> bool:
        while self._pos >= self._buf.nbytes:
            if self._seq >= self._count:
                return False
            self._buf.release()
            self._buf = memoryview(self._fetch(self._seq))
            self._seq += 1
            self._pos = 0
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        while done < view.nbytes and self._fill():
            n = min(view.nbytes - done, self._buf.nbytes - self._pos)
            view[done : done + n] = self._buf[self._pos : self._pos + n]
            done += n
            self._pos += n
        return done

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out = bytearray()
            while self._fill():
                out += self._buf[self._pos :]
                self._pos = self._buf.nbytes
            return bytes(out)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])


# Binary COPY framing (see the PostgreSQL COPY documentation, "Binary Format").
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)


def _unreachable(e: BaseException) -> bool:
    """Whether a failed write failed for want of the server, not because of its rows."""
    return isinstance(e, (StoreOpenError, psycopg.OperationalError, psycopg.InterfaceError))


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
        connect_timeout: seconds to wait for the server, unless the URL says.

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
    ) -> None:
        from . import _redact

        connect_timeout = check_seconds("connect_timeout", connect_timeout)
        conninfo, url_schema = split_url(url)
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
            self._connect_args["connect_timeout"] = max(1, round(connect_timeout))
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
        self._commits: GroupCommit[_Row, None] = GroupCommit(self._write_rows, shared_failure=_unreachable)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- connections ------------------------------------------------------------
    def describe(self) -> Optional[tuple[str, tuple[tuple[str, Any], ...]]]:
        # The URL as given (password included: another process must log in
        # too), and the schema, which the URL may not name.
        return self._conninfo, (("schema", self.schema),)

    def _scrub(self, e: BaseException | str) -> str:
        """An error message without the password (libpq may echo parameters)."""
        text = e if isinstance(e, str) else _first_line(e)
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

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn(conn)``; once more on a new connection if the old one broke,
        up to ``ROLLBACK_ATTEMPTS`` times if the server rolled it back.

        A server restart or an idle timeout must not end a workflow that runs
        for days. Every ``fn`` here is one transaction, or a read, so running
        it again is safe (a put rewrites the same entry).
        """
        for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
            conn = self._conn()
            try:
                return fn(conn)
            except psycopg.OperationalError as e:
                if (e.sqlstate or "").startswith("40") and not conn.closed and attempt < ROLLBACK_ATTEMPTS:
                    # Class 40, a deadlock or a serialization failure: the
                    # server rolled our transaction back whole, so running it
                    # again is the remedy (after a short random pause, so the
                    # two sides part ways).
                    logger.debug("%s on %s; attempt %d", type(e).__name__, self.location, attempt + 1)
                    time.sleep(random.uniform(0.005, 0.05) * attempt)
                    continue
                if not conn.closed:
                    raise
                logger.info("connection to %s lost; reconnecting", self.location)
                self._drop(conn)
                return fn(self._conn())
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
        statements = [
            "CREATE SCHEMA IF NOT EXISTS {s}",
            "CREATE TABLE IF NOT EXISTS {s}.store_info (name text PRIMARY KEY, value text NOT NULL)",
            # COLLATE "C": keys sort by bytes, which for UTF-8 is code-point
            # order, as in the other stores; and the primary key's index then
            # serves prefix ranges.
            """CREATE TABLE IF NOT EXISTS {s}.entries (
                key     text COLLATE "C" PRIMARY KEY,
                created double precision NOT NULL,
                meta    text NOT NULL,
                value   bytea,
                nchunks integer NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX IF NOT EXISTS entries_created ON {s}.entries (created)",
            """CREATE TABLE IF NOT EXISTS {s}.chunks (
                key  text COLLATE "C" NOT NULL REFERENCES {s}.entries (key) ON DELETE CASCADE,
                seq  integer NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (key, seq)
            )""",
            # Pickled arrays rarely compress: skip pglz's attempt on 8 MiB rows.
            "ALTER TABLE {s}.chunks ALTER COLUMN data SET STORAGE EXTERNAL",
            _RUNS_TABLE,
            """CREATE TABLE IF NOT EXISTS {s}.claims (
                key     text COLLATE "C" PRIMARY KEY,
                owner   text NOT NULL,
                expires timestamptz NOT NULL
            )""",
        ]
        try:
            with conn.transaction():
                # Without the lock two processes can both pass IF NOT EXISTS
                # and one fails on a unique violation in the catalogs.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
                if self._read_info(conn) is not None:
                    return  # another process created it while we waited
                for stmt in statements:
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

        row = self._run(fetch)
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
        source = f"{self.location} entry {key!r}"
        conn = self._conn()
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

            reader = cast(BinaryIO, _ChunkReader(chunk, row[2]))
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
                self._run(lambda conn: self._write_chunked(conn, key, meta, text, encoded))
        except psycopg.Error as e:
            raise SaveError(key, f"{type(e).__name__}: {self._scrub(e)} (store {self.location})") from e

    _UPSERT = (
        "INSERT INTO {s}.entries (key, created, meta, value, nchunks) "
        "VALUES (%s, %s, %s, %b, %s) ON CONFLICT (key) DO UPDATE SET "
        "created = EXCLUDED.created, meta = EXCLUDED.meta, "
        "value = EXCLUDED.value, nchunks = EXCLUDED.nchunks"
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

        self._run(put)
        return [None] * len(rows)

    def _write_chunked(
        self, conn: psycopg.Connection[Any], key: str, meta: dict[str, Any], text: str, encoded: Encoded
    ) -> None:
        # COPY cannot run in a pipeline (nor join a batch); a large put is
        # dominated by its bytes anyway.
        nchunks = -(-encoded.size // CHUNK_SIZE)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(self._q(self._UPSERT), (key, float(meta["created"]), text, None, nchunks))
            cur.execute(self._q("DELETE FROM {s}.chunks WHERE key = %s"), (key,))
            self._copy_chunks(cur, key, encoded, nchunks)

    def _copy_chunks(self, cur: psycopg.Cursor[Any], key: str, encoded: Encoded, nchunks: int) -> None:
        """Stream the frame into ``chunks`` with a binary COPY, from the value's own memory.

        The COPY rows are framed here rather than with ``write_row``, which
        would first copy each chunk into a buffer of its own: the bytes go
        from the array to libpq's send buffer, a slice at a time.
        """
        k = key.encode("utf-8")
        head = struct.pack("!hi", 3, len(k)) + k + struct.pack("!i", 4)
        with cur.copy(self._q("COPY {s}.chunks (key, seq, data) FROM STDIN (FORMAT BINARY)")) as copy:
            copy.write(_COPY_SIGNATURE)
            seq, room = 0, 0
            for piece in encoded.chunks():
                while piece.nbytes:
                    if room == 0:
                        size = min(CHUNK_SIZE, encoded.size - seq * CHUNK_SIZE)
                        copy.write(head + struct.pack("!ii", seq, size))
                        seq, room = seq + 1, size
                    n = min(room, piece.nbytes)
                    copy.write(piece[:n])
                    piece, room = piece[n:], room - n
            if seq != nchunks or room:
                raise ValueError(f"frame of {encoded.size} bytes gave {seq} chunks, expected {nchunks}")
            copy.write(_COPY_TRAILER)

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
                conn.execute(self._q(_RUNS_TABLE))
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
