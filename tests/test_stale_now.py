"""ls --stale and the report list the entries stale now (issue 27, point 2).

An entry is stale now when a run judged it stale after it was saved and it
was neither replaced nor removed since; a run's old judgement of an entry
redone after ``rm`` no longer lists it.
"""

from __future__ import annotations

from pathlib import Path

from ai2_kit.core.checkpoint import Checkpointer, _ops
from ai2_kit.core.checkpoint._report import render_report
from ai2_kit.core.checkpoint.stores import open_store
from helpers_cli import cli


def step(x: int) -> int:
    return x * 10


def _call(path: str, key: str, x: int, stale: str = "warn") -> int:
    # One Checkpointer per call: each is a run of its own, as separate jobs would be.
    with Checkpointer(path, stale=stale) as ck:
        return ck(key)(step)(x)


def _listed(path: str) -> list[str]:
    r = cli("load", path, "-", "ls", "--stale")
    assert r.code == 0, r.err
    return r.out.split()


def _report_stale(path: str) -> list[str]:
    with open_store(path, readonly=True) as store:
        page = render_report(path, store.iter_meta(), store.iter_runs())
    return sorted(part.split(" <small>")[0] for part in page.split('<li class="stale">')[1:])


def test_an_entry_redone_after_rm_is_no_longer_stale(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    for key in ("iters-000/a", "iters-000/b", "iters-001/a"):
        _call(path, key, 1)
    assert _call(path, "iters-000/a", 2) == 10  # judged stale, the saved result returned
    assert _call(path, "iters-001/a", 2) == 10
    assert _listed(path) == ["iters-000/a", "iters-001/a"]
    assert _report_stale(path) == ["iters-000/a", "iters-001/a"]
    # The fix: remove one and run it again; remove the other for good.
    assert cli("load", path, "-", "rm", "iters-000/a", "--yes").code == 0
    assert _call(path, "iters-000/a", 2) == 20
    assert cli("load", path, "-", "rm", "iters-001/a", "--yes").code == 0
    assert _listed(path) == []
    assert _report_stale(path) == []
    with open_store(path, readonly=True) as store:
        assert _ops.stale_now(store) == {}
        assert sum(len(r["stale_keys"]) for r in store.iter_runs()) == 2  # the history is kept


def test_rerun_replaces_and_a_later_judgement_counts_again(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    _call(path, "k", 1)
    assert _call(path, "k", 2, stale="rerun") == 20  # judged stale and replaced in the same run
    assert _listed(path) == []
    assert _call(path, "k", 3) == 20  # judged stale again by a later run: stale now
    assert _listed(path) == ["k"]
    with open_store(path, readonly=True) as store:
        judged = _ops.stale_now(store)
        assert list(judged) == ["k"] and judged["k"] == store.iter_runs()[-1]["id"]


def test_ls_stale_with_pattern_and_verbose(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    for key in ("x/1", "y/1"):
        _call(path, key, 1)
        _call(path, key, 2)
    r = cli("load", path, "-", "ls", "--stale", "x")
    assert r.out.split() == ["x/1"]
    r = cli("load", path, "-", "ls", "--stale", "--verbose")
    assert "x/1" in r.out and "y/1" in r.out and "CREATED" in r.out
    assert cli("ls", str(tmp_path / "c.db"), "--stale", "--tree").code == 2  # one view at a time
    fresh = str(tmp_path / "fresh.db")
    _call(fresh, "z", 1)
    r = cli("load", fresh, "-", "ls", "--stale")
    assert r.code == 0 and r.out == "" and "no stale entries" in r.err
