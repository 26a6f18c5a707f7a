"""The order of a save's file-system calls, recorded with strace (issue 10, case 9).

A kill cannot show a missing fsync: the page cache survives a killed
process, so every SIGKILL test passes with all fsyncs removed. Only a power
cut (or a crash of the machine) loses what was not fsynced. So these tests
record what a save asks of the kernel (``strace -f -y``: every mkdir,
rename, link and fsync, with the path behind each file descriptor) and
check the order that makes the save survive a power cut:

- a file's data is fsynced before the rename (or link) that puts it in place;
- the folder that received the name is fsynced after it, before the call returns;
- every folder the save created is made durable by fsyncing its parent
  after the mkdir (its name lives there), up to the store's root;
- for SQLite's side files: the value's file and its folder are fsynced
  before the database commits the row that refers to them;
- a folder that lost an entry file is fsynced before the removal returns
  (a removal undone by a power cut brings a stale result back).

Then each fsync the library makes is skipped in turn (in the traced child
only, by wrapping ``os.fsync`` there) and the check must fail: a test that
would pass without the fsync it is about cannot fail, so it would prove
nothing. The one exception is an fsync that SQLite itself repeats within the
same call, which the trace must then show. ``scripts/test.sh`` installs
strace when it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

STRACE = shutil.which("strace")
SENTINEL = "/nonexistent-ai2-kit-fsync-order-sentinel"
CALLS = ("openat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,unlink,unlinkat,fsync,fdatasync,"
         "newfstatat,stat,statx")

pytestmark = pytest.mark.skipif(
    STRACE is None and os.environ.get("CI") != "true",
    reason="strace is not installed (scripts/test.sh installs it)",
)


@dataclass
class Event:
    call: str  # fsync, mkdir, rename, link, return
    path: str
    target: str = ""


_FD = r"\d+<([^>]*)>"
_PATTERNS = [
    ("fsync", re.compile(rf"^(?:fsync|fdatasync)\({_FD}\)\s*= 0")),
    ("mkdir", re.compile(r'^mkdir\("([^"]+)",.*\)\s*= 0')),
    ("mkdir", re.compile(r'^mkdirat\([^,]+, "([^"]+)",.*\)\s*= 0')),
    ("rename", re.compile(r'^rename\("([^"]+)", "([^"]+)"\)\s*= 0')),
    ("rename", re.compile(r'^renameat2?\([^,]+, "([^"]+)", [^,]+, "([^"]+)".*\)\s*= 0')),
    ("link", re.compile(r'^link\("([^"]+)", "([^"]+)"\)\s*= 0')),
    ("link", re.compile(r'^linkat\([^,]+, "([^"]+)", [^,]+, "([^"]+)".*\)\s*= 0')),
    ("unlink", re.compile(r'^unlink\("([^"]+)"\)\s*= 0')),
    ("unlink", re.compile(r'^unlinkat\([^,]+, "([^"]+)", 0\)\s*= 0')),
]


def parse(text: str, under: str) -> list[Event]:
    """The events of the trace that concern paths under ``under``; "return" where a call returned."""
    events: list[Event] = []
    for line in text.splitlines():
        line = re.sub(r"^\d+\s+", "", line.strip())  # the pid, with -f
        if SENTINEL in line:
            events.append(Event("return", ""))
            continue
        for call, rx in _PATTERNS:
            m = rx.match(line)
            if m:
                paths = m.groups()
                if paths[0].startswith(under) or paths[-1].startswith(under):
                    events.append(Event(call, paths[0], paths[1] if len(paths) > 1 else ""))
                break
    return events


def _first(events: list[Event], start: int, call: str, path: str) -> int:
    for i in range(start, len(events)):
        if events[i].call == call and events[i].path == path:
            return i
    return -1


def _last_before(events: list[Event], end: int, call: str, path: str) -> int:
    for i in range(end - 1, -1, -1):
        if events[i].call == call and events[i].path == path:
            return i
    return -1


def check(events: list[Event], root: str) -> list[str]:
    """What in ``events`` would not survive a power cut (empty when the order is right).

    ``root``: the folder above the store (its parent must be fsynced when
    the store's own folder is new).
    """
    problems: list[str] = []
    returns = [i for i, e in enumerate(events) if e.call == "return"]
    if not returns:
        return ["the traced calls never returned"]
    for i, e in enumerate(events[: returns[-1]]):
        # What a call did must be durable before that same call returned.
        ret = next(r for r in returns if r > i)
        if e.call in ("rename", "link"):
            if _last_before(events, i, "fsync", e.path) < 0:
                problems.append(f"{e.path} was not fsynced before its {e.call} to {e.target}")
            folder = os.path.dirname(e.target)
            j = _first(events, i + 1, "fsync", folder)
            if not 0 <= j < ret:
                problems.append(f"{folder} was not fsynced after {e.call} of {e.target}")
        elif e.call == "unlink" and e.path.endswith(".ckpt"):
            # A removed entry that a power cut brought back would be a stale result.
            folder = os.path.dirname(e.path)
            j = _first(events, i + 1, "fsync", folder)
            if not 0 <= j < ret:
                problems.append(f"{folder} was not fsynced after removing {e.path}")
        elif e.call == "mkdir":
            parent = os.path.dirname(e.path)
            j = _first(events, i + 1, "fsync", parent)
            if not 0 <= j < ret:
                problems.append(f"{parent} was not fsynced after mkdir of {e.path}")
    return problems


def redundant(events: list[Event], at: int) -> bool:
    """Whether the fsync ``events[at]`` repeats an earlier fsync of that folder with no change between."""
    folder = events[at].path
    for e in reversed(events[:at]):
        if e.call == "fsync" and e.path == folder:
            return True
        if e.call in ("mkdir", "unlink") and os.path.dirname(e.path) == folder:
            return False
        if e.call in ("rename", "link") and folder in (os.path.dirname(e.path), os.path.dirname(e.target)):
            return False
    return False


def check_side_files(events: list[Event], db: str) -> list[str]:
    """SQLite side files: the value's file and folder are durable before the row's commit."""
    ret = [i for i, e in enumerate(events) if e.call == "return"][-1]
    files = (db, db + "-wal", db + "-journal")
    commits = [i for i, e in enumerate(events[:ret]) if e.call == "fsync" and e.path in files]
    if not commits:
        return ["the database was never fsynced (no commit)"]
    commit = commits[-1]
    blobs = db + ".blobs"
    frames = [e.path for e in events if e.call == "fsync" and e.path.startswith(blobs + "/")]
    problems = []
    if not frames:
        problems.append("the side file was not fsynced")
    for path in frames:
        if _first(events, 0, "fsync", path) > commit:
            problems.append(f"{path} was fsynced after the commit")
    j = _last_before(events, commit, "fsync", blobs)
    if j < 0:
        problems.append(f"{blobs} was not fsynced before the commit")
    return problems


CHILD = """
import os, sys
skip = int(sys.argv[1])
calls = [0]
phase = [0]
real_fsync = os.fsync

def fsync(fd):
    calls[0] += 1
    if calls[0] == skip:
        sys.stderr.write("skipped: %d %s\\n" % (phase[0], os.readlink("/proc/self/fd/%d" % fd)))
        return  # this one fsync removed, to show the check notices
    real_fsync(fd)

os.fsync = fsync
# Nothing remembered as durable (stores/_fs.py): the same fsyncs in every run,
# however long each step takes, so that skipping call N means the same call.
from ai2_kit.core.checkpoint.stores import _fs
_fs._settle_ns = lambda ctime_ns: 1 << 62
def returned():
    phase[0] += 1
    sys.stderr.write("returned after fsync call %d\\n" % calls[0])
    try:
        os.stat({sentinel!r})
    except OSError:
        pass

{body}
sys.stderr.write("fsync calls: %d\\n" % calls[0])
"""

DIRECTORY_SAVE = """
from ai2_kit.core.checkpoint.stores import DirectoryStore
s = DirectoryStore({root!r})  # creates the store: its folder and marker
returned()
s.put("a/b/c", 1)  # a new key in new folders
returned()
"""

DIRECTORY_REMOVE = """
from ai2_kit.core.checkpoint.stores import DirectoryStore
s = DirectoryStore({root!r})
returned()
for key in ("a/x", "a/y", "b/x", "c"):
    s.put(key, 1)
    returned()
s.delete_many(["a/x", "b/x", "c"])  # 'b' is left empty and pruned
returned()
"""

SQLITE_SAVE = """
from ai2_kit.core.checkpoint.stores import SQLiteStore
s = SQLiteStore({db!r})  # creates the store in a new folder
returned()
s.put("k", b"x" * (3 << 20))  # over INLINE_MAX: a side file, in a new folder
returned()
"""


@dataclass
class Trace:
    events: list[Event]
    calls: int  # os.fsync calls the child made
    marks: list[int]  # os.fsync calls made when each traced call returned
    skipped_phase: int = -1  # which traced call the skipped fsync was in
    skipped: str = ""  # and the path it was for


def run_traced(tmp_path: Path, body: str, skip: int, name: str) -> Trace:
    script = CHILD.format(body=textwrap.dedent(body), sentinel=SENTINEL)
    out = tmp_path / f"trace-{name}-{skip}.txt"
    assert STRACE is not None
    res = subprocess.run([STRACE, "-f", "-y", "-qq", "-o", str(out), "-e", f"trace={CALLS}",
                          sys.executable, "-c", script, str(skip)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    m = re.search(r"fsync calls: (\d+)", res.stderr)
    assert m, res.stderr
    trace = Trace(parse(out.read_text(), str(tmp_path)), int(m.group(1)),
                  [int(x) for x in re.findall(r"returned after fsync call (\d+)", res.stderr)])
    skipped = re.search(r"skipped: (\d+) (.*)", res.stderr)
    if skipped:
        trace.skipped_phase, trace.skipped = int(skipped.group(1)), skipped.group(2)
    return trace


def test_directory_save_order(tmp_path: Path) -> None:
    work = tmp_path / "w0"
    work.mkdir()
    root = str(work / "store")
    clean = run_traced(tmp_path, DIRECTORY_SAVE.format(root=root), 0, "dir")
    events, n = clean.events, clean.calls
    assert check(events, root) == [], events
    # The save made new folders (the store, a, a/b), the marker and the entry.
    made = [e.path for e in events if e.call == "mkdir"]
    assert made == [root, root + "/a", root + "/a/b"]
    assert any(e.call == "rename" and e.target.endswith("/.ai2-kit-checkpoint") for e in events)
    assert n >= 7
    for skip in range(1, n + 1):
        work = tmp_path / f"w{skip}"
        work.mkdir()
        root = str(work / "store")
        t = run_traced(tmp_path, DIRECTORY_SAVE.format(root=root), skip, "dir")
        if check(t.events, root) == []:
            # Allowed only for a folder fsynced again with nothing changed in it
            # since its last fsync: a save re-syncs every folder above its
            # entry unless it knows it durable, which a folder changed in the
            # last seconds never is (see _fs.ensure_durable).
            at = [i for i, e in enumerate(events) if e.call == "fsync"][skip - 1]
            assert redundant(events, at), f"the check passes with fsync call {skip} ({t.skipped}) removed"


def test_directory_remove_order(tmp_path: Path) -> None:
    work = tmp_path / "w0"
    work.mkdir()
    root = str(work / "store")
    clean = run_traced(tmp_path, DIRECTORY_REMOVE.format(root=root), 0, "rm")
    events, n = clean.events, clean.calls
    assert check(events, root) == [], events
    assert sorted(e.path for e in events if e.call == "unlink" and e.path.endswith(".ckpt")) == [
        root + "/a/x.ckpt", root + "/b/x.ckpt", root + "/c.ckpt"]
    saves = clean.marks[-2]  # fsync calls made before the removal
    for skip in range(saves + 1, n + 1):  # the saves' own are test_directory_save_order's
        work = tmp_path / f"w{skip}"
        work.mkdir()
        root = str(work / "store")
        t = run_traced(tmp_path, DIRECTORY_REMOVE.format(root=root), skip, "rm")
        assert check(t.events, root) != [], f"the check passes with fsync call {skip} ({t.skipped}) removed"
    assert n - saves == 3  # the two folders that lost names (a, b) and the root (c), once each


def test_sqlite_save_order(tmp_path: Path) -> None:
    work = tmp_path / "w0"
    work.mkdir()
    db = str(work / "new" / "c.db")
    clean = run_traced(tmp_path, SQLITE_SAVE.format(db=db), 0, "sqlite")
    events, n = clean.events, clean.calls
    assert check(events, db) == [] and check_side_files(events, db) == [], events
    assert [e.path for e in events if e.call == "mkdir"] == [os.path.dirname(db), db + ".blobs"]
    for skip in range(1, n + 1):
        work = tmp_path / f"w{skip}"
        work.mkdir()
        db = str(work / "new" / "c.db")
        t = run_traced(tmp_path, SQLITE_SAVE.format(db=db), skip, "sqlite")
        events, phase, skipped = t.events, t.skipped_phase, t.skipped
        problems = check(events, db) + check_side_files(events, db)
        if problems == []:
            # Allowed only where SQLite itself made the same fsync within the
            # same call (it syncs a database it commits, and the folder of a
            # journal it creates): ours was then a second one.
            returns = [-1] + [i for i, e in enumerate(events) if e.call == "return"]
            window = events[returns[phase] + 1: returns[phase + 1]]
            assert any(e.call == "fsync" and e.path == skipped for e in window), (
                f"the check passes with fsync call {skip} ({skipped}) removed")
