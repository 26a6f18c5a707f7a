"""docs/api.md runs as written, and every function it names in a heading is called in one of its examples."""

from __future__ import annotations

import doctest
import os
import re
from pathlib import Path

import pytest

from ai2_kit.core.checkpoint import Checkpointer, open_store, reset_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _examples() -> str:
    """The source lines of every example (``>>>`` and ``...``), joined."""
    parser = doctest.DocTestParser()
    return "\n".join(ex.source for ex in parser.get_examples(DOC.read_text(encoding="utf-8")))


def test_every_example_runs() -> None:
    try:
        result = doctest.testfile(str(DOC), module_relative=False, verbose=False, report=True,
                                  optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        reset_checkpoint()
    assert result.attempted >= 20, result
    assert result.failed == 0, result


def test_every_documented_function_is_called() -> None:
    text = DOC.read_text(encoding="utf-8")
    headed = re.findall(r"^###\s+(.+)$", text, re.M)
    names = {n for h in headed for n in re.findall(r"`(?:[a-z_]+\.)?([A-Za-z_]+)\(", h)}
    assert {"open_store", "keys", "iter_meta", "get_meta", "verify", "lookup", "delete", "delete_many",
            "iter_runs", "Checkpointer", "get_checkpointer"} <= names, names
    code = _examples()
    missing = sorted(n for n in names if not re.search(rf"\b{n}\(", code))
    assert not missing, f"documented in docs/api.md but never called there: {missing}"


@pytest.mark.parametrize("kind", ["file", "dir", "missing-file", "missing-dir-child"])
def test_open_store_for_reading_never_creates(tmp_path: Path, kind: str) -> None:
    """``open_store(..., readonly=True)`` and ``Checkpointer(readonly=True)`` make nothing, anywhere."""
    before: set[str]
    if kind == "file":
        target = tmp_path / "c.db"
        with open_store(str(target)) as store:
            store.put("a", 1)
    elif kind == "dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif kind == "missing-file":
        target = tmp_path / "typo.db"
    else:
        target = tmp_path / "no" / "such" / "store"
    before = {str(p) for p in tmp_path.rglob("*")}
    if kind.startswith("missing"):
        for opener in (lambda: open_store(str(target), readonly=True),
                       lambda: Checkpointer(str(target), readonly=True)):
            with pytest.raises(Exception) as info:
                opener()
            assert "no such file or directory" in str(info.value)
    else:
        with open_store(str(target), readonly=True) as store:
            store.keys(), store.iter_runs(), store.get_meta("a"), store.verify("a")
        with Checkpointer(str(target), readonly=True) as ckpt:
            ckpt.store.keys()
    assert {str(p) for p in tmp_path.rglob("*")} == before
    assert not os.path.exists(str(target) + ".blobs")
