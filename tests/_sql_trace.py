"""The SQL statements a piece of code runs on one SQLite connection (tests of the hit and save paths)."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable


def statements(conn: sqlite3.Connection, run: Callable[[], Any]) -> list[str]:
    """Every statement ``run()`` made on ``conn``, in order (SQLite's trace callback)."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        run()
    finally:
        conn.set_trace_callback(None)
    return seen
