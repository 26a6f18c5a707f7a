"""Where a store is, and is not (issue 21, cases 7 and 8).

Case 7: an empty store path is the current folder to ``os.path.abspath``;
with ``STORE`` unset, ``load "$STORE" - rm "*"`` removed every entry of the
stores in subfolders. An empty path is now a usage error everywhere (API,
the default's environment variable, CLI), and a folder holding files that
are not ours is refused even when stores live below it.

Case 8: a process that used a store which was then removed (``rm -rf ckpt``,
``rm ck.db*``) flushed its run record afterwards and so made the store again:
``ckpt/.runs/ID.json``, or a bare SQLite file, which the next run refused as
a stranger's. The flush now notices and skips, with one WARNING.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ai2_kit.core.checkpoint import Checkpointer, set_checkpoint_dir, set_checkpoint_file
from ai2_kit.core.checkpoint._errors import StoreOpenError
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, open_store

CLI = [sys.executable, "-m", "ai2_kit.core.checkpoint._main"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "tool", "checkpoint", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def two_stores_and_a_file(top: Path) -> dict[str, int]:
    """A user's folder: a file of theirs and two stores in subfolders."""
    (top / "notes.txt").write_text("mine")
    counts = {}
    for name in ("run1", "run2"):
        with open_store(str(top / name), prefer="dir") as s:
            s.put("iters-000/a", 1)
            s.put("iters-000/b", 2)
        counts[name] = 2
    return counts


def entries(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*.ckpt"))


def test_an_empty_store_path_is_refused_in_the_cli(tmp_path: Path) -> None:
    two_stores_and_a_file(tmp_path)
    before = entries(tmp_path)
    res = cli("load", "", "-", "rm", "*", cwd=tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "empty" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert entries(tmp_path) == before == ["run1/iters-000/a.ckpt", "run1/iters-000/b.ckpt",
                                           "run2/iters-000/a.ckpt", "run2/iters-000/b.ckpt"]


@pytest.mark.parametrize("how", ["open_store", "DirectoryStore", "SQLiteStore", "Checkpointer",
                                 "set_checkpoint_dir", "set_checkpoint_file"])
def test_an_empty_store_path_is_refused_by_the_api(tmp_path: Path, how: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    opener = {"open_store": open_store, "DirectoryStore": DirectoryStore, "SQLiteStore": SQLiteStore,
              "Checkpointer": Checkpointer, "set_checkpoint_dir": set_checkpoint_dir,
              "set_checkpoint_file": set_checkpoint_file}[how]
    with pytest.raises(StoreOpenError, match="the store path is empty"):
        opener("")
    assert os.listdir(tmp_path) == []  # nothing made in the current folder


def test_an_empty_store_path_in_the_environment_is_refused(tmp_path: Path) -> None:
    """A worker given the default through AI2_KIT_CHECKPOINT_DEFAULT with an empty location."""
    code = ("from ai2_kit.core.checkpoint import get_checkpointer\n"
            "print('default:', get_checkpointer())\n")
    env = {**os.environ, "AI2_KIT_CHECKPOINT_DEFAULT": json.dumps({"location": "", "prefer": "dir"})}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "default: None" in res.stdout
    assert "the store path is empty" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert os.listdir(tmp_path) == []


def test_a_folder_with_a_file_not_ours_is_refused_even_with_stores_below(tmp_path: Path) -> None:
    two_stores_and_a_file(tmp_path)
    before = entries(tmp_path)
    res = cli("load", str(tmp_path), "-", "rm", "*", cwd=tmp_path)
    assert res.returncode == 1
    assert "another checkpoint store lives below it ('run1/" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert entries(tmp_path) == before
    # Without the user's file, the stores below still make it someone's folder (their markers).
    (tmp_path / "notes.txt").unlink()
    res = cli("load", str(tmp_path), "-", "rm", "*", cwd=tmp_path)
    assert res.returncode == 1 and "lives below it" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert entries(tmp_path) == before
    # A user's folder holding a file of theirs and our entries, without a marker (lost).
    for name in ("run1", "run2"):
        (tmp_path / name / ".ai2-kit-checkpoint").unlink()
    (tmp_path / "notes.txt").write_text("mine")
    res = cli("load", str(tmp_path), "-", "rm", "*", cwd=tmp_path)
    assert res.returncode == 1 and "notes.txt" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert entries(tmp_path) == before


def test_our_entries_beside_a_file_not_ours_are_refused(tmp_path: Path) -> None:
    """An unmarked folder (its marker lost): our entries do not vouch for the user's file beside them."""
    with open_store(str(tmp_path / "s"), prefer="dir") as s:
        s.put("a", 1)
    (tmp_path / "s" / ".ai2-kit-checkpoint").unlink()
    (tmp_path / "s" / "z-results.csv").write_text("1,2")
    res = cli("load", str(tmp_path / "s"), "-", "rm", "*", cwd=tmp_path)
    assert res.returncode == 1 and "z-results.csv" in res.stderr, res.stderr
    assert (tmp_path / "s" / "a.ckpt").exists()


REMOVED = r"""
import os, sys, threading
from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint._runs import _flusher

ckpt = Checkpointer(sys.argv[1], prefer=sys.argv[2])
ckpt("step")(lambda: 41)()
ckpt("step")(lambda: 41)()  # a hit: the run has something to record
print("saved", flush=True)
sys.stdin.readline()  # the store is removed meanwhile
for _ in range(2):  # from a thread with no connection yet, as the flusher thread is; twice
    t = threading.Thread(target=_flusher.flush_all)
    t.start()
    t.join()
    ckpt("step2")(lambda: 1)  # (nothing saved: not called)
    ckpt.store  # still the same object
"""


@pytest.mark.parametrize("kind", ["directory", "sqlite"])
def test_a_removed_store_is_not_made_again_by_the_run_record(tmp_path: Path, kind: str) -> None:
    location = tmp_path / ("ckpt" if kind == "directory" else "ck.db")
    proc = subprocess.Popen([sys.executable, "-c", REMOVED, str(location), "dir" if kind == "directory" else "file"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
        # rm -rf ckpt / rm ck.db*
        if kind == "directory":
            shutil.rmtree(location)
        else:
            for p in tmp_path.glob("ck.db*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        _, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert os.listdir(tmp_path) == [], "the removed store was made again"
    warnings = [line for line in err.splitlines() if "not recorded" in line]
    assert len(warnings) == 1 and "is gone" in warnings[0] and str(location) in warnings[0], err
    assert "Traceback" not in err, err
