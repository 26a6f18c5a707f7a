"""Big values: the checksum computed while writing and while reading keeps every guarantee.

A big frame's CRC-32 runs in a second thread alongside the writes and the
reads, with zlib-ng's implementation when installed. These tests check that
the recorded checksum is the standard CRC-32 (entries written before read on,
and the other way round), that damage anywhere in a big value is caught
before anything is unpickled, and that no checksum thread outlives its call.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from _powerfs import Mount, fuse_unavailable
from ai2_kit.core.checkpoint import CorruptEntryError, SignatureMismatchError, _codec
from ai2_kit.core.checkpoint._codec import _checksum, _fileio
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store

#: Above the size from which the checksum runs in its own thread.
BIG = 3 * _codec._THREAD_MIN


class Payload:
    """Unpickling this creates a marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def big_array(seed: int = 0) -> Any:
    return np.random.default_rng(seed).random(BIG // 8)


def stdlib_crc(value: Any) -> str:
    """The CRC-32 of ``value``'s frame parts, by the standard library alone."""
    crc = 0
    for part in _codec.encode(value).parts:
        crc = zlib.crc32(part, crc)
    return f"{crc:08x}"


def checksum_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ai2-kit-checksum"]


def entry_file(store: Store, key: str) -> Path:
    """The file holding ``key``'s frame: the side file or the entry file."""
    if isinstance(store, SQLiteStore):
        files = list(Path(store.blob_dir).glob("*.frame"))
        assert len(files) == 1
        return files[0]
    assert isinstance(store, DirectoryStore)
    return Path(store._path(key))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_big_value_records_the_standard_crc32_and_reads_back(store_factory: Callable[..., Store]) -> None:
    store = store_factory()
    value = big_array()
    meta = store.put("k", value)
    assert meta["crc32"] == stdlib_crc(value)
    reader = store_factory()
    on_disk = reader.get_meta("k")
    assert on_disk is not None and on_disk["crc32"] == meta["crc32"]  # the record, not a placeholder
    hit = reader.lookup("k")
    assert hit is not None and np.array_equal(hit.value, value)
    assert reader.verify("k") is None
    assert checksum_threads() == []


def test_fast_crc32_is_the_standard_one() -> None:
    fast = _codec._fast_crc32()
    view = memoryview(np.random.default_rng(1).bytes(3 * _codec._CHUNK + 12345))
    assert fast(view, 0) == zlib.crc32(view)
    assert _codec._crc_update(7, view) == zlib.crc32(view, 7)
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        assert fast is zlib.crc32
    else:
        assert fast is zlib_ng.crc32


@pytest.mark.parametrize("writer_crc, reader_crc", [("stdlib", "fast"), ("fast", "stdlib")])
def test_entries_read_whichever_crc32_implementation_wrote_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer_crc: str, reader_crc: str
) -> None:
    """Entries written before zlib-ng was used (stdlib CRC-32) read on, and without it too."""
    impl = {"stdlib": zlib.crc32, "fast": _codec._fast_crc32()}
    value = big_array(2)
    for store in (SQLiteStore(str(tmp_path / "c.db")), DirectoryStore(str(tmp_path / "d"))):
        with store:
            monkeypatch.setattr(_checksum, "_fast", impl[writer_crc])
            store.put("k", value)
            monkeypatch.setattr(_checksum, "_fast", impl[reader_crc])
            hit = store.lookup("k")
            assert hit is not None and np.array_equal(hit.value, value)


@pytest.mark.parametrize("kind", ["sqlite", "directory"])
@pytest.mark.parametrize("where", ["first slice", "last slice"])
def test_damage_in_a_big_value_is_caught_before_unpickling(tmp_path: Path, kind: str, where: str) -> None:
    marker = tmp_path / "ran"
    store: Store = SQLiteStore(str(tmp_path / "c.db")) if kind == "sqlite" else DirectoryStore(str(tmp_path / "d"))
    with store:
        store.put("k", [Payload(marker), big_array()])
        path = entry_file(store, "k")
        size = path.stat().st_size
        flip(path, size - 100 if where == "last slice" else size - BIG + 100)
        with pytest.raises(CorruptEntryError, match="checksum mismatch"):
            store.lookup("k")
        assert not marker.exists()  # nothing was unpickled
        assert "checksum mismatch" in str(store.verify("k"))
    assert checksum_threads() == []


@pytest.mark.parametrize("kind", ["sqlite", "directory"])
def test_truncated_big_value_is_damage_and_leaves_no_thread(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    store: Store = SQLiteStore(str(tmp_path / "c.db")) if kind == "sqlite" else DirectoryStore(str(tmp_path / "d"))
    with store:
        store.put("k", [Payload(marker), big_array()])
        path = entry_file(store, "k")
        os.truncate(path, path.stat().st_size - (1 << 20))
        with pytest.raises(CorruptEntryError, match="truncated"):
            store.lookup("k")
        assert not marker.exists()
    assert checksum_threads() == []


def test_big_signed_entry_checked_before_unpickling(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    writer = store_factory()
    writer.set_signing_key("s3cret")
    value = big_array(3)
    meta = writer.put("evil", [Payload(marker), value])
    assert meta["crc32"] == stdlib_crc([Payload(marker), value]) and len(meta["mac"]) == 64
    other = store_factory()
    other.set_signing_key("another key")
    with pytest.raises(SignatureMismatchError, match="signature"):
        other.lookup("evil")
    assert not marker.exists()
    same = store_factory()
    same.set_signing_key("s3cret")
    writer.put("fine", value)
    hit = same.lookup("fine")
    assert hit is not None and np.array_equal(hit.value, value)
    assert checksum_threads() == []


class _FailingFile:
    """A file whose disk fills up after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room

    def write(self, view: memoryview) -> int:
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        n = min(self.room, view.nbytes)
        self.room -= n
        return n


def test_failed_big_write_raises_and_leaves_no_thread() -> None:
    encoded = _codec.encode(big_array())
    assert not encoded.crc_known  # left for write_to
    with pytest.raises(OSError, match="No space"):
        encoded.write_to(_FailingFile(BIG // 2))  # type: ignore[arg-type]
    assert checksum_threads() == []
    assert encoded.crc == stdlib_crc(big_array())  # still computed on demand


def _run(code: str, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_listing_does_not_load_the_fast_checksum(tmp_path: Path) -> None:
    """zlib-ng adds ~0.6 MB to a process: loaded on the first big checksum, not by ls."""
    with SQLiteStore(str(tmp_path / "c.db")) as store:
        store.put("small", {"a": 1})
        store.put("big", big_array())
    out = _run("""
        import sys
        from ai2_kit.core.checkpoint.stores import SQLiteStore
        with SQLiteStore(sys.argv[1] + "/c.db") as store:
            keys = [m["key"] for m in store.iter_meta()]
            small = store.lookup("small").value
            print(keys, small, "zlib_ng" in sys.modules)
            store.lookup("big")
            print(sys.modules["ai2_kit.core.checkpoint._codec._checksum"]._fast is not None)
        """, tmp_path)
    assert out.split("\n")[:2] == ["['big', 'small'] {'a': 1} False", "True"]


def test_fork_after_the_fast_checksum_was_loaded_leaves_the_child_working(tmp_path: Path) -> None:
    """The import guard is held by fork(): the child must find it released."""
    out = _run("""
        import os, sys
        from ai2_kit.core.checkpoint._codec import _checksum
        data = memoryview(bytes(range(256)) * 8192)
        expected = _checksum._crc_update(0, data)
        pid = os.fork()
        if pid == 0:
            _checksum._fast = None  # the child loads it again, under the same guard
            ok = _checksum._crc_update(0, data) == expected and _checksum._import_lock.acquire(timeout=30)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), _checksum._import_lock.acquire(timeout=30))
        """, tmp_path)
    assert out.strip() == "0 True"


def test_bench_arrays_runs_end_to_end(tmp_path: Path) -> None:
    """benchmarks/bench_arrays.py at a tiny size, every contender (no timing is checked)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_arrays.py"
    done = subprocess.run(
        [sys.executable, str(script), "--mb", "12", "--rounds", "1", "--stores", "sqlite,dir,sqlite-put,dir-put",
         "--tmp", str(tmp_path), "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, _, second = done.stdout.partition("Median over")
    rows = [line for line in first.splitlines() if line.startswith("| ") and "contender" not in line]
    assert len(rows) == 5 and all(row.rstrip().endswith("| yes |") for row in rows), done.stdout
    assert len([line for line in second.splitlines() if line.startswith("| ") and "x |" in line]) == 4


_no_fuse = fuse_unavailable()


@pytest.mark.skipif(_no_fuse is not None and os.environ.get("CI") != "true", reason=str(_no_fuse))
@pytest.mark.parametrize("kind", ["sqlite", "directory"])
def test_big_value_survives_a_power_cut_right_after_put(tmp_path: Path, kind: str) -> None:
    """The checksum written after the frame (the directory store rewrites its record) is fsynced too.

    tests/_powerfs.py keeps only what was fsynced: a record rewritten after
    the fsync would come back with its placeholder checksum.
    """
    mount = Mount(str(tmp_path / "disk"), str(tmp_path / "mnt"))
    mount.start()
    value = big_array(4)
    try:
        store: Store = (SQLiteStore(mount.path("c.db")) if kind == "sqlite"
                        else DirectoryStore(mount.path("d")))
        with store:
            store.put("k", value)
    finally:
        mount.cut()
    disk = tmp_path / "disk"
    with (SQLiteStore(str(disk / "c.db")) if kind == "sqlite" else DirectoryStore(str(disk / "d"))) as after:
        hit = after.lookup("k")
        assert hit is not None and np.array_equal(hit.value, value)


# -- a big frame handed to the disk slice by slice, then fsynced --------------------

STRACE = shutil.which("strace")

_WRITEBACK_CHILD = """
import sys
import numpy as np
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore
kind, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = SQLiteStore(root + "/c.db") if kind == "sqlite" else DirectoryStore(root + "/d")
with store:
    store.put("k", np.random.default_rng(5).random(n))
"""

_TRACED = re.compile(r"^(?:\d+\s+)?(sync_file_range|fsync|fdatasync|rename)\((\d+<([^>]*)>|\"([^\"]*)\")(.*)$")


@pytest.mark.skipif(STRACE is None and os.environ.get("CI") != "true",
                    reason="strace is not installed (scripts/test.sh installs it)")
@pytest.mark.parametrize("kind", ["sqlite", "directory"])
def test_big_frame_goes_to_disk_slice_by_slice_then_is_fsynced(tmp_path: Path, kind: str) -> None:
    """Each written slice of a big frame is handed to the disk at once (``sync_file_range``).

    Left to itself the kernel would keep the whole frame in memory until the
    fsync, which then waits for all of it. The hints must cover the value's
    bytes exactly, up to the end of the file, and come before the file's
    fsync, which still comes before the entry becomes visible (the rename;
    tests/test_fsync_order.py checks the rest of the order).
    """
    assert STRACE is not None
    trace = tmp_path / "trace"
    root = tmp_path / "store"
    root.mkdir()
    done = subprocess.run(
        [STRACE, "-f", "-y", "-o", str(trace), "-e", "trace=sync_file_range,fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", _WRITEBACK_CHILD, kind, str(root), str(BIG // 8)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events: list[tuple[str, str, str]] = []
    for line in trace.read_text().splitlines():
        m = _TRACED.match(line.strip())
        if m:
            events.append((m.group(1), m.group(3) or m.group(4), m.group(5)))
    suffix = ".frame" if kind == "sqlite" else ".tmp"
    hints = [(path, rest) for call, path, rest in events if call == "sync_file_range" and path.endswith(suffix)]
    assert len(hints) >= 2, events
    paths = {path for path, _ in hints}
    assert len(paths) == 1, paths
    (written,) = paths
    ranges = [tuple(int(x) for x in re.findall(r"\d+", rest)[:2]) for _, rest in hints]
    assert all("SYNC_FILE_RANGE_WRITE" in rest and "WAIT" not in rest for _, rest in hints)
    # Contiguous, in order, and ending where the file ends: every byte of the value, once.
    for (off, n), (nxt, _) in zip(ranges, ranges[1:]):
        assert off + n == nxt, ranges
    final = written if kind == "sqlite" else str(root / "d" / "k.ckpt")
    assert ranges[-1][0] + ranges[-1][1] == os.path.getsize(final)
    assert ranges[0][0] < 4096 + 8 * 4 + 100  # after the record and the frame's header only
    assert sum(n for _, n in ranges) >= BIG
    last_hint = max(i for i, (call, path, _) in enumerate(events) if call == "sync_file_range" and path == written)
    syncs = [i for i, (call, path, _) in enumerate(events) if call in ("fsync", "fdatasync") and path == written]
    assert syncs and syncs[-1] > last_hint, "the file was not fsynced after its last slice was written"
    if kind == "directory":
        renamed = [i for i, (call, path, _) in enumerate(events) if call.startswith("rename") and path == written]
        assert renamed and syncs[-1] < renamed[0]


@pytest.mark.parametrize("refusal", ["refused", "missing"])
def test_big_save_does_not_depend_on_the_writeback_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """A system without ``sync_file_range``, or a file system refusing it, saves exactly as before."""
    calls: list[tuple[int, int, int, int]] = []

    def refuse(fd: int, offset: int, n: int, flags: int) -> int:
        calls.append((fd, offset, n, flags))
        return -1

    monkeypatch.setattr(_fileio, "_sync_file_range", refuse if refusal == "refused" else False)
    value = big_array(6)
    for store in (SQLiteStore(str(tmp_path / "c.db")), DirectoryStore(str(tmp_path / "d"))):
        with store:
            meta = store.put("k", value)
            assert meta["crc32"] == stdlib_crc(value)
            hit = store.lookup("k")
            assert hit is not None and np.array_equal(hit.value, value)
    # Refused once per file, then no more hints for that file.
    assert len(calls) == (2 if refusal == "refused" else 0)


def test_big_frame_written_to_a_file_without_descriptor() -> None:
    """``write_to`` also writes into a file object that has no OS file behind it."""
    value = big_array(7)
    encoded = _codec.encode(value)
    out = io.BytesIO()
    encoded.write_to(out)  # type: ignore[arg-type]
    assert out.getvalue() == _codec.encode(value).to_bytes()
    assert encoded.crc == stdlib_crc(value)


def test_big_save_in_a_child_forked_after_one(tmp_path: Path) -> None:
    """The writeback hint looked up in the parent (ctypes) serves a forked child too."""
    out = _run("""
        import os, sys
        import numpy as np
        from ai2_kit.core.checkpoint._codec import _fileio
        from ai2_kit.core.checkpoint.stores import DirectoryStore
        s = DirectoryStore(sys.argv[1] + "/d")
        a = np.arange(3 << 20, dtype=np.float64)  # 24 MB: hinted slice by slice
        s.put("parent", a)
        looked_up = _fileio._sync_file_range is not None
        pid = os.fork()
        if pid == 0:
            s.put("child", a + 1)
            hit = s.lookup("child")
            os._exit(0 if hit is not None and np.array_equal(hit.value, a + 1) else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), looked_up)
        """, tmp_path)
    assert out.strip() == "0 True"
