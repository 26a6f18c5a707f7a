"""The PostgreSQL store's tables, created idempotently (``{s}`` stands for the schema)."""

from __future__ import annotations

__all__ = ["CREATE_STATEMENTS", "RUNS_TABLE"]

RUNS_TABLE = "CREATE TABLE IF NOT EXISTS {s}.runs (id text PRIMARY KEY, record text NOT NULL)"

#: Run in order, in one transaction, under an advisory lock (PostgresStore._create).
CREATE_STATEMENTS = [
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
    RUNS_TABLE,
    """CREATE TABLE IF NOT EXISTS {s}.claims (
        key     text COLLATE "C" PRIMARY KEY,
        owner   text NOT NULL,
        expires timestamptz NOT NULL
    )""",
]
