"""Issue 23: run records, names and outputs held to the trust boundary; no secret in a run record.

Each numbered case of the issue has its tests here, on real stores (SQLite,
directory and PostgreSQL where the case applies), through the command line
as users type it. ``test_fuzz_records`` fills records with random types and
values for every command that reads them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from ai2_kit.core.checkpoint import Checkpointer, _runs
from ai2_kit.core.checkpoint._main import checkpoint_main, main
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store
from ai2_kit.core.checkpoint.stores._base import library_version
from conftest import location_for, open_kind
from helpers_cli import Result, cli, record, write_reference_dir

# -- helpers -------------------------------------------------------------------------------

#: What must never reach a terminal or the report raw: C0 (but newline in
#: multi-line output), DEL, C1, bidi controls, separators, lone surrogates.
_RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
                  "\ud800-\udfff]")


def clean_exit(r: Result, what: object) -> None:
    """Exit 0, or 1 with one error line (warnings aside); never a traceback; nothing raw printed."""
    assert "Traceback" not in r.out + r.err, (what, r)
    assert r.code in (0, 1), (what, r)
    errors = [line for line in r.err.splitlines() if ": warning: " not in line]
    if r.code == 1:
        assert len(errors) == 1, (what, r)
    assert not _RAW.search(r.out) and not _RAW.search(r.err), (what, r)


def json_lines(text: str) -> list[Any]:
    """Every line parsed as strict JSON (NaN and Infinity are not JSON)."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON: {text!r}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def cli_location(kind: str, location: str, options: dict[str, Any]) -> str:
    """The store as the command line names it (a PostgreSQL schema goes in the URL)."""
    if kind != "postgres":
        return location
    return location + ("&" if "?" in location else "?") + "schema=" + options["schema"]


def _meta_text(meta: dict[str, Any]) -> str:
    """A metadata record as the stores write it (checksummed), with whatever fields it is given."""
    body = json.dumps(meta, sort_keys=True, separators=(",", ":"))  # NaN allowed: a crafted record
    # "__DEEP<n>__" stands for a value nested n lists deep (json.dumps itself would recurse too deep).
    body = re.sub(r'"__DEEP(\d+)__"', lambda m: "[" * int(m.group(1)) + "1" + "]" * int(m.group(1)), body)
    crc = zlib.crc32(body.encode("utf-8"))
    return f'{{"_crc":"{crc:08x}",{body[1:]}' if body != "{}" else f'{{"_crc":"{crc:08x}"}}'


def plant_meta(store: Store, kind: str, key: str, fields: dict[str, Any]) -> None:
    """Replace the fields of ``key``'s metadata record, below the store's API (as a crafted file would)."""
    meta = dict(store.get_meta(key) or {}, **fields)
    text = _meta_text(meta)
    if kind == "sqlite":
        with sqlite3.connect(store.path) as conn:  # type: ignore[attr-defined]
            conn.execute("UPDATE entries SET meta = ? WHERE key = ?", (text, key))
        conn.close()
    elif kind == "directory":
        path = store._path(key)  # type: ignore[attr-defined]
        data = Path(path).read_bytes()
        (n,) = __import__("struct").unpack_from("<I", data, 4)
        new = text.encode("utf-8")
        Path(path).write_bytes(data[:4] + len(new).to_bytes(4, "little") + new + data[8 + n:])
    else:
        import psycopg

        with psycopg.connect(store._conninfo, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute(f'UPDATE "{store.schema}".entries SET meta = %s WHERE key = %s',  # type: ignore[attr-defined]
                         (text, key))


def plant_run_text(store: Store, kind: str, run_id: str, text: str) -> None:
    """Put ``text`` as a run record's stored JSON, whatever it holds."""
    store.put_run({"id": run_id})  # creates the table or folder
    if kind == "sqlite":
        with sqlite3.connect(store.path) as conn:  # type: ignore[attr-defined]
            conn.execute("INSERT OR REPLACE INTO runs (id, record) VALUES (?, ?)", (run_id, text))
        conn.close()
    elif kind == "directory":
        Path(store.root, ".runs", run_id + ".json").write_text(text)  # type: ignore[attr-defined]
    else:
        import psycopg

        with psycopg.connect(store._conninfo, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute(f'UPDATE "{store.schema}".runs SET record = %s WHERE id = %s',  # type: ignore[attr-defined]
                         (text, run_id))


def run_in_thread(fn: Callable[[], Result], deadline: float = 60.0) -> Result:
    """``fn()`` in a thread, failing the test if it has not returned by the deadline (a hang guard)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        pytest.fail("the command blocked")
    return out[0]  # type: ignore[no-any-return]


def all_readers(loc: str, key: str, tmp_path: Path) -> dict[str, Result]:
    """Every command that reads records, on ``loc``."""
    page = tmp_path / f"report-{len(os.listdir(tmp_path))}.html"
    return {
        "runs": cli("runs", loc),
        "runs --json": cli("runs", loc, "--json"),
        "report": cli("report", loc, str(page)),
        "ls": cli("ls", loc),
        "ls -v": cli("ls", loc, "-v"),
        "ls --json": cli("ls", loc, "--json"),
        "ls --tree": cli("ls", loc, "--tree"),
        "show": cli("show", loc, key),
        "show --json": cli("show", loc, key, "--json"),
        "rm --from --dry-run": cli("rm", loc, "--from", key, "--dry-run"),
        "verify": cli("verify", loc),
    }


# -- 1. special files in a directory store's .runs/ -----------------------------------------
def test_special_files_in_runs_are_skipped_with_a_warning(tmp_path: Path) -> None:
    loc = tmp_path / "d"
    with DirectoryStore(str(loc)) as s:
        s.put("k", 1)
        s.put_run({"id": "good", "started": 1.0, "hits": 1})
    runs = loc / ".runs"
    os.mkfifo(runs / "fifo.json")
    os.symlink("/dev/zero", runs / "zero.json")
    elsewhere = tmp_path / "other.json"
    elsewhere.write_text(json.dumps({"id": "planted", "started": 2.0, "hits": 5}))
    os.symlink(elsewhere, runs / "planted.json")
    (runs / "folder.json").mkdir()
    with open(runs / "huge.json", "wb") as f:
        f.truncate(17 << 20)  # sparse: beyond the bound without using the disk
    r = run_in_thread(lambda: cli("runs", str(loc), "--json"))
    assert r.code == 0 and [run["id"] for run in json_lines(r.out)] == ["good"], r
    warnings = r.err.splitlines()
    for name, why in [("fifo.json", "FIFO"), ("zero.json", "symbolic link"), ("planted.json", "symbolic link"),
                      ("folder.json", "directory"), ("huge.json", "bytes")]:
        assert len([w for w in warnings if name in w]) == 1 and why in r.err, (name, r.err)
    assert len(warnings) == 5 and "Traceback" not in r.err
    page = tmp_path / "r.html"
    r = run_in_thread(lambda: cli("report", str(loc), str(page)))
    assert r.code == 0 and "planted" not in page.read_text() and "good" in page.read_text()


def test_a_linked_runs_folder_gets_no_records(tmp_path: Path) -> None:
    loc = tmp_path / "d"
    with DirectoryStore(str(loc)) as s:
        s.put("k", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs.json").write_text(json.dumps({"id": "theirs", "started": 1.0}))
    os.symlink(elsewhere, loc / ".runs")
    with DirectoryStore(str(loc)) as s:
        with pytest.raises(OSError) as e:
            s.put_run({"id": "r", "started": 1.0})
        assert e.value.errno == errno.ENOTDIR and "symbolic link" in str(e.value)
    # A workflow's run record does not go there either (and the step still runs and saves).
    with Checkpointer(str(loc), prefer="dir") as ckpt:
        assert ckpt("step")(lambda: 41 + 1)() == 42
    assert os.listdir(elsewhere) == ["theirs.json"]
    r = cli("runs", str(loc), "--json")
    assert r.code == 0 and r.out == "" and "link" in r.err and len(r.err.splitlines()) == 1, r


# -- 2. report OUT never renames over anything but a regular file ------------------------------
def test_report_refuses_links_fifos_devices_and_folders(tmp_path: Path) -> None:
    loc = tmp_path / "s.db"
    with SQLiteStore(str(loc)) as s:
        s.put("k", 1)
    target = tmp_path / "target.html"
    target.write_text("mine")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.html"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.html"
    folder.mkdir()
    outs = [(link, "symbolic link"), (fifo, "FIFO"), (folder, "directory")]
    if os.geteuid() == 0:
        dev = tmp_path / "null.html"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        outs.append((dev, "character device"))
    for out, kind in outs:
        before = os.lstat(out)
        r = run_in_thread(lambda out=out: cli("report", str(loc), str(out)))  # type: ignore[misc]
        assert r.code == 1 and len(r.err.splitlines()) == 1 and kind in r.err and str(out) in r.err, r
        after = os.lstat(out)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), out
    assert target.read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    # A new name and a regular file work (the regular file is replaced).
    for out in (tmp_path / "new.html", target):
        r = cli("report", str(loc), str(out))
        assert r.code == 0 and out.read_text().startswith("<!DOCTYPE html>"), r


def test_report_with_an_empty_name_says_so(tmp_path: Path) -> None:
    loc = tmp_path / "s.db"
    with SQLiteStore(str(loc)) as s:
        s.put("k", 1)
    r = cli("report", str(loc), "")
    assert r.code == 2 and "OUT.html" in r.err and "empty" in r.err and len(r.err.splitlines()) == 1, r
    assert "Is a directory" not in r.err


# -- 3. no secret in a run record ---------------------------------------------------------------
SECRET_ARGV = [
    "wf.py", "postgresql://me:PW-URL@db/team", "--signing-key=SK-EQ", "--api-token", "TOK-SP",
    "AWS_SECRET_ACCESS_KEY=ENV-SECRET", "--db-password", "PW-OPT", "PGPASSWORD=PW-ENV",
    "--db=postgresql://u:PW-IN@h/d", "--keep", "visible", "host=db password=PW-LIBPQ dbname=x",
    "https://u:PW/WITH@AT@h/x?sslpassword=PW-QUERY&mode=1",
]
SECRETS = ["PW-URL", "SK-EQ", "TOK-SP", "ENV-SECRET", "PW-OPT", "PW-ENV", "PW-IN", "PW-LIBPQ", "PW/WITH", "AT@h",
           "PW-QUERY"]


def test_mask_argv_forms() -> None:
    masked = _runs.mask_argv(SECRET_ARGV)
    assert masked == [
        "wf.py", "postgresql://me:***@db/team", "--signing-key=***", "--api-token", "***",
        "AWS_SECRET_ACCESS_KEY=***", "--db-password", "***", "PGPASSWORD=***",
        "--db=postgresql://u:***@h/d", "--keep", "visible", "host=db password=*** dbname=x",
        "https://u:***@h/x?sslpassword=***&mode=1",
    ]
    # Names that merely contain the letters are not secrets; an option after a secret one is not its value.
    assert _runs.mask_argv(["--monkey", "m", "--keyword", "w", "--token", "--verbose"]) == \
        ["--monkey", "m", "--keyword", "w", "--token", "--verbose"]


def _record_a_run(store: Store, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    rec = _runs.RunRecorder(store)
    rec.ran(1.0)
    rec.flush()


def test_run_records_hold_no_secret(store_factory: Callable[..., Store], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kind = store_factory.kind  # type: ignore[attr-defined]
    store = store_factory()
    store.put("k", 1)
    _record_a_run(store, monkeypatch, SECRET_ARGV)
    # A record written before masking existed, verbatim: shown masked all the same.
    store.put_run({"id": "0-old", "started": 1.0, "argv": SECRET_ARGV})
    stored = json.dumps(store.iter_runs())
    assert "--api-token" in stored and "visible" in stored
    new = [r for r in store.iter_runs() if r["id"] != "0-old"]
    assert not any(s in json.dumps(new) for s in SECRETS), new
    loc = cli_location(kind, store_factory.location, store_factory.options)  # type: ignore[attr-defined]
    page = tmp_path / "r.html"
    outputs = [cli("runs", loc).out, cli("runs", loc, "--json").out]
    assert cli("report", loc, str(page)).code == 0
    outputs.append(page.read_text())
    for text in outputs:
        assert "visible" in text and "***" in text
        assert not [s for s in SECRETS if s in text], text


def test_no_command_line_recorded_when_switched_off(store_factory: Callable[..., Store],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_factory()
    monkeypatch.setenv("AI2_KIT_CHECKPOINT_ARGV", "off")  # documented in docs/security.md
    _record_a_run(store, monkeypatch, SECRET_ARGV)
    (run,) = store.iter_runs()
    assert run["argv"] is None and "wf.py" not in json.dumps(run)
    loc = cli_location(store_factory.kind, store_factory.location, store_factory.options)  # type: ignore[attr-defined]
    r = cli("runs", loc)
    assert r.code == 0 and r.out.splitlines()[1].endswith("  -"), r


# -- 4. crafted numbers and types --------------------------------------------------------------
CRAFTED_METAS: list[dict[str, Any]] = [
    {"created": 1e308, "duration": float("inf"), "size": "big"},
    {"created": float("nan"), "duration": float("nan"), "size": float("nan")},
    {"created": float("inf"), "duration": -5, "size": 10**30},
    {"created": "yesterday", "duration": [1], "size": [1, 2], "fingerprint": {"args": 5}},
    {"created": -1e308, "fingerprint": {"args": [1], "helpers": 3, "unhashable": "x", "env": {"packages": 7}}},
    {"created": 10**400 // 10**380, "duration": True, "fingerprint": 5, "is_awaitable": "maybe"},
]
CRAFTED_RUNS: list[dict[str, Any]] = [
    {"id": "r1", "started": 1e308, "last": float("nan"), "argv": 5, "stale_keys": 7, "hits": "x"},
    {"id": "r2", "started": float("inf"), "last": -1e308, "argv": [1, 2], "saved_seconds": float("inf"),
     "steps_run": [3], "pid": 10**30, "host": ["h"], "user": 5},
    {"id": "r3", "started": "now", "last": {"a": 1}, "stale_keys": [1, "k", None], "run_seconds": "x",
     "saved_seconds": float("nan"), "stale": -1, "reruns": 1.5, "save_failures": True},
    {"id": "r4", "started": float("nan"), "argv": "wf.py --x", "stale_keys": {"k": 1}},
]


def test_crafted_numbers_and_types_never_give_a_traceback(store_factory: Callable[..., Store],
                                                          tmp_path: Path) -> None:
    kind = store_factory.kind  # type: ignore[attr-defined]
    store = store_factory()
    keys = [f"k{i}" for i in range(len(CRAFTED_METAS))]
    for key, fields in zip(keys, CRAFTED_METAS):
        store.put(key, 1)
        plant_meta(store, kind, key, fields)
    for run in CRAFTED_RUNS:
        plant_run_text(store, kind, run["id"], json.dumps(run))
    loc = cli_location(kind, store_factory.location, store_factory.options)  # type: ignore[attr-defined]
    for key in keys:
        for what, r in all_readers(loc, key, tmp_path).items():
            clean_exit(r, (what, key))
            if "--json" in what:
                assert json_lines(r.out), what
            if what in ("runs", "report", "ls -v", "show", "ls --json", "runs --json"):
                assert r.code == 0, (what, key, r)
    rows = cli("runs", loc).out.splitlines()[1:]
    assert len(rows) == len(CRAFTED_RUNS) and all(" - " in row for row in rows), rows
    # Records that are not run records at all: left out, with one warning for them all.
    # Records that are not run records at all, or too big to read: left out, with one warning.
    huge = json.dumps({"id": "x5", "pad": "a" * (17 << 20)})
    for run_id, text in [("x1", "not json"), ("x2", "[1, 2]"), ("x3", '{"id": 5}'), ("x4", "[" * 100000),
                         ("x5", huge)]:
        plant_run_text(store, kind, run_id, text)
    r = cli("runs", loc)
    assert r.code == 0 and len(r.out.splitlines()) == 1 + len(CRAFTED_RUNS), r
    if kind == "directory":  # the file is skipped by size before it is read, and named
        assert len(r.err.splitlines()) == 2 and "4 run record(s)" in r.err and "x5.json" in r.err, r
    else:
        assert len(r.err.splitlines()) == 1 and "5 run record(s)" in r.err and "left out" in r.err, r


# -- 5. names: one escaping function for every field, non-UTF-8 names addressable ---------------
def test_fields_reach_the_terminal_and_the_report_escaped(store_factory: Callable[..., Store],
                                                          tmp_path: Path) -> None:
    kind = store_factory.kind  # type: ignore[attr-defined]
    store = store_factory()
    evil_key = "a\u202eb\x85c\x9b"
    store.put(evil_key, 1)
    store.put("plain", 1)
    plant_meta(store, kind, "plain", {"fn_name": "f\x1b[2J\nplain  FORGED", "call_site": "x.py:1\u202e\rY",
                                      "host": "h\nFORGED-LINE", "user": "u\x07"})
    plant_run_text(store, kind, "r1", json.dumps({"id": "r1\u202e", "host": "h\x1b]0;t\x07\nFORGED", "user": "u\n",
                                                   "started": 1.0, "last": 2.0, "argv": ["wf.py", "a\nFORGED"],
                                                   "stale_keys": ["s\u202e\x1b"]}))
    # A real step whose function's __name__ holds escape sequences and a newline.
    def step() -> int:
        return 1

    step.__name__ = step.__qualname__ = "evil\x1b[2J\nfn  FORGED"
    with Checkpointer(store=store) as ckpt:
        assert ckpt("by-fn")(step)() == 1
    store = store_factory()
    loc = cli_location(kind, store_factory.location, store_factory.options)  # type: ignore[attr-defined]
    assert "evil\\x1b[2J\\nfn  FORGED" in cli("ls", loc, "-v").out
    for key in (evil_key, "plain", "by-fn"):
        for what, r in all_readers(loc, key, tmp_path).items():
            clean_exit(r, what)
            # A newline in a field would start a line of its own: the planted text must stay inside its line.
            assert not any(line.startswith(("FORGED", "plain  FORGED", "fn  FORGED")) for line in r.out.splitlines()), \
                (what, r)
    assert cli("ls", loc).out.splitlines() == ["a\\u202eb\\u0085c\\u009b", "by-fn", "plain"]
    page = tmp_path / "page.html"
    assert cli("report", loc, str(page)).code == 0
    text = page.read_text()
    assert not _RAW.search(text) and "\\u202e" in text and "\\x1b" in text


def _non_utf8_reference_dir(tmp_path: Path) -> tuple[Path, str]:
    loc = write_reference_dir(tmp_path / "ref", {"good": record("good")})
    name = os.fsencode(str(loc)) + b"/caf\xe9"
    import cloudpickle

    with open(name, "wb") as f:
        cloudpickle.dump(record("x"), f)
    return loc, "caf\udce9"


def test_non_utf8_names_are_shown_escaped_and_addressable(tmp_path: Path) -> None:
    loc, key = _non_utf8_reference_dir(tmp_path)
    r = cli("ls", str(loc))
    assert r.code == 0 and r.out.splitlines() == ["caf\\xe9", "good"], r
    for what, res in all_readers(str(loc), "caf\\xe9", tmp_path).items():
        clean_exit(res, what)
    page = tmp_path / "page.html"
    r = cli("report", str(loc), str(page))
    assert r.code == 0 and "caf\\xe9" in page.read_text(), r
    # No key can name the file (a workflow never hits it): show, rm and verify say what removes it,
    # in a form a shell types, whether given the escaped form or the raw bytes.
    hints = []
    for argv in (["show", str(loc), "caf\\xe9"], ["rm", str(loc), "caf\\xe9", "--yes"], ["show", str(loc), key],
                 ["verify", str(loc)]):
        r = cli(*argv)
        clean_exit(r, argv)
        line = next(line for line in (r.out + r.err).splitlines() if "rm $'" in line)
        assert "caf\\xe9 is not a valid key" in line, r
        hints.append(line[line.index("rm $'"):])
    assert len(set(hints)) == 1 and hints[0] == f"rm $'{loc}/caf\\xe9'"
    assert sorted(os.listdir(os.fsencode(str(loc)))) == [b"caf\xe9", b"good"]  # nothing removed by refusing
    subprocess.run(["bash", "-c", hints[0]], check=True, timeout=60)
    assert sorted(os.listdir(os.fsencode(str(loc)))) == [b"good"]
    r = cli("verify", str(loc))
    assert r.code == 0 and "1 entry checked, 0 damaged" in r.out, r


# -- 6. the environment default is checked as documented -----------------------------------------
STEP_SCRIPT = """
import logging, os, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from ai2_kit.core.checkpoint import apply_checkpoint
print(apply_checkpoint("step")(lambda x: x + 1)(41))
print(sorted(os.listdir(".")))
"""


@pytest.mark.parametrize("description", [
    {"location": "ckpt.db", "store_options": [1, 2]},
    {"location": ""},
    {"location": "ckpt.db", "lease": "long"},
    {"location": "ckpt.db", "readonly": "yes"},
    [1, 2],
])
def test_a_wrong_environment_default_warns_once_and_the_step_runs(tmp_path: Path, description: Any) -> None:
    env = dict(os.environ, AI2_KIT_CHECKPOINT_DEFAULT=json.dumps(description))
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["42", "[]"], proc  # the step ran; nothing was created here
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "AI2_KIT_CHECKPOINT_DEFAULT" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr


# -- 7. small: --version on every entry point ------------------------------------------------------
def test_version_on_every_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    assert checkpoint_main(["--version"]) == 0
    assert capsys.readouterr().out == f"ai2-kit-checkpoint {library_version()}\n"
    assert main(["tool", "checkpoint", "--version"]) == 0
    assert capsys.readouterr().out == f"ai2-kit tool checkpoint {library_version()}\n"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ai2-kit-checkpoint {library_version()}\n"


# -- the fuzz test: random types and values in every record, every reading command ------------------
_TEXTS = ["", "-", "a\nb", "\x1b[31mred", "\x85\x9b", "\u202eevil", "x\u2028y", "caf\udce9", "%s%n", "NaN",
          "Infinity", "x" * 3000, "\x00", "é/ü", "'; DROP TABLE runs; --", "../../etc/passwd"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(12 if depth < 3 else 9)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 7, 2**31, -(2**63), 2**64, 10**200, rng.randint(-10**12, 10**12)])
    if pick == 3:
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 1.7e9, 4e9])
    if pick == 4:
        return rng.uniform(-1e10, 1e10)
    if pick in (5, 6):
        return rng.choice(_TEXTS)
    if pick in (7, 8):
        return "".join(chr(rng.choice([rng.randrange(0, 0x250), rng.randrange(0x2000, 0x2070)]))
                       for _ in range(rng.randrange(12)))
    if pick in (9, 10):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "args", "env", "packages", "python", "fn", "code", "\n"]): _value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


_META_FIELDS = ["key", "created", "duration", "size", "fn_name", "call_site", "host", "pid", "run", "is_awaitable",
                "legacy", "fingerprint", "damaged", "version", "format", "weird\nfield"]
_RUN_FIELDS = ["started", "last", "host", "pid", "user", "argv", "python", "steps_run", "hits", "stale",
               "reruns", "save_failures", "run_seconds", "saved_seconds", "stale_keys", "extra"]


def _fuzz_round(rng: random.Random, kind: str, store: Store, loc: str, tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(3)]
    for key in keys:
        store.put(key, 1)
        fields = {f: _value(rng) for f in rng.sample(_META_FIELDS, rng.randrange(1, 6))}
        if rng.random() < 0.3:
            fields["fingerprint"] = {f: _value(rng) for f in ("v", "fn", "code", "bc", "helpers", "args",
                                                                 "unhashable", "env")}
        if rng.random() < 0.05:  # nested deeper than any JSON reader recurses (written by _meta_text)
            fields[rng.choice(["fingerprint", "fn_name", "extra"])] = f"__DEEP{rng.choice([60, 900, 5000])}__"
        plant_meta(store, kind, key, fields)
    for i in range(4):
        run = {f: _value(rng) for f in rng.sample(_RUN_FIELDS, rng.randrange(0, len(_RUN_FIELDS)))}
        run["id"] = rng.choice([f"run-{i}", f"run-{i}", f"run-{i}\u202e\n", 5, None])
        text = json.dumps(rng.choice([run, run, run, [run], 5, "text"]))
        text = rng.choice([text] * 6 + [text[: len(text) // 2], "[" * 5000 + "]" * 5000, "{}"])
        plant_run_text(store, kind, f"run-{i}", text)
    for what, r in all_readers(loc, rng.choice(keys), tmp_path).items():
        clean_exit(r, (kind, what))
        if "--json" in what:
            json_lines(r.out)
        # show may refuse a record it cannot read (one line, as for any damaged entry); listings may not.
        if what in ("runs", "runs --json", "report", "ls -v", "ls --json", "ls"):
            assert r.code == 0, (kind, what, r)


#: Rounds per store kind (a third of them on PostgreSQL); scripts/stress.py --fuzz runs many more.
FUZZ_ROUNDS = int(os.environ.get("AI2_KIT_FUZZ_ROUNDS", "40"))


def test_fuzz_records(store_kind: str, tmp_path: Path) -> None:
    """Random types and values in metadata and run records: every reading command exits cleanly."""
    seed = int(os.environ.get("AI2_KIT_FUZZ_SEED", "23"))  # seeded: a failure repeats
    rng = random.Random(seed)
    rounds = FUZZ_ROUNDS if store_kind != "postgres" else max(FUZZ_ROUNDS // 3, 1)
    for n in range(rounds):
        where = tmp_path / f"round-{n}"
        where.mkdir()
        location, options = location_for(store_kind, where)
        store = open_kind(store_kind, location, options)
        try:
            try:
                _fuzz_round(rng, store_kind, store, cli_location(store_kind, location, options), where)
            except AssertionError as e:
                raise AssertionError(f"fuzz round {n} (AI2_KIT_FUZZ_SEED={seed}): {e}") from None
        finally:
            store.close()
            if store_kind == "postgres":
                from conftest import _drop_pg_schema

                _drop_pg_schema(location, options["schema"])


@pytest.mark.parametrize("kind", ["reference-dir", "reference-file"])
def test_fuzz_reference_records(kind: str, tmp_path: Path) -> None:
    """The reference formats' records (read through the inert reader) with random fields."""
    from helpers_cli import write_reference_file

    seed = int(os.environ.get("AI2_KIT_FUZZ_SEED", "23"))
    rng = random.Random(seed)
    for n in range(max(FUZZ_ROUNDS // 4, 1)):
        records = {}
        for i in range(3):
            rec: dict[str, Any] = record(f"k{i}")
            rec["info"] = rng.choice([{f: _value(rng) for f in rng.sample(["fn_name", "call_site", "extra"], 2)},
                                      _value(rng)])
            if rng.random() < 0.5:
                rec["is_awaitable"] = _value(rng)
            records[f"k{i}"] = rec
        where = tmp_path / f"round-{n}"
        loc = where / "ref.pkl"
        (write_reference_dir if kind == "reference-dir" else write_reference_file)(loc, records)
        for what, r in all_readers(str(loc), "k1", where).items():
            clean_exit(r, (kind, n, what))
            if "--json" in what:
                json_lines(r.out)
            if what in ("runs", "runs --json", "report", "ls -v", "ls --json", "ls"):
                assert r.code == 0, (kind, n, what, r)
