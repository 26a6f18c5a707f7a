"""The layers above ``stores/`` see engines only through the ``Store`` interface.

No module outside ``stores/`` checks an engine's class, opens an engine's
connection (``store._conn()``, which also skipped the fork gate), reads an
engine's private connection string or imports the hit CRC; ``stores/_base.py``
imports no engine's driver. And the interface methods that replaced those
reads answer what the callers used to work out themselves.
"""

from __future__ import annotations

import ast
import os
import sqlite3
from pathlib import Path

import pytest

import ai2_kit.core.checkpoint as package
from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint._maintenance import copy_entries
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, open_store

PKG = Path(os.path.dirname(os.path.abspath(package.__file__)))
ENGINES = {"SQLiteStore", "DirectoryStore", "LegacyFileStore", "PostgresStore"}
KINDS = {"sqlite", "directory", "legacy-file", "postgres"}


def _outside_stores() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py")) if "stores" not in p.relative_to(PKG).parts]


def _leaks(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(PKG)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}
            if names & ENGINES:
                found.append(f"{where} isinstance on an engine")
        if isinstance(node, ast.Attribute) and node.attr in ("_conn", "_conninfo", "_conns", "_session"):
            found.append(f"{where} .{node.attr}")
        # What differs by engine is a Store attribute or method, not a test of its kind.
        if isinstance(node, ast.Compare) and any(
            isinstance(n, ast.Attribute) and n.attr == "kind" for n in [node.left, *node.comparators]
        ) and any(isinstance(n, ast.Constant) and n.value in KINDS for n in ast.walk(node)):
            found.append(f"{where} compares an engine's kind")
        # The signing key is the codec's: others ask ``Signer.secret``.
        if "_codec" not in path.relative_to(PKG).parts and (
            (isinstance(node, ast.Attribute) and node.attr == "_secret")
            or (isinstance(node, ast.Constant) and node.value == "_secret")
        ):
            found.append(f"{where} reads the signer's private secret")
        if isinstance(node, ast.ImportFrom) and node.module and "stores._" in node.module:
            for alias in node.names:
                if alias.name in ("key_crc", "hit_crc") or alias.name in ENGINES:
                    found.append(f"{where} imports {alias.name} from {node.module}")
    return found


def test_no_module_above_the_stores_reaches_into_an_engine() -> None:
    found = [leak for path in _outside_stores() for leak in _leaks(path)]
    assert not found, found


def test_the_store_contract_imports_no_engine_driver() -> None:
    tree = ast.parse((PKG / "stores" / "_base.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {"sqlite3", "psycopg"} & imported


@pytest.mark.parametrize("prefer", ["file", "dir"])
def test_describe_opens_the_same_store_again(tmp_path: Path, prefer: str) -> None:
    with open_store(tmp_path / "s", prefer=prefer) as store:
        store.put("k", 41)
        spec = store.describe()
        assert spec is not None
        location, options = spec
        with open_store(location, prefer=prefer, **dict(options)) as again:
            assert type(again) is type(store) and again.lookup("k").value == 41  # type: ignore[union-attr]
        assert store.is_local
        assert store.prefer == prefer


def test_a_checkpointer_made_from_a_store_describes_it(tmp_path: Path) -> None:
    with Checkpointer(store=DirectoryStore(str(tmp_path / "d"))) as ck:
        assert ck.spec is not None and ck.spec.location == str(tmp_path / "d")


def test_the_short_look_up_needs_no_checksum_from_its_caller(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "a.db")) as store:
        store.put("k", [1, 2], fingerprint={"x": 1}, fpd="d" * 32)
        assert store.lookup_fast("k", "d" * 32) == ([1, 2], None, False)
        assert store.lookup_fast("k", "e" * 32) is None  # another call's: the full way judges it


def test_a_copy_finds_every_key_of_a_store_whose_key_index_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with SQLiteStore(str(path)) as store:
        for i in range(50):
            store.put(f"k{i:02d}", i)
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_entries_1'").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:  # the key index's root page overwritten: listing by key fails
        f.seek((root - 1) * page)
        f.write(b"\xff" * page)
    # The rows themselves are intact: every key is found, probed row by row
    # (``Store.probe_keys``); each is then copied or listed as failed, none missed.
    with SQLiteStore(str(path), readonly=True) as src, DirectoryStore(str(tmp_path / "d")) as dst:
        report = copy_entries(src, dst, "k*")
    assert sorted([*report.copied, *report.failed]) == [f"k{i:02d}" for i in range(50)]
