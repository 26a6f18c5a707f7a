"""Power cuts with a folder made by another writer (issue 21, case 3).

Writer A creates the folders of its key and stalls before any folder fsync
(a slow disk, or a writer killed right after its ``mkdir``). Writer B then
saves into the folder A created, and returns. The power goes. B's entry was
acknowledged, so it must be there, although B created none of the folders it
wrote into: a save returns only when every folder from the store's parent to
its entry is durable, whoever made it. The same for the SQLite store's side
files: B writes into the ``FILE.blobs/`` folder that A made.

Runs on the power-cut file system (tests/_powerfs.py, see test_powercut.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from _powerfs import Mount, fuse_unavailable
from ai2_kit.core.checkpoint._maintenance import verify_store
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, open_store

_why_not = fuse_unavailable()
if _why_not is not None and os.environ.get("CI") == "true":
    raise RuntimeError(f"power-cut tests cannot run under CI=true: {_why_not}")
pytestmark = pytest.mark.skipif(_why_not is not None, reason=str(_why_not))

# Over the SQLite store's 1 MiB inline limit: a side file.
BIG = 1_200_000

WRITER = r"""
import os, stat, sys, time
import numpy as np
from ai2_kit.core.checkpoint.stores import open_store

role, kind, location, key, big = sys.argv[1:5] + [int(sys.argv[5])]
if role == "stalls":
    real_fsync = os.fsync

    def fsync(fd):
        # The first folder fsync never comes: this writer's mkdirs are not durable.
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            print("stalled", flush=True)
            time.sleep(3600)
        real_fsync(fd)

    os.fsync = fsync
store = open_store(location, prefer="dir" if kind == "directory" else "file")
if role == "saves":
    # Open and written to first (SQLite creates and syncs its WAL file and
    # the folder holding it now), then wait for the other writer's folders.
    store.put("warm-up", 0)
    print("ready", flush=True)
    sys.stdin.readline()
value = np.full(big // 4, 7 if role == "stalls" else 8, dtype=np.int32) if kind == "sqlite" else role
store.put(key, value)
print("ack", flush=True)
"""


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(str(tmp_path / "disk"), str(tmp_path / "mnt"))
    yield m
    if m.proc is not None:
        m.unmount()


def run(role: str, kind: str, location: str, key: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, role, kind, location, key, str(BIG)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The writer's first line (it prints one, then stalls or exits), within a deadline."""
    assert proc.stdout is not None
    lines: list[str] = []
    out = proc.stdout
    reader = threading.Thread(target=lambda: lines.append(out.readline().strip()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the writer printed nothing within {timeout} s: {err[-2000:]}")
    return lines[0]


@pytest.mark.parametrize("kind", ["directory", "sqlite"])
def test_a_save_into_a_folder_another_writer_made_survives_a_cut(mount: Mount, kind: str) -> None:
    name = {"directory": "ckpt.d", "sqlite": "ckpt.db"}[kind]
    # The store exists and is durable before the mount: only the folders the writers make are tested.
    if kind == "directory":
        DirectoryStore(os.path.join(mount.disk, name)).close()
    else:
        SQLiteStore(os.path.join(mount.disk, name)).close()
    mount.start()
    location = mount.path(name)
    b = run("saves", kind, location, "iters-000/train/model-0/b")
    a = None
    try:
        assert first_line(b) == "ready"
        a = run("stalls", kind, location, "iters-000/train/model-0/a")
        assert first_line(a) == "stalled"
        out, err = b.communicate("go\n", timeout=60)
        assert b.returncode == 0 and out.split() == ["ack"], err
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    mount.cut()
    store = open_store(os.path.join(mount.disk, name))
    try:
        hit = store.lookup("iters-000/train/model-0/b")
        assert hit is not None, "an acknowledged entry in a folder another writer made was lost"
        got = hit.value
        if kind == "sqlite":
            assert isinstance(got, np.ndarray) and got.shape == (BIG // 4,) and (got == 8).all()
        else:
            assert got == "saves"
        assert verify_store(store).ok
    finally:
        store.close()
