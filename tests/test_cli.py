"""The CLI in-process: every command on every kind of store, errors, safety."""

from __future__ import annotations

import doctest
import inspect
import json
import logging
import os
import re
import sqlite3
import types
from pathlib import Path

import pytest

from ai2_kit.core.checkpoint import _display, _ops
from ai2_kit.core.checkpoint import _main as main_module
from ai2_kit.core.checkpoint import cli as cli_module
from ai2_kit.core.checkpoint._cli._commands import COMMANDS
from ai2_kit.core.checkpoint._cli._declare import build_parser
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, open_store
from helpers_cli import (
    AFTER_RM_DEEPMD,
    KEYS,
    KINDS,
    Bomb,
    TTYInput,
    cli,
    copy_fixtures,
    make_store,
    open_for_check,
    value_of,
    write_reference_dir,
    write_reference_file,
)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- the seed's three lines ------
@pytest.mark.parametrize("kind", KINDS)
def test_seed_lines(tmp_path: Path, kind: str) -> None:
    path = str(make_store(tmp_path, kind))

    r = cli("load", path, "-", "ls")
    assert r.code == 0, r.err
    assert r.out.splitlines() == sorted(KEYS)

    r = cli("load", path, "-", "ls", "--verbose")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["CREATED", "DURATION", "SIZE"]
    assert [ln.split()[4] for ln in lines[1:]] == sorted(KEYS)
    if kind != "reference-dir":  # per-key reference files are not unpickled for ls
        assert "step_red" in r.out or "step" in r.out

    r = cli("load", path, "-", "rm", "iters-000/deepmd")
    assert r.code == 0, r.err
    assert "Removed 2 entries" in r.out
    assert cli("load", path, "-", "ls").out.splitlines() == AFTER_RM_DEEPMD


@pytest.mark.parametrize("kind", KINDS)
def test_conventional_forms_match_chained(tmp_path: Path, kind: str) -> None:
    path = str(make_store(tmp_path, kind))
    assert cli("ls", path).out == cli("load", path, "-", "ls").out
    assert cli("ls", path, "iters-000/*", "-v").out == cli("load", path, "-", "ls", "iters-000/*", "-v").out
    assert cli("show", path, "time_consuming_step").out == cli("load", path, "-", "show",
                                                               "time_consuming_step").out
    r = cli("rm", path, "iters-001", "--yes")
    assert r.code == 0 and "Removed 1 entry" in r.out
    assert "iters-001/lammps" not in cli("ls", path).out


def test_odd_paths_reach_the_store_as_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spaced = make_store(tmp_path, "sqlite", name="my store #1.db")
    assert cli("load", str(spaced), "-", "ls").out.splitlines() == sorted(KEYS)
    dashed = make_store(tmp_path, "directory", name="-dashed")
    monkeypatch.chdir(tmp_path)
    assert cli("load", "--path=-dashed", "-", "ls").out.splitlines() == sorted(KEYS)
    assert cli("load", "-dashed", "-", "ls").code == 2  # read as an option, said so
    assert dashed.is_dir()


def test_load_alone_prints_a_summary(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("load", path)
    assert r.code == 0
    assert r.out.splitlines()[0] == f"{path}: sqlite store, {len(KEYS)} entries"


def test_commands_chain(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("load", path, "-", "rm", "iters-000", "--yes", "-", "ls")
    assert r.code == 0, r.err
    assert r.out.splitlines()[-2:] == ["iters-001/lammps", "time_consuming_step"]


# -- ls ------
def test_ls_patterns_and_exclude(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    assert cli("ls", path, "iters-000/deepmd").out.splitlines() == [
        "iters-000/deepmd/neu", "iters-000/deepmd/red"]
    assert cli("ls", path, "iters-000/deepmd*").out.splitlines() == [
        "iters-000/deepmd-old", "iters-000/deepmd/neu", "iters-000/deepmd/red"]
    assert cli("ls", path, "*/red").out.splitlines() == ["iters-000/cp2k/red", "iters-000/deepmd/red"]
    r = cli("ls", path, "iters-000", "--exclude", "*/red", "--exclude=iters-000/deepmd-old")
    assert r.out.splitlines() == ["iters-000/cp2k/neu", "iters-000/deepmd/neu"]


def test_ls_nothing_matches_is_said_on_stderr(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("ls", path, "nope")
    assert r.code == 0 and r.out == ""
    assert "no entries match 'nope'" in r.err


def test_ls_json_has_all_metadata(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    rows = [json.loads(line) for line in cli("ls", path, "--json").out.splitlines()]
    assert [r["key"] for r in rows] == sorted(KEYS)
    for row in rows:
        assert row["fn_name"] == "write_library_store.<locals>.step"
        assert row["size"] > 0 and row["duration"] >= 0 and row["created"] > 0
        assert ":" in row["call_site"]


def test_ls_tree_counts_and_depth(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    lines = cli("ls", path, "--tree").out.splitlines()
    assert lines[0].startswith(path) and "7 entries" in lines[0]
    iters0 = next(ln for ln in lines if ln.strip().startswith("iters-000/"))
    assert "5 entries" in iters0
    assert any(ln.startswith("      red") for ln in lines)  # level 3
    shallow = cli("ls", path, "--tree", "--depth", "1").out.splitlines()
    assert [ln.split()[0] for ln in shallow[1:]] == ["iters-000/", "iters-001/", "time_consuming_step"]


def test_ls_verbose_of_a_reference_dir_needs_no_unpickling(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "reference-dir"))
    r = cli("ls", path, "--verbose")
    assert "(reference 2024 file)" in r.out


def test_values_reach_the_store_as_typed(tmp_path: Path) -> None:
    """No conversion: python-fire, used before, read 1_000 as 1000, [ab] as a list and a#b as 'a'."""
    keys = ["a", "a#b", "1_000", "True", "[ab]", "-dash", "x,y"]
    path = str(make_store(tmp_path, "sqlite", keys))
    assert cli("ls", path, "1_000").out.splitlines() == ["1_000"]
    assert cli("ls", path, "True").out.splitlines() == ["True"]
    assert cli("ls", path, "x,y").out.splitlines() == ["x,y"]
    assert cli("ls", path, "--pattern=-dash").out.splitlines() == ["-dash"]
    r = cli("rm", path, "a#b", "--yes")
    assert r.code == 0 and "Removed 1 entry" in r.out
    with open_for_check(Path(path)) as s:
        assert "a" in s and "a#b" not in s
    r = cli("show", path, "[ab]")  # a glob character, but show takes a key
    assert r.code == 0 and "[ab]" in r.out


# -- show ------
def test_show_metadata_and_value(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("load", path, "-", "show", "iters-000/deepmd/red")
    assert r.code == 0, r.err
    fields = dict(line.split(None, 1) for line in r.out.splitlines() if not line.startswith("call site"))
    assert fields["key"] == "iters-000/deepmd/red"
    assert fields["function"] == "write_library_store.<locals>.step"
    assert "crc32" in fields and "created" in fields and "duration" in fields
    assert not any(line.startswith("value") for line in r.out.splitlines())
    r = cli("load", path, "-", "show", "iters-000/deepmd/red", "--value")
    assert repr(value_of("iters-000/deepmd/red")) in r.out
    r = cli("show", path, "iters-000/deepmd/red", "--json", "--value")
    record = json.loads(r.out)
    assert record["key"] == "iters-000/deepmd/red" and record["value_repr"] == repr(value_of(record["key"]))


def test_show_of_a_missing_key_points_below(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("show", path, "iters-000/deepmd")
    assert r.code == 1
    line = one_error_line(r.err)
    assert "no entry 'iters-000/deepmd'" in line and "2 entries below it" in line
    r = cli("show", path, "zzz")
    assert r.code == 1 and "no entry 'zzz'" in one_error_line(r.err)


def test_show_reference_entries(tmp_path: Path) -> None:
    for kind in ("reference-file", "reference-dir"):
        path = str(make_store(tmp_path / kind, kind))
        r = cli("show", path, "iters-000/deepmd/red", "--value")
        assert r.code == 0, r.err
        assert "awaitable     True" in r.out
        assert repr(value_of("iters-000/deepmd/red")) in r.out


# -- rm ------
def test_rm_prefix_is_not_a_string_prefix(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "directory"))
    r = cli("rm", path, "iters-000/deepmd")
    assert r.out.splitlines()[:2] == ["removed iters-000/deepmd/neu", "removed iters-000/deepmd/red"]
    with open_for_check(Path(path)) as s:
        assert s.keys() == AFTER_RM_DEEPMD


def test_rm_glob_exclude_and_dry_run(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("rm", path, "iters-000/*", "--exclude", "*/neu", "--dry-run")
    assert r.code == 0
    assert r.out.splitlines() == ["Would remove 3 entries from " + path + ":",
                                  "  iters-000/cp2k/red", "  iters-000/deepmd-old", "  iters-000/deepmd/red"]
    with open_for_check(Path(path)) as s:
        assert len(s) == len(KEYS)
    cli("rm", path, "iters-000/*", "--exclude", "*/neu", "-y")
    with open_for_check(Path(path)) as s:
        assert s.keys() == ["iters-000/cp2k/neu", "iters-000/deepmd/neu", "iters-001/lammps",
                            "time_consuming_step"]


def test_rm_matching_nothing_is_not_an_error(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("rm", path, "iters-009")
    assert r.code == 0
    assert r.out.strip() == f"No entries matching 'iters-009' in {path}; nothing removed."


def test_rm_asks_on_a_terminal(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("load", path, "-", "rm", "iters-000/deepmd", stdin=TTYInput("n\n"))
    assert r.code == 1
    assert "About to remove 2 entries" in r.err and "Remove them? [y/N]" in r.err
    assert "nothing removed" in r.err
    with open_for_check(Path(path)) as s:
        assert len(s) == len(KEYS)
    r = cli("load", path, "-", "rm", "iters-000/deepmd", stdin=TTYInput(""))  # EOF: no
    assert r.code == 1
    r = cli("load", path, "-", "rm", "iters-000/deepmd", stdin=TTYInput("y\n"))
    assert r.code == 0 and "Removed 2 entries" in r.out
    with open_for_check(Path(path)) as s:
        assert s.keys() == AFTER_RM_DEEPMD


def test_rm_lists_long_selections_shortened(tmp_path: Path) -> None:
    keys = [f"iters-{i:03d}/step" for i in range(40)]
    path = str(make_store(tmp_path, "sqlite", keys))
    r = cli("rm", path, "*", "--dry-run")
    lines = r.out.splitlines()
    assert lines[0] == f"Would remove 40 entries from {path}:"
    assert "  ... (25 more) ..." in lines
    assert len(lines) == 1 + 10 + 1 + 5 and lines[-1] == "  iters-039/step"


def test_rm_reference_file_rewrites_it_with_a_backup(tmp_path: Path) -> None:
    """Removing from a 2023 file keeps it a 2023 file, rewritten without unpickling (issue 10)."""
    path = make_store(tmp_path, "reference-file")
    original = path.read_bytes()
    r = cli("rm", str(path), "iters-000/deepmd")
    assert r.code == 0, r.err
    line = one_error_line(r.err)
    assert "warning" in line and ".legacy-" in line and "without unpickling" in line
    backups = list(tmp_path.glob("checkpoint.pkl.legacy-*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == original
    assert path.read_bytes()[:1] == b"\x80"  # still the reference's format
    with open_store(str(path), readonly=True) as s:
        assert s.kind == "legacy-file" and s.keys() == AFTER_RM_DEEPMD
        hit = s.lookup("time_consuming_step")
        assert hit is not None and hit.value == value_of("time_consuming_step")


def test_rm_dry_run_of_a_reference_file_changes_nothing(tmp_path: Path) -> None:
    path = make_store(tmp_path, "reference-file")
    before = path.read_bytes()
    assert cli("rm", str(path), "*", "-n").code == 0
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.bak"))


# -- nothing is unpickled by ls, show (metadata) and rm ------
@pytest.mark.parametrize("kind", ["sqlite", "directory", "reference-dir", "postgres"])
def test_listing_showing_removing_never_unpickle(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    location: Path | str = tmp_path / "store"
    cleanup = None
    if kind == "postgres":
        import uuid

        from conftest import _drop_pg_schema, pg_url_or_skip

        url, schema = pg_url_or_skip(), "t_cli_" + uuid.uuid4().hex[:10]
        location = f"{url}{'&' if '?' in url else '?'}schema={schema}"
        cleanup = (_drop_pg_schema, url, schema)
    if kind == "reference-dir":
        write_reference_dir(location, {
            "bomb": {"return": Bomb(str(marker)), "is_awaitable": False,
                     "info": {"fn_name": "f", "call_site": "x.py:1"}},
            "other/bomb": {"return": Bomb(str(marker)), "is_awaitable": False,
                           "info": {"fn_name": "f", "call_site": "x.py:1"}},
        })
    else:
        with open_store(str(location), prefer="dir" if kind == "directory" else "file") as s:
            s.put("bomb", Bomb(str(marker)), fn_name="f")
            s.put("other/bomb", Bomb(str(marker)), fn_name="f")
    try:
        assert not marker.exists()
        for argv in (["ls"], ["ls", "-v"], ["ls", "--json"], ["ls", "--tree"], ["ls", "bomb"],
                     ["show", "bomb"], ["show", "bomb", "--json"], ["rm", "other", "--dry-run"],
                     ["verify"], ["rm", "other", "--yes"]):
            r = cli("load", str(location), "-", *argv)
            assert r.code == 0, (argv, r.err)
            assert not marker.exists(), f"{argv} unpickled a value"
        # The control: --value does unpickle, so the bomb is live.
        assert cli("load", str(location), "-", "show", "bomb", "--value").code == 0
        assert marker.exists()
    finally:
        if cleanup is not None:
            cleanup[0](cleanup[1], cleanup[2])


# -- verify ------
@pytest.mark.parametrize("kind", ["sqlite", "directory"])
def test_verify_finds_damage_and_salvages(tmp_path: Path, kind: str) -> None:
    path = make_store(tmp_path, kind, name="store")
    r = cli("verify", str(path))
    assert r.code == 0 and f"{len(KEYS)} entries checked, 0 damaged." in r.out
    # Flip a byte of one stored value.
    if kind == "directory":
        victim = path / "time_consuming_step.ckpt"
        data = bytearray(victim.read_bytes())
        data[-3] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        conn = sqlite3.connect(path)
        (blob,) = conn.execute("SELECT value FROM entries WHERE key='time_consuming_step'").fetchone()
        data = bytearray(blob)
        data[-3] ^= 0xFF
        conn.execute("UPDATE entries SET value=? WHERE key='time_consuming_step'", (bytes(data),))
        conn.commit()
        conn.close()
    r = cli("load", str(path), "-", "verify")
    assert r.code == 1
    assert "1 damaged" in r.out and "damaged: time_consuming_step: " in r.out
    assert "--salvage NEW" in one_error_line(r.err)
    new = tmp_path / "salvaged"
    r = cli("verify", str(path), "--salvage", str(new))
    assert r.code == 0 and f"Salvaged {len(KEYS) - 1} entries" in r.out
    assert "not salvaged: time_consuming_step" in r.err
    with open_for_check(new) as s:
        assert s.keys() == sorted(set(KEYS) - {"time_consuming_step"})
    r = cli("verify", str(path), "--salvage", str(new))
    assert r.code == 1 and "already exists" in one_error_line(r.err)


def test_verify_checks_entries_that_migrate_wrote(tmp_path: Path) -> None:
    path = make_store(tmp_path, "reference-dir")
    assert cli("migrate", str(path)).code == 0
    victim = path / "time_consuming_step.ckpt"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = cli("verify", str(path))
    assert r.code == 1 and "damaged: time_consuming_step" in r.out


# -- migrate ------
def test_migrate_reference_file(tmp_path: Path) -> None:
    path = make_store(tmp_path, "reference-file")
    original = path.read_bytes()
    r = cli("load", str(path), "-", "migrate")
    assert r.code == 0, r.err
    assert r.err == ""  # the report says it all; no duplicate warning
    assert f"converted and verified: {len(KEYS)} entries" in r.out
    backup = next(tmp_path.glob("checkpoint.pkl.legacy-*.bak"))
    assert backup.read_bytes() == original and str(backup) in r.out
    with SQLiteStore(str(path), readonly=True) as s:
        assert s.keys() == sorted(KEYS)
        for key in KEYS:
            hit = s.lookup(key)
            assert hit is not None and hit.value == value_of(key)
            assert hit.meta["fn_name"] == "step_" + key.split("/")[-1]
            assert hit.meta["is_awaitable"] is (key == "iters-000/deepmd/red")
    r = cli("migrate", str(path))
    assert r.code == 0 and "already in this project's format" in r.out


def test_migrate_reference_dir(tmp_path: Path) -> None:
    path = make_store(tmp_path, "reference-dir")
    with DirectoryStore(str(path)) as s:  # one entry already in our format
        s.put("ours", 1, fn_name="g")
    r = cli("migrate", str(path))
    assert r.code == 0, r.err
    assert f"converted and verified: {len(KEYS)} entries" in r.out
    assert "already in this format: 1 entry" in r.out
    backup = next(tmp_path.glob("checkpoint.pkl.legacy-*.bak"))
    assert (backup / "iters-000" / "deepmd" / "red").is_file()
    assert not (path / "iters-000" / "deepmd" / "red").exists()  # rewritten as .ckpt
    with DirectoryStore(str(path), readonly=True) as s:
        assert s.keys() == sorted([*KEYS, "ours"])
        for key in KEYS:
            hit = s.lookup(key)
            assert hit is not None and hit.value == value_of(key)
            assert hit.meta["fn_name"] == "step_" + key.split("/")[-1]
            assert "crc32" in hit.meta
        assert s.get_meta("iters-000/deepmd/red")["is_awaitable"] is True  # type: ignore[index]
    assert "already in this project's format" in cli("migrate", str(path)).out


def test_migrate_reports_an_unreadable_entry_and_keeps_it(tmp_path: Path) -> None:
    path = make_store(tmp_path, "reference-dir")
    broken = path / "iters-001" / "lammps"
    broken.write_bytes(broken.read_bytes()[:10])  # a pickle head, then truncated
    r = cli("migrate", str(path))
    assert r.code == 1
    assert f"converted and verified: {len(KEYS) - 1} entries" in r.out
    assert "not converted: iters-001/lammps" in r.err
    assert broken.exists()
    assert (next(tmp_path.glob("checkpoint.pkl.legacy-*.bak")) / "iters-001" / "lammps").exists()


def test_migrate_leaves_current_stores_alone(tmp_path: Path) -> None:
    for kind in ("sqlite", "directory"):
        path = make_store(tmp_path / kind, kind)
        r = cli("migrate", str(path))
        assert r.code == 0 and "nothing to migrate" in r.out
    assert not list(tmp_path.rglob("*.bak"))


# -- the shared reference fixtures, when present ------
def test_shared_reference_fixtures(tmp_path: Path) -> None:
    root = copy_fixtures(tmp_path)
    if root is None:
        pytest.skip("the shared fixtures are not on this machine")
    manifest = json.loads((root / "manifest.json").read_text())
    for name in ("file-era.pkl", "dir-era"):
        path = str(root / name)
        assert cli("load", path, "-", "ls").out.splitlines() == sorted(manifest)
        assert cli("load", path, "-", "ls", "--verbose").code == 0
        r = cli("load", path, "-", "rm", "iters-000/deepmd")
        assert r.code == 0 and "Removed 2 entries" in r.out
        expect = sorted(k for k in manifest if not k.startswith("iters-000/deepmd/"))
        assert cli("load", path, "-", "ls").out.splitlines() == expect
        r = cli("migrate", path)
        assert r.code == 0, r.err
        with open_for_check(Path(path)) as s:
            for key in expect:
                hit = s.lookup(key)
                assert hit is not None and repr(hit.value) == manifest[key]


# -- errors: one line, a path or word, a way out, no traceback ------
def test_missing_store_is_not_created(tmp_path: Path) -> None:
    for argv in (["ls"], ["rm", "x", "--yes"], ["show", "x"], ["migrate"]):
        r = cli("load", str(tmp_path / "nope.pkl"), "-", *argv)
        assert r.code == 1
        line = one_error_line(r.err)
        assert "nope.pkl" in line and "no such file" in line and "Check the path" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"hello, not a store\n", b"\x80\x04garbage"])
def test_not_a_store(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "thing.pkl"
    path.write_bytes(content)
    for argv in (["ls"], ["rm", "x"], ["migrate"]):
        r = cli("load", str(path), "-", *argv)
        assert r.code == 1
        assert str(path) in one_error_line(r.err)
    assert path.read_bytes() == content


def test_sqlite_file_of_another_application(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    r = cli("ls", str(path))
    assert r.code == 1 and "another application" in one_error_line(r.err)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    db = make_store(tmp_path / "a", "sqlite")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version=7")
    conn.commit()
    conn.close()
    folder = make_store(tmp_path / "b", "directory")
    (folder / ".ai2-kit-checkpoint").write_text('{"format": 9, "created_by": "9.0"}')
    for path in (db, folder):
        for argv in (["ls"], ["show", "time_consuming_step"], ["rm", "iters-000", "--yes"], ["migrate"]):
            r = cli("load", str(path), "-", *argv)
            assert r.code == 1, (path, argv)
            line = one_error_line(r.err)
            assert str(path) in line and "newer" in line and "pip install -U ai2-kit-checkpoint" in line
    with DirectoryStore(str(folder), readonly=True) as s:
        assert len(s) == len(KEYS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything; the subprocess test covers it")
def test_permission_denied(tmp_path: Path) -> None:
    path = make_store(tmp_path, "sqlite")
    path.chmod(0)
    try:
        r = cli("ls", str(path))
    finally:
        path.chmod(0o644)
    assert r.code == 1 and "permission denied" in one_error_line(r.err)


@pytest.mark.parametrize(
    "argv, word",
    [
        (["load", "F", "-", "frob"], "'frob'"),
        (["frob"], "'frob'"),
        (["load", "F", "-", "ls", "--frob"], "'--frob'"),
        (["load", "F", "-", "ls", "a", "b"], "'b'"),
        (["load", "F", "-", "rm"], "PATTERN"),
        (["ls"], "needs a store"),
        (["load", "F", "-"], "missing after '-'"),
        (["load", "F", "-", "ls", "--", "--interactive"], "'--'"),
        (["load", "F", "-", "ls", "--depth", "2"], "--depth goes with --tree"),
        (["load", "F", "-", "ls", "--tree", "--depth", "x"], "'x'"),
        (["load", "F", "-", "ls", "--verbose=maybe"], "'maybe'"),
        (["load", "F", "-", "rm", "x", "--exclude"], "--exclude needs a value"),
        (["load", "F", "-", "rm", "x", "-y", "-n"], "choose one"),
    ],
)
def test_usage_errors(argv: list[str], word: str) -> None:
    r = cli(*argv)
    assert r.code == 2
    assert word in one_error_line(r.err)
    assert r.out == ""


def test_rm_of_a_read_only_store_is_one_line(tmp_path: Path) -> None:
    folder = make_store(tmp_path, "directory")
    store = cli_module.CheckpointTool  # the class is public for scripts that want it
    assert store is not None
    # A directory store whose marker is unreadable is "not a checkpoint store".
    (folder / ".ai2-kit-checkpoint").write_text("{not json")
    r = cli("rm", str(folder), "iters-000", "--yes")
    assert r.code == 1 and "marker" in one_error_line(r.err)


# -- help ------
@pytest.mark.parametrize("command", ["load", "ls", "show", "rm", "verify", "migrate"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    for argv in ([command, "--help"], ["load", "F", "-", command, "-h"], ["help", command]):
        r = cli(*argv)
        assert r.code == 0 and r.err == ""
        assert r.out.startswith("usage: ai2-kit tool checkpoint")
        examples = r.out.split("examples:\n", 1)[1].splitlines()
        assert any(line.startswith("  ai2-kit tool checkpoint ") and f" {command}" in line for line in examples)


def test_group_help() -> None:
    for argv in ([], ["--help"], ["-h"]):
        r = cli(*argv)
        assert r.code == 0
        assert "load ./path/to/checkpoint.pkl - rm \"iters-000/deepmd\"" in r.out
        for name in ("load", "ls", "show", "rm", "verify", "migrate"):
            assert f"  {name} " in r.out


def test_main_is_a_command_group(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main_module.main(["--help"]) == 0
    assert "tool" in capsys.readouterr().out
    assert main_module.main(["tool"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    assert main_module.main(["nope"]) == 2
    assert "unknown command 'nope'" in one_error_line(capsys.readouterr().err)
    assert main_module.main(["tool", "nope"]) == 2
    assert "unknown tool 'nope'" in one_error_line(capsys.readouterr().err)
    path = str(make_store(tmp_path, "sqlite"))
    assert main_module.main(["tool", "checkpoint", "load", path, "-", "ls"]) == 0
    assert capsys.readouterr().out.splitlines() == sorted(KEYS)


def test_run_leaves_logging_as_it_found_it(tmp_path: Path) -> None:
    logger = logging.getLogger("ai2_kit")
    before = (list(logger.handlers), logger.propagate)
    cli("rm", str(make_store(tmp_path, "reference-file")), "x")
    assert (list(logger.handlers), logger.propagate) == before


# -- the library functions behind the commands ------
@pytest.mark.parametrize("module", [_ops, _display], ids=["_ops", "_display"])
def test_ops_doctests(module: types.ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_ops_select_remove_tree(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "c.db")) as s:
        for key in KEYS:
            s.put(key, value_of(key), fn_name="f")
        assert [m["key"] for m in _ops.select(s, "iters-000", exclude=["*/red", "*old"])] == [
            "iters-000/cp2k/neu", "iters-000/deepmd/neu"]
        with pytest.raises(ValueError):
            _ops.remove(s, "")
        assert _ops.remove(s, "iters-000/cp2k") == ["iters-000/cp2k/neu", "iters-000/cp2k/red"]
        assert _ops.remove(s, "zzz") == []
        t = _ops.tree(_ops.iter_select(s))
        assert t.count == len(KEYS) - 2 and t.size == sum(m["size"] for m in s.iter_meta())
        assert {n.name: n.count for _, n in t.walk(depth=1)} == {
            "iters-000": 3, "iters-001": 1, "time_consuming_step": 1}


def test_ops_open_existing_refuses_to_create(tmp_path: Path) -> None:
    from ai2_kit.core.checkpoint import StoreOpenError

    with pytest.raises(StoreOpenError, match="no such file"):
        _ops.open_existing(tmp_path / "x.db")
    assert not (tmp_path / "x.db").exists()


def test_format_helpers() -> None:
    assert _display.format_size(0) == "0 B" and _display.format_size(1536) == "1.5 KiB"
    assert _display.format_size(5 * 1024**3) == "5.0 GiB" and _display.format_size(None) == "-"
    assert _display.format_duration(1.234) == "1.23s" and _display.format_duration(75) == "1m15s"
    assert _display.format_duration(7325) == "2h02m" and _display.format_duration(None) == "-"


def test_reference_file_written_by_hand_lists(tmp_path: Path) -> None:
    """A 2023 file whose records lack 'info' still lists (fields shown as '-')."""
    path = write_reference_file(tmp_path / "f.pkl", {"k": {"return": 1}})
    r = cli("ls", str(path), "-v")
    assert r.code == 0 and r.out.splitlines()[1].split()[4:] == ["k", "-", "-"]


# -- PostgreSQL, when a server is given ------
def test_seed_lines_on_postgres() -> None:
    import uuid

    from conftest import _drop_pg_schema, pg_url_or_skip

    url = pg_url_or_skip()
    schema = "t_cli_" + uuid.uuid4().hex[:10]
    location = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    with open_store(location) as s:
        for key in KEYS:
            s.put(key, value_of(key), fn_name="f", call_site="w.py:1", duration=1.0)
    try:
        assert cli("load", location, "-", "ls").out.splitlines() == sorted(KEYS)
        assert cli("load", location, "-", "ls", "--verbose").code == 0
        r = cli("load", location, "-", "rm", "iters-000/deepmd")
        assert r.code == 0 and "Removed 2 entries" in r.out
        assert cli("load", location, "-", "ls").out.splitlines() == AFTER_RM_DEEPMD
        assert "nothing to migrate" in cli("migrate", location).out
    finally:
        _drop_pg_schema(url, schema)
    r = cli("load", f"{url}{'&' if '?' in url else '?'}schema=t_cli_absent", "-", "ls")
    assert r.code == 1 and "t_cli_absent" in one_error_line(r.err)


# -- the parser: each option declared once, shown in the help, with its --no- form ------
SAMPLE_ARGS = {"load": [], "ls": [], "show": ["k"], "rm": ["k"], "verify": [], "copy": ["D"], "migrate": []}


@pytest.mark.parametrize("command", list(SAMPLE_ARGS))
def test_every_option_in_the_help_is_accepted(command: str) -> None:
    text = cli_module.command_help(command)
    rows = re.findall(r"^  (-\S.*?)  ", text.split("options:\n", 1)[1], re.M) if "options:\n" in text else []
    if command not in ("load", "migrate", "verify"):
        assert rows, text
    head = ["load", "F", "-", command, *SAMPLE_ARGS[command]] if command != "load" else ["load"]
    for row in rows:
        for form in (f.strip() for f in row.split(",")):
            name, _, metavar = form.partition(" ")
            name, _, value = name.partition("=")
            if name.startswith("--[no-]"):
                on = cli_module.parse([*head, "--" + name[7:]]).steps[-1].kwargs
                off = cli_module.parse([*head, "--" + name[7:], "--no-" + name[7:]]).steps[-1].kwargs
                assert [k for k, v in on.items() if v is True] and on != off, (form, on, off)
            elif name.startswith("-") and not (metavar or value):
                assert cli_module.parse([*head, name]).steps, form
            else:
                extra = {"--depth": ["--tree"], "--by": ["--from", "k"]}.get(name, [])
                sample = "key" if name == "--by" else "2"  # an option with a fixed set of values
                # The --NAME=VALUE form of a positional replaces it.
                base = head[:4] if {"show": "--key", "rm": "--pattern", "copy": "--dest"}.get(command) == name else head
                kwargs = cli_module.parse([*base, f"{name}={sample}", *extra]).steps[-1].kwargs
                assert any(v in (sample, 2, [sample]) for v in kwargs.values()), (form, kwargs)


def test_every_declared_argument_is_a_parameter_of_its_command() -> None:
    """What the parser hands a command is exactly what the method that runs it takes."""
    assert list(COMMANDS)[:2] == ["load", "ls"] and len(COMMANDS) == 9
    for name, declared in COMMANDS.items():
        parser, _ = build_parser(declared, "prog", with_store=False)
        dests = {a.dest for a in parser._actions} - {f"{a.dest}_option" for a in declared.args}
        params = set(inspect.signature(getattr(cli_module.CheckpointTool, name)).parameters) - {"self"}
        assert dests == params, name


def test_flags_switch_off_again(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    assert cli("ls", path, "--verbose", "--no-verbose").out == cli("ls", path).out
    r = cli("rm", path, "iters-000", "--dry-run", "--no-dry-run", "--yes")
    assert r.code == 0 and "Removed 5 entries" in r.out


def test_the_whole_line_is_checked_before_anything_runs(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    r = cli("load", path, "-", "rm", "iters-000", "--yes", "-", "ls", "--frob")
    assert r.code == 2 and "'--frob'" in one_error_line(r.err) and r.out == ""
    assert cli("ls", path).out.splitlines() == sorted(KEYS)  # nothing was removed
