"""Builders for the CLI tests: stores written by the library and by the reference design."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import cloudpickle

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.cli import run
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore

#: Keys shaped like a real workflow's, with the traps of prefix matching
#: (``iters-000/deepmd-old`` is not below ``iters-000/deepmd``).
KEYS = [
    "iters-000/cp2k/red",
    "iters-000/cp2k/neu",
    "iters-000/deepmd/red",
    "iters-000/deepmd/neu",
    "iters-000/deepmd-old",
    "iters-001/lammps",
    "time_consuming_step",
]
AFTER_RM_DEEPMD = sorted(set(KEYS) - {"iters-000/deepmd/red", "iters-000/deepmd/neu"})
KINDS = ["sqlite", "directory", "reference-file", "reference-dir"]


def _shared_fixtures() -> Path:
    """The reference design's real files (shared/fixtures/legacy, outside this repository).

    ``$AI2_KIT_SHARED_FIXTURES`` names the folder; otherwise ``shared/`` beside
    the checkout (or beside the main checkout of a git worktree), or where
    this project's machines keep it (``/work/shared``, for clean clones made
    elsewhere, e.g. by CI). Tests that need them skip where they are absent.
    """
    given = os.environ.get("AI2_KIT_SHARED_FIXTURES")
    if given:
        return Path(given)
    repo = Path(__file__).resolve().parents[1]
    for top in (repo.parent, repo.parent.parent, Path("/work")):
        candidate = top / "shared" / "fixtures" / "legacy"
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "fixtures" / "legacy"


FIXTURES = _shared_fixtures()


def value_of(key: str) -> Any:
    return {"key": key, "n": len(key)}


def record(key: str, value: Any = None, awaitable: bool = False) -> dict[str, Any]:
    """One entry in the reference's format."""
    return {
        "return": value_of(key) if value is None else value,
        "is_awaitable": awaitable,
        "info": {"fn_name": "step_" + key.split("/")[-1], "call_site": "workflow.py:42"},
    }


def write_reference_file(path: Path, records: dict[str, dict[str, Any]]) -> Path:
    """The reference's 2023 format: one cloudpickle dump of key -> record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        cloudpickle.dump(records, f)
    return path


def write_reference_dir(path: Path, records: dict[str, dict[str, Any]]) -> Path:
    """The reference's 2024 format: one cloudpickle file per key, '/' as folders."""
    for key, rec in records.items():
        target = path.joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            cloudpickle.dump(rec, f)
    return path


def write_library_store(location: Path, kind: str, keys: list[str]) -> Path:
    """A store written through the library's decorator, as a workflow would."""
    prefer = "dir" if kind == "directory" else "file"
    with Checkpointer(str(location), prefer=prefer) as ckpt:
        for key in keys:

            def step(k: str) -> Any:
                return value_of(k)

            ckpt(key)(step)(key)
    return location


def make_store(tmp_path: Path, kind: str, keys: list[str] = KEYS, name: str = "checkpoint.pkl") -> Path:
    """A store of ``kind`` holding ``keys`` at ``tmp_path/name``.

    The seed's file name (``checkpoint.pkl``) is used for every kind; a
    directory store does not mind a name ending in .pkl.
    """
    location = tmp_path / name
    if kind in ("sqlite", "directory"):
        return write_library_store(location, kind, keys)
    records = {k: record(k, awaitable=(k == "iters-000/deepmd/red")) for k in keys}
    if kind == "reference-file":
        return write_reference_file(location, records)
    if kind == "reference-dir":
        return write_reference_dir(location, records)
    raise ValueError(kind)


def open_for_check(location: Path) -> SQLiteStore | DirectoryStore:
    """Open a store the CLI changed, to check it with the library (no CLI involved)."""
    if location.is_dir():
        return DirectoryStore(str(location), readonly=True)
    return SQLiteStore(str(location), readonly=True)


class Bomb:
    """A value whose unpickling creates the directory ``marker``.

    ``os.mkdir`` is in the standard library, so the pickle loads (and goes
    off) in any process, which makes it the proof that a command unpickled.
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


class Result(NamedTuple):
    code: int
    out: str
    err: str


class TTYInput(io.StringIO):
    """Typed answers, from something that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class PipeInput(io.StringIO):
    def isatty(self) -> bool:
        return False


def cli(*argv: str, stdin: io.StringIO | None = None) -> Result:
    """Run ``ai2-kit tool checkpoint ARGV`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err, stdin=stdin if stdin is not None else PipeInput(""))
    return Result(code, out.getvalue(), err.getvalue())


def copy_fixtures(tmp_path: Path) -> Path | None:
    """A writable copy of the shared reference fixtures, or None when absent."""
    if not (FIXTURES / "manifest.json").is_file():
        return None
    target = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, target)
    for p in target.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    target.chmod(0o755)
    return target
