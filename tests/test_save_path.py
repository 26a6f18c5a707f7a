"""The save path's shortcuts give the same bytes as the general way (issue 15)."""

from __future__ import annotations

import collections
import pickle
import sqlite3
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint._codec import _PLAIN_MAX, _is_plain, decode_bytes, encode
from ai2_kit.core.checkpoint.stores import SQLiteStore

PLAIN: list[Any] = [
    None, True, 0, -(2**70), 1.5, float("inf"), "", "é\u2028\x00", b"\x00\xff",
    {"step": 3, "name": "task-3", "energy": 1.5, "payload": b"x" * 1000},
    [1, [2, (3, {4: frozenset({5, "a"})})]], (), [], {}, {(1, "a"): {None: [b""]}},
    {1, 2.5, "x"}, [0.1] * 1000, {str(i): i for i in range(500)},
]


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
def test_plain_values_pickle_to_cloudpickles_bytes(value: Any) -> None:
    assert _is_plain(value)
    frame = encode(value)
    assert len(frame.parts) == 1
    assert bytes(frame.parts[0]) == cloudpickle.dumps(value, protocol=5)
    out = decode_bytes(frame.to_bytes(), frame.crc)
    assert out == value and type(out) is type(value)


class _Local:
    def __init__(self, x: int) -> None:
        self.x = x


NOT_PLAIN: list[Any] = [
    collections.OrderedDict(a=1), {"f": lambda x: x}, [1, _Local(2)], np.arange(3), bytearray(b"ab"),
    {"k": collections.defaultdict(list)}, [[0]] * (_PLAIN_MAX + 1), True.__class__,
]


@pytest.mark.parametrize("value", NOT_PLAIN, ids=lambda v: type(v).__name__)
def test_anything_else_goes_through_cloudpickle(value: Any) -> None:
    assert not _is_plain(value)


def test_self_containing_list_is_not_plain_and_still_saved() -> None:
    a: list[Any] = [1]
    a.append(a)
    assert not _is_plain(a)
    frame = encode(a)
    out = decode_bytes(frame.to_bytes(), frame.crc)
    assert out[1] is out


def test_a_lambda_inside_a_dict_is_saved_by_value(tmp_path: Path) -> None:
    # Plain pickle would refuse it (or, for a __main__ function, save a name
    # another process cannot load); cloudpickle saves it by value.
    with Checkpointer(tmp_path / "c.db") as ck:
        ck("k")(lambda: {"f": lambda x: x + 1})()
    with Checkpointer(tmp_path / "c.db") as ck:
        hit = ck.store.lookup("k")
        assert hit is not None and hit.value["f"](1) == 2


def test_sequential_saves_commit_once_each_and_store_the_same_frames(tmp_path: Path) -> None:
    def step(i: int) -> dict[str, Any]:
        return {"i": i, "payload": b"x" * 1000}

    with Checkpointer(tmp_path / "c.db") as ck:
        for i in range(20):
            ck(f"k/{i}")(step)(i)
        store = ck.store
        assert isinstance(store, SQLiteStore) and store._commits.batches == 20
    conn = sqlite3.connect(tmp_path / "c.db")
    try:
        rows = conn.execute("SELECT key, value FROM entries ORDER BY key").fetchall()
    finally:
        conn.close()
    assert len(rows) == 20
    for key, frame in rows:
        i = int(key.split("/")[1])
        assert frame[16:] == cloudpickle.dumps(step(i), protocol=5)
        assert pickle.loads(frame[16:]) == step(i)


@pytest.fixture
def standard_finders(request: pytest.FixtureRequest) -> bool:
    """True when the test ran (and passed) in a fresh interpreter: an earlier test changed how
    distributions are found here.

    Importing dask imports the importlib_metadata backport, which removes the
    standard finder's ``find_distributions`` for the rest of the process:
    ``_scan_version`` then rightly leaves every answer to importlib.metadata.
    """
    from importlib.machinery import PathFinder

    if getattr(PathFinder, "find_distributions", None) is not None:
        return False
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        capture_output=True, text=True, timeout=300, cwd=request.config.rootpath,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return True


def test_distribution_versions_read_as_importlib_metadata_reads_them(standard_finders: bool) -> None:
    if standard_finders:
        return  # ran in a fresh interpreter
    import importlib.metadata as md

    from ai2_kit.core.checkpoint._fingerprint import _UNSURE, _scan_version

    if sys.version_info < (3, 10):  # older rules: importlib.metadata always decides
        assert _scan_version("numpy") is _UNSURE
        return
    names = {d.metadata["Name"] for d in md.distributions()}
    assert "numpy" in names
    for name in names:
        got = _scan_version(name)
        assert got is _UNSURE or got == md.version(name), name
    for name in ("NumPy", "numpy", "zlib_ng", "zlib.ng", "Zlib-NG"):  # spellings of one name
        assert _scan_version(name) == md.version(name)
    assert _scan_version("no-such-distribution-x") is None
    with pytest.raises(md.PackageNotFoundError):
        md.version("no-such-distribution-x")


def test_odd_distribution_folders_are_left_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standard_finders: bool
) -> None:
    if standard_finders:
        return  # ran in a fresh interpreter
    import importlib.metadata as md

    from ai2_kit.core.checkpoint._fingerprint import _UNSURE, _scan_version

    def dist(folder: str, text: str) -> None:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "METADATA").write_text(text, encoding="utf-8")

    if sys.version_info < (3, 10):
        pytest.skip("importlib.metadata always decides before Python 3.10")
    dist("plain_pkg-1.0.dist-info", "Metadata-Version: 2.1\nName: plain-pkg\nVersion: 1.0\n\nbody\nVersion: 9\n")
    dist("folded-2.0.dist-info", "Name: folded\nVersion: 2.0\n  continued\n")
    dist("twice-1.0.dist-info", "Name: twice\nVersion: 1.0\n")
    dist("Twice-2.0.dist-info", "Name: twice\nVersion: 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _scan_version("Plain.Pkg") == md.version("Plain.Pkg") == "1.0"
    assert _scan_version("folded") is _UNSURE
    assert _scan_version("twice") is _UNSURE
    egg = tmp_path / "old_pkg-1.0-py3.11.egg"
    (egg / "EGG-INFO").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(egg))
    assert _scan_version("plain-pkg") is _UNSURE  # an egg on the path: importlib.metadata's rules


class _OtherFinder:
    """A finder of distributions besides the standard one (as the importlib_metadata backport adds)."""

    def find_spec(self, *args: Any) -> None:
        return None

    def find_distributions(self, *args: Any) -> list[Any]:
        return []


@pytest.mark.skipif(sys.version_info < (3, 10), reason="importlib.metadata always decides before 3.10")
def test_other_finders_of_distributions_decide_by_their_order(
    monkeypatch: pytest.MonkeyPatch, standard_finders: bool
) -> None:
    if standard_finders:
        return  # ran in a fresh interpreter
    # A finder after the standard one decides only what the standard one
    # does not find (importlib.metadata takes the first answer).
    import importlib.metadata as md

    from ai2_kit.core.checkpoint._fingerprint import _UNSURE, _scan_version

    plain = [f for f in sys.meta_path if getattr(f, "find_distributions", None) is None or
             getattr(f, "__name__", "") == "PathFinder"]
    monkeypatch.setattr(sys, "meta_path", [*plain, _OtherFinder()])
    assert _scan_version("numpy") == md.version("numpy")  # the standard finder answers first
    assert _scan_version("no-such-distribution-x") is _UNSURE  # the later finder might know it
    monkeypatch.setattr(sys, "meta_path", [_OtherFinder(), *plain])
    assert _scan_version("numpy") is _UNSURE  # asked first: its answer would win
    monkeypatch.setattr(sys, "meta_path", plain)
    assert _scan_version("numpy") == md.version("numpy")
    assert _scan_version("no-such-distribution-x") is None


@pytest.mark.skipif(sys.version_info < (3, 10), reason="importlib.metadata always decides before 3.10")
def test_first_save_of_a_step_using_numpy_reads_no_distribution_metadata(tmp_path: Path) -> None:
    # The environment fingerprint records numpy's version: read from its
    # dist-info folder, without importing importlib.metadata (~26 ms).
    import subprocess

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from ai2_kit.core.checkpoint import Checkpointer\n"
        "big = np.arange(10)\n"
        "def step(i):\n"
        "    return big * i\n"
        f"ck = Checkpointer({str(tmp_path / 'c.db')!r})\n"
        "ck('k')(step)(1)\n"
        "rec = ck.store.get_meta('k')['fingerprint']\n"
        "assert rec['env']['packages'].get('numpy') == np.__version__, rec['env']\n"
        "ck.close()\n"
        "assert 'importlib.metadata' not in sys.modules, 'importlib.metadata imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_new_store_is_born_in_its_journal_mode_and_leaves_no_temporary_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: str) -> None:
    monkeypatch.setenv("AI2_KIT_CHECKPOINT_JOURNAL", journal)
    path = tmp_path / "c.db"
    with SQLiteStore(str(path)) as store:
        store.put("k", {"a": 1})
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == journal
        assert conn.execute("SELECT value FROM store_info WHERE name='created_by'").fetchone() is not None
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db"]
    with SQLiteStore(str(path)) as store:
        hit = store.lookup("k")
        assert hit is not None and hit.value == {"a": 1}
