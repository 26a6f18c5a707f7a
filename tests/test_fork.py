"""fork() while other threads use the store: children save promptly, nothing crosses the fork."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any, Callable

import pytest

from ai2_kit.core.checkpoint.stores import SQLiteStore, Store

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_store_procs.py")
# A child that has not saved within this many seconds is stuck (the old
# failure waited SQLite's 120 s busy timeout, or for ever).
CHILD_DEADLINE_S = 20


def run_script(role: str, factory: Any, *args: object, timeout: float = 240) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, SCRIPT, role, factory.kind, factory.location, json.dumps(factory.options),
         *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


@pytest.mark.timeout(300)
def test_fifty_forks_while_a_thread_saves(store_factory: Callable[..., Store]) -> None:
    got = run_script("fork-while-saving", store_factory, 50, CHILD_DEADLINE_S)
    assert got["codes"] == [0] * 50, got["stderr"]
    assert not got["errors"] and got["saved"] > 0
    store = store_factory()
    assert store.keys("child/") == [f"child/{n:03d}" for n in range(50)]
    assert len(store.keys("parent/")) == got["saved"]
    for key in store.keys("parent/")[::25]:
        assert store.lookup(key) is not None
    if isinstance(store, SQLiteStore):
        assert store.integrity_check() == []
        assert store.orphan_blobs() == []


@pytest.mark.timeout(120)
def test_fork_while_a_thread_is_in_its_first_save(store_factory: Callable[..., Store]) -> None:
    got = run_script("fork-during-import", store_factory, CHILD_DEADLINE_S)
    # Nothing is imported on the save path any more: the saver never enters
    # the (slowed-down) import, and the child saves.
    assert got["codes"] == [0], got["stderr"]
    assert got["in_import"] is False
    assert store_factory().lookup("child/0") is not None


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_fork_closes_the_parents_sqlite_connections_and_waits_for_writes(tmp_path: Any) -> None:
    """No SQLite connection exists at the instant of a fork; the parent reopens afterwards."""
    store = SQLiteStore(str(tmp_path / "s.db"))
    try:
        store.put("a", 1)
        before = store._conn()
        holding = threading.Event()
        go_on = threading.Event()
        saved = threading.Event()

        def writer() -> None:
            with store._session():  # an operation in flight
                holding.set()
                go_on.wait(30)
            store.put("b", 2)
            saved.set()

        t = threading.Thread(target=writer)
        t.start()
        assert holding.wait(30)
        # The fork must wait for the operation in flight: let it finish from
        # a third thread shortly, then fork from here.
        threading.Timer(0.05, go_on.set).start()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            ok = go_on.is_set() and store._conns.connections() == []
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            seen = f.read()
        os.waitpid(pid, 0)
        assert seen == b"1"  # the operation had ended, and no connection crossed
        assert saved.wait(30)
        t.join()
        assert before not in store._conns.connections()  # closed before the fork
        assert store.lookup("b") is not None and store.lookup("a") is not None
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_a_forked_childs_hits_count_in_its_own_run(tmp_path: Any) -> None:
    """A hit counts on this process's run without a pid check: the fork hook gives the child its own."""
    from ai2_kit.core.checkpoint import Checkpointer

    def step(x: int) -> int:
        return x * 2

    ck = Checkpointer(tmp_path / "c.db")
    try:
        assert ck("k")(step)(1) == 2
        assert ck("k")(step)(1) == 2  # a hit in the parent: its recorder exists before the fork
        parent_run = ck.run.id
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(r)
                for _ in range(3):
                    ck("k")(step)(1)
                child_run = ck.run.id
                ck.close()  # flushes the child's run
                os.write(w, child_run.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            child_run = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert status == 0 and child_run and child_run != parent_run
        ck.run.flush()
        runs = {rec["id"]: rec for rec in ck.store.iter_runs()}
        assert runs[child_run]["hits"] == 3 and runs[child_run]["pid"] == pid
        assert runs[parent_run]["hits"] == 1 and runs[parent_run]["steps_run"] == 1
    finally:
        ck.close()


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_forks_while_threads_hit(tmp_path: Any, journal: str) -> None:
    """Hits in threads while the main thread forks: each child hits and saves promptly.

    In WAL mode a hit's one SELECT holds the fork gate's lock instead of
    counting itself in and out (``ThreadConnections.fetchone(held=)``); the
    fork must still land between SQLite calls, never inside one.
    """
    import signal
    import time

    from ai2_kit.core.checkpoint import Checkpointer

    def step(x: int) -> int:
        return x * 2

    ck = Checkpointer(store=SQLiteStore(str(tmp_path / "c.db"), journal=journal))
    try:
        assert ck.store._wal == (journal == "wal")  # type: ignore[attr-defined]
        for i in range(50):
            ck(f"k{i}")(step)(i)
        stop = threading.Event()
        hits = [0, 0]
        errors: list[str] = []

        def hitting(t: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    if ck(f"k{i % 50}")(step)(i % 50) != i % 50 * 2:
                        errors.append(f"wrong value for k{i % 50}")
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                hits[t] += 1
                i += 1

        threads = [threading.Thread(target=hitting, args=(t,)) for t in range(2)]
        for th in threads:
            th.start()
        pids = []
        for n in range(20):
            target = sum(hits) + 1 + n % 3  # fork at different points of the hitters' work
            limit = time.monotonic() + 30
            while sum(hits) < target and time.monotonic() < limit and not errors:
                time.sleep(0.0005 * (n % 4))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    signal.alarm(CHILD_DEADLINE_S)  # stuck on an inherited lock: killed, a non-zero code
                    ok = ck(f"k{n}")(step)(n) == n * 2 and ck(f"child/{n}")(step)(n) == n * 2
                    ok = ok and ck.store.lookup(f"child/{n}") is not None
                    code = 0 if ok else 1
                finally:
                    os._exit(code)
            pids.append(pid)
        codes = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            codes.append(status)
        stop.set()
        for th in threads:
            th.join(60)
        assert codes == [0] * 20 and not errors and min(hits) > 0
        assert ck.store.keys("child/") == sorted(f"child/{n}" for n in range(20))
        assert ck.store.integrity_check() == []  # type: ignore[attr-defined]
    finally:
        ck.close()


_HOOK_ORDER = r'''
import os, sys
from ai2_kit.core.checkpoint import _forking

log = []


def note(name):
    return lambda: log.append(name)


def boom():
    raise RuntimeError("a failing hook")


_forking.at_fork(before=note("b1"), after_in_parent=note("p1"), after_in_child=note("c1"))
_forking.at_fork(before=note("b2"), after_in_parent=boom, after_in_child=boom)
_forking.at_fork(before=note("b3"), after_in_parent=note("p3"), after_in_child=note("c3"))
pid = os.fork()
if pid == 0:
    print("child", " ".join(log), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", " ".join(log), flush=True)
'''


def test_fork_hooks_run_in_the_registry_order_and_one_failing_stops_none() -> None:
    # _forking follows the operating system's rule: "before" hooks in the
    # reverse order of registration, "after" hooks in that order; a hook that
    # raises is reported and the next one still runs.
    proc = subprocess.run([sys.executable, "-c", _HOOK_ORDER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["child b3 b2 b1 c1 c3", "parent b3 b2 b1 p1 p3"]
    assert proc.stderr.count("RuntimeError: a failing hook") == 2


def test_the_package_registers_its_fork_hooks_only_with_the_registry() -> None:
    # One os.register_at_fork call in the package: every module's hooks go
    # through _forking, in import order (codec, connections, runs, checkpointer, facade).
    import pathlib

    import ai2_kit.core.checkpoint as pkg
    from ai2_kit.core.checkpoint import _forking

    root = pathlib.Path(pkg.__file__).parent
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "os.register_at_fork(" in p.read_text())
    assert callers == ["_forking.py"]
    child = [getattr(h, "__module__", "") or "" for h in _forking._after_in_child]
    mine = [m.rsplit(".", 1)[-1] if m != "ai2_kit.core.checkpoint" else "facade" for m in child if m]
    assert mine == ["_conns", "_runs", "_async", "_dedup", "_policy", "facade"]
    assert len(child) == len(mine) + 1  # and the codec's lock, released first
