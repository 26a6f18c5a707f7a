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
