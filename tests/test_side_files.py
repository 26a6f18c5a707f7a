"""A single-file store copied without its side-file folder (FILE.blobs/) says so where it is first noticed."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import open_store

from .helpers_cli import cli

BIG = 300_000  # float64: 2.4 MB, over the 1 MiB a row keeps


def _copied_without_folder(tmp_path: Path) -> Path:
    """A store with two big values and a small one, copied with ``cp FILE`` only."""
    src = tmp_path / "src" / "ckpt.db"
    src.parent.mkdir()
    with open_store(str(src)) as store:
        store.put("iters-000/big", np.arange(BIG, dtype=np.float64))
        store.put("iters-001/big", np.ones(BIG))
        store.put("iters-001/small", 3)
    assert (tmp_path / "src" / "ckpt.db.blobs").is_dir()
    dst = tmp_path / "elsewhere" / "ckpt.db"
    dst.parent.mkdir()
    shutil.copy(src, dst)  # what a user does: the folder beside it is left behind
    return dst


def _names_folder(text: str, dst: Path) -> None:
    assert "ckpt.db.blobs" in text and "missing" in text, text
    assert "copy" in text, text


def test_ls_and_load_name_the_missing_folder(tmp_path: Path) -> None:
    dst = _copied_without_folder(tmp_path)
    r = cli("load", str(dst), "-", "ls")
    assert r.out.split() == ["iters-000/big", "iters-001/big", "iters-001/small"]
    _names_folder(r.err, dst)
    assert "2 entries" in r.err
    r = cli("load", str(dst))
    _names_folder(r.err, dst)
    r = cli("load", str(dst), "-", "show", "iters-000/big")
    _names_folder(r.err, dst)
    # Said once per command line, not once per command.
    r = cli("load", str(dst), "-", "ls", "-", "show", "iters-001/small")
    assert r.err.count("is missing") == 1, r.err
    assert not os.path.exists(str(dst) + ".blobs"), "reading must not create the folder"


def test_a_sound_store_says_nothing(tmp_path: Path) -> None:
    dst = _copied_without_folder(tmp_path)
    shutil.copytree(tmp_path / "src" / "ckpt.db.blobs", str(dst) + ".blobs")
    r = cli("load", str(dst), "-", "ls")
    assert r.code == 0 and r.err == ""
    assert cli("load", str(dst), "-", "verify").code == 0
    # A store whose values all fit in rows needs no folder.
    small = tmp_path / "small.db"
    with open_store(str(small)) as store:
        store.put("a", 1)
    assert cli("load", str(small), "-", "ls").err == ""


def test_verify_names_the_folder_and_does_not_advise_rm(tmp_path: Path) -> None:
    dst = _copied_without_folder(tmp_path)
    r = cli("load", str(dst), "-", "verify")
    assert r.code == 1
    _names_folder(r.out + r.err, dst)
    assert " rm " not in r.err and "- rm" not in r.err, r.err
    # The two entries are still listed as unreadable here.
    assert r.out.count("damaged: iters-00") == 2


def test_a_hit_names_the_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dst = _copied_without_folder(tmp_path)
    ck = Checkpointer(str(dst))
    calls = []

    @ck("iters-000/big")
    def big() -> np.ndarray:
        calls.append(1)
        return np.arange(BIG, dtype=np.float64)

    with caplog.at_level(logging.WARNING, logger="ai2_kit.core.checkpoint"):
        assert big().shape == (BIG,)
    ck.close()
    assert calls == [1]  # it cannot be read here, so the step ran again
    text = " ".join(r.getMessage() for r in caplog.records)
    _names_folder(text, dst)
    assert "Remove it" not in text, text


def test_store_method(tmp_path: Path) -> None:
    dst = _copied_without_folder(tmp_path)
    with open_store(str(dst), readonly=True) as store:
        problem = store.missing_side_files()
        assert problem is not None and "2 entries" in problem and str(dst) + ".blobs" in problem
    with open_store(str(tmp_path / "src" / "ckpt.db"), readonly=True) as store:
        assert store.missing_side_files() is None
