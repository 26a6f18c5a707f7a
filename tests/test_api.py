"""The seed facade and the Checkpointer: what a workflow author relies on."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import ai2_kit.core.checkpoint as cp
from ai2_kit.core.checkpoint import (
    Checkpointer,
    CheckpointError,
    FnInfo,
    InvalidKeyError,
    NewerFormatError,
    NotACheckpointStoreError,
    SaveError,
    apply_checkpoint,
    del_checkpoint,
    set_checkpoint_dir,
    set_checkpoint_file,
)
from ai2_kit.core.checkpoint.stores import SQLiteStore

LOGGER = "ai2_kit.core.checkpoint"


@pytest.fixture(params=["file", "dir"])
def enable(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Turn the module facade on with either store."""

    def on() -> Checkpointer:
        if request.param == "file":
            return set_checkpoint_file(tmp_path / "checkpoint.pkl")
        return set_checkpoint_dir(tmp_path / "checkpoints")

    return on


class Counter:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return {"args": args, "kwargs": kwargs}


def test_first_call_runs_later_calls_hit(enable: Any) -> None:
    enable()
    step = Counter()
    assert apply_checkpoint("step")(step)(1, b=2) == {"args": (1,), "kwargs": {"b": 2}}
    assert apply_checkpoint("step")(step)(5) == {"args": (1,), "kwargs": {"b": 2}}
    assert len(step.calls) == 1


@pytest.mark.parametrize("value", [None, False, 0, "", [], {}, ValueError("as value")], ids=repr)
def test_falsy_values_and_exceptions_are_results(enable: Any, value: Any) -> None:
    enable()
    calls = []

    def step() -> Any:
        calls.append(1)
        return value

    first = apply_checkpoint("k")(step)()
    second = apply_checkpoint("k")(step)()
    assert calls == [1]
    if isinstance(value, Exception):
        assert type(second) is ValueError and second.args == value.args
    else:
        assert second == first == value


def test_step_that_raises_saves_nothing(enable: Any) -> None:
    ckpt = enable()

    class Boom(RuntimeError):
        pass

    def step() -> int:
        raise Boom("node died")

    with pytest.raises(Boom, match="node died") as info:
        apply_checkpoint("k")(step)()
    assert info.type is Boom
    assert ckpt.store.keys() == []
    assert apply_checkpoint("k")(lambda: 7)() == 7  # the rerun runs the step


def test_async_steps_under_gather(enable: Any) -> None:
    enable()
    ran: list[int] = []

    async def step(i: int) -> int:
        ran.append(i)
        await asyncio.sleep(0.01)
        return i * i

    async def workflow() -> list[int]:
        return await asyncio.gather(*(apply_checkpoint(f"iters-000/s{i}")(step)(i) for i in range(8)))

    assert asyncio.run(workflow()) == [i * i for i in range(8)]
    assert asyncio.run(workflow()) == [i * i for i in range(8)]
    assert sorted(ran) == list(range(8))
    wrapped = apply_checkpoint("x")(step)
    assert inspect.isawaitable(coro := wrapped(1))
    assert asyncio.run(coro) == 1  # type: ignore[arg-type]


def test_async_step_that_raises_saves_nothing(enable: Any) -> None:
    ckpt = enable()

    async def step() -> int:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        asyncio.run(apply_checkpoint("k")(step)())
    assert ckpt.store.keys() == []


def test_sync_function_returning_awaitable_like_reference(enable: Any) -> None:
    enable()

    async def inner(x: int) -> int:
        return x + 1

    def step(x: int) -> Any:
        return inner(x)

    assert asyncio.run(apply_checkpoint("k")(step)(1)) == 2
    again = apply_checkpoint("k")(step)(5)
    assert inspect.isawaitable(again)  # a hit is awaitable too
    assert asyncio.run(again) == 2


def test_no_location_or_disable_just_runs(tmp_path: Path) -> None:
    step = Counter()
    apply_checkpoint("k")(step)(1)
    apply_checkpoint("k")(step)(1)
    assert len(step.calls) == 2
    ckpt = set_checkpoint_file(tmp_path / "c.db")
    apply_checkpoint("k", disable=True)(step)(1)
    apply_checkpoint("k", disable=True)(step)(1)
    assert len(step.calls) == 4
    assert ckpt.store.keys() == []


def test_decorate_before_setting_the_file(tmp_path: Path) -> None:
    step = Counter()
    wrapped = apply_checkpoint("k")(step)
    set_checkpoint_file(tmp_path / "c.db")
    wrapped(1)
    wrapped(2)
    assert len(step.calls) == 1


def test_key_function_gets_fn_info(enable: Any) -> None:
    enable()
    seen: list[FnInfo] = []

    def key(info: FnInfo) -> str:
        seen.append(info)
        return f"{info.fn_name}/{info.args[0]}"

    def train(i: int, lr: float = 0.1) -> int:
        return i

    assert apply_checkpoint(key)(train)(3, lr=0.5) == 3
    info = seen[0]
    assert info.fn_name == "train" and info.args == (3,) and info.kwargs == {"lr": 0.5}
    file, line = info.call_site.rsplit(":", 1)
    assert file == __file__ and int(line) > 0


def test_hit_is_logged_with_duration(enable: Any, caplog: pytest.LogCaptureFixture) -> None:
    enable()
    apply_checkpoint("timed")(lambda: 1)()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        apply_checkpoint("timed")(lambda: 2)()
    hits = [r for r in caplog.records if r.getMessage().startswith("Hit checkpoint: timed")]
    assert len(hits) == 1 and hits[0].levelno == logging.INFO and "took" in hits[0].getMessage()


def test_unpicklable_result_is_returned_and_warned(enable: Any, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = enable()
    lock = threading.Lock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert apply_checkpoint("bad/key")(lambda: lock)() is lock
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'bad/key'" in warnings[0].getMessage() and "lock" in warnings[0].getMessage()
    assert ckpt.store.keys() == []


def test_strict_mode_raises_on_failed_save(tmp_path: Path) -> None:
    set_checkpoint_file(tmp_path / "c.db", strict=True)
    lock = threading.Lock()
    with pytest.raises(SaveError) as info:
        apply_checkpoint("k")(lambda: lock)()
    assert info.value.key == "k"


def test_read_only_store_hits_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.db"
    with Checkpointer(path) as ckpt:
        ckpt("old")(lambda: "saved")()
    with Checkpointer(path, readonly=True) as ro:
        assert ro("old")(lambda: "recomputed")() == "saved"
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert ro("new")(lambda: 5)() == 5
        assert any("read-only" in r.getMessage() and "'new'" in r.getMessage() for r in caplog.records)
    with Checkpointer(path) as ckpt:
        assert ckpt.store.keys() == ["old"]


def test_same_location_again_is_harmless_other_switches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = set_checkpoint_file(tmp_path / "a.db")
    assert set_checkpoint_file(str(tmp_path / "a.db")) is a
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        b = set_checkpoint_file(tmp_path / "b.db")
    assert b is not a and a.store.closed
    assert any("switched" in r.getMessage() for r in caplog.records)


def test_del_checkpoint(enable: Any) -> None:
    enable()
    step = Counter()
    apply_checkpoint("iters-000/x")(step)()
    assert del_checkpoint("iters-000/x") is True
    assert del_checkpoint("iters-000/x") is False
    apply_checkpoint("iters-000/x")(step)()
    assert len(step.calls) == 2


def test_del_checkpoint_without_store_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="set_checkpoint_file"):
        del_checkpoint("x")


@pytest.mark.parametrize("key", ["", "../x", "/etc/x", "a/../../b", "a//b", "x\x00"])
def test_bad_keys_fail_before_running(enable: Any, key: str) -> None:
    enable()
    with pytest.raises(InvalidKeyError):
        apply_checkpoint(key)(lambda: 1)()
    with pytest.raises(InvalidKeyError):
        apply_checkpoint(lambda info: key)(lambda: 1)()


def test_wrong_types_are_clear(enable: Any) -> None:
    enable()
    with pytest.raises(TypeError, match="key"):
        apply_checkpoint(3)(lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        apply_checkpoint("k")(5)  # type: ignore[arg-type]


def test_object_api_holds_several_stores(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "one.db") as one, Checkpointer(tmp_path / "two", prefer="dir") as two:
        one("k")(lambda: 1)()
        two("k")(lambda: 2)()
        assert one("k")(lambda: 0)() == 1
        assert two("k")(lambda: 0)() == 2
        assert two.store.kind == "directory"


def test_wrapper_keeps_name_and_signature(tmp_path: Path) -> None:
    def train(x: int, *, lr: float = 0.1) -> float:
        """Train."""
        return x * lr

    wrapped = apply_checkpoint("t")(train)
    assert wrapped.__name__ == "train" and wrapped.__doc__ == "Train."
    assert inspect.signature(wrapped) == inspect.signature(train)


# -- opening: what the path holds decides, and nothing foreign is overwritten --


def test_directory_given_to_set_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(NotACheckpointStoreError, match="set_checkpoint_dir"):
        set_checkpoint_file(tmp_path)


def test_file_given_to_set_checkpoint_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotACheckpointStoreError, match="set_checkpoint_file"):
        set_checkpoint_dir(tmp_path / "f")


@pytest.mark.parametrize(
    "content, words",
    [(b"", "empty"), (b"hello, I am a text file\n", "neither"), (os.urandom(4096), "neither")],
    ids=["zero-bytes", "text", "garbage"],
)
def test_foreign_files_are_refused_untouched(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "checkpoint.pkl"
    if content[:1] == b"\x80":
        content = b"\x00" + content
    path.write_bytes(content)
    with pytest.raises(NotACheckpointStoreError) as info:
        set_checkpoint_file(path)
    assert str(path) in str(info.value) and words in str(info.value)
    assert path.read_bytes() == content


def test_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(NotACheckpointStoreError, match="another application"):
        set_checkpoint_file(path)
    assert path.read_bytes() == before


def test_newer_format_opens_read_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.db"
    with SQLiteStore(str(path)) as store:
        store.put("k", 1)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store = Checkpointer(path).store  # the checkpointer says so in the log
    try:
        assert store.readonly and "99" in store.readonly_reason
        assert isinstance(store.newer_format, NewerFormatError) and store.newer_format.found == 99
        assert store.lookup("k") is not None
        with pytest.raises(CheckpointError, match="newer"):
            store.put("k2", 2)
    finally:
        store.close()
    assert any("newer" in r.getMessage() for r in caplog.records)
    assert issubclass(NewerFormatError, CheckpointError)


def test_concurrent_creation_of_one_file(tmp_path: Path, reap: Any) -> None:
    """Several processes creating the same new store at once: one file, all writes land."""
    path = tmp_path / "new.db"
    script = textwrap.dedent(
        f"""
        import sys
        from ai2_kit.core.checkpoint import set_checkpoint_file, apply_checkpoint
        set_checkpoint_file({str(path)!r})
        apply_checkpoint("k" + sys.argv[1])(lambda: sys.argv[1])()
        """
    )
    procs = reap([subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE) for i in range(6)])
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with SQLiteStore(str(path)) as store:
        assert store.keys() == [f"k{i}" for i in range(6)]


def test_seed_example_verbatim(tmp_path: Path) -> None:
    """The seed's code, unchanged: the first run sleeps 10 s, the second hits."""
    script = textwrap.dedent(
        """
        from ai2_kit.core.checkpoint import set_checkpoint_file, apply_checkpoint
        import time

        def a_time_consuming_step(timeout):
            time.sleep(timeout)

        # enable the checkpoint mechanism by setting a checkpoint file
        set_checkpoint_file("./checkpoint.pkl")

        # instead of calling the time consuming step directly,
        # `a_time_consuming_step(10)`
        # You should apply the checkpoint to the time consuming step
        apply_checkpoint('time_consuming_step')(a_time_consuming_step)(10)
        """
    )
    (tmp_path / "seed.py").write_text(script)
    subprocess.run([sys.executable, "seed.py"], cwd=tmp_path, check=True, timeout=120)
    with SQLiteStore(str(tmp_path / "checkpoint.pkl")) as store:
        first = store.get_meta("time_consuming_step")
    assert first is not None and first["duration"] >= 10 and first["fn_name"] == "a_time_consuming_step"
    subprocess.run([sys.executable, "seed.py"], cwd=tmp_path, check=True, timeout=120)
    with SQLiteStore(str(tmp_path / "checkpoint.pkl")) as store:
        # Not rewritten: the second run returned the saved None without sleeping.
        assert store.get_meta("time_consuming_step") == first


def test_dataclass_from_main_survives_a_new_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import dataclasses, sys
        from ai2_kit.core.checkpoint import set_checkpoint_file, apply_checkpoint

        @dataclasses.dataclass
        class Result:
            energy: float
            label: str

        set_checkpoint_file({str(tmp_path / "c.db")!r})
        r = apply_checkpoint("dft")(lambda: Result(float(sys.argv[1]), "run" + sys.argv[1]))()
        print(type(r).__name__, r.energy, r.label)
        """
    )
    first = subprocess.run([sys.executable, "-c", script, "1.5"], capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", script, "9.9"], capture_output=True, text=True, check=True)
    assert first.stdout == second.stdout == "Result 1.5 run1.5\n"


def test_library_configures_no_logging() -> None:
    code = (
        "import logging, ai2_kit.core.checkpoint as c\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "assert not logging.getLogger('ai2_kit.core.checkpoint').handlers\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_does_not_load_optional_drivers() -> None:
    code = "import sys, ai2_kit.core.checkpoint\nassert 'psycopg' not in sys.modules\nassert 'fire' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names() -> None:
    for name in ("set_checkpoint_file", "set_checkpoint_dir", "apply_checkpoint", "del_checkpoint", "FnInfo"):
        assert name in cp.__all__ and hasattr(cp, name)


# -- switching, closing and re-setting while steps run ------------------------------


def _step_in_thread(wrapped: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(wrapped(*args)))
    t.start()
    return t, out


def test_switch_mid_step_saves_into_the_store_the_call_started_with(tmp_path: Path) -> None:
    a = set_checkpoint_file(tmp_path / "a.db")
    running, go_on = threading.Event(), threading.Event()

    def slow() -> str:
        running.set()
        assert go_on.wait(60)
        return "from A"

    t, out = _step_in_thread(apply_checkpoint("k")(slow))
    assert running.wait(60)
    b = set_checkpoint_file(tmp_path / "b.db")  # switch while the step runs on A
    assert not a.store.closed  # A stays open for the call in flight
    go_on.set()
    t.join()
    assert out == ["from A"] and a.store.closed  # saved, then A closed
    assert b.store.keys() == []
    with Checkpointer(tmp_path / "a.db") as again:
        assert again.store.keys() == ["k"]


def test_close_mid_step_loses_nothing(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "c.db")
    running, go_on = threading.Event(), threading.Event()

    def slow() -> int:
        running.set()
        assert go_on.wait(60)
        return 7

    t, out = _step_in_thread(ckpt("k")(slow))
    assert running.wait(60)
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt("other")(lambda: 1)()  # no new calls on a closed checkpointer
    go_on.set()
    t.join()
    assert out == [7] and ckpt.store.closed
    with Checkpointer(tmp_path / "c.db") as again:
        assert again.store.keys() == ["k"]


def test_same_location_with_other_options_applies_them(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    a = set_checkpoint_file(path)
    b = set_checkpoint_file(path, strict=True, stale="rerun", dedup=True, signing_key="s3cret")
    assert b is not a and a.store.closed
    assert (b.strict, b.stale, b.dedup) == (True, "rerun", True)
    apply_checkpoint("signed")(lambda: 1)()
    assert b.store.get_meta("signed").get("mac")  # the signing key is in use
    # Options not given again stay as they are; the same ones again change nothing.
    assert set_checkpoint_file(path) is b
    assert set_checkpoint_file(path, strict=True) is b
    c = set_checkpoint_file(path, strict=False)
    assert (c.strict, c.stale, c.dedup) == (False, "rerun", True) and c.store.signer is not None
    with pytest.raises(TypeError, match="strct"):
        set_checkpoint_file(path, strct=True)
    with pytest.raises(ValueError, match="stale"):
        set_checkpoint_file(path, stale="sometimes")
    assert cp.get_checkpointer() is c


def test_async_wrapper_is_a_coroutine_function_and_a_method(tmp_path: Path) -> None:
    set_checkpoint_file(tmp_path / "c.db")

    async def label(n: int) -> list[int]:
        return [0] * n

    wrapped = apply_checkpoint("l")(label)
    # Python 3.9's inspect only knows real functions; asyncio's check works there.
    iscoro = inspect.iscoroutinefunction if sys.version_info >= (3, 10) else asyncio.iscoroutinefunction
    assert iscoro(wrapped) and not iscoro(apply_checkpoint("x")(len))
    assert inspect.signature(wrapped) == inspect.signature(label)

    class Model:
        def __init__(self) -> None:
            self.calls = 0

        @apply_checkpoint(lambda info: f"m/{info.args[1]}")
        def fit(self, x: int) -> int:
            self.calls += 1
            return x * 2

        @apply_checkpoint(lambda info: f"am/{info.args[1]}")
        async def afit(self, x: int) -> int:
            return x * 3

    m = Model()
    assert m.fit(2) == 4 and m.fit(2) == 4 and m.calls == 1
    assert iscoro(m.afit)
    assert asyncio.run(m.afit(2)) == 6


def test_switch_while_an_async_step_runs(tmp_path: Path) -> None:
    set_checkpoint_file(tmp_path / "a.db")

    async def main() -> None:
        started, go_on = asyncio.Event(), asyncio.Event()

        async def step() -> str:
            started.set()
            await go_on.wait()
            return "from A"

        task = asyncio.ensure_future(apply_checkpoint("k")(step)())
        await asyncio.wait_for(started.wait(), 60)  # the step runs, on A
        b = set_checkpoint_file(tmp_path / "b.db")
        go_on.set()
        assert await task == "from A"
        assert b.store.keys() == []

    asyncio.run(main())
    with Checkpointer(tmp_path / "a.db") as again:
        assert again.store.keys() == ["k"]
