"""Group commit: saves arriving together share one transaction; each returns once its own entry is durable."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from ai2_kit.core.checkpoint import SaveError
from ai2_kit.core.checkpoint.stores import SQLiteStore, Store
from ai2_kit.core.checkpoint.stores._sqlite import INLINE_MAX

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_store_procs.py")
BIG = INLINE_MAX // 8 + 100  # int64 elements: a side file


def wait_for(cond: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Blocker:
    """Holds the store's write lock from outside, so that saves pile up behind the first one."""

    def __init__(self, store: Store, factory: Any) -> None:
        self.store = store
        if isinstance(store, SQLiteStore):
            self.conn: Any = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            from ai2_kit.core.checkpoint.stores._pg_connect import split_url

            self.conn = psycopg.connect(split_url(factory.location)[0], autocommit=True)
            self.conn.execute("BEGIN")
            self.conn.execute(f'LOCK TABLE "{store.schema}".entries IN EXCLUSIVE MODE')  # type: ignore[attr-defined]

    def release(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


def run_threads(fns: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # the test looks at it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    return threads, results


@pytest.fixture
def sql_store(store_factory: Callable[..., Store]) -> Iterator[Store]:
    if store_factory.kind == "directory":  # type: ignore[attr-defined]
        pytest.skip("the directory store writes one file per entry: nothing to group")
    yield store_factory()


def piled_up_saves(store: Store, factory: Any, keys: list[str], values: list[Any]) -> list[Any]:
    """The first save waits for the lock; the others arrive meanwhile and queue behind it."""
    commits = store._commits  # type: ignore[attr-defined]
    before = commits.batches
    blocker = Blocker(store, factory)
    try:
        first, firsts = run_threads([lambda: store.put(keys[0], values[0])])
        wait_for(lambda: commits._busy, "the first save to lead")
        rest, results = run_threads([lambda k=k, v=v: store.put(k, v) for k, v in zip(keys[1:], values[1:])])
        wait_for(lambda: len(commits._queue) == len(keys) - 1, "the other saves to queue up")
    finally:
        blocker.release()  # also when the wait failed: never leave the lock held
    for t in first + rest:
        t.join(60)
    assert commits.batches - before == 2  # the first alone, then all the others in one transaction
    return firsts + results


def test_saves_arriving_together_share_one_commit(sql_store: Store, store_factory: Any) -> None:
    keys = [f"g/{i}" for i in range(8)]
    values: list[Any] = [{"i": i} for i in range(8)]
    if isinstance(sql_store, SQLiteStore):  # (PostgreSQL streams large values in a transaction of their own)
        values[3] = np.full(BIG, 3, np.int64)  # a side file, written by its caller before the commit
    results = piled_up_saves(sql_store, store_factory, keys, values)
    assert all(isinstance(r, dict) for r in results), results
    assert sql_store.keys("g/") == keys
    for k, v in zip(keys, values):
        got = sql_store.lookup(k)
        assert got is not None
        np.testing.assert_array_equal(got.value, v) if isinstance(v, np.ndarray) else None
        assert isinstance(v, np.ndarray) or got.value == v
    if isinstance(sql_store, SQLiteStore):
        assert sql_store.orphan_blobs() == []


def test_one_key_saved_several_times_in_one_batch(tmp_path: Any) -> None:
    """Overwrites of one key inside one transaction: one complete value, no side file lost or left."""
    store = SQLiteStore(str(tmp_path / "s.db"))
    factory = type("F", (), {"location": store.path})
    try:
        values: list[Any] = [np.full(BIG + i, i, np.int64) if i % 2 else {"i": i} for i in range(6)]
        results = piled_up_saves(store, factory, ["same"] * 6, values)
        assert all(isinstance(r, dict) for r in results), results
        hit = store.lookup("same")
        assert hit is not None
        v = hit.value
        assert any(isinstance(v, type(w)) and (np.array_equal(v, w) if isinstance(w, np.ndarray) else v == w)
                   for w in values[1:])
        assert store.orphan_blobs() == []
        assert len(os.listdir(store.blob_dir)) == (1 if isinstance(v, np.ndarray) else 0)
    finally:
        store.close()


def _refuse_bad_keys(store: Store, factory: Any) -> None:
    """A real per-entry failure inside a batch: the database refuses one row."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "CREATE TRIGGER refuse_bad BEFORE INSERT ON entries WHEN NEW.key LIKE 'bad%' "
                "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
            )
        return
    import psycopg

    from ai2_kit.core.checkpoint.stores._pg_connect import split_url

    s = store.schema  # type: ignore[attr-defined]
    with psycopg.connect(split_url(factory.location)[0], autocommit=True) as conn:
        conn.execute(
            f'CREATE FUNCTION "{s}".refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
            "IF NEW.key LIKE 'bad%' THEN RAISE EXCEPTION 'refused by a test trigger'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(f'CREATE TRIGGER refuse_bad BEFORE INSERT ON "{s}".entries '
                     f'FOR EACH ROW EXECUTE FUNCTION "{s}".refuse_bad()')


def test_one_bad_entry_fails_alone(sql_store: Store, store_factory: Any) -> None:
    _refuse_bad_keys(sql_store, store_factory)
    keys = ["ok/0", "ok/1", "ok/2", "bad/3", "ok/4", "bad/5", "ok/6", "ok/7"]
    values: list[Any] = [{"i": i} for i in range(8)]
    if isinstance(sql_store, SQLiteStore):
        values[5] = np.full(BIG, 5, np.int64)  # a refused entry with a side file leaves no file
    results = piled_up_saves(sql_store, store_factory, keys, values)
    for k, r in zip(keys, results):
        if k.startswith("bad"):
            assert isinstance(r, SaveError) and "refused by a test trigger" in str(r), r
        else:
            assert isinstance(r, dict), r
    assert sql_store.keys() == [k for k in keys if k.startswith("ok")]
    if isinstance(sql_store, SQLiteStore):
        assert sql_store.orphan_blobs() == []


def test_many_threads_saving_and_overwriting(sql_store: Store) -> None:
    """Group commit under real contention: every save lands, overwrites keep one complete value."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                sql_store.put(f"t{t}/k{i:02d}", (t, i))
                sql_store.put("shared", np.full(BIG if i % 10 == 9 else 10, t, np.int64))
        except BaseException as e:  # reported below
            errors.append(e)

    threads, _ = run_threads([lambda t=t: work(t) for t in range(8)])
    for th in threads:
        th.join(120)
    assert not errors, errors[:3]
    assert len([k for k in sql_store.keys() if k.startswith("t")]) == 320
    assert sql_store.lookup("t5/k39").value == (5, 39)  # type: ignore[union-attr]
    v = sql_store.lookup("shared").value  # type: ignore[union-attr]
    assert (v == v[0]).all()
    if isinstance(sql_store, SQLiteStore):
        assert sql_store.integrity_check() == [] and sql_store.orphan_blobs() == []


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: Any) -> None:
    raise _Interrupted


@pytest.mark.timeout(60)
def test_interrupted_waiter_does_not_strand_the_queue() -> None:
    """A caller interrupted while queued (a signal in the main thread) withdraws; the others go on."""
    from ai2_kit.core.checkpoint.stores._conns import GroupCommit

    gate = threading.Event()
    written: list[list[int]] = []

    def write(items: list[int]) -> list[int]:
        gate.wait(30)
        written.append(items)
        return items

    commit: GroupCommit[int, int] = GroupCommit(write)
    lead, lead_res = run_threads([lambda: commit.submit(0)])
    wait_for(lambda: commit._busy, "a leader")
    others: list[threading.Thread] = []
    other_res: list[list[Any]] = []

    def conductor() -> None:
        wait_for(lambda: len(commit._queue) == 1, "the main thread to queue")
        ts, rs = run_threads([lambda: commit.submit(2)])
        others.extend(ts)
        other_res.append(rs)
        wait_for(lambda: len(commit._queue) == 2, "a second waiter")
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: len(commit._queue) == 1, "the interrupted caller to withdraw")
        gate.set()

    old = signal.signal(signal.SIGUSR1, _interrupt)
    try:
        c = threading.Thread(target=conductor)
        c.start()
        with pytest.raises(_Interrupted):
            commit.submit(1)
        c.join(30)
    finally:
        signal.signal(signal.SIGUSR1, old)
    for t in lead + others:
        t.join(30)
    assert lead_res == [0] and other_res == [[2]]
    assert written == [[0], [2]]  # the withdrawn item was never written
    assert not commit._busy and commit._queue == []


@pytest.mark.timeout(600)
def test_sigkill_while_threads_save_loses_nothing_acknowledged(tmp_path: Any) -> None:
    """Durable on return with group commit at work: 8 threads save, SIGKILL at random moments."""
    path = str(tmp_path / "k.db")
    rng = random.Random(7)
    acknowledged = 0
    for trial in range(int(os.environ.get("AI2_KIT_KILL_TRIALS", "30")) // 3 or 1):
        tag = f"trial{trial}"
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "thread-writer", "sqlite", path, "{}", tag, "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        acks: list[str] = []

        def read(p: subprocess.Popen[str] = proc, out: list[str] = acks) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                if line.startswith("ack "):
                    out.append(line.split()[1])

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(rng.uniform(0.4, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()
        with SQLiteStore(path) as store:
            for key in acks:
                hit = store.lookup(key)
                assert hit is not None, f"{key} was acknowledged but is missing"
                assert hit.value["key"] == key
            assert store.integrity_check() == []
        acknowledged += len(acks)
    assert acknowledged > 0
    print(json.dumps({"acknowledged": acknowledged}))


def test_benchmark_runs(tmp_path: Any) -> None:
    """benchmarks/bench_group_commit.py runs end to end (tiny sizes; no figures checked)."""
    pytest.importorskip("diskcache")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "bench_group_commit.py")
    env = {k: v for k, v in os.environ.items() if k != "AI2_KIT_TEST_PG_URL"}
    proc = subprocess.run([sys.executable, bench, "--n", "16", "--threads", "4", "--repeat", "1",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| SQLite, 4 threads (group commit) |" in proc.stdout


@pytest.mark.timeout(60)
def test_lone_caller_writes_directly_and_hands_over_to_who_came_meanwhile() -> None:
    """A lone caller writes without queueing; callers arriving during its write are written after it."""
    from ai2_kit.core.checkpoint.stores._conns import GroupCommit

    gate = threading.Event()
    written: list[list[int]] = []

    def write(items: list[int]) -> list[int]:
        if items == [0]:
            gate.wait(30)
        written.append(items)
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(write)
    assert commit.submit(7) == 70 and written == [[7]]  # alone: written at once
    lone, lone_res = run_threads([lambda: commit.submit(0)])
    wait_for(lambda: commit._busy, "the lone writer")
    later, later_res = run_threads([lambda: commit.submit(1), lambda: commit.submit(2)])
    wait_for(lambda: len(commit._queue) == 2, "two callers queued behind it")
    gate.set()
    for t in lone + later:
        t.join(30)
    assert lone_res == [0] and sorted(later_res) == [10, 20]
    assert written[:2] == [[7], [0]] and sorted(sum(written[2:], [])) == [1, 2]
    assert not commit._busy and commit._queue == []


def test_lone_caller_error_reaches_it_and_leaves_the_queue_idle() -> None:
    from ai2_kit.core.checkpoint.stores._conns import GroupCommit

    def write(items: list[int]) -> list[int]:
        if items == [1]:
            raise ValueError("bad item")
        return items

    commit: GroupCommit[int, int] = GroupCommit(write)
    with pytest.raises(ValueError, match="bad item"):
        commit.submit(1)
    assert not commit._busy and commit.submit(2) == 2 and commit.batches == 2
