"""The SQLite store's settings and names, issue 21 cases 5 and 6.

- Journal modes come in through ``journal=`` and ``AI2_KIT_CHECKPOINT_JOURNAL``:
  ``wal``, ``delete``, ``truncate`` and ``persist`` are accepted (each keeps a
  committed entry through a power cut); anything else is refused before the
  file is touched, with one line naming where the value came from and the
  accepted ones. (Before: ``off`` and ``memory`` were used silently, other
  text gave a raw ``sqlite3.ProgrammingError``.)
- A store reached through a symbolic link keeps its side files beside the
  real file, so every name of the store finds them; a copy of a store into
  itself is refused however the destination is spelled.
"""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint._errors import StoreOpenError
from ai2_kit.core.checkpoint._maintenance import verify_store
from ai2_kit.core.checkpoint.cli import run
from ai2_kit.core.checkpoint.stores import SQLiteStore

BIG = np.arange(400_000, dtype=np.int64)  # 3.2 MB: a side file


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- journal modes --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["wal", "delete", "truncate", "persist", "WAL", " Delete "])
def test_accepted_journal_modes_are_used(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for how in ("option", "variable"):
        path = str(tmp_path / f"{how}.db")
        if how == "variable":
            monkeypatch.setenv("AI2_KIT_CHECKPOINT_JOURNAL", mode)
            store = SQLiteStore(path)
        else:
            monkeypatch.delenv("AI2_KIT_CHECKPOINT_JOURNAL", raising=False)
            store = SQLiteStore(path, journal=mode)
        with store:
            store.put("k", 1)
            with store._session() as conn:
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == mode.strip().lower()
            assert store.lookup("k").value == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["off", "memory", "wall", "wal; drop table entries", "1"])
def test_other_journal_modes_are_refused_from_the_option(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "ck.db"
    with pytest.raises(StoreOpenError) as info:
        SQLiteStore(str(path), journal=mode)
    text = str(info.value)
    assert "\n" not in text and "journal=" in text and repr(mode) in text
    assert "wal, delete, truncate, persist" in text
    assert not path.exists()  # refused before anything is created


@pytest.mark.parametrize("mode", ["off", "memory", "nonsense"])
def test_other_journal_modes_are_refused_from_the_variable(tmp_path: Path, mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.db"
    with SQLiteStore(str(path)) as store:
        store.put("k", 1)
    before = path.read_bytes()
    monkeypatch.setenv("AI2_KIT_CHECKPOINT_JOURNAL", mode)
    with pytest.raises(StoreOpenError, match="AI2_KIT_CHECKPOINT_JOURNAL") as info:
        SQLiteStore(str(path))
    assert "wal, delete, truncate, persist" in str(info.value)
    assert path.read_bytes() == before  # left as it was
    # The command line: one line, exit status 1, no traceback.
    code, out, err = cli("ls", str(path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "AI2_KIT_CHECKPOINT_JOURNAL" in err and "Traceback" not in err


# -- symbolic links ---------------------------------------------------------------------------


def test_side_files_are_found_by_every_name_of_the_store(tmp_path: Path) -> None:
    real = tmp_path / "data" / "real.db"
    real.parent.mkdir()
    alias = tmp_path / "alias.db"
    alias.symlink_to(real)
    folder_link = tmp_path / "linked"
    folder_link.symlink_to(real.parent)
    with Checkpointer(str(alias)) as ck:
        ck.save("big", BIG)
        ck.save("small", "s")
    assert not (tmp_path / "alias.db.blobs").exists()  # beside the real file, not the link
    assert (tmp_path / "data" / "real.db.blobs").is_dir()
    for name in (real, alias, folder_link / "real.db"):
        with SQLiteStore(str(name)) as store:
            hit = store.lookup("big")
            assert hit is not None and np.array_equal(hit.value, BIG), name
            report = verify_store(store)
            assert report.ok and not report.orphan_files, (name, report)
    # Written through the real path, read through the link.
    with Checkpointer(str(real)) as ck:
        ck.save("big2", BIG + 1)
    with SQLiteStore(str(alias)) as store:
        hit = store.lookup("big2")
        assert hit is not None and np.array_equal(hit.value, BIG + 1)


@pytest.mark.parametrize("spelling", ["symlink", "hard link", "folder link", "relative"])
def test_a_copy_into_the_same_store_is_refused(tmp_path: Path, spelling: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real.db"
    with Checkpointer(str(real)) as ck:
        ck.save("big", BIG)
        ck.save("small", "s")
    if spelling == "symlink":
        dest = str(tmp_path / "alias.db")
        os.symlink(real, dest)
    elif spelling == "hard link":
        dest = str(tmp_path / "hard.db")
        os.link(real, dest)
    elif spelling == "folder link":
        (tmp_path / "here").symlink_to(tmp_path)
        dest = str(tmp_path / "here" / "real.db")
    else:
        monkeypatch.chdir(tmp_path)
        dest = "./sub/../real.db"
        (tmp_path / "sub").mkdir()
    blobs_before = sorted(os.listdir(str(real) + ".blobs"))
    code, out, err = cli("load", str(real), "-", "copy", dest)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "other than the store itself" in err, err
    assert sorted(os.listdir(str(real) + ".blobs")) == blobs_before
    with SQLiteStore(str(real)) as store:
        hit = store.lookup("big")
        assert hit is not None and np.array_equal(hit.value, BIG)
        assert verify_store(store).ok


def test_a_copy_into_another_store_still_works(tmp_path: Path) -> None:
    with Checkpointer(str(tmp_path / "a.db")) as ck:
        ck.save("big", BIG)
    code, _, err = cli("load", str(tmp_path / "a.db"), "-", "copy", str(tmp_path / "b.db"))
    assert code == 0, err
    with SQLiteStore(str(tmp_path / "b.db")) as store:
        hit = store.lookup("big")
        assert hit is not None and np.array_equal(hit.value, BIG)
    with sqlite3.connect(str(tmp_path / "b.db")) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    db.close()
