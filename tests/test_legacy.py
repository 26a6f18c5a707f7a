"""The reference design's own files: read as they are, migrated without loss."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from ai2_kit.core.checkpoint import (
    NotACheckpointStoreError,
    apply_checkpoint,
    del_checkpoint,
    set_checkpoint_dir,
    set_checkpoint_file,
)
from ai2_kit.core.checkpoint.stores import DirectoryStore, LegacyFileStore, SQLiteStore, open_store
from helpers_cli import FIXTURES

# What the reference stored: key -> (value, is_awaitable)
ENTRIES: dict[str, tuple[Any, bool]] = {
    "iters-000/cp2k/red": ({"systems": ["a.xyz", "b.xyz"], "n": 2}, False),
    "iters-000/cp2k/neu": ([1, 2, 3], False),
    "iters-000/deepmd/red": ("model-red.pb", True),
    "iters-000/deepmd/neu": (3.5, False),
    "iters-001/lammps": (("traj", 42), False),
    "time_consuming_step": (None, False),
}


def record(key: str, value: Any, awaitable: bool) -> dict[str, Any]:
    return {"return": value, "is_awaitable": awaitable,
            "info": {"fn_name": key.rsplit("/", 1)[-1], "call_site": "workflow.py:42"}}


def write_file_era(path: Path) -> None:
    data = {k: record(k, v, a) for k, (v, a) in ENTRIES.items()}
    path.write_bytes(cloudpickle.dumps(data))


def write_dir_era(root: Path) -> None:
    for k, (v, a) in ENTRIES.items():
        target = root.joinpath(*k.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(cloudpickle.dumps(record(k, v, a)))


def boom() -> Any:
    raise AssertionError("a step that already finished must not run again")


async def aboom() -> Any:
    raise AssertionError("a step that already finished must not run again")


def check_all_hit() -> None:
    for key, (value, awaitable) in ENTRIES.items():
        if awaitable:
            got = apply_checkpoint(key)(boom)()
            assert inspect.isawaitable(got)
            assert asyncio.run(got) == value
            assert asyncio.run(apply_checkpoint(key)(aboom)()) == value
        else:
            assert apply_checkpoint(key)(boom)() == value


def test_file_era_hits_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pkl"
    write_file_era(path)
    before = path.read_bytes()
    ckpt = set_checkpoint_file(path)
    assert isinstance(ckpt.store, LegacyFileStore)
    check_all_hit()
    assert path.read_bytes() == before  # reading never rewrites the file
    meta = ckpt.store.get_meta("iters-000/deepmd/red")
    assert meta is not None and meta["fn_name"] == "red" and meta["call_site"] == "workflow.py:42"


def test_file_era_first_write_migrates_with_backup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "checkpoint.pkl"
    write_file_era(path)
    original = path.read_bytes()
    set_checkpoint_file(path)
    with caplog.at_level(logging.WARNING, logger="ai2_kit.core.checkpoint"):
        assert apply_checkpoint("iters-001/new")(lambda: "fresh")() == "fresh"
    backups = sorted(tmp_path.glob("checkpoint.pkl.legacy-*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == original
    assert any("Migrated" in r.getMessage() and str(backups[0]) in r.getMessage() for r in caplog.records)
    with open(path, "rb") as f:
        assert f.read(16) == b"SQLite format 3\x00"
    check_all_hit()
    assert apply_checkpoint("iters-001/new")(boom)() == "fresh"
    # A new process sees the migrated store with everything in it.
    with SQLiteStore(str(path)) as store:
        assert set(store.keys()) == set(ENTRIES) | {"iters-001/new"}
        meta = store.get_meta("iters-000/deepmd/red")
        assert meta is not None and meta["is_awaitable"] is True and meta["legacy"] == "reference-file"


def test_file_era_delete_migrates_first(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pkl"
    write_file_era(path)
    set_checkpoint_file(path)
    assert del_checkpoint("iters-000/cp2k/red") is True
    assert len(list(tmp_path.glob("*.bak"))) == 1
    with open_store(str(path)) as store:
        assert set(store.keys()) == set(ENTRIES) - {"iters-000/cp2k/red"}


def test_truncated_file_era_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pkl"
    write_file_era(path)
    data = path.read_bytes()[:-20]
    path.write_bytes(data)
    with pytest.raises(NotACheckpointStoreError) as info:
        set_checkpoint_file(path)
    assert str(path) in str(info.value) and "truncated" in str(info.value)
    assert path.read_bytes() == data


def test_dir_era_hits_every_entry(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_dir_era(root)
    ckpt = set_checkpoint_dir(root)
    check_all_hit()
    assert ckpt.store.keys() == sorted(ENTRIES)
    meta = ckpt.store.get_meta("iters-000/cp2k/red")
    assert meta is not None and meta["legacy"] == "reference-dir"


def test_dir_era_new_writes_and_overrides(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_dir_era(root)
    ckpt = set_checkpoint_dir(root)
    apply_checkpoint("iters-002/new")(lambda: 1)()
    ckpt.store.put("iters-000/cp2k/neu", [9])  # ours replaces the reference file
    assert ckpt.store.keys() == sorted(set(ENTRIES) | {"iters-002/new"})
    assert apply_checkpoint("iters-000/cp2k/neu")(boom)() == [9]
    assert not (root / "iters-000" / "cp2k" / "neu").exists()
    assert del_checkpoint("iters-000/deepmd/neu") is True
    assert not (root / "iters-000" / "deepmd" / "neu").exists()


def test_shared_fixtures_when_present(tmp_path: Path) -> None:
    if not FIXTURES.is_dir():
        pytest.skip("shared/fixtures is not beside this checkout")
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    shutil.copy(FIXTURES / "file-era.pkl", tmp_path / "file-era.pkl")
    shutil.copytree(FIXTURES / "dir-era", tmp_path / "dir-era")
    for location in (tmp_path / "file-era.pkl", tmp_path / "dir-era"):
        with open_store(str(location)) as store:
            assert store.keys() == sorted(manifest)
            for key, want in manifest.items():
                hit = store.lookup(key)
                assert hit is not None and repr(hit.value) == want, key
            awaitable = store.lookup("iters-000/deepmd/red")
            assert awaitable is not None and awaitable.meta["is_awaitable"] is True
    set_checkpoint_file(tmp_path / "file-era.pkl")
    apply_checkpoint("after")(lambda: 1)()  # migrates
    with SQLiteStore(str(tmp_path / "file-era.pkl")) as store:
        for key, want in manifest.items():
            hit = store.lookup(key)
            assert hit is not None and repr(hit.value) == want, key


def test_directory_store_ignores_leftover_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with DirectoryStore(str(root)) as store:
        store.put("a/b", 1)
        (root / "a" / ".b.ckpt.host.123.abcd.tmp").write_bytes(b"A2KE partial")
        (root / ".x.ckpt.host.1.ff.tmp").write_bytes(b"")
        assert store.keys() == ["a/b"]
        hit = store.lookup("a/b")
        assert hit is not None and hit.value == 1
    assert os.path.exists(root / "a" / ".b.ckpt.host.123.abcd.tmp")
