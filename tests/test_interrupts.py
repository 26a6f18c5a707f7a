"""KeyboardInterrupt at any point of a save, a claim or a run flush leaves no connection relaxed.

Issue 21, case 2: an interrupt between ``PRAGMA synchronous=OFF`` (or
``BEGIN IMMEDIATE``) and the block that undid it left the thread's SQLite
connection unsynced (later saves acknowledged without an fsync) or inside an
open transaction (every later save of that thread failed, and another
process's saves waited out the busy timeout).

Two harnesses:

- *every point*: the operation runs under a trace function that raises
  KeyboardInterrupt at its N-th bytecode inside the store's code, for every
  N in turn (sampled when there are many). This is where a real Ctrl-C
  lands: between two bytecodes, in particular right after a C call such as
  ``execute("BEGIN IMMEDIATE")`` returns;
- *signal storm*: a subprocess saves, claims and flushes run records in its
  main thread while another thread of it sends it SIGINT at random moments
  (one at a time: the next once the last was caught), with a second thread
  saving meanwhile (group commit, a contended write lock).

After each, every connection of the store must be back at its durable
settings (``PRAGMA synchronous`` = EXTRA, no transaction open), no write
lock held (another connection can take it at once), the fork gate idle, and
the store must go on saving.

A rule test besides: no SQL in the package sets ``synchronous`` below what
the store promises.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import ai2_kit.core.checkpoint as package
from ai2_kit.core.checkpoint.stores import SQLiteStore
from ai2_kit.core.checkpoint.stores._sqlite import BUSY_TIMEOUT_S, _connect

PKG = os.path.dirname(os.path.abspath(package.__file__))
STORES = os.path.join(PKG, "stores")
EXTRA = 3  # PRAGMA synchronous answers a number: OFF 0, NORMAL 1, FULL 2, EXTRA 3
BIG = np.arange(300_000, dtype=np.int64)  # 2.4 MB: a side file, and its replacement a BEGIN IMMEDIATE


#: The files whose every bytecode gets an interrupt: the SQLite store and the
#: store's common layer. (GroupCommit, in stores/_conns.py, has its own
#: interrupt tests: an interrupt inside its hand-over is another matter.)
TRACED = tuple(sorted(str(p) for p in Path(STORES, "_sqlite").glob("*.py"))) + tuple(
    os.path.join(STORES, f) for f in ("_base.py", "_shared.py"))


def run_interrupted(op: Callable[[], Any], n: int, where: tuple[str, ...] = TRACED) -> tuple[bool, int]:
    """Run ``op``, raising KeyboardInterrupt at its ``n``-th bytecode in the files ``where``.

    Returns (whether it was raised, bytecodes counted). ``n=0`` only counts.
    """
    count = 0
    fired = False

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count, fired
        if event == "opcode":
            count += 1
            if count == n:
                fired = True
                raise KeyboardInterrupt(f"injected at bytecode {n}")
        return local

    def outer(frame: Any, event: str, arg: Any) -> Any:
        if fired or frame.f_code.co_filename not in where:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return local

    sys.settrace(outer)
    try:
        op()
    except KeyboardInterrupt:
        if not fired:
            raise
    finally:
        sys.settrace(None)
    return fired, count


def problems(store: SQLiteStore) -> list[str]:
    """What is left relaxed, open or held in ``store`` (empty: all is back as it should be)."""
    found = []
    for conn in store._conns.connections():
        if conn.in_transaction:
            found.append("a connection is inside a transaction")
        level = conn.execute("PRAGMA synchronous").fetchone()[0]
        if level != EXTRA:
            found.append(f"a connection is at synchronous={level}")
        # A run record waits for the write lock a short while only; that
        # shorter wait must not outlive its statement.
        wait = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        if wait != int(BUSY_TIMEOUT_S * 1000):
            found.append(f"a connection waits {wait} ms for the write lock")
    gate = store._conns.gate
    if gate._active or gate.inside():
        found.append(f"the fork gate counts {gate._active} operation(s) in flight")
    other = sqlite3.connect(store.path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        found.append(f"the write lock is held ({e})")
    finally:
        other.close()
    return found


def operations(store: SQLiteStore) -> dict[str, Callable[[], Any]]:
    run = {"id": "run-1", "started": 1.0, "hits": 1}
    seq = iter(range(1_000_000))
    return {
        "lone save": lambda: store.put(f"small/{next(seq)}", {"x": 1}),
        # Replacing a row that names a side file: BEGIN IMMEDIATE ... COMMIT.
        "save replacing a side file": lambda: store.put("big", BIG),
        "claim": lambda: store.try_claim("claimed", "me", 60.0),
        "lease renewal": lambda: store.renew_claim("claimed", "me", 60.0),
        "release": lambda: store.release_claim("claimed", "me"),
        "run flush": lambda: store.put_run(run),
        "removal": lambda: store.delete_many([f"small/{next(seq)}", "nothing"]),
    }


# An interrupt may strike between open() and the ``with`` that would close the
# file: the file object is then closed when it is collected, which pytest reports.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", ["lone save", "save replacing a side file", "claim", "lease renewal",
                                  "release", "run flush", "removal"])
def test_an_interrupt_at_every_point_leaves_the_connection_durable(tmp_path: Path, name: str) -> None:
    store = SQLiteStore(str(tmp_path / "ck.db"))
    try:
        store.put("big", BIG)
        op = operations(store)[name]
        _, total = run_interrupted(op, 0)
        assert total > 10
        # Every point of short operations; about 300 evenly spread points of long ones.
        step = max(1, total // 300)
        tried = 0
        for n in range(1, total + 1, step):
            fired, _ = run_interrupted(op, n)
            if not fired:
                continue  # a shorter path this time (a row already there)
            tried += 1
            found = problems(store)
            assert not found, f"{name}: KeyboardInterrupt at bytecode {n} of {total}: {found}"
        assert tried > 0
        # And the store goes on: a save, read back, and the side file's row too.
        store.put("after", "fine")
        hit = store.lookup("after")
        assert hit is not None and hit.value == "fine"
        big = store.lookup("big")
        assert big is not None and np.array_equal(big.value, BIG)
    finally:
        store.close()


STORM = r"""
import json, os, random, signal, sys, threading, time
import numpy as np
from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import SQLiteStore

path, signals, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
store = SQLiteStore(path)
ckpt = Checkpointer(store=store, dedup=True, lease=0.3)
caught = threading.Semaphore(0)
stop = threading.Event()
big = np.arange(300_000, dtype=np.int64)

def storm():
    # One SIGINT at a time: the next only once the main thread caught the last.
    for _ in range(signals):
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(os.getpid(), signal.SIGINT)
        if not caught.acquire(timeout=60):
            os._exit(3)
    stop.set()

def neighbour():
    # Another thread saving meanwhile: group commit, and a write lock to wait for.
    i = 0
    while not stop.is_set():
        store.put(f"neighbour/{i % 50}", {"i": i})
        i += 1

def step(i):
    if i % 11 == 3:
        time.sleep(0.15)  # the heartbeat renews the lease meanwhile
    return big if i % 9 == 0 else {"i": i}

threading.Thread(target=storm, daemon=True).start()
nb = threading.Thread(target=neighbour, daemon=True)
nb.start()
i = 0
interrupted = 0
while not stop.is_set():
    try:
        i += 1
        what = i % 4
        if what == 0:
            ckpt(f"step/{i % 40}")(step)(i % 40)  # claim, save, release
        elif what == 1:
            store.put("big" if i % 3 else f"small/{i % 30}", big if i % 3 else {"i": i})
        elif what == 2:
            ckpt.run.ran(0.1)
            ckpt.run.flush()  # the run recorder's flush, here in the main thread
        else:
            store.delete_many([f"small/{(i + 7) % 30}"])
    except KeyboardInterrupt:
        interrupted += 1
        caught.release()
nb.join(timeout=60)
found = []
for conn in store._conns.connections():
    if conn.in_transaction:
        found.append("a connection is inside a transaction")
    level = conn.execute("PRAGMA synchronous").fetchone()[0]
    if level != 3:
        found.append(f"a connection is at synchronous={level}")
store.put("after", "fine")
ckpt.close()
print(json.dumps({"interrupted": interrupted, "operations": i, "problems": found}), flush=True)
"""


@pytest.mark.slow
def test_a_signal_storm_leaves_every_connection_durable(tmp_path: Path) -> None:
    path = str(tmp_path / "storm.db")
    signals = int(os.environ.get("AI2_KIT_STORM_SIGNALS", "150"))
    proc = subprocess.run([sys.executable, "-c", STORM, path, str(signals), "5"], capture_output=True,
                          text=True, timeout=120 + signals)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["interrupted"] == signals, result
    assert not result["problems"], result
    # No lock left behind: another process writes at once.
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
    with SQLiteStore(path) as store:
        assert store.integrity_check() == []


# -- the rule ---------------------------------------------------------------------------

#: Where the package may lower ``synchronous``, and why it is safe there.
ALLOWED_RELAXATIONS = {
    # A brand-new database under a temporary name nobody opens, fsynced whole
    # before it is linked into place.
    ("stores/_sqlite/_schema.py", "create_database"),
}


def _sql_texts(tree: ast.AST) -> list[tuple[str, str]]:
    """(enclosing Class.function, text) of every string (f-strings joined) in a module."""
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, where: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            where = where + [node.name]
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                str(v.value) if isinstance(v, ast.Constant)
                else "{" + (v.value.id if isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
                            else "?") + "}"
                for v in node.values)
            out.append((".".join(where), str(text)))
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((".".join(where), node.value))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, [])
    return out


SETS_SYNC = re.compile(r"synchronous\s*=\s*(\{[\w?]+\}|\w+)", re.I)


def test_no_sql_in_the_package_lowers_synchronous() -> None:
    """Every ``synchronous=`` in the package's SQL is the store's own setting (EXTRA), or allowed above."""
    assert _connect._SYNC == "EXTRA"
    found = []
    for path in sorted(Path(PKG).rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for where, text in _sql_texts(ast.parse(path.read_text(encoding="utf-8"))):
            for m in SETS_SYNC.finditer(text):
                value = m.group(1).upper()
                if value in ("EXTRA", "3"):
                    continue
                # f"PRAGMA synchronous={_SYNC}": the store's constant, checked above.
                if value == "{_SYNC}" and rel == "stores/_sqlite/_connect.py":
                    continue
                if (rel, where) in ALLOWED_RELAXATIONS:
                    continue
                found.append(f"{rel} {where}: {text!r}")
    assert not found, found
    # PostgreSQL: the only setting it touches is turning synchronous_commit on.
    pg = (Path(STORES) / "_postgres.py").read_text(encoding="utf-8")
    assert re.findall(r"SET synchronous_commit TO (\w+)", pg) == ["on"]
