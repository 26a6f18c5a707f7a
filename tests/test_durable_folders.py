"""The per-process memory of folders known durable (stores/_fs.py, issue 21 case 3).

A save makes every folder above its entry durable; folders known durable
cost a stat, not an fsync, so later saves stay at one file fsync and one
folder fsync. The memory must never lie: a folder changed since its fsync
(a name added or removed by anyone, the folder removed and made again) is
fsynced again. The fsyncs are counted by wrapping ``os.fsync`` (the store
itself runs unchanged on a real folder); the settling delay (see
``_fs._settle_ns``) is lifted so that the test does not wait for clocks.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from time import time_ns
from typing import Any, Iterator

import pytest

from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, _fs


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths fsynced, in order; the memory starts empty and trusts any ctime."""
    done: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        done.append(path + ("/" if stat.S_ISDIR(os.fstat(fd).st_mode) else ""))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(_fs, "_settle_ns", lambda ctime_ns: -(10**12))  # whatever the clocks say
    monkeypatch.setattr(_fs, "_durable", {})
    yield done


def folders(done: list[str]) -> list[str]:
    return [p.rstrip("/") for p in done if p.endswith("/")]


def test_a_known_durable_path_costs_one_folder_fsync(tmp_path: Path, synced: list[str]) -> None:
    root = str(tmp_path / "store")
    store = DirectoryStore(root)
    store.put("iters-000/train/a", 1)
    # Every folder from the store's parent down to the entry's: all were new.
    assert set(folders(synced)) >= {str(tmp_path), root, f"{root}/iters-000", f"{root}/iters-000/train"}
    synced.clear()
    store.put("iters-000/train/b", 2)
    assert folders(synced) == [f"{root}/iters-000/train"]  # the floor: the entry's own folder
    assert len(synced) == 2  # and the entry file


def test_a_folder_made_again_by_someone_else_is_synced_again(tmp_path: Path, synced: list[str]) -> None:
    root = str(tmp_path / "store")
    store = DirectoryStore(root)
    store.put("iters-000/train/a", 1)
    store.put("iters-000/train/b", 1)
    synced.clear()
    # Another process removes the folders and makes them again (perhaps on
    # the same inode numbers): nothing this process knew about them holds.
    subprocess.run([sys.executable, "-c", "import os, shutil, sys; shutil.rmtree(sys.argv[1]); "
                    "os.makedirs(os.path.join(sys.argv[1], 'train'))", f"{root}/iters-000"], check=True)
    store.put("iters-000/train/c", 3)
    assert set(folders(synced)) == {root, f"{root}/iters-000", f"{root}/iters-000/train"}
    synced.clear()
    # A sibling folder made by another writer changes the folder holding both.
    os.mkdir(f"{root}/iters-000/eval")
    store.put("iters-000/train/d", 4)
    assert folders(synced) == [f"{root}/iters-000/train", f"{root}/iters-000"]


def test_a_new_side_file_folder_made_by_another_writer_is_synced_in_its_parent(
        tmp_path: Path, synced: list[str]) -> None:
    db = str(tmp_path / "c.db")
    store = SQLiteStore(db)
    os.mkdir(db + ".blobs")  # another writer's mkdir, not yet durable
    synced.clear()
    store.put("big", b"x" * (3 << 20))
    assert str(tmp_path) in folders(synced) and db + ".blobs" in folders(synced)
    synced.clear()
    store.put("big2", b"y" * (3 << 20))
    assert str(tmp_path) not in folders(synced)  # known durable now: the floor
    store.close()


def test_the_memory_is_kept_across_fork(tmp_path: Path, synced: list[str]) -> None:
    """A child keeps what its parent knew: durability belongs to the disk, not the process."""
    root = str(tmp_path / "store")
    store = DirectoryStore(root)
    store.put("a/b/c", 1)
    known = dict(_fs._durable)
    assert known
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        ok = _fs._durable == known
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)


def test_a_ctime_is_trusted_only_once_older_than_its_grain() -> None:
    assert _fs._settle_ns(1_733_461_234_123_456_789) == 50_000_000  # nanoseconds: a clock tick at most
    assert _fs._settle_ns(1_733_461_234_000_000_000) == 3_000_000_000  # whole seconds (Lustre, FAT...)
    assert _fs._settle_ns(1_733_461_234_500_000_000) == 3_000_000_000  # half seconds
    assert _fs._settle_ns(1_733_461_234_750_000_000) == 1_000_000_000  # a 250 ms grain
    assert _fs._settle_ns(1_733_461_234_120_000_000) == 1_000_000_000  # 10 ms (exFAT)


def test_a_fresh_change_is_never_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real settling rule: a folder changed just now is fsynced at every save."""
    monkeypatch.setattr(_fs, "_durable", {})
    folder = tmp_path / "f"
    folder.mkdir()
    _fs.ensure_durable([str(tmp_path)])
    st = os.stat(tmp_path)
    if time_ns() - st.st_ctime_ns <= _fs._settle_ns(st.st_ctime_ns):
        assert str(tmp_path) not in _fs._durable


def test_fsync_errors_of_a_folder_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> Any:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        return None

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(_fs.DurabilityError) as e:
        _fs.fsync_dir(str(tmp_path))
    assert str(e.value) == f"cannot make {tmp_path} durable: fsync failed with EIO (Input/output error)"
    for code in (22, 95):  # EINVAL, ENOTSUP: this file system cannot fsync a folder

        def unsupported(fd: int, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", unsupported)
        _fs.fsync_dir(str(tmp_path))
    shutil.rmtree(tmp_path)
    with pytest.raises(_fs.DurabilityError, match="ENOENT"):
        _fs.fsync_dir(str(tmp_path))
