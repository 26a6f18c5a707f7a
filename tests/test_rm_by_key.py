"""rm --from KEY --by key: redo a workflow from a step on when its keys carry the order (issue 27, point 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ai2_kit.core.checkpoint import _ops
from ai2_kit.core.checkpoint.stores import open_store
from helpers_cli import cli

# Saved in this order; then iteration 1 is redone, so its entry is the newest.
FIRST = ["iters-000/generate", "iters-000/label", "iters-001/generate", "iters-001/label",
         "iters-002/generate", "iters-009/generate", "iters-010/generate"]


@pytest.fixture
def redone(tmp_path: Path) -> str:
    path = str(tmp_path / "c.db")
    with open_store(path) as store:
        for i, key in enumerate(FIRST):
            store.put(key, i)
        store.delete("iters-001/generate")
        store.put("iters-001/generate", "redone")
    return path


def _keys(path: str) -> list[str]:
    with open_store(path, readonly=True) as store:
        return store.keys()


def test_by_time_is_still_the_default(redone: str) -> None:
    r = cli("load", redone, "-", "rm", "--from", "iters-001/generate", "--yes")
    assert r.code == 0, r.err
    assert "iters-002/generate" in _keys(redone)  # saved before the redo: kept, by time
    assert "iters-001/generate" not in _keys(redone)


def test_by_key_removes_every_later_key(redone: str) -> None:
    r = cli("load", redone, "-", "rm", "--from", "iters-001/generate", "--by", "key", "--dry-run")
    assert r.code == 0, r.err
    assert "Would remove 5 entries" in r.out, r.out
    assert _keys(redone) == sorted(FIRST)  # a dry run removes nothing
    r = cli("load", redone, "-", "rm", "--from", "iters-001/generate", "--by", "key", "--yes")
    assert r.code == 0, r.err
    assert "in key order" in r.out
    # Digits compare as numbers: iters-010 comes after iters-009, and both after iters-001.
    assert _keys(redone) == ["iters-000/generate", "iters-000/label"]


def test_by_key_from_a_prefix_and_with_a_pattern(redone: str) -> None:
    # KEY need not be an entry: a key part such as 'iters-002' starts the order there.
    r = cli("rm", redone, "*/generate", "--from", "iters-002", "--by", "key", "--yes")
    assert r.code == 0, r.err
    assert _keys(redone) == ["iters-000/generate", "iters-000/label", "iters-001/generate", "iters-001/label"]


def test_natural_order_of_keys(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "n.db")) as store:
        for key in ("it-9/a", "it-10/a", "it-1/a", "it-09b"):
            store.put(key, 1)
        assert _ops.from_key_on(store, "it-9") == ["it-9/a", "it-09b", "it-10/a"]


def test_by_is_checked(redone: str) -> None:
    r = cli("load", redone, "-", "rm", "--from", "iters-001/generate", "--by", "name")
    assert r.code == 2 and "--by" in r.err and "key" in r.err and "time" in r.err
    r = cli("load", redone, "-", "rm", "iters-001", "--by", "key")
    assert r.code == 2 and "--by goes with --from" in r.err
    assert _keys(redone) == sorted(FIRST)


def test_help_names_by() -> None:
    r = cli("rm", "--help")
    assert "--by" in r.out and "key order" in r.out
