"""File-system metadata operations per hit, save, listed entry and open (issue 26).

On NFS and Lustre every look-up, open, stat, mkdir, rename, unlink, folder
read, fsync and byte-range lock is a round trip to a server, so the count of
such operations per step sets a resume's time. Each case runs a real store
in a subprocess under strace twice, with N steps and with none, and checks
(count with N - count with 0) / N against the goal of the issue
(``tests/_opcount.py`` says what is counted). Counts, not timings: they do
not depend on the machine's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _opcount import STRACE, per_op, run_counted
from ai2_kit.core.checkpoint.stores import DirectoryStore
from ai2_kit.core.checkpoint.stores._fs import folders_between

pytestmark = pytest.mark.skipif(
    STRACE is None or not sys.platform.startswith("linux"),
    reason="strace is not installed (scripts/test.sh installs it); the counts need it, on Linux",
)

HIT = r"""
import sys
from ai2_kit.core.checkpoint.stores import DirectoryStore
n, root = int(sys.argv[1]), sys.argv[2]
s = DirectoryStore(root)
for i in range(n):
    assert s.lookup(f"f/k{i}") is not None
"""

# A step's save as a resume makes it: the miss look-up, then the put.
SAVE = r"""
import sys
from ai2_kit.core.checkpoint.stores import DirectoryStore
n, root = int(sys.argv[1]), sys.argv[2]
s = DirectoryStore(root)
s.put("f/warm", 0)  # the folder is known durable from here on, as in a long run
for i in range(n):
    assert s.lookup(f"f/new{i}") is None
    s.put(f"f/new{i}", i)
"""

LS = r"""
import sys
from ai2_kit.core.checkpoint.stores import DirectoryStore
n, root, entries = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = DirectoryStore(root)
if n:
    assert len(list(s.iter_meta())) == entries
"""

ENTRIES = 200


def directory_store(path: Path, n: int) -> str:
    root = str(path)
    with DirectoryStore(root) as s:
        for i in range(n):
            s.put(f"f/k{i}", i)
    return root


def test_a_hit_is_one_open(tmp_path: Path) -> None:
    root = directory_store(tmp_path / "store", 40)
    ops, calls = per_op(HIT, 40, root, cwd=str(tmp_path))
    assert ops <= 1, calls  # the entry's open; its type is checked on the descriptor


def test_a_save_into_an_existing_folder_is_at_the_floor(tmp_path: Path) -> None:
    root = directory_store(tmp_path / "store", 1)
    ops, calls = per_op(SAVE, 20, root, cwd=str(tmp_path))
    # The floor: the miss's open, the temporary file's open, its fsync, the
    # rename, the folder's open and fsync. Plus one stat per folder above the
    # entry's (the store's parent, the store): the per-process memory of
    # durable folders checks that none changed since its fsync.
    above = len(folders_between(root, os.path.join(root, "f")))
    assert ops <= 6 + above, calls
    assert calls["fsync"] + calls["fdatasync"] == 2 * 20, calls  # the file and its folder, every save


def test_an_older_store_looks_for_reference_files_once_per_save(tmp_path: Path) -> None:
    root = directory_store(tmp_path / "store", 1)
    marker = Path(root, ".ai2-kit-checkpoint")
    info = json.loads(marker.read_text())
    info.pop("reference_files", None)  # a store created before the marker said so
    marker.write_text(json.dumps(info))
    ops, calls = per_op(SAVE, 20, root, cwd=str(tmp_path))
    above = len(folders_between(root, os.path.join(root, "f")))
    assert ops <= 6 + above + 1, calls  # the miss looks the reference file up; the put does not again


def test_ls_is_one_open_per_entry(tmp_path: Path) -> None:
    root = directory_store(tmp_path / "store", ENTRIES)
    ops, calls = per_op(LS, 1, root, str(ENTRIES), cwd=str(tmp_path))
    assert ops / ENTRIES <= 1.1, calls


# Side files are made small in the setup only (the store opened under strace
# is unchanged), by a process that then exits: their writer is dead, as after
# any finished run, which is what made the old open query each of them.
SQLITE_SETUP = r"""
import sys
import ai2_kit.core.checkpoint.stores._sqlite._store as engine
from ai2_kit.core.checkpoint.stores import SQLiteStore
engine.INLINE_MAX = 16
n, path = int(sys.argv[1]), sys.argv[2]
with SQLiteStore(path, journal="delete") as s:
    s.put("small", 1)
    for i in range(n):
        s.put(f"big{i}", b"x" * 64)
"""

SQLITE_OPEN = r"""
import sys
from ai2_kit.core.checkpoint.stores import SQLiteStore
with SQLiteStore(sys.argv[1], journal="delete") as s:
    assert s.lookup("small") is not None
"""


@pytest.mark.slow
def test_sqlite_open_does_no_work_per_side_file(tmp_path: Path) -> None:
    counts = []
    for n in (0, 300):
        path = str(tmp_path / f"s{n}.db")
        subprocess.run([sys.executable, "-c", SQLITE_SETUP, str(n), path], check=True, timeout=120)
        if n:
            assert len(os.listdir(path + ".blobs")) >= n
        counts.append(run_counted(SQLITE_OPEN, path, cwd=str(tmp_path)))
    none, many = (sum(c.values()) for c in counts)
    assert many <= none + 10, (counts[0], counts[1])


RUNS = r"""
import sys
from ai2_kit.core.checkpoint.stores import SQLiteStore
n, path, what = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with SQLiteStore(path, journal="delete") as s:
    s.put("first", 0)
    s.put_run({"id": "r", "started": 1.0})
    for i in range(n):
        if what == "run":
            s.put_run({"id": "r", "started": 1.0, "hits": i})
        else:
            s.put(f"k{i}", i)
"""


@pytest.mark.slow
def test_a_run_record_flush_is_one_transaction(tmp_path: Path) -> None:
    """In the rollback-journal mode of network file systems, where a transaction costs most."""
    flush, calls = per_op(RUNS, 10, str(tmp_path / "r.db"), "run", cwd=str(tmp_path))
    save, _ = per_op(RUNS, 10, str(tmp_path / "p.db"), "put", cwd=str(tmp_path))
    # One transaction, as one small entry's save is, plus the stat that checks
    # the store was not removed (a run record must never re-create it).
    assert flush <= save + 1, calls
