"""CLI: redo from a step on (rm --from), copy between stores, and show's fingerprints."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, open_store
from helpers_cli import cli

STEPS = ["iters-000/label", "iters-000/train", "iters-001/label", "iters-001/train", "iters-002/label"]


@pytest.fixture
def workflow(tmp_path: Path) -> str:
    """A store whose entries were created one after another, in workflow order."""
    path = str(tmp_path / "c.db")
    with Checkpointer(path) as ckpt:
        for i, key in enumerate(STEPS):
            ckpt(key)(lambda i=i: i)()
            time.sleep(0.002)
    return path


def test_rm_from_removes_the_step_and_everything_after(workflow: str) -> None:
    code, out, _ = cli("load", workflow, "-", "rm", "--from", "iters-001/label", "--dry-run")
    assert code == 0 and "Would remove 3 entries" in out
    assert "iters-000/train" not in out and "iters-002/label" in out
    with SQLiteStore(workflow) as store:
        assert store.keys() == sorted(STEPS)  # a dry run removes nothing
    code, out, _ = cli("load", workflow, "-", "rm", "--from", "iters-001/label")
    assert code == 0 and "Removed 3 entries" in out
    with SQLiteStore(workflow) as store:
        assert store.keys() == ["iters-000/label", "iters-000/train"]


def test_rm_from_with_a_pattern_and_unknown_key(workflow: str) -> None:
    code, out, _ = cli("rm", workflow, "*/label", "--from", "iters-000/train", "--yes")
    assert code == 0 and "Removed 2 entries" in out
    with SQLiteStore(workflow) as store:
        assert store.keys() == ["iters-000/label", "iters-000/train", "iters-001/train"]
    code, _, err = cli("rm", workflow, "--from", "no/such/step")
    assert code == 1 and "no entry 'no/such/step'" in err and len(err.strip().splitlines()) == 1


def test_rm_needs_a_pattern_or_from(workflow: str) -> None:
    code, _, err = cli("load", workflow, "-", "rm")
    assert code == 2 and "--from" in err


@pytest.mark.parametrize("dest_kind", ["file", "dir"])
def test_copy_between_stores(workflow: str, tmp_path: Path, dest_kind: str) -> None:
    if dest_kind == "dir":
        DirectoryStore(str(tmp_path / "dest")).close()
        dest = str(tmp_path / "dest")
    else:
        dest = str(tmp_path / "dest.db")
    code, out, err = cli("copy", workflow, dest, "iters-000")
    assert code == 0, err
    assert "Copied 2 entries" in out
    with open_store(dest) as store:
        assert store.keys() == ["iters-000/label", "iters-000/train"]
        hit = store.lookup("iters-000/train")
        assert hit is not None and hit.value == 1
        with SQLiteStore(workflow) as src:
            assert store.get_meta("iters-000/train")["created"] == src.get_meta("iters-000/train")["created"]  # type: ignore[index]
    code, out, _ = cli("load", workflow, "-", "copy", dest, "--exclude", "*/train")
    assert code == 0 and "Copied 3 entries" in out
    with open_store(dest) as store:
        assert len(store) == 4


def test_copy_into_itself_is_refused(workflow: str) -> None:
    code, _, err = cli("copy", workflow, workflow)
    assert code == 2 and "DEST other than" in err


def test_copy_to_postgres(workflow: str) -> None:
    url = os.environ.get("AI2_KIT_TEST_PG_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("AI2_KIT_TEST_PG_URL is not set under CI=true")
        pytest.skip("no PostgreSQL test server")
    import uuid

    import psycopg

    schema = "copy_" + uuid.uuid4().hex[:10]
    dest = f"{url}?schema={schema}"
    try:
        code, out, err = cli("copy", workflow, dest)
        assert code == 0, err
        assert "Copied 5 entries" in out and "postgresql://" in out
        code, out, _ = cli("load", dest, "-", "ls")
        assert code == 0 and out.split() == sorted(STEPS)
        code, out, _ = cli("load", dest, "-", "rm", "iters-001", "--yes")
        assert code == 0 and "Removed 2 entries" in out
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_show_prints_fingerprints(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")

    def train(model: str, lr: float = 0.1) -> Any:
        return model

    with Checkpointer(path) as ckpt:
        ckpt("t")(train)("mlp", lr=0.5)
    code, out, _ = cli("show", path, "t")
    assert code == 0
    assert "fingerprint" in out and "'mlp'" in out and "lr" in out and "code" in out


@pytest.fixture
def dest_with_other_values(workflow: str, tmp_path: Path) -> str:
    """A destination that already has two of the source's keys, with other values."""
    dest = str(tmp_path / "dest.db")
    with Checkpointer(dest) as ckpt:
        for key in ("iters-000/label", "iters-001/label"):
            ckpt(key)(lambda: "dest's own")()
    return dest


def _values(location: str) -> dict[str, Any]:
    with open_store(location) as store:
        out = {}
        for key in store.keys():
            hit = store.lookup(key)
            assert hit is not None
            out[key] = hit.value
        return out


def test_copy_replaces_existing_entries_by_default_and_with_no_skip_existing(
    workflow: str, dest_with_other_values: str
) -> None:
    # Through fire, '--no-skip-existing' arrived as the string "False", which
    # is true: existing entries were kept, and each counted as a failure.
    code, out, err = cli("copy", workflow, dest_with_other_values, "--no-skip-existing")
    assert code == 0, err
    assert "Copied 5 entries" in out
    assert _values(dest_with_other_values) == {key: i for i, key in enumerate(STEPS)}


def test_copy_skip_existing_keeps_them_and_is_not_a_failure(workflow: str, dest_with_other_values: str) -> None:
    code, out, err = cli("load", workflow, "-", "copy", dest_with_other_values, "--skip-existing")
    assert code == 0, err  # asked for: a success, with the count reported
    assert "Copied 3 entries" in out and "Kept 2 entries" in out
    values = _values(dest_with_other_values)
    assert values["iters-000/label"] == values["iters-001/label"] == "dest's own"
    assert values["iters-000/train"] == 1 and len(values) == 5
