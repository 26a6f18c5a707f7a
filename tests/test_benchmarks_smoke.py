"""The benchmark suite still runs end to end (tiny sizes; no timing is checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
OURS = ("sqlite", "dir")
CONTENDERS = "sqlite,dir,floor_full,floor_normal,pickle_append,np_save,np_save_fsync"
SIZES = (50, 200)


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(BENCH, "report.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--sizes", ",".join(map(str, SIZES)),
         "--contenders", CONTENDERS, "--results", str(out / "results"), "--tmp", str(out), "--no-docs"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## W1 save" in proc.stdout and "## Targets" in proc.stdout
    with open(out / "results" / "latest.json", encoding="utf-8") as f:
        return json.load(f)


def _one(results: dict, workload: str, contender: str, n: int | None = None) -> dict:
    found = [r for r in results["records"]
             if r["workload"] == workload and r["contender"] == contender and (n is None or r["n"] == n)]
    assert len(found) == 1, (workload, contender, n, found)
    rec = found[0]
    assert "error" not in rec, rec
    return rec


@pytest.mark.slow
def test_every_record_is_well_formed(results: dict) -> None:
    assert results["meta"]["quick"] is True
    for rec in results["records"]:
        assert {"contender", "workload", "n"} <= rec.keys()
        assert "error" not in rec, rec
        assert rec["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("contender", [*OURS, "floor_full", "floor_normal", "pickle_append"])
def test_small_steps_saved_then_all_hits_equal(results: dict, contender: str) -> None:
    for n in SIZES:
        save = _one(results, "W1", contender, n)
        assert save["done"] == n and save["stopped_at"] is None and save["runs"] == n
        assert save["mean_us"] > 0 and save["blocks"]
        resume = _one(results, "W2", contender, n)
        assert resume["checked"] == n
        assert resume["mismatches"] == 0, "a stored value came back different"
        assert resume["reran"] == 0, "a stored step ran again"
        assert resume["open_ms"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("contender", [*OURS, "floor_full", "pickle_append"])
def test_listing_finds_every_entry(results: dict, contender: str) -> None:
    n = results["meta"]["w3"][0]
    assert _one(results, "W3build", contender)["built"] == n
    assert _one(results, "W3", contender)["listed"] == n


@pytest.mark.slow
@pytest.mark.parametrize("contender", [*OURS, "np_save", "np_save_fsync"])
def test_big_array_round_trips(results: dict, contender: str) -> None:
    save = _one(results, "W4save", contender)
    assert save["array_mb"] == pytest.approx(results["meta"]["w4_mb"])
    for workload in ("W4load", "W4warm"):
        load = _one(results, workload, contender)
        assert load["equal"] is True and load["reran"] == 0


@pytest.mark.slow
def test_docs_render_from_results(results: dict, tmp_path) -> None:
    report = _load_report()
    text = report.render(results)
    headings = ("## Targets", "## W1 save", "## W2 resume", "## W3 list", "## W4 big value", "## W5 growth")
    for heading in headings:
        assert heading in text
    written = report.write_docs(results, str(tmp_path))
    assert os.path.join(str(tmp_path), "performance.md") in written
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "performance-growth.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_paired_hit_harness_runs(tmp_path) -> None:
    # benchmarks/bench_hits.py: stores built by W1, then every contender's hits in turn
    # (diskcache is a benchmark extra, left out here); it exits non-zero if any call missed.
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_hits.py"), "--n", "40", "--passes", "1", "--dir", str(tmp_path),
         "--contenders", "sqlite,sqlite_ignore,floor_full", "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 40 and set(out["passes"][0]["x_floor"]) == {"sqlite", "sqlite_ignore"}


@pytest.mark.slow
def test_the_suite_pairs_hits_in_one_process(results: dict) -> None:
    # run.py runs bench_hits.py at the first size of a quick run; the hit goals read its ratios.
    rec = _one(results, "W2pair", "sqlite", SIZES[0])
    assert rec["sqlite_x_floor"] > 0 and set(rec["median_us"]) == {"sqlite", "floor_full"}
    report = _load_report()
    rows = [row for row in report.targets(report.Results(results)) if row[0].startswith("hit, staleness checks on")]
    assert any("called in turn in one process" in row[2] for row in rows), rows
