"""The installed ``ai2-kit`` console script, in real subprocesses."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ai2_kit.core.checkpoint.stores import SQLiteStore
from helpers_cli import AFTER_RM_DEEPMD, KEYS, KINDS, Bomb, copy_fixtures, make_store

VENV_BIN = Path(sys.executable).parent
AI2_KIT = str(VENV_BIN / "ai2-kit")
if not os.path.exists(AI2_KIT):  # pragma: no cover - the project's venv has it
    AI2_KIT = "/work/main/.venv/bin/ai2-kit"

SEED_LINES = [
    "ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls",
    "ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls --verbose",
    'ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - rm "iters-000/deepmd"',
]


def shell(line: str, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run one command line as a user types it, with the venv's ai2-kit first on PATH."""
    env = dict(os.environ, PATH=f"{os.path.dirname(AI2_KIT)}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, **kw)  # type: ignore[call-overload]


def ai2kit(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AI2_KIT, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, **kw)  # type: ignore[call-overload]


def assert_clean_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("kind", KINDS)
def test_seed_lines_verbatim(tmp_path: Path, kind: str) -> None:
    make_store(tmp_path / "path" / "to", kind)
    ls, ls_verbose, rm = (shell(line, tmp_path) for line in SEED_LINES)
    for proc in (ls, ls_verbose, rm):
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    assert ls.stdout.splitlines() == sorted(KEYS)
    assert [ln.split()[4] for ln in ls_verbose.stdout.splitlines()[1:]] == sorted(KEYS)
    assert rm.stdout.splitlines() == [
        "removed iters-000/deepmd/neu",
        "removed iters-000/deepmd/red",
        f"Removed 2 entries (matching 'iters-000/deepmd') from {tmp_path}/path/to/checkpoint.pkl.",
    ]
    assert shell(SEED_LINES[0], tmp_path).stdout.splitlines() == AFTER_RM_DEEPMD


def test_seed_lines_on_a_store_of_the_seed_api(tmp_path: Path) -> None:
    """A store written by a workflow through set_checkpoint_file/apply_checkpoint."""
    script = (
        "from ai2_kit.core.checkpoint import set_checkpoint_file, apply_checkpoint\n"
        "set_checkpoint_file('./path/to/checkpoint.pkl')\n"
        f"for key in {KEYS!r}:\n"
        "    apply_checkpoint(key)(lambda k: k.upper())(key)\n"
    )
    (tmp_path / "path" / "to").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=120)
    assert shell(SEED_LINES[0], tmp_path).stdout.splitlines() == sorted(KEYS)
    verbose = shell(SEED_LINES[1], tmp_path).stdout
    assert "<lambda>" in verbose and "<string>:4" in verbose
    assert shell(SEED_LINES[2], tmp_path).returncode == 0
    assert shell(SEED_LINES[0], tmp_path).stdout.splitlines() == AFTER_RM_DEEPMD


def test_seed_lines_on_the_shared_reference_fixtures(tmp_path: Path) -> None:
    root = copy_fixtures(tmp_path)
    if root is None:
        pytest.skip("the shared fixtures are not on this machine")
    manifest = json.loads((root / "manifest.json").read_text())
    for name in ("file-era.pkl", "dir-era"):
        work = tmp_path / name.replace(".", "_")
        (work / "path" / "to").mkdir(parents=True)
        src = root / name
        dst = work / "path" / "to" / "checkpoint.pkl"
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
        procs = [shell(line, work) for line in SEED_LINES]
        assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr for p in procs]
        assert procs[0].stdout.splitlines() == sorted(manifest)
        left = sorted(k for k in manifest if not k.startswith("iters-000/deepmd/"))
        assert shell(SEED_LINES[0], work).stdout.splitlines() == left


def test_conventional_form(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    proc = ai2kit("tool", "checkpoint", "ls", path, "iters-000/*", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["key"] for line in proc.stdout.splitlines()] == sorted(
        k for k in KEYS if k.startswith("iters-000/"))


def test_help_is_printed_not_paged() -> None:
    proc = ai2kit("tool", "checkpoint", "rm", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: ai2-kit tool checkpoint load STORE - rm PATTERN")
    assert "examples:" in proc.stdout
    assert ai2kit("--help").stdout.startswith("usage: ai2-kit COMMAND")


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pkl"
    assert_clean_error(ai2kit("tool", "checkpoint", "load", str(missing), "-", "ls"),
                       str(missing), "no such file")
    assert not missing.exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a store\n")
    assert_clean_error(ai2kit("tool", "checkpoint", "load", str(text), "-", "ls"),
                       str(text), "neither a checkpoint store")
    assert_clean_error(ai2kit("tool", "checkpoint", "load", str(text), "-", "lss"), "'lss'", "--help")
    assert_clean_error(ai2kit("tool", "chekpoint"), "'chekpoint'")
    assert_clean_error(ai2kit("tols"), "'tols'")
    db = make_store(tmp_path, "sqlite")
    with SQLiteStore(str(db)) as s:
        s._conn().execute("PRAGMA user_version=3")
    assert_clean_error(ai2kit("tool", "checkpoint", "ls", str(db)), str(db), "newer", "pip install -U")


def _as_unprivileged() -> list[str]:
    """A command prefix under which file permissions apply, even for root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    # Root without these capabilities is refused by mode bits like anyone else.
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def test_permission_denied(tmp_path: Path) -> None:
    prefix = _as_unprivileged()
    db = make_store(tmp_path, "sqlite")
    folder = make_store(tmp_path, "directory", name="ckpt.d")
    db.chmod(0)
    folder.chmod(0)
    try:
        for path in (db, folder):
            for argv in (["ls"], ["show", "x"], ["rm", "x", "--yes"], ["migrate"]):
                proc = subprocess.run([*prefix, AI2_KIT, "tool", "checkpoint", "load", str(path), "-", *argv],
                                      capture_output=True, text=True, timeout=120)
                assert_clean_error(proc, str(path), "permission denied")
    finally:
        db.chmod(0o644)
        folder.chmod(0o755)


def test_rm_of_a_read_only_store(tmp_path: Path) -> None:
    prefix = _as_unprivileged()
    db = make_store(tmp_path, "sqlite")
    folder = make_store(tmp_path, "directory", name="ckpt.d")
    db.chmod(0o444)
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        for path in (db, folder):
            proc = subprocess.run([*prefix, AI2_KIT, "tool", "checkpoint", "load", str(path), "-",
                                   "rm", "iters-000", "--yes"], capture_output=True, text=True, timeout=120)
            assert_clean_error(proc, str(path), "read-only", "no write permission")
            listing = subprocess.run([*prefix, AI2_KIT, "tool", "checkpoint", "ls", str(path)],
                                     capture_output=True, text=True, timeout=120)
            assert listing.returncode == 0 and listing.stdout.splitlines() == sorted(KEYS)
    finally:
        db.chmod(0o644)
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_never_unpickles_through_the_console_script(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    db = tmp_path / "store.db"
    with SQLiteStore(str(db)) as s:
        s.put("iters-000/bomb", Bomb(str(marker)), fn_name="f")
    for argv in (["ls", "-v"], ["show", "iters-000/bomb"], ["rm", "iters-000", "--yes"]):
        proc = ai2kit("tool", "checkpoint", "load", str(db), "-", *argv)
        assert proc.returncode == 0, proc.stderr
        assert not marker.exists(), argv


def _read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data


def test_rm_asks_on_a_terminal(tmp_path: Path) -> None:
    db = str(make_store(tmp_path, "sqlite"))
    for answer, code, left in ((b"n\n", 1, len(KEYS)), (b"y\n", 0, len(KEYS) - 2)):
        master, slave = pty.openpty()
        try:
            argv = [AI2_KIT, "tool", "checkpoint", "load", db, "-", "rm", "iters-000/deepmd"]
            proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=slave)
            os.close(slave)
            prompt = _read_until(master, b"[y/N]")
            assert b"About to remove 2 entries" in prompt and b"[y/N]" in prompt
            os.write(master, answer)
            out, _ = proc.communicate(timeout=60)
            _read_until(master, b"\n", timeout=1)
        finally:
            os.close(master)
        assert proc.returncode == code
        with SQLiteStore(db, readonly=True) as s:
            assert len(s) == left


# -- a large store ------
N_LARGE = 100_000
BIG = 48 << 20  # three values of 48 MB: what ls must never load


@pytest.fixture(scope="module")
def large_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    db = tmp_path_factory.mktemp("large") / "large.db"
    with SQLiteStore(str(db)) as s:
        for i in range(3):
            s.put(f"big/{i}", np.full(BIG // 8, i, dtype=np.float64), fn_name="big")
        for i in range(N_LARGE):
            s.put(f"iters-{i // 1000:03d}/step-{i:06d}", i, fn_name="step", duration=0.5)
    return db


@pytest.mark.slow
def test_ls_of_100k_entries_streams(large_store: Path) -> None:
    with subprocess.Popen([AI2_KIT, "tool", "checkpoint", "load", str(large_store), "-", "ls"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        # 100,003 keys are ~2.5 MB of output, far more than a pipe holds: the
        # process is still running when the first line arrives, so the listing
        # is written as it is read, not after collecting it.
        assert proc.poll() is None
        assert first == b"big/0\n"
        rest = proc.stdout.read()
        err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert rest.count(b"\n") == N_LARGE + 2


# Run from a small launcher: a child's peak RSS on Linux includes what it
# shared with its parent before exec, and pytest's process is large.
_MEASURE = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


@pytest.mark.slow
def test_ls_memory_does_not_depend_on_value_sizes(large_store: Path) -> None:
    argv = [AI2_KIT, "tool", "checkpoint", "load", str(large_store), "-", "ls", "--verbose"]
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    code, max_rss_mb = int(out[0]), int(out[1]) / 1024  # KiB on Linux
    assert code == 0
    # The three big values alone are 144 MB; loading any one would show.
    assert max_rss_mb < BIG / (1 << 20), f"ls used {max_rss_mb:.0f} MB"


@pytest.mark.slow
def test_ls_into_a_closed_pipe_is_quiet(large_store: Path, tmp_path: Path) -> None:
    proc = shell(f"ai2-kit tool checkpoint load {large_store} - ls | head -n 3", tmp_path)
    assert proc.stdout.splitlines() == ["big/0", "big/1", "big/2"]
    assert proc.stderr == ""
