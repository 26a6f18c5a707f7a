"""Each system call of a save failing in turn, injected with strace (issue 21, cases 3, 4).

A child process opens a store that already holds acknowledged entries and
makes one save; strace (``-e inject=SYSCALL:error=EIO:when=N``) fails the
N-th call of one kind: each fsync, fdatasync, rename, write, pwrite64 and
mkdir that the save makes, one per run, on both stores, for a small value
and for a big one (the SQLite store's side file). Each time:

- the save fails with SaveError, one line naming the store and the errno
  (before, a folder fsync's EIO was swallowed and the save returned as if
  durable);
- the same process can still read and save afterwards;
- reopened by another process, the store passes ``verify`` (SQLite's
  integrity check included), every entry acknowledged before is there and
  equal, and the failed entry is either absent or whole.

The calls of the save are found in a first run without injection, between
two marker calls (a ``stat`` of a path that does not exist); each injected
run's own trace must show the injected call inside that window, or the run
proves nothing and the test says so. ``scripts/test.sh`` installs strace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from _reliability import record
from ai2_kit.core.checkpoint._maintenance import verify_store
from ai2_kit.core.checkpoint.stores import open_store

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(
    STRACE is None and os.environ.get("CI") != "true",
    reason="strace is not installed (scripts/test.sh installs it)",
)

BEGIN = "/nonexistent-ai2-kit-inject-begin"
END = "/nonexistent-ai2-kit-inject-end"
INJECTED = ("fsync", "fdatasync", "rename", "renameat", "renameat2", "write", "pwrite64", "mkdir", "mkdirat")
TRACED = ",".join(INJECTED + ("stat", "newfstatat", "statx"))
BIG = 3 << 20  # over the SQLite store's 1 MiB inline limit: a side file

CHILD = r"""
import json, os, sys
from ai2_kit.core.checkpoint._errors import SaveError
from ai2_kit.core.checkpoint.stores import open_store

kind, location, size, BEGIN, END, KEY = sys.argv[1:7]
size = int(size)
store = open_store(location, prefer="dir" if kind == "directory" else "file")
value = b"v" * size
out = {}
def mark(path):
    try:
        os.stat(path)
    except OSError:
        pass
mark(BEGIN)
try:
    store.put(KEY, value)
    out["save"] = "ok"
except SaveError as e:
    out["save"] = str(e)
mark(END)
# The same process goes on: reads what was there, saves again.
hit = store.lookup("old/1")
out["read_after"] = hit is not None and hit.value == 1
store.put("after", 2)
out["saved_after"] = True
store.close()
sys.stderr.write("RESULT " + json.dumps(out) + "\n")
"""

_CALL = re.compile(r"^(\d+\s+)?([a-z0-9_]+)\(")


def calls_between(trace: str) -> tuple[Counter[str], Counter[str], list[str]]:
    """(calls of each kind before BEGIN, calls of each kind between BEGIN and END, injected lines)."""
    before: Counter[str] = Counter()
    within: Counter[str] = Counter()
    injected: list[str] = []
    phase = 0
    for line in trace.splitlines():
        if BEGIN in line:
            phase = 1
            continue
        if END in line:
            phase = 2
            continue
        m = _CALL.match(line.strip())
        if not m or m.group(2) not in INJECTED:
            continue
        if "(INJECTED)" in line:
            injected.append(f"{phase}: {line.strip()}")
        if phase == 0:
            before[m.group(2)] += 1
        elif phase == 1:
            within[m.group(2)] += 1
    return before, within, injected


def run_child(tmp_path: Path, kind: str, location: str, size: int, inject: str | None,
              name: str, key: str) -> tuple[dict[str, object], str]:
    trace = tmp_path / f"trace-{name}.txt"
    assert STRACE is not None
    cmd = [STRACE, "-qq", "-y", "-o", str(trace), "-e", f"trace={TRACED}"]
    if inject:
        cmd += ["-e", f"inject={inject}"]
    res = subprocess.run([*cmd, sys.executable, "-c", CHILD, kind, location, str(size), BEGIN, END, key],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"^RESULT (.*)$", res.stderr, re.M)
    assert m, f"{inject}: the child did not finish: {res.stderr[-3000:]}"
    return json.loads(m.group(1)), trace.read_text()


def fill(kind: str, location: str) -> dict[str, object]:
    """Acknowledged entries the faults must not touch: small ones and a big one."""
    want: dict[str, object] = {"old/1": 1, "old/2": "two", "iters-000/old": 3, "big/1": b"b" * BIG}
    store = open_store(location, prefer="dir" if kind == "directory" else "file")
    try:
        for key, value in want.items():
            store.put(key, value)
    finally:
        store.close()
    return want


@pytest.mark.slow
@pytest.mark.parametrize(("size", "key"), [(10, "iters-000/train/new"), (BIG, "iters-000/train/new"),
                                           (BIG, "big/1")], ids=["small", "big", "big-overwrite"])
@pytest.mark.parametrize("kind", ["directory", "sqlite"])
def test_each_call_of_a_save_failing_fails_that_save_only(tmp_path: Path, kind: str, size: int, key: str) -> None:
    """A new key in new folders, small or big; or a big entry replacing a big one (its side file)."""
    location = str(tmp_path / ("store.d" if kind == "directory" else "store.db"))
    fill(kind, location)
    # A first run, without faults, finds the calls the save makes (and warms the caches).
    run_child(tmp_path, kind, location + ".warm", size, None, "warm", key)
    shutil.copytree(location, location + ".base") if kind == "directory" else None
    if kind == "sqlite":
        shutil.copyfile(location, location + ".base")
        if os.path.isdir(location + ".blobs"):
            shutil.copytree(location + ".blobs", location + ".base.blobs")

    def fresh(n: int) -> str:
        """A copy of the filled store for run ``n``."""
        target = f"{location}.{n}"
        if kind == "directory":
            shutil.copytree(location + ".base", target)
        else:
            shutil.copyfile(location + ".base", target)
            if os.path.isdir(location + ".base.blobs"):
                shutil.copytree(location + ".base.blobs", target + ".blobs")
        return target

    out, trace = run_child(tmp_path, kind, fresh(0), size, None, "clean", key)
    assert out == {"save": "ok", "read_after": True, "saved_after": True}, out
    before, within, _ = calls_between(trace)
    assert within["fsync"] + within["fdatasync"] >= 2, within
    runs = [(call, before[call] + i) for call in INJECTED for i in range(1, within[call] + 1)]
    assert runs
    problems: list[str] = []
    tolerated: list[str] = []
    for n, (call, when) in enumerate(runs, start=1):
        target = fresh(n)
        want = {"old/1": 1, "old/2": "two", "iters-000/old": 3, "big/1": b"b" * BIG}
        spec = f"{call}:error=EIO:when={when}"
        out, trace = run_child(tmp_path, kind, target, size, spec, f"{n}", key)
        injected = calls_between(trace)[2]
        if not (len(injected) == 1 and injected[0].startswith("1: ")):
            problems.append(f"{spec}: the fault did not land inside the save: {injected}")
            continue
        message = str(out["save"])
        folder = os.path.dirname(target)
        if message == "ok" and kind == "sqlite" and re.match(rf"1: fdatasync\(\d+<{re.escape(folder)}>\)", injected[0]):
            # SQLite's own sync of the database's folder after it starts a WAL
            # file: SQLite ignores its errors by design, so the save cannot see
            # them; the store fsynced that folder itself when the connection
            # opened (test below), so this one is a repeat. Nothing else may pass.
            tolerated.append(spec)
            message = "tolerated"
        if message == "ok":
            problems.append(f"{spec} ({injected[0][3:80]}): the save returned as if durable")
        elif message != "tolerated" and ("\n" in message or target not in message or not re.search(
                r"EIO|I/O error|Input/output error", message)):
            problems.append(f"{spec}: not one clear line naming the store and the errno: {message!r}")
        if out.get("read_after") is not True or out.get("saved_after") is not True:
            problems.append(f"{spec}: the process could not go on after the failed save: {out}")
        store = open_store(target)
        try:
            report = verify_store(store)
            if not report.ok:
                problems.append(f"{spec}: verify after the failed save: {report}")
            want["after"] = 2
            for name, value in want.items():
                hit = store.lookup(name)
                if name == key:
                    # The failed save's key: the old value, or the new one whole (the
                    # fault came after its rename or commit), never anything else.
                    if hit is None or hit.value not in (value, b"v" * size):
                        problems.append(f"{spec}: the entry the failed save replaced is lost or damaged")
                elif hit is None or hit.value != value:
                    problems.append(f"{spec}: acknowledged entry {name!r} lost or changed")
            hit = store.lookup(key)
            if hit is not None and hit.value not in (want.get(key), b"v" * size):
                problems.append(f"{spec}: the failed entry is there and different")
        finally:
            store.close()
    label = {10: "small value", BIG: "big value"}[size] + (", replacing one" if key == "big/1" else ", new folders")
    record(f"EIO injected into each call of a save ({label})", kind, len(runs), len(runs),
           len(runs) * len(want), sum("lost" in p or "different" in p for p in problems))
    assert not problems, "\n".join(problems)
    assert len(tolerated) <= 1, tolerated


OPEN = r"""
import sys
from ai2_kit.core.checkpoint._errors import StoreOpenError
from ai2_kit.core.checkpoint.stores import SQLiteStore
try:
    store = SQLiteStore(sys.argv[1])
    store.put("k", 1)
    print("saved")
except StoreOpenError as e:
    print("refused:", e)
"""


def test_a_wal_file_whose_folder_cannot_be_synced_refuses_the_connection(tmp_path: Path) -> None:
    """SQLite ignores the errors of its own folder fsync after it creates the WAL file.

    The store fsyncs that folder itself when a connection opens (the WAL file
    exists by then): with EIO on every fsync, the open is refused with the
    errno instead of saves being acknowledged into a WAL file whose name a
    power cut may take.
    """
    db = str(tmp_path / "c.db")
    with open_store(db) as s:
        s.put("old", 1)
    assert not os.path.exists(db + "-wal")  # closed cleanly: the next open creates it
    assert STRACE is not None
    res = subprocess.run([STRACE, "-qq", "-f", "-o", str(tmp_path / "trace.txt"), "-e", "trace=fsync,fdatasync",
                          "-e", "inject=fsync:error=EIO", sys.executable, "-c", OPEN, db],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused:"), res.stdout + res.stderr
    assert f"cannot make {tmp_path} durable: fsync failed with EIO" in lines[0]
    with open_store(db) as s:
        assert s.lookup("old") is not None and s.lookup("k") is None and verify_store(s).ok
