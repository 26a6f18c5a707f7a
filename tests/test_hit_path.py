"""The short way of a hit (issue 15): what it reads, what it checks, and files made before it.

A hit on the SQLite store reads the hit columns of one row (fingerprint
digest, a CRC over key, awaitable flag and frame, duration) instead of
parsing the metadata record; anything it cannot settle goes the full way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from _sql_trace import statements
from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint._codec import meta_to_json
from ai2_kit.core.checkpoint.stores import _sqlite
from ai2_kit.core.checkpoint.stores._sqlite import APPLICATION_ID, SQLiteStore, _store

LOGGER = "ai2_kit.core.checkpoint"
RUNS: list[Any] = []


def step(x: Any, y: Any = 1, **options: Any) -> dict[str, Any]:
    RUNS.append(x)
    return want(x, y, **options)


def want(x: Any, y: Any = 1, **options: Any) -> dict[str, Any]:
    return {"x": x, "y": y, "options": options}


@pytest.fixture(autouse=True)
def _reset() -> None:
    RUNS.clear()


def _no_meta_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(text: Any) -> Any:
        raise AssertionError("a hit parsed the metadata record")

    monkeypatch.setattr(_store, "meta_from_json", refuse)


@pytest.mark.parametrize("stale", ["warn", "ignore"])
def test_a_hit_reads_no_metadata_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stale: str) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path, stale=stale) as ck:
        want = ck("k")(step)(3, options={"a": (1, 2.5, "s")})
    with Checkpointer(path, stale=stale) as ck:
        _no_meta_parsing(monkeypatch)
        assert ck("k")(step)(3, options={"a": (1, 2.5, "s")}) == want
    assert RUNS == [3]


def test_a_changed_argument_still_warns_and_rerun_still_reruns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path) as ck:
        saved = ck("k")(step)(1)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert ck("k")(step)(2) == saved
        assert any("argument 'x' changed" in r.getMessage() for r in caplog.records)
        assert ck("k", stale="rerun")(step)(2) == want(2)
    assert RUNS == [1, 2]


def test_kwargs_in_another_order_differ_in_digest_but_are_no_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Checkpointer(tmp_path / "c.db") as ck:
        saved = ck("k")(step)(1, a=1, b=2)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            assert ck("k")(step)(1, b=2, a=1) == saved
    assert RUNS == [1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _row(path: Path, key: str) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM entries WHERE key=?", (key,)).fetchone())
    finally:
        conn.close()


def _set(path: Path, key: str, **cols: Any) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for name, value in cols.items():
            conn.execute(f"UPDATE entries SET {name}=? WHERE key=?", (value, key))
    finally:
        conn.close()


@pytest.mark.parametrize("damage", ["hcrc", "aw", "fpd", "dur-and-hcrc"])
def test_damaged_hit_columns_go_the_full_way_and_return_the_right_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path) as ck:
        want = ck("k")(step)(5)
    row = _row(path, "k")
    assert row["hcrc"] is not None and row["fpd"] and row["aw"] == 0
    if damage == "hcrc":
        _set(path, "k", hcrc=row["hcrc"] ^ 4)
    elif damage == "aw":
        _set(path, "k", aw=1)  # would hand back an awaitable: the CRC covers the flag
    elif damage == "fpd":
        _set(path, "k", fpd="0" * 32)
    else:
        _set(path, "k", dur=-1.0, hcrc=None)
    parsed: list[Any] = []
    real = _store.meta_from_json

    def spy(text: Any) -> Any:
        parsed.append(1)
        return real(text)

    monkeypatch.setattr(_store, "meta_from_json", spy)
    with Checkpointer(path) as ck:
        got = ck("k")(step)(5)
    assert got == want and not asyncio.iscoroutine(got)
    assert RUNS == [5] and parsed  # the full way read the record


def test_a_damaged_value_is_still_a_damaged_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path) as ck:
        ck("k")(step)(5)
    frame = bytearray(_row(path, "k")["value"])
    frame[-3] ^= 0xFF
    _set(path, "k", value=bytes(frame))
    with Checkpointer(path) as ck, caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ck("k")(step)(5) == want(5)
    assert RUNS == [5, 5]
    assert any("Running the step again" in r.getMessage() for r in caplog.records)


def test_an_awaitable_entry_comes_back_as_an_awaitable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def value() -> int:
        return 7

    def plain_returning_awaitable() -> Any:
        return value()

    path = tmp_path / "c.db"
    with Checkpointer(path) as ck:
        assert asyncio.run(ck("k")(plain_returning_awaitable)()) == 7
    with Checkpointer(path) as ck:
        _no_meta_parsing(monkeypatch)
        got = ck("k")(plain_returning_awaitable)()
        assert asyncio.iscoroutine(got) or hasattr(got, "__await__")
        assert asyncio.run(got) == 7


_OLD_SCHEMA = """
CREATE TABLE entries (key TEXT PRIMARY KEY NOT NULL, created REAL NOT NULL, meta TEXT NOT NULL,
                      value BLOB, blob TEXT);
CREATE INDEX entries_blob ON entries (blob) WHERE blob IS NOT NULL;
CREATE TABLE store_info (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
CREATE TABLE claims (key TEXT PRIMARY KEY NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL);
"""


def _old_store(path: Path) -> None:
    """A store as the library wrote it before the hit columns, holding entry 'old' = step(4)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.executescript(_OLD_SCHEMA)
    conn.close()
    # The entry itself as this library encodes it, written through the old column list.
    with SQLiteStore(str(tmp_copy := path.with_suffix(".tmp.db"))) as s:
        s.put("old", want(4), fn_name="step")
        row = _row(tmp_copy, "old")
    meta = _store.meta_from_json(row["meta"])
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO entries (key, created, meta, value, blob) VALUES (?,?,?,?,?)",
                 ("old", meta["created"], meta_to_json(meta), row["value"], None))
    conn.close()
    RUNS.clear()


def _columns(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
    finally:
        conn.close()


def test_a_store_from_before_the_hit_columns_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_store(path)
    with Checkpointer(path, readonly=True) as ck:  # read-only: hits the full way, schema untouched
        assert ck("old")(step)(4) == want(4)
    assert "fpd" not in _columns(path)
    with Checkpointer(path) as ck:
        assert ck("old")(step)(4) == want(4)  # its row has no hit columns: the full way
        assert "fpd" not in _columns(path)  # nothing written by a hit
        ck("new")(step)(6)  # the first save adds the columns
        assert {"fpd", "hcrc", "dur", "aw"} <= _columns(path)
        assert ck("new")(step)(6) == want(6)
        assert ck("old")(step)(4) == want(4)
    assert RUNS == [6]
    assert _row(path, "old")["hcrc"] is None  # the old row was left as it was
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_rows_written_by_an_older_library_after_the_columns_exist_go_the_full_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path) as ck:
        ck("k")(step)(1)
    row = _row(path, "k")
    # What an older library does on a save: INSERT OR REPLACE naming its five columns.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT OR REPLACE INTO entries (key, created, meta, value, blob) VALUES (?,?,?,?,?)",
                 ("k", row["created"], row["meta"], row["value"], None))
    conn.close()
    assert _row(path, "k")["hcrc"] is None
    with Checkpointer(path) as ck:
        assert ck("k")(step)(1) == want(1)
    assert RUNS == [1]


def test_signed_stores_take_the_full_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path, signing_key=b"secret") as ck:
        ck("k")(step)(1)
    assert _row(path, "k")["hcrc"] is None
    with Checkpointer(path, signing_key=b"secret") as ck:
        assert ck("k")(step)(1) == want(1)
    assert RUNS == [1]


def test_an_entry_saved_without_fingerprints_is_any_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Saved with stale="ignore": no record to compare, so (as Checkpointer.accept
    # says) any call may have it; the short way knows it from the row.
    path = tmp_path / "c.db"
    with Checkpointer(path, stale="ignore") as ck:
        ck("k")(step)(1)
    assert _row(path, "k")["fpd"] == "-"
    with Checkpointer(path) as ck:
        _no_meta_parsing(monkeypatch)
        assert ck("k")(step)(2) == want(1)
    assert RUNS == [1]


# -- the short digest, the async small hit, the key check (issue 15, hit path) ------------


def _entry_selects(conn: sqlite3.Connection, run: Any) -> list[str]:
    """The statements on the entries table that ``run()`` made on ``conn``."""
    return [s for s in statements(conn, run) if "FROM entries" in s]


@pytest.mark.parametrize("stale", ["warn", "ignore"])
def test_an_async_small_hit_is_one_select(tmp_path: Path, stale: str) -> None:
    # It used to read the metadata record first (for the size), then take the short way: two.
    async def astep(x: int) -> dict[str, Any]:
        RUNS.append(x)
        return want(x)

    with Checkpointer(tmp_path / "c.db", stale=stale) as ck:
        wrapped = ck("k")(astep)
        assert asyncio.run(wrapped(1)) == want(1)
        conn = ck.store._conns.get()  # a small hit is read on the loop: this thread's connection

        def hit() -> None:
            assert asyncio.run(wrapped(1)) == want(1)

        selects = _entry_selects(conn, hit)
        assert len(selects) == 1, selects
        assert RUNS == [1]
        # A miss is settled by that one query too (the step then runs in its thread and saves).
        other = ck("other")(astep)
        assert len(_entry_selects(conn, lambda: asyncio.run(other(2)))) == 1
    assert RUNS == [1, 2]


def test_an_async_large_hit_is_read_in_a_thread_without_its_value_on_the_loop(tmp_path: Path) -> None:
    from ai2_kit.core.checkpoint._checkpointer._async import INLINE_MAX_BYTES

    big = b"x" * (INLINE_MAX_BYTES * 2)

    async def astep(x: int) -> bytes:
        RUNS.append(x)
        return big

    with Checkpointer(tmp_path / "c.db") as ck:
        wrapped = ck("k")(astep)
        assert asyncio.run(wrapped(1)) == big
        conn = ck.store._conns.get()
        seen: list[str] = []

        def hit() -> None:
            assert asyncio.run(wrapped(1)) == big

        seen = _entry_selects(conn, hit)
        # On the loop: one query, which did not read the value (the thread reads it on its own connection).
        assert len(seen) == 1 and "length(value)" in seen[0], seen
    assert RUNS == [1]


def test_an_async_hit_of_a_changed_call_still_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def astep(x: int) -> dict[str, Any]:
        RUNS.append(x)
        return want(x)

    with Checkpointer(tmp_path / "c.db") as ck:
        saved = asyncio.run(ck("k")(astep)(1))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert asyncio.run(ck("k")(astep)(2)) == saved
    assert any("argument 'x' changed" in r.getMessage() for r in caplog.records)
    assert RUNS == [1]


def _plain(a: Any, b: Any = 2.5, *rest: Any, c: Any = None) -> None:
    pass


def _two(a: Any, b: Any) -> None:
    pass


def _nothing() -> None:
    pass


def _closure() -> Any:
    cell = [1]

    def inner(x: Any) -> Any:
        return cell, x

    return inner


@pytest.mark.parametrize("fn, args", [
    (_two, (1, "s")), (_two, (True, None)), (_two, (-7, 1e300)), (_two, (0.0, -0.0)),
    (_plain, (1,)), (_plain, (1, 2)), (_plain, (1, 2, 3, 4)), (_plain, ("x" * 20, 2)),
    (_closure(), (5,)), (step, (3,)),
    # Strings whose repr needs escapes or other quotes, and text beyond ASCII:
    # the short digest writes repr's text itself, so it must escape the same.
    (_two, ("it's", 'say "hi"')), (_two, ("tab\there", "back\\slash")), (_two, ("\u00e9t\u00e9", "\u2028")),
    (_two, ("\ud800", "\x00")), (_nothing, ()), (_two, (10 ** 19, -(10 ** 19))), (_two, (False, 1)),
])
def test_the_short_digest_is_the_records_digest(fn: Any, args: tuple) -> None:
    from ai2_kit.core.checkpoint._fingerprint import fingerprint, hit_digest

    fingerprint(fn, args, {})  # the first call caches the function's parts, as a first save does
    got = hit_digest(fn, args, {})
    assert got is not None
    assert got == fingerprint(fn, args, {}).digest


@pytest.mark.parametrize("fn, args, kwargs", [
    (_two, (1, [1]), {}),  # a list: the canonical walk
    (_two, (1, "x" * 100), {}),  # a long string: a digest, not its repr
    (_two, (1,), {"b": 2}),  # keywords: the full way
    (_two, (1,), {}),  # a call that does not fit the signature
    (_two, (1, 2 ** 80), {}),
])
def test_the_short_digest_leaves_the_rest_to_the_full_way(fn: Any, args: tuple, kwargs: dict) -> None:
    from ai2_kit.core.checkpoint._fingerprint import fingerprint, hit_digest

    fingerprint(fn, args, kwargs)
    assert hit_digest(fn, args, kwargs) is None


def test_the_short_digest_follows_changed_defaults() -> None:
    from ai2_kit.core.checkpoint._fingerprint import fingerprint, hit_digest

    def f(x: Any, y: Any = 1) -> None:
        pass

    fingerprint(f, (1,), {})
    before = hit_digest(f, (1,), {})
    f.__defaults__ = (2,)
    assert hit_digest(f, (1,), {}) is None  # the cached parts are no longer valid: the full way
    after = fingerprint(f, (1,), {}).digest
    assert after != before and hit_digest(f, (1,), {}) == after


def test_a_changed_default_argument_still_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def f(x: Any, y: Any = 1) -> Any:
        RUNS.append(x)
        return x

    with Checkpointer(tmp_path / "c.db") as ck:
        ck("k")(f)(1)
        ck("k")(f)(1)  # a hit the short way
        f.__defaults__ = (2,)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ck("k")(f)(1)
    assert any("argument 'y' changed" in r.getMessage() for r in caplog.records)
    assert RUNS == [1]


@pytest.mark.parametrize("key", [
    "a", "step/000001", "a.b/c-d_e", ".hidden/x", "x/.y", "a/..b", "A9/_/-", "a" * 1024, "a" * 1025,
    ".", "..", "a/./b", "a/../b", "/a", "a/", "a//b", "", "a\nb", "a\x00b", "é/ü", "a b", "a\\b", "\ud800",
    "é" * 600, "a/" * 10 + "b", "-", "_", "a.", "a..",
])
def test_the_quick_key_check_agrees_with_the_rules(key: str) -> None:
    from ai2_kit.core.checkpoint._errors import InvalidKeyError
    from ai2_kit.core.checkpoint._keys import _validate, validate_key

    try:
        _validate(key)
        ok = True
    except InvalidKeyError:
        ok = False
    if ok:
        assert validate_key(key) == key
    else:
        with pytest.raises(InvalidKeyError):
            validate_key(key)


def test_a_wrapper_of_a_wrapper_keeps_its_own_key_store_and_policy(tmp_path: Path) -> None:
    # A wrapper copies the wrapped object's __dict__ (as functools.wraps does); another
    # wrapper's fields must not come along (most of them are class defaults now).
    with Checkpointer(tmp_path / "a.db") as a, Checkpointer(tmp_path / "b.db") as b:
        inner = a("inner", stale="rerun")(step)
        outer = b("outer")(inner)
        assert outer(5) == want(5)
        assert "outer" in b.store and "inner" not in b.store
        assert "inner" in a.store and "outer" not in a.store
        assert repr(outer).endswith("key='outer'>")
        assert outer._ck_stale is None and outer._ck_bound is b and inner._ck_stale == "rerun"
        assert outer(5) == want(5)
    assert RUNS == [5]


@pytest.mark.parametrize("case", ["side file", "digest differs"])
def test_a_hit_the_short_way_cannot_settle_is_read_once(tmp_path: Path, case: str) -> None:
    # The full way was taken twice: every value in a side file, and every
    # entry whose digest differed, was read and unpickled two times (a 512 MB
    # array held twice in memory).
    big = case == "side file"

    def value_of(x: int) -> Any:
        return b"x" * (_sqlite.INLINE_MAX + 1) if big else want(x)

    def stepped(x: int) -> Any:
        RUNS.append(x)
        return value_of(x)

    with Checkpointer(tmp_path / "c.db", stale="ignore" if big else "warn") as ck:
        assert ck("k")(stepped)(1) == value_of(1)
        call = ck("k")(stepped)
        arg = 1 if big else 2  # another argument: a digest that differs, judged on the record
        conn = ck.store._conns.get()
        got: list[Any] = []
        selects = _entry_selects(conn, lambda: got.append(call(arg)))
        assert got == [value_of(1)] and RUNS == [1]
        assert len([s for s in selects if "SELECT" in s]) == 2, selects  # the short way, then the full way


# -- the one call path (CheckpointedFunction.__call__): the short look-up first ---------------


async def _seven() -> int:
    return 7


def _plain_returning_awaitable() -> Any:
    return _seven()


def _script(ck: Checkpointer) -> list[Any]:
    """The same calls on any checkpointer: what each returned, what ran."""
    out: list[Any] = []
    out.append(ck("a")(step)(1))  # a miss
    out.append(ck("a")(step)(1))  # a hit
    out.append(ck("a")(step)(2))  # another argument: warn / rerun / ignore
    out.append(ck("a")(step)(2))
    out.append(ck("b")(step)(3, y=4))  # keywords: the full fingerprint
    out.append(ck("b")(step)(3, y=4))
    out.append(ck("c")(step)(5, [1, 2]))  # a list argument: the full fingerprint
    out.append(ck("c")(step)(5, [1, 2]))
    out.append(ck("c")(step)(5, [1, 3]))
    out.append(asyncio.run(ck("d")(_plain_returning_awaitable)()))  # awaitable's value saved
    out.append(asyncio.run(ck("d")(_plain_returning_awaitable)()))  # the hit: an awaitable again
    out.append(ck("e", stale="rerun")(step)(6))
    out.append(ck("e", stale="rerun")(step)(7))
    out.append(ck("e", stale="ignore")(step)(8))
    out.append(ck("e", disable=True)(step)(9))
    out.append(list(RUNS))
    ck.run.flush()
    rec = ck.run.record
    out.append((rec["hits"], rec["steps_run"], rec["stale"]))
    return out


def _count_full_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys that went the full way (``Checkpointer.lookup``: the short look-up did not settle them)."""
    looked: list[str] = []
    full = Checkpointer.lookup

    def counting(self: Any, key: str) -> Any:
        looked.append(key)
        return full(self, key)

    monkeypatch.setattr(Checkpointer, "lookup", counting)
    return looked


class _EveryStep(Checkpointer):
    """Every step of a call overridden (and recorded): the one path must call each of them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.steps: list[tuple[str, str]] = []
        super().__init__(*args, **kwargs)

    def lookup_call(self, key: str, *rest: Any) -> Any:
        self.steps.append(("lookup_call", key))
        return super().lookup_call(key, *rest)

    def log_hit(self, key: str, meta: dict[str, Any]) -> None:
        self.steps.append(("log_hit", key))
        super().log_hit(key, meta)

    def fingerprint(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        return super().fingerprint(fn, args, kwargs)

    def accept(self, key: str, *rest: Any) -> bool:
        self.steps.append(("accept", key))
        return super().accept(key, *rest)

    def _enter(self) -> bool:
        return super()._enter()

    def _leave(self) -> None:
        super()._leave()


@pytest.mark.parametrize("stale", ["warn", "rerun", "ignore"])
def test_one_path_whose_first_step_is_the_short_look_up(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch, stale: str) -> None:
    # The same calls on a checkpointer and on a subclass that overrides every
    # step: the same results, log lines and run counts, and the subclass's
    # steps are called on hits too (no call takes a way around them).
    looked = _count_full_lookups(monkeypatch)
    results, logs, taken = [], [], []
    for cls in (Checkpointer, _EveryStep):
        RUNS.clear()
        looked.clear()
        caplog.clear()
        where = tmp_path / f"{cls.__name__}.db"
        with caplog.at_level(logging.INFO, logger=LOGGER), cls(where, stale=stale) as ck:
            results.append(_script(ck))
        logs.append([(r.levelname, re.sub(r"took [0-9.]+ s", "took T s", r.getMessage().replace(str(where), "F")))
                     for r in caplog.records])
        taken.append(list(looked))
    assert results[0] == results[1]
    assert logs[0] == logs[1]
    if stale != "rerun":
        assert any("checkpoint 'a'" in r[1] and r[0] == "WARNING" for r in logs[0]) == (stale == "warn")
    # The short look-up settled the plain misses and hits itself: only what it
    # could not settle (a digest that differs) went the full way.
    assert taken[0] == taken[1]
    assert taken[0].count("a") < 4 and taken[0].count("d") <= 1


def test_a_subclass_step_is_called_on_every_hit(tmp_path: Path) -> None:
    with _EveryStep(tmp_path / "a.db") as ck:
        assert ck("k")(step)(1) == want(1) and ck("k")(step)(1) == want(1)
        assert ck.steps == [("lookup_call", "k"), ("lookup_call", "k"), ("log_hit", "k")]
    assert RUNS == [1]


class _ClosingInside(SQLiteStore):
    """The real store; ``during`` runs inside the short way of the next hit, before its query."""

    during: list[Any] = []

    def lookup_fast(self, *args: Any, **kwargs: Any) -> Any:
        while self.during:
            self.during.pop()()
        return super().lookup_fast(*args, **kwargs)


def test_close_during_a_hit_closes_the_store_after_it(tmp_path: Path) -> None:
    from ai2_kit.core.checkpoint import CheckpointError

    store = _ClosingInside(str(tmp_path / "c.db"))
    ck = Checkpointer(store=store)
    assert ck("k")(step)(1) == want(1)
    store.during.append(ck.close)
    assert ck("k")(step)(1) == want(1)  # closed mid-hit: the hit still reads and returns
    assert store.closed and ck._inflight == 0
    with pytest.raises(CheckpointError, match="is closed"):
        ck("k")(step)(1)
    assert RUNS == [1]


def test_hits_from_threads_while_the_checkpointer_closes(tmp_path: Path) -> None:
    import threading
    import time

    from ai2_kit.core.checkpoint import CheckpointError

    with Checkpointer(tmp_path / "c.db") as ck:
        for i in range(20):
            ck(f"k{i}")(step)(i)
    RUNS.clear()
    ck = Checkpointer(tmp_path / "c.db")
    done = [0] * 4
    bad: list[Any] = []

    def hitting(t: int) -> None:
        i = 0
        while True:
            try:
                got = ck(f"k{i % 20}")(step)(i % 20)
            except CheckpointError as e:
                if "is closed" not in str(e):
                    bad.append(e)
                return
            except BaseException as e:  # anything else is a defect
                bad.append(e)
                return
            if got != want(i % 20):
                bad.append(got)
            done[t] += 1
            i += 1

    threads = [threading.Thread(target=hitting, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while min(done) < 50 and time.monotonic() < deadline:
        time.sleep(0.001)
    ck.close()
    for th in threads:
        th.join(60)
    assert min(done) >= 50 and not bad and RUNS == []
    assert ck.store.closed and ck._inflight == 0


class _CallableObject:
    def __call__(self, x: Any) -> Any:
        return x


def _with_attribute(x: Any) -> Any:
    return x


_with_attribute.note = "kept"  # type: ignore[attr-defined]


async def _coro_fn(x: Any) -> Any:
    return x


@pytest.mark.parametrize("fn", [step, lambda x: x, _closure(), functools.partial(step, y=3), _CallableObject(),
                                _with_attribute, _coro_fn, len, str])
def test_the_plain_decorator_makes_the_same_wrapper_as_init(tmp_path: Path, fn: Any) -> None:
    # ckpt(key) with no other option builds the wrapper without __init__ once the
    # function has been seen: it must set exactly what __init__ sets.
    from ai2_kit.core.checkpoint._checkpointer import CheckpointedFunction
    from ai2_kit.core.checkpoint._errors import InvalidKeyError

    with Checkpointer(tmp_path / "c.db") as ck:
        first = ck("k")(fn)  # through __init__: the function's state is worked out
        again = ck("k")(fn)
        ref = CheckpointedFunction(fn, "k", ckpt=ck)
        assert type(again) is CheckpointedFunction
        assert vars(first) == vars(again) == vars(ref)
        with pytest.raises(InvalidKeyError):
            ck("../bad")(fn)
    with pytest.raises(TypeError, match="must wrap a callable"):
        Checkpointer(tmp_path / "d.db")("k")(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("aw", [0, 1])
def test_the_hit_crc_is_the_standard_crc_whichever_library_computes_it(aw: int) -> None:
    # zlib-ng's CRC-32 when installed: the values saved by (and for) the standard library's must match.
    import zlib

    frame = bytes(range(256)) * 5
    kcrc = _sqlite.key_crc("a/b")
    want_crc = zlib.crc32(frame, zlib.crc32(b"\x01", kcrc) if aw else kcrc)
    assert _sqlite.hit_crc(kcrc, aw, frame) == want_crc == zlib.crc32(b"a/b" + b"\x01" * aw + frame)


def test_the_seed_interface_settles_hits_the_short_way_and_follows_the_default_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # apply_checkpoint(key)(fn)(*args), as workflows call it: the wrapper resolves the
    # default store at every call, so a switch of store between calls is followed.
    from ai2_kit.core.checkpoint import apply_checkpoint, get_checkpointer, set_checkpoint_file
    from ai2_kit.core.checkpoint._checkpointer import make_wrapper

    looked = _count_full_lookups(monkeypatch)
    assert apply_checkpoint("k")(step)(1) == want(1)  # no store: it just runs
    a = set_checkpoint_file(tmp_path / "a.db")
    kept = apply_checkpoint("k")(step)
    assert vars(kept) == vars(make_wrapper(step, "k", False, get_checkpointer))
    assert kept(1) == want(1) and apply_checkpoint("k")(step)(1) == want(1)  # a miss, then a hit
    looked.clear()
    for _ in range(3):
        assert apply_checkpoint("k")(step)(1) == want(1)
    assert looked == [] and RUNS == [1, 1]  # hits: the short look-up only
    b = set_checkpoint_file(tmp_path / "b.db")
    assert kept(1) == want(1) and "k" in b.store and RUNS == [1, 1, 1]  # the new default: a miss there
    assert a.closing and not b.closing
    assert apply_checkpoint("k", disable=True)(step)(1) == want(1) and RUNS == [1, 1, 1, 1]
