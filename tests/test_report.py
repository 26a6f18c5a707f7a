"""The report page: built from metadata only, self-contained, and checked in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ai2_kit.core.checkpoint._ops import open_existing
from ai2_kit.core.checkpoint._report import MAX_ROWS, WIDTH, render_report, steps_from_metas

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What a headless Chromium needs on a closed network (see the project's test script).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]


def need_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing under CI=true: scripts/test.sh installs it")
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    return CHROMIUM


def browse(page: Path, tmp_path: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """Load ``page`` in headless Chromium: (the DOM after loading, console messages).

    With ``screenshot``, a PNG of a 1400 x 900 window is written there instead of the DOM.
    """
    exe = need_chromium()
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    what = ["--dump-dom"] if screenshot is None else [f"--screenshot={screenshot}", "--window-size=1400,900"]
    proc = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *what, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def bars_in(dom: str) -> int:
    """Steps drawn on the timeline: single bars plus the steps inside aggregate bars."""
    single = len(re.findall(r'<rect class="bar" ', dom))
    grouped = sum(int(n) for n in re.findall(r'<rect class="bar agg" data-count="(\d+)"', dom))
    return single + grouped


def metas_for(n: int, t0: float, runs: tuple[str, ...] = ("r1",), step: float = 1.0) -> list[dict[str, Any]]:
    return [
        {"key": f"iters-{i % 3:03d}/step-{i}", "created": t0 + i * step + 0.5, "duration": 0.5, "size": 1000 + i,
         "fn_name": "train", "call_site": "wf.py:10", "host": "node-1", "run": runs[i % len(runs)]}
        for i in range(n)
    ]


def test_every_step_is_one_bar_with_its_details(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    metas = metas_for(12, t0, runs=("r1", "r2"))
    page = render_report("ckpt.db", metas, [{"id": "r1", "started": t0}, {"id": "r2", "started": t0 + 1}])
    assert bars_in(page) == 12
    assert page.count('class="bar agg"') == 0
    hover = re.search(r'data-key="iters-001/step-1".*?<title>(.*?)</title>', page, re.S)
    assert hover is not None
    for part in ("iters-001/step-1", "function: train", "call site: wf.py:10", "size: 1001 B", "host: node-1"):
        assert part in hover.group(1)
    lanes = re.findall(r'<text class="lane"[^>]*>([^<]*)</text>', page)
    assert lanes == ["iters-000", "iters-001", "iters-002"]
    # Coloured by run: two runs, two colours.
    assert len(set(re.findall(r'class="bar" data-key="[^"]*"[^>]*fill="(#[0-9a-f]+)"', page))) == 2


def test_thin_steps_are_aggregated_and_none_is_lost() -> None:
    t0 = 1_700_000_000.0
    metas = metas_for(100_000, t0, step=0.01)
    started = time.perf_counter()
    page = render_report("big.db", metas)
    elapsed = time.perf_counter() - started
    assert bars_in(page) == 100_000
    # Aggregated: at most one shape per pixel column of each row of each of the 3 lanes.
    assert page.count("<rect") <= 3 * MAX_ROWS * int(WIDTH) < 100_000
    print(f"\nreport of 100,000 entries: {elapsed:.2f} s, {len(page) / 1e6:.1f} MB")


def test_long_idle_gaps_are_cut_out_of_the_axis() -> None:
    t0 = 1_700_000_000.0
    monday = metas_for(5, t0, runs=("r1",))
    wednesday = metas_for(5, t0 + 2 * 86400, runs=("r2",))
    for m in wednesday:
        m["key"] += "-b"
    page = render_report("ckpt.db", monday + wednesday)
    assert page.count('class="cut"') == 1
    assert re.search(r"47h59m without saved steps \(cut out\)", page)
    widths = [float(w) for w in re.findall(r'<rect class="bar" [^>]*width="([0-9.]+)"', page)]
    assert len(widths) == 10
    assert min(widths) > 10  # the 2-day gap did not squash the steps to nothing


def test_damaged_stale_and_reference_entries_are_listed_without_unpickling() -> None:
    metas = [
        {"key": "a", "created": 10.0, "duration": 1.0, "size": 5},
        {"key": "b", "damaged": "metadata unreadable"},
        {"key": "legacy/x", "size": 3},  # a reference entry: no times
    ]
    # Judged stale by a run that started after the entry was saved: stale now.
    runs = [{"id": "r1", "started": 11.0, "last": 12.0, "stale_keys": ["a"], "steps_run": 1}]
    steps, damaged, untimed = steps_from_metas(metas)
    assert [s.key for s in steps] == ["a"] and [m["key"] for m in damaged] == ["b"]
    assert [m["key"] for m in untimed] == ["legacy/x"]
    page = render_report("ckpt.db", metas, runs)
    assert '<li class="damaged">b: metadata unreadable</li>' in page
    assert '<li class="stale">a ' in page
    assert ">legacy</td>" in page  # in the key tree


def test_keys_and_text_are_escaped() -> None:
    metas = [{"key": "it/<script>alert(1)</script>", "created": 10.0, "duration": 1.0, "fn_name": '"><b>x'}]
    page = render_report("<db>", metas, [{"id": "<r>", "argv": ["<x>"]}])
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page


def test_the_page_loads_in_a_real_browser_with_no_console_errors(tmp_path: Path) -> None:
    t0 = time.time() - 100
    page = tmp_path / "report.html"
    page.write_text(render_report("ckpt.db", metas_for(30, t0), [{"id": "r1", "started": t0}]), encoding="utf-8")
    dom, console = browse(page, tmp_path)
    assert console == []
    assert bars_in(dom) == 30
    shot = tmp_path / "shot.png"
    browse(page, tmp_path, screenshot=shot)
    assert shot.stat().st_size > 1000


def test_the_console_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction()</script></body></html>", encoding="utf-8")
    _, console = browse(page, tmp_path)
    assert any("undefinedFunction" in line for line in console)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow.py"


def run_example(store: Path, *flags: str, fail_at: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("AI2_KIT_EXAMPLE_FAIL_AT", None)
    if fail_at:
        env["AI2_KIT_EXAMPLE_FAIL_AT"] = fail_at
    return subprocess.run([sys.executable, str(EXAMPLE), "--store", str(store), "--step-seconds", "0.05", *flags],
                          env=env, capture_output=True, text=True, timeout=120)


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``ai2-kit-checkpoint`` console script."""
    exe = os.path.join(os.path.dirname(sys.executable), "ai2-kit-checkpoint")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags", [[], ["--dir"]], ids=["file", "dir"])
def test_runs_and_report_of_the_example_workflow(tmp_path: Path, flags: list[str]) -> None:
    store = tmp_path / "store"
    first = run_example(store, *flags, fail_at="iters-001/explore")
    assert first.returncode == 1, first.stderr
    second = run_example(store, *flags)
    assert second.returncode == 0, second.stderr
    # Two runs, oldest first: the failed one saved 13 steps; the resumed one hit those 13 and ran 11.
    out = tool("load", str(store), "-", "runs", "--json")
    assert out.returncode == 0, out.stderr
    runs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["steps_run"], r["hits"], r["save_failures"]) for r in runs] == [(13, 0, 0), (11, 13, 0)]
    assert runs[1]["saved_seconds"] >= 13 * 0.05
    assert all(r["pid"] != os.getpid() and r["argv"][0].endswith("workflow.py") for r in runs)
    table = tool("runs", str(store))
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 3  # a heading and two runs
    # Every entry names the run that saved it.
    with open_existing(str(store), readonly=True) as st:
        by_run = {m["key"]: m.get("run") for m in st.iter_meta()}
    assert len(by_run) == 24
    assert sorted(set(by_run.values())) == sorted(r["id"] for r in runs)

    page = tmp_path / "report.html"
    made = tool("load", str(store), "-", "report", str(page))
    assert made.returncode == 0, made.stderr
    dom, console = browse(page, tmp_path)
    assert console == []
    assert bars_in(dom) == 24  # one bar per saved step
    assert dom.count("<tr data-run=") == 2
    shot = tmp_path / "report.png"
    browse(page, tmp_path, screenshot=shot)
    assert shot.stat().st_size > 1000


def _store_with(tmp_path: Path, n: int) -> Path:
    from ai2_kit.core.checkpoint.stores import SQLiteStore

    path = tmp_path / "many.db"
    with SQLiteStore(str(path)) as store:
        for i in range(n):
            store.put(f"k/{i:04d}", i)
    return path


def _on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the console script with stderr on a pseudo-terminal: (status, what the terminal showed)."""
    import fcntl
    import pty
    import struct
    import termios

    exe = os.path.join(os.path.dirname(sys.executable), "ai2-kit-checkpoint")
    master, slave = pty.openpty()
    # A real terminal has a size; a new pseudo-terminal is 0 x 0, where a bar has no room.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=60), shown.decode(errors="replace")


@pytest.mark.parametrize("command", ["verify", "copy", "salvage", "migrate"])
def test_long_commands_show_progress_on_a_terminal_only(tmp_path: Path, command: str) -> None:
    import pickle

    if command == "migrate":
        src = tmp_path / "ref.pkl"  # a reference 2023 file: {key: {"return": ..., "info": ...}}
        src.write_bytes(pickle.dumps({f"k/{i}": {"return": i, "info": None} for i in range(300)}))
        args = ["migrate", str(src)]
        label = "check"
    else:
        src = _store_with(tmp_path, 300)
        args = {"verify": ["verify", str(src)], "copy": ["copy", str(src), str(tmp_path / "copy.db")],
                "salvage": ["verify", str(src), "--salvage", str(tmp_path / "saved.db")]}[command]
        label = "copy" if command == "salvage" else command
    piped = tool(*args)
    assert piped.returncode == 0, piped.stderr
    assert f"{label}:" not in piped.stderr and "entries/s" not in piped.stderr
    for path in (tmp_path / "copy.db", tmp_path / "saved.db"):
        if path.exists():
            path.unlink()
    if command == "migrate":
        src.unlink()
        src.write_bytes(pickle.dumps({f"k/{i}": {"return": i, "info": None} for i in range(300)}))
        for bak in tmp_path.glob("ref.pkl.legacy-*"):
            bak.unlink()
    status, shown = _on_a_terminal(*args)
    assert status == 0, shown
    assert f"{label}:" in shown and " entries" in shown, shown


def test_migrate_of_a_pickle_that_is_not_reference_shaped_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    import pickle

    src = tmp_path / "other.pkl"
    data = pickle.dumps({"k": {"value": 1}})
    src.write_bytes(data)
    out = tool("migrate", str(src))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "no 'return' field" in out.stderr
    assert src.read_bytes() == data
    # No backup, no half-written store (the hidden lock file stays, as after every migration).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pkl.migrate.lock", "other.pkl"]


def test_every_store_keeps_runs(store_factory: Any) -> None:
    store = store_factory()
    assert store.iter_runs() == []  # a store (or an old one) without runs lists none
    store.put("a", 1, run="r2")
    store.put_run({"id": "r2", "started": 20.0, "hits": 1})
    store.put_run({"id": "r1", "started": 10.0, "hits": 0})
    store.put_run({"id": "r2", "started": 20.0, "hits": 5})  # replaced, not added
    assert [(r["id"], r["hits"]) for r in store.iter_runs()] == [("r1", 0), ("r2", 5)]
    again = store_factory()
    assert [r["id"] for r in again.iter_runs()] == ["r1", "r2"]
    assert again.get_meta("a")["run"] == "r2"
    assert [m["key"] for m in again.iter_meta()] == ["a"]  # runs are not entries
    readonly = store_factory(readonly=True)
    readonly.put_run({"id": "r3", "started": 30.0})  # read-only: kept nowhere, no error
    assert [r["id"] for r in again.iter_runs()] == ["r1", "r2"]


def test_steps_that_ran_side_by_side_get_rows_of_their_own() -> None:
    t0 = 1_700_000_000.0
    # Four models trained at once, then one step after them: 4 rows, the last step back in the first.
    metas = [{"key": f"it/train/m{i}", "created": t0 + 10, "duration": 10.0} for i in range(4)]
    metas.append({"key": "it/explore", "created": t0 + 15, "duration": 5.0})
    page = render_report("ckpt.db", metas)
    ys = {key: float(y) for key, y in re.findall(r'data-key="([^"]+)" x="[0-9.]+" y="([0-9.]+)"', page)}
    assert len({ys[f"it/train/m{i}"] for i in range(4)}) == 4
    assert ys["it/explore"] == ys["it/train/m0"]
