"""The PostgreSQL store across a network partition, for real.

A private network namespace (``unshare -n``, loopback only) holds a
PostgreSQL server of its own and the client; nftables drops the server's
replies (a half-open connection), then both directions, during a save and a
hit on threads that already hold a connection. Every call must end within
the store's timeout (a generous deadline here, never a timing assertion),
nothing acknowledged may be lost, a save cut off mid-flight lands exactly
once, and saving resumes after the heal. A third cut comes while a save waits
on a row lock on the server (its request received and acknowledged): the
statement deadline and the keepalives bound it. The work is done by
tests/_netns_pg.py inside the namespace.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

TIMEOUT = 3.0
#: Per call: the timeout, one reconnect (capped at the timeout), and slack for
#: a loaded machine; a hung call (the defect) would wait for minutes.
DEADLINE = 30.0


def _bindir() -> str | None:
    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "initdb"))]
    return max(dirs, key=lambda d: int(Path(d).parent.name)) if dirs else None


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need root on Linux"
    for tool in ("unshare", "nft", "ip", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test.sh installs nftables)"
    import pwd  # (Unix only: after the platform check)

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres system user to run the server as (scripts/postgres.sh creates it)"
    if _bindir() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    probe = subprocess.run(["unshare", "-n", "nft", "list", "tables"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"no private network namespace with nftables here ({probe.stderr.decode().strip()[:80]})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_partition_bounds_every_call_and_loses_nothing() -> None:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    work = tempfile.mkdtemp(prefix="ai2kit-netns-")
    try:
        os.chmod(work, 0o755)
        shutil.chown(work, "postgres")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run(
            ["unshare", "-n", sys.executable, str(Path(__file__).with_name("_netns_pg.py")),
             str(_bindir()), work, str(TIMEOUT), str(DEADLINE)],
            capture_output=True, text=True, timeout=280, env=env,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "harness_error" not in report, report["harness_error"]
    assert all("result" in w for w in report["warm"]), report["warm"]

    assert report["save_behind_lock"].get("waiting"), report["save_behind_lock"]
    for phase in ("hit_half_open", "save_half_open", "save_full_cut", "hit_full_cut", "save_behind_lock"):
        got = report[phase]
        assert not got.get("hung"), f"{phase}: still blocked after {DEADLINE} s (timeout {TIMEOUT} s): {report}"
        assert "error" in got, f"{phase}: returned during the cut: {got}"
        # One clear error naming the server (password masked) and what was being done.
        assert "127.0.0.1:5432" in got["message"] and "sekret" not in got["message"], (phase, report)
    for phase in ("hit_half_open", "save_half_open", "save_full_cut", "hit_full_cut", "save_behind_lock"):
        message = report[phase]["message"]
        assert "did not answer" in message and f"timeout {TIMEOUT:g} s" in message, (phase, message)
    assert "looking up 'kept'" in report["hit_half_open"]["message"]
    assert "saving 'half'" in report["save_half_open"]["message"]
    assert report["save_half_open"]["error"] == "SaveError"
    assert report["save_half_open"]["cause"] == report["hit_half_open"]["error"] == "StoreTimeoutError"

    # Saving resumes after each heal; nothing acknowledged is lost, and the
    # saves cut off mid-flight are there once, whole: none had committed
    # (without the re-send by the next call they are missing or old), and a
    # re-send never replaces a newer value saved meanwhile by another host.
    for phase in ("save_after_heal_1", "save_after_heal_2", "hit_after_heal", "save_after_heal_3"):
        assert "result" in report[phase], (phase, report[phase])
    # The save behind the lock was cancelled by its deadline or committed
    # after the heal; either way it is there once the next save has settled it.
    assert report["final"] == {"kept": "saved behind a lock", "half": "half-open value", "after1": 1,
                               "full": "newer, from another host", "after2": 2, "after3": 3}, report["final"]


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "5", True])
def test_timeout_option_is_checked(bad: Any) -> None:
    from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

    with pytest.raises(ValueError, match=r"^timeout must be"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", timeout=bad)
    if isinstance(bad, float):
        with pytest.raises(ValueError, match=r"^the URL's timeout must be"):
            PostgresStore(f"postgresql://nobody@127.0.0.1:1/none?timeout={bad}")
    with pytest.raises(ValueError, match=r"^the URL's timeout must be a number"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none?timeout=5s")


@pytest.mark.postgres
def test_every_connection_carries_the_bound_unless_the_url_sets_it(tmp_path: Any) -> None:
    # The defect: connections had no keepalives, no TCP user timeout and no
    # statement deadline, so a silent server held a call for ever.
    from ai2_kit.core.checkpoint.stores._postgres import PostgresStore
    from conftest import _drop_pg_schema, location_for

    url, options = location_for("postgres", tmp_path)
    sep = "&" if "?" in url else "?"
    store = PostgresStore(url + sep + "keepalives_idle=7", timeout=4, **options)
    try:
        conn = store._conn()
        params = conn.info.get_parameters()
        assert params.get("keepalives") == "1"
        assert params.get("keepalives_idle") == "7"  # the URL's own value wins
        assert params.get("tcp_user_timeout") == "4000"
        assert conn.execute("SHOW statement_timeout").fetchone() == ("4s",)
        assert store.timeout == 4.0
    finally:
        store.close()
    default = PostgresStore(url, **options)
    from_url = PostgresStore(url + sep + "timeout=2.5", **options)
    try:
        conn = default._conn()
        assert conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
        assert conn.info.get_parameters().get("tcp_user_timeout") == "30000"
        assert from_url._conn().execute("SHOW statement_timeout").fetchone() == ("2500ms",)
        # Reopened in another process (a pool's worker) with the same bound.
        described = from_url.describe()
        assert described is not None and ("timeout", 2.5) in described[1]
        assert "timeout" not in described[0]
    finally:
        default.close()
        from_url.close()
        _drop_pg_schema(url, options["schema"])
