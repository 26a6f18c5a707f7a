"""The save path's shortcuts give the same bytes as the general way (issue 15)."""

from __future__ import annotations

import collections
import json
import os
import pickle
import sqlite3
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from _sql_trace import statements
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

    from ai2_kit.core.checkpoint._fingerprint._env import _UNSURE, _scan_version

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

    from ai2_kit.core.checkpoint._fingerprint._env import _UNSURE, _scan_version

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

    from ai2_kit.core.checkpoint._fingerprint._env import _UNSURE, _scan_version

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


# -- a lone save's one statement, its metadata text, its fingerprint record (issue 15, save) -----


def test_a_lone_save_is_one_statement_of_its_own(tmp_path: Path) -> None:
    # It was BEGIN IMMEDIATE, INSERT, COMMIT: an INSERT outside BEGIN is a
    # transaction of its own, with the same one commit (and fsync).
    def step(i: int) -> dict[str, Any]:
        return {"i": i}

    with Checkpointer(tmp_path / "c.db") as ck:
        ck("k/0")(step)(0)  # the first save may add columns and make the connection
        conn = ck.store._conns.get()
        seen = statements(conn, lambda: ck("k/1")(step)(1))
        writes = [s for s in seen if not s.lstrip().upper().startswith("SELECT")]
        assert len(writes) == 1 and writes[0].startswith("INSERT INTO entries"), seen
        assert not conn.in_transaction
        # Overwriting a row without a side file: the same one statement.
        seen = statements(conn, lambda: ck("k/1", stale="rerun")(step)(2))
        writes = [s for s in seen if not s.lstrip().upper().startswith("SELECT")]
        assert len(writes) == 1 and writes[0].startswith("INSERT INTO entries"), seen
    with Checkpointer(tmp_path / "c.db") as ck:
        hit = ck.store.lookup("k/1")
        assert hit is not None and hit.value == {"i": 2} and hit.meta["fingerprint"]["args"] == {"i": "2"}


BIG = 2 << 20  # over INLINE_MAX: a side file


@pytest.mark.parametrize("sizes", [("big", "small"), ("big", "big"), ("small", "big", "small"), ("big", "big", "big")])
def test_overwrites_of_side_files_remove_the_old_file(tmp_path: Path, sizes: tuple[str, ...]) -> None:
    # A lone save's one statement leaves a row that names a side file alone;
    # the save then goes the transaction's way, which removes the old file.
    def value(kind: str, i: int) -> Any:
        return np.full(BIG // 8, i, np.int64) if kind == "big" else {"i": i}

    store = SQLiteStore(str(tmp_path / "c.db"))
    try:
        for i, kind in enumerate(sizes):
            store.put("k", value(kind, i))
            got = store.lookup("k")
            assert got is not None
            assert (np.array_equal(got.value, value(kind, i)) if kind == "big" else got.value == value(kind, i))
            files = os.listdir(store.blob_dir) if os.path.isdir(store.blob_dir) else []
            assert len(files) == (1 if kind == "big" else 0), (i, files)
            assert store.orphan_blobs() == []
    finally:
        store.close()


def _record_shapes() -> list[dict[str, Any]]:
    from ai2_kit.core.checkpoint._fingerprint import fingerprint

    def one(i: int) -> int:
        return i

    def many(a: int, b: str = "é\"\n\u2028", *rest: Any, c: Any = None, **kw: Any) -> int:
        return a

    base = {"call_site": "/x/é.py:3", "crc32": "0011aabb", "created": 1.7e9 + 0.123, "duration": 5e-05,
            "fn_name": "one", "format": 1, "fpd": "ab" * 16, "host": "h\u00f6st", "is_awaitable": False,
            "key": "step/\u00e9/1", "pid": 4242, "run": "20260101T000000-h-1-abcd", "size": 1088,
            "version": "0.1.0"}
    fps = [
        fingerprint(one, (1,), {}),
        fingerprint(many, (1, "x", 2, 3), {"c": [1, 2], "zz": "y", "aa": 1.5}),
        fingerprint(many, (1,), {"c": threading_lock()}),  # an unhashable argument
        {"args": {}, "bc": "b", "code": None, "env": {}, "fn": "f", "unhashable": {}, "v": 2},
    ]
    out = []
    for fp in fps:
        out.append({**base, "fingerprint": fp})
        out.append({**base, "fingerprint": fp, "is_awaitable": True, "duration": 0.0, "pid": 0})
    return out


def threading_lock() -> Any:
    import threading

    return threading.Lock()


@pytest.mark.parametrize("meta", _record_shapes(), ids=lambda m: f"{m['fingerprint'].get('fn')}-{m['pid']}")
def test_a_saves_record_has_the_general_encoders_text(meta: dict[str, Any]) -> None:
    from ai2_kit.core.checkpoint._codec import _JSON, _save_record, meta_from_json, meta_to_json

    for _ in range(2):  # uncached, then with the static parts' text cached
        text = _save_record(meta)
        assert text == _JSON.encode(meta)
    assert meta_from_json(meta_to_json(meta)) == json.loads(_JSON.encode(meta))


def test_other_records_take_the_general_encoder() -> None:
    from ai2_kit.core.checkpoint._codec import _JSON, _save_record, meta_to_json

    meta = _record_shapes()[0]
    odd = [
        {**meta, "mac": "x"},  # another field
        {**meta, "duration": float("nan")},  # the encoder's NaN
        {**meta, "created": float("inf")},
        {**meta, "pid": True},  # a bool where an int is
        {**meta, "size": 1.0},
        {**meta, "fingerprint": {**meta["fingerprint"], "extra": 1}},
        {**meta, "fingerprint": {**meta["fingerprint"], "args": {"x": 1}}},  # not a str
        {k: v for k, v in meta.items() if k != "fpd"},
    ]
    for m in odd:
        assert _save_record(m) is None
        assert meta_to_json(m).endswith(_JSON.encode(m)[1:])


def test_a_record_changed_in_place_is_written_as_it_is_now() -> None:
    from ai2_kit.core.checkpoint._codec import _JSON, _save_record

    meta = _record_shapes()[0]
    assert _save_record(meta) == _JSON.encode(meta)
    changed = {**meta, "fingerprint": dict(meta["fingerprint"])}
    changed["fingerprint"]["env"] = {**changed["fingerprint"]["env"], "python": "0.0.0"}
    assert '"python":"0.0.0"' in _save_record(changed)  # type: ignore[operator]
    assert _save_record(changed) == _JSON.encode(changed)
    helpers = {"h": ["a" * 32 + "." + "b" * 32, "one"]}
    changed["fingerprint"]["helpers"] = helpers
    assert _save_record(changed) == _JSON.encode(changed)
    helpers["h"][1] = "other"  # mutated after its text was cached
    assert _save_record(changed) == _JSON.encode(changed)


def test_a_misss_record_the_short_way_equals_the_full_way() -> None:
    from ai2_kit.core.checkpoint._fingerprint import _record as F

    def step(a: int, b: str = "x", c: float = 1.5) -> int:
        return a

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {}), ((1, "y"), {}), ((1, "y", 2.5), {}), ((None, True, -3.0), {}), ((10**30,), {}),
        (("z" * 40,), {}), ((1,), {"b": "q"}), (([1, 2],), {}),
    ]
    for args, kwargs in calls:
        F._BASES.pop(step, None)
        full = F.fingerprint(step, args, kwargs)  # no cached parts: the full way
        assert step in F._BASES
        short = F.fingerprint(step, args, kwargs)
        assert short == full and short.digest == full.digest and short.legacy_args == full.legacy_args
        assert short.fn_obj is step
        if not kwargs:
            assert F.hit_digest(step, args, kwargs) in (None, short.digest)
    # The cached parts are never handed out to be changed.
    a, b = F.fingerprint(step, (1,), {}), F.fingerprint(step, (1,), {})
    a["args"]["a"] = "changed"
    assert b["args"]["a"] == "1"


def test_a_miss_after_hit_digest_builds_the_same_record_and_never_a_stale_one() -> None:
    from ai2_kit.core.checkpoint._fingerprint import _record as F

    def step(a: int, b: int = 2) -> int:
        return a + b

    F.fingerprint(step, (0,), {})  # caches the parts
    args = (1,)
    digest = F.hit_digest(step, args, {})
    rec = F.fingerprint(step, args, {})  # from what hit_digest worked out
    F._BASES.pop(step, None)
    full = F.fingerprint(step, args, {})
    assert digest == rec.digest == full.digest and rec == full
    # Worked out, then the defaults changed: the record says what the call is now.
    assert F.hit_digest(step, args, {}) is not None
    step.__defaults__ = (3,)
    rec = F.fingerprint(step, args, {})
    assert rec["args"] == {"a": "1", "b": "3"}
    F._BASES.pop(step, None)
    assert rec == F.fingerprint(step, args, {}) and rec.digest == F.fingerprint(step, args, {}).digest
    # Another call's (another tuple of the same values): built again, the same.
    assert F.hit_digest(step, (1,), {}) is not None
    assert F.fingerprint(step, tuple([1]), {}) == rec


def test_a_save_never_joins_a_transaction_left_open_on_its_connection(tmp_path: Path) -> None:
    # Its one statement would then commit nothing, and put() would return
    # for an entry that a close or a crash rolls back. No transaction of ours
    # outlives its call, so one found open (left by an interrupt that struck
    # its cleanup) is rolled back first, and the save commits (issue 21).
    store = SQLiteStore(str(tmp_path / "c.db"))
    try:
        store.put("a", 1)
        conn = store._conns.get()
        conn.execute("BEGIN")  # as an interrupted transaction would leave it
        store.put("b", 2)
        assert not conn.in_transaction
        # Committed when put() returned: another connection sees it at once.
        seen = sqlite3.connect(tmp_path / "c.db")
        try:
            assert seen.execute("SELECT count(*) FROM entries WHERE key='b'").fetchone()[0] == 1
        finally:
            seen.close()
    finally:
        store.close()
    other = sqlite3.connect(tmp_path / "c.db")
    try:
        assert [k for (k,) in other.execute("SELECT key FROM entries ORDER BY key")] == ["a", "b"]
    finally:
        other.close()
