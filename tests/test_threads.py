"""Per-thread connections end with their thread; readers never mistake a concurrent change for damage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

from ai2_kit.core.checkpoint.stores import SQLiteStore, Store
from ai2_kit.core.checkpoint.stores._sqlite import INLINE_MAX

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_store_procs.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_thread_churn_under_a_low_file_limit(kind: str, tmp_path: Any) -> None:
    """10,000 short-lived threads (a fresh 2-thread pool per call) under RLIMIT_NOFILE=256."""
    from conftest import _drop_pg_schema, location_for

    location, options = location_for(kind, tmp_path)
    iterations = 5000 if kind == "sqlite" else 300  # a PostgreSQL session costs ~10 ms to open
    try:
        proc = subprocess.run(
            [sys.executable, SCRIPT, "churn", kind, location, json.dumps(options), str(iterations), "256"],
            capture_output=True, text=True, timeout=280,
        )
    finally:
        if kind == "postgres":
            _drop_pg_schema(location, options["schema"])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["error"] == "", got
    assert got["saved"] == iterations * 2 // 50
    early, late = got["fds"]
    # Flat: the connections of the ended threads were closed (at most the
    # two of the last pool are still open), not one per thread ever run.
    assert late <= early + 4, got


def test_connections_of_ended_threads_are_closed(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    try:
        store.put("k", 1)
        conns: list[Any] = []

        def use() -> None:
            store.lookup("k")
            conns.append(store._conns.current())

        for _ in range(20):
            t = threading.Thread(target=use)
            t.start()
            t.join()
        # Each new thread closed the connection of the one before it.
        assert len({id(c) for c in conns}) == 20
        assert len(store._conns.connections()) <= 2  # this thread's and the last one's
        for c in conns[:-1]:
            with pytest.raises(Exception, match="closed"):
                c.execute("SELECT 1")
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_side_file_replaced_or_removed_while_reading_is_never_damage(tmp_path: Any) -> None:
    """Large values (side files) overwritten and removed while others read them: hits or misses only."""
    path = str(tmp_path / "s.db")
    store = SQLiteStore(path)
    n = INLINE_MAX // 8 + 1000  # a side file
    stop = threading.Event()
    errors: list[str] = []
    reads = [0, 0]  # hits, misses

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                if i % 4 == 3:
                    store.delete("big")
                else:
                    store.put("big", np.full(n + i % 7, i, np.int64))
            except Exception as e:  # reported below
                errors.append(f"writer: {type(e).__name__}: {e}")
            i += 1

    def reader() -> None:
        while not stop.is_set():
            try:
                hit = store.lookup("big")
            except Exception as e:  # the defect: CorruptEntryError
                errors.append(f"reader: {type(e).__name__}: {e}")
                continue
            if hit is None:
                reads[1] += 1
            else:
                v = hit.value
                if not (v == v[0]).all():
                    errors.append("reader: a mixed value")
                reads[0] += 1

    threads = [threading.Thread(target=writer), threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    # Enough reads of both kinds to have raced many overwrites and removals.
    while (reads[0] < 300 or reads[1] < 30) and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    store.close()
    assert errors == [], errors[:5]
    assert reads[0] >= 300 and reads[1] >= 30, reads


def test_side_file_removed_by_hand_is_still_damage(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    try:
        store.put("big", np.zeros(INLINE_MAX // 8 + 10))
        for name in os.listdir(store.blob_dir):
            os.unlink(os.path.join(store.blob_dir, name))
        from ai2_kit.core.checkpoint import CorruptEntryError

        with pytest.raises(CorruptEntryError, match="missing|No such file"):
            store.lookup("big")
    finally:
        store.close()


def test_listing_while_removing_sees_each_entry_once(
    store_factory: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing in pages: a caller may remove entries as it iterates, across page ends."""
    from ai2_kit.core.checkpoint.stores._sqlite import _store

    monkeypatch.setattr(_store, "PAGE_SIZE", 7)
    if store_factory.kind == "postgres":  # type: ignore[attr-defined]
        from ai2_kit.core.checkpoint.stores import _postgres

        monkeypatch.setattr(_postgres, "PAGE_SIZE", 7)
    store = store_factory()
    keys = [f"k/{i:05d}" for i in range(50)]
    for k in keys:
        store.put(k, 0)
    seen = []
    for meta in store.iter_meta("k/"):
        seen.append(meta["key"])
        store.delete(meta["key"])
    assert seen == keys and store.keys() == []


def test_a_store_dropped_without_close_closes_its_connections(store_factory: Callable[..., Store]) -> None:
    """No connection outlives its store: dropped unclosed, it closes them, those of ended threads too."""
    import gc

    if store_factory.kind == "directory":  # type: ignore[attr-defined]
        pytest.skip("the directory store keeps no connections")
    from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

    kind = PostgresStore if store_factory.kind == "postgres" else SQLiteStore  # type: ignore[attr-defined]
    location, options = store_factory.location, store_factory.options  # type: ignore[attr-defined]
    store_factory().put("a", 1)  # created (and closed by the fixture)
    store = kind(location, **options)
    worker = threading.Thread(target=store.lookup, args=("a",))  # run() drops its target when done
    worker.start()
    worker.join()
    assert store.lookup("a") is not None
    conns = store._conns.connections()
    assert len(conns) == 2
    unraisable: list[Any] = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        del store
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []  # psycopg warns about a connection collected while open
    for conn in conns:
        if kind is SQLiteStore:
            with pytest.raises(Exception, match="closed"):
                conn.execute("SELECT 1")
        else:
            assert conn.closed
