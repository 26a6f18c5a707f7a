"""Fault injection: full disks, file-size limits, read-only media, damaged files, load, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from _procs import value_for
from _reliability import record
from ai2_kit.core.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptEntryError,
    SaveError,
)
from ai2_kit.core.checkpoint._maintenance import copy_entries, salvage, verify_store
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store, open_store

PROCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_procs.py")
LOAD_SECONDS = float(os.environ.get("AI2_KIT_LOAD_SECONDS", "4"))
DAMAGE_TRIALS = int(os.environ.get("AI2_KIT_DAMAGE_TRIALS", "40"))
LOCAL = ["sqlite", "directory"]


def run_role(role: str, factory: Any, *args: object, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, PROCS, role, factory.kind, factory.location, json.dumps(factory.options),
         *map(str, args)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout + out.stderr


def check_entries(store: Store, tag: str, acks: list[int]) -> None:
    for i in acks:
        hit = store.lookup(f"{tag}/k{i:03d}")
        assert hit is not None, i
        want = value_for(tag, i, 2)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(hit.value, want)
        else:
            assert hit.value == want


def integrity(store: Store) -> None:
    if isinstance(store, SQLiteStore):
        assert store.integrity_check() == []
    report = verify_store(store)
    assert not report.damaged and not report.store_problems, report


# -- a file-size limit (EFBIG) -------------------------------------------------


@pytest.mark.parametrize("store_kind", LOCAL, indirect=True)
def test_file_size_limit_reports_and_keeps_earlier_entries(store_factory: Callable[..., Store]) -> None:
    store = store_factory()
    store.put("before", "intact")
    store.close()
    out = run_role("fill", store_factory, "efbig", 1_000_000)  # big values fail, small ones fit
    acks = [int(line.split()[1]) for line in out.splitlines() if line.startswith("ack ")]
    fails = [int(line.split()[1]) for line in out.splitlines() if line.startswith("fail ")]
    assert fails, out  # the limit was hit
    assert "NOT saved" in out and "efbig/k" in out  # reported, naming the key
    store = store_factory()
    hit = store.lookup("before")
    assert hit is not None and hit.value == "intact"
    check_entries(store, "efbig", acks)
    for i in fails:
        assert store.lookup(f"efbig/k{i:03d}") is None  # nothing partial is visible
    integrity(store)
    store.put("after", np.ones(500_000))  # saving works again without the limit
    assert store.lookup("after") is not None
    record("file-size limit (RLIMIT_FSIZE, EFBIG)", store_factory.kind, 1, len(fails), len(acks), 0)  # type: ignore[attr-defined]


def test_strict_mode_raises_on_failed_save_in_a_subprocess(tmp_path: Path) -> None:
    code = (
        "import resource, signal, numpy as np\n"
        "from ai2_kit.core.checkpoint import Checkpointer, SaveError\n"
        f"c = Checkpointer({str(tmp_path / 'c.db')!r}, strict=True)\n"
        "c('small')(lambda: 1)()\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
        "try:\n"
        "    c('big')(lambda: np.ones(1_000_000))()\n"
        "except SaveError as e:\n"
        "    print('raised', e.key)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "raised big", out.stderr
    with SQLiteStore(str(tmp_path / "c.db")) as store:
        assert store.keys() == ["small"]
        assert store.orphan_blobs() == []  # the failed side file was removed


# -- a small tmpfs that fills up, and a read-only file system -------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("kind", LOCAL)
def test_disk_full_then_space_back(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "mnt", "3m") as mnt:
        location = str(mnt / ("c.db" if kind == "sqlite" else "d"))
        ballast = mnt / "ballast"  # another program's file, removed to give space back
        ballast.write_bytes(b"\0" * 1_000_000)
        ckpt = Checkpointer(location, prefer="file" if kind == "sqlite" else "dir")
        saved, failed = [], []
        for i in range(40):
            key = f"full/k{i:03d}"
            with caplog.at_level("WARNING", logger="ai2_kit.core.checkpoint"):
                value = ckpt(key)(lambda i=i: np.full(100_000, i, np.int32))()
            assert value[0] == i  # the workflow always gets its result
            (saved if ckpt.store.get_meta(key) else failed).append(i)
        assert failed, "the tmpfs never filled up"
        assert any("NOT saved" in r.getMessage() for r in caplog.records)
        for i in saved:
            hit = ckpt.store.lookup(f"full/k{i:03d}")
            assert hit is not None and hit.value[0] == i
        ckpt.close()
        store = open_store(location)
        integrity(store)
        store.close()
        ballast.unlink()
        with Checkpointer(location) as again:  # space is back: saving works
            again("after")(lambda: np.ones(100_000))()
            assert again.store.get_meta("after") is not None
        record("disk full (3 MB tmpfs)", kind, 1, len(failed), len(saved), 0)


@pytest.mark.parametrize("kind", LOCAL)
def test_read_only_file_system(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        location = str(mnt / ("c.db" if kind == "sqlite" else "d"))
        with Checkpointer(location, prefer="file" if kind == "sqlite" else "dir") as ckpt:
            ckpt("done")(lambda: {"v": 1})()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with Checkpointer(location) as ckpt:
            assert ckpt.store.readonly
            assert ckpt("done")(lambda: "rerun")() == {"v": 1}  # hits work
            with caplog.at_level("WARNING", logger="ai2_kit.core.checkpoint"):
                assert ckpt("new")(lambda: 2)() == 2
            assert any("read-only" in r.getMessage() and "'new'" in r.getMessage() for r in caplog.records)
        with Checkpointer(location, strict=True) as ckpt, pytest.raises(SaveError, match="read-only"):
            ckpt("new")(lambda: 2)()


# -- damaged files ---------------------------------------------------------------


def build(kind: str, location: str, n: int = 30) -> dict[str, Any]:
    values: dict[str, Any] = {}
    store = SQLiteStore(location) if kind == "sqlite" else DirectoryStore(location)
    with store:
        for i in range(n):
            v: Any = {"i": i, "s": "x" * (i * 37 % 500)} if i % 7 else np.arange(300_000) + i
            store.put(f"e/k{i:03d}", v)
            values[f"e/k{i:03d}"] = v
    return values


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return bool(a == b)


def victims(kind: str, location: str) -> list[Path]:
    if kind == "sqlite":
        files = [Path(location)]
        blobs = Path(location + ".blobs")
        files += sorted(blobs.iterdir()) if blobs.is_dir() else []
        return files
    return sorted(p for p in Path(location).rglob("*.ckpt"))


def read_everything(location: str, values: dict[str, Any]) -> tuple[int, int]:
    """Every read returns the exact value or a typed error: (exact, refused)."""
    exact = refused = 0
    try:
        store = open_store(location)
    except CheckpointError:
        return 0, len(values)
    with store:
        try:
            keys = store.keys()
        except CheckpointError:
            keys = list(values)
        for key in values:
            try:
                hit = store.lookup(key)
            except CheckpointError:
                refused += 1
                continue
            if hit is None:
                refused += 1
                continue
            assert same(hit.value, values[key]), f"{key}: a damaged store returned a wrong value"
            exact += 1
        for key in set(keys) - set(values):
            # A damaged listing may show a garbled key; reading it never succeeds.
            with contextlib.suppress(CheckpointError):
                assert store.lookup(key) is None, f"{key!r} is not a key that was ever written"
    return exact, refused


@pytest.mark.parametrize("kind", LOCAL)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_files_never_return_wrong_values(tmp_path: Path, kind: str, damage: str) -> None:
    rng = random.Random(f"{kind}-{damage}")
    faults = refused_total = 0
    for trial in range(DAMAGE_TRIALS):
        location = str(tmp_path / f"{trial}" / ("c.db" if kind == "sqlite" else "d"))
        os.makedirs(os.path.dirname(location))
        values = build(kind, location)
        target = rng.choice(victims(kind, location))
        data = bytearray(target.read_bytes())
        if damage == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        faults += 1
        _, refused = read_everything(location, values)
        refused_total += refused
        assert target.read_bytes() == bytes(data)  # the damaged file is never overwritten
        shutil.rmtree(os.path.dirname(location))  # long runs would fill the disk
    # Entries in the damaged file may be refused (they are damaged); "lost"
    # counts wrong values returned, which the assertions above rule out.
    record(f"damaged files ({damage}: random offsets)", kind, DAMAGE_TRIALS, faults, 30 * DAMAGE_TRIALS, 0)


@pytest.mark.parametrize(
    "content", [b"", b"plain text\n", b"\x00garbage" * 100], ids=["empty", "text", "garbage"]
)
def test_foreign_content_where_a_directory_entry_should_be(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "d"
    with DirectoryStore(str(root)) as store:
        store.put("k", 1)
    (root / "k.ckpt").write_bytes(content)
    with DirectoryStore(str(root)) as store:
        with pytest.raises(CorruptEntryError) as info:
            store.lookup("k")
        assert "k" in str(info.value)
        assert set(verify_store(store).damaged) == {"k"}
    assert (root / "k.ckpt").read_bytes() == content


def test_directory_where_a_file_is_expected_and_the_reverse(tmp_path: Path) -> None:
    (tmp_path / "c.db").mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        SQLiteStore(str(tmp_path / "c.db"))
    (tmp_path / "d").write_text("x")
    with pytest.raises(CheckpointError, match="file"):
        DirectoryStore(str(tmp_path / "d"))
    root = tmp_path / "store"
    with DirectoryStore(str(root)) as store:
        store.put("a/b", 1)
    (root / "a" / "b.ckpt").unlink()
    (root / "a" / "b.ckpt").mkdir()
    with DirectoryStore(str(root)) as store, pytest.raises(CheckpointError):
        store.lookup("a/b")


def test_verify_and_salvage_a_damaged_sqlite_store(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    values = build("sqlite", path, n=60)
    with SQLiteStore(path) as store:
        assert verify_store(store).ok
        conn = store._conn()
        value = bytearray(conn.execute("SELECT value FROM entries WHERE key = 'e/k001'").fetchone()[0])
        value[40] ^= 0x01
        conn.execute("UPDATE entries SET value = ? WHERE key = 'e/k001'", (bytes(value),))
        blob = conn.execute("SELECT blob FROM entries WHERE key = 'e/k007'").fetchone()[0]
    side = Path(path + ".blobs") / blob
    raw = bytearray(side.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    side.write_bytes(bytes(raw))
    with SQLiteStore(path) as store:
        report = verify_store(store)
        assert set(report.damaged) == {"e/k001", "e/k007"} and report.entries == 60
        with SQLiteStore(str(tmp_path / "new.db")) as dst:
            result = salvage(store, dst)
            assert set(result.failed) == {"e/k001", "e/k007"} and len(result.copied) == 58
            for key in result.copied:
                hit = dst.lookup(key)
                assert hit is not None and same(hit.value, values[key])
            assert verify_store(dst).ok


def test_copy_between_stores_keeps_metadata(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "a.db")) as src, DirectoryStore(str(tmp_path / "b")) as dst:
        src.put("x/1", [1], fn_name="f", call_site="w.py:3", duration=2.5)
        src.put("y/2", np.arange(500_000))
        report = copy_entries(src, dst)
        assert report.copied == ["x/1", "y/2"] and not report.failed
        meta = dst.get_meta("x/1")
        assert meta is not None and meta["fn_name"] == "f" and meta["duration"] == 2.5
        assert meta["created"] == src.get_meta("x/1")["created"]  # type: ignore[index]


# -- load: many processes and threads on overlapping keys ---------------------


def test_load_processes_and_threads_on_overlapping_keys(store_factory: Callable[..., Store], reap: Any) -> None:
    procs = reap([
        subprocess.Popen(
            [sys.executable, PROCS, "load", store_factory.kind, store_factory.location,  # type: ignore[attr-defined]
             json.dumps(store_factory.options), f"p{p}", str(LOAD_SECONDS), "20"],  # type: ignore[attr-defined]
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(8)
    ])
    total = 0
    for proc in procs:
        out, err = proc.communicate(timeout=LOAD_SECONDS + 300)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["nerrors"] == 0, result["errors"]
        total += result["ops"]
    store = store_factory()
    for key in store.keys():
        hit = store.lookup(key)
        assert hit is not None and hit.value["key"] == key
        assert (hit.value["data"] == hit.value["nonce"] % 251).all()
    integrity(store)
    record(f"load: 8 processes x 4 threads, {LOAD_SECONDS:.0f} s, 20 shared keys (operations)",
           store_factory.kind, 1, 0, total, 0)  # type: ignore[attr-defined]


# -- asyncio cancellation ----------------------------------------------------------


def test_cancelled_step_saves_nothing_and_releases_its_claim(store_factory: Callable[..., Store]) -> None:
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)

    started: set[int] = set()

    async def step(i: int) -> int:
        started.add(i)
        await asyncio.sleep(60)
        return i

    async def main() -> None:
        tasks = [asyncio.ensure_future(ckpt(f"c/{i}")(step)(i)) for i in range(8)]
        # Cancel only once every step runs, that is holds its claim: a fixed
        # sleep let the test pass without testing when the steps were late.
        deadline = time.monotonic() + 60
        while len(started) < 8:
            assert time.monotonic() < deadline, "the steps never started"
            await asyncio.sleep(0.01)
        probe = f"probe-{uuid.uuid4().hex}"
        assert not any(ckpt.store.try_claim(f"c/{i}", probe, 30) for i in range(8))
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

    asyncio.run(main())
    assert ckpt.store.keys() == []
    other = f"other-{uuid.uuid4().hex}"
    for i in range(8):  # nobody else waits for a claim a cancelled task left behind
        assert ckpt.store.try_claim(f"c/{i}", other, 30)


def test_side_files_of_dead_writers_are_reclaimed_live_ones_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    with SQLiteStore(path) as store:
        store.put("big", np.ones(300_000))
        host = os.uname().nodename
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
        blobs = Path(path + ".blobs")
        files = {
            "dead": blobs / f"aa.{dead}.{host}.frame",
            "live": blobs / f"bb.{os.getpid()}.{host}.frame",
            "old-remote": blobs / "cc.123.other-host.frame",
            "new-remote": blobs / "dd.123.other-host.frame",
        }
        for f in files.values():
            f.write_bytes(b"partial")
        os.utime(files["old-remote"], (0, 0))
    with SQLiteStore(path) as store:  # opening reclaims
        assert not files["dead"].exists() and not files["old-remote"].exists()
        assert files["live"].exists() and files["new-remote"].exists()
        hit = store.lookup("big")
        assert hit is not None and hit.value.sum() == 300_000  # referenced files stay


@pytest.mark.parametrize("field", [b'"crc32"', b'"is_awaitable"', b'"key"'])
def test_damaged_metadata_field_is_damage_not_a_silent_change(tmp_path: Path, field: bytes) -> None:
    """Found by the long stress run: a flip in the name "crc32" switched the value's check off."""
    root = tmp_path / "d"
    with DirectoryStore(str(root)) as store:
        store.put("k", {"s": "x" * 100}, is_awaitable=False)
    path = root / "k.ckpt"
    data = path.read_bytes()
    assert field in data
    path.write_bytes(data.replace(field, field[:1] + b"g" + field[2:], 1))
    with DirectoryStore(str(root)) as store:
        with pytest.raises(CorruptEntryError, match="metadata record fails its checksum"):
            store.lookup("k")
        assert store.keys() == ["k"] and "damaged" in next(iter(store.iter_meta()))


def test_directory_leftovers_of_dead_writers_are_found_and_removed(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with DirectoryStore(str(root)) as store:
        store.put("a/b", 1)
        host = os.uname().nodename
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
        left = root / "a" / f".b.ckpt.{host}.{dead}.00ff00ff.tmp"
        live = root / "a" / f".c.ckpt.{host}.{os.getpid()}.00ff00ff.tmp"
        for f in (left, live):
            f.write_bytes(b"partial")
        assert store.leftover_temp_files() == [str(left)]
        assert verify_store(store).orphan_files == [str(left)]
        assert store.remove_dead_writers_files() == [str(left)]
        assert not left.exists() and live.exists() and store.keys() == ["a/b"]
