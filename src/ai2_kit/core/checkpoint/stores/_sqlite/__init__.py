"""The single-file store (SQLite), by job: ``_schema`` (what the file is, creating it),
``_connect`` (connections, sync setting, journal mode, the transaction helper), ``_hits``
(the hit columns and the short look-up), ``_blobs`` (side files and loaders), ``_store``
(``SQLiteStore``, which uses them all). Import direction: ``_store`` -> the other four,
``_schema`` -> ``_connect``; ``_hits`` and ``_blobs`` import neither."""

from __future__ import annotations

from ._blobs import INLINE_MAX
from ._connect import BUSY_TIMEOUT_S
from ._hits import ANY_CALL, hit_crc, key_crc
from ._schema import APPLICATION_ID, JOURNAL_ENV, JOURNAL_MODES, SQLITE_MAGIC, check_journal, check_sqlite_header
from ._store import SQLiteStore

__all__ = [
    "SQLiteStore", "APPLICATION_ID", "SQLITE_MAGIC", "INLINE_MAX", "BUSY_TIMEOUT_S", "ANY_CALL", "JOURNAL_MODES",
    "JOURNAL_ENV", "check_journal", "check_sqlite_header", "key_crc", "hit_crc",
]
