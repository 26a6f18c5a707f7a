"""Steps sent to process pools are checkpointed in the workers, under every start method.

Real pools, real worker processes, real stores; a step leaves one file per
run, so "the second round never runs the step" is counted, not assumed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import pickle
from itertools import repeat
from pathlib import Path
from typing import Any, Callable

import pytest

import _pool_steps as steps
from ai2_kit.core.checkpoint import (
    Checkpointer,
    apply_checkpoint,
    get_checkpointer,
    reset_checkpoint,
    set_checkpoint_dir,
    set_checkpoint_file,
)
from ai2_kit.core.checkpoint._checkpointer import CheckpointedFunction, StoreSpec
from conftest import location_for

METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
N = 6
LOGGER = "ai2_kit.core.checkpoint"


def run_round(pool_kind: str, method: str, fn: Callable[..., Any], runs: Path) -> list[int]:
    ctx = multiprocessing.get_context(method)
    if pool_kind == "pool":
        with ctx.Pool(2) as pool:
            return list(pool.starmap(fn, zip(range(N), repeat(str(runs)))))
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        return list(ex.map(fn, range(N), repeat(str(runs))))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pool_kind", ["pool", "executor"])
def test_two_rounds_second_all_hits(tmp_path: Path, method: str, pool_kind: str) -> None:
    set_checkpoint_file(tmp_path / "ckpt.db")
    wrapped = apply_checkpoint(steps.key_of)(steps.square)
    runs = tmp_path / "runs"
    want = [i * i for i in range(N)]
    # Fresh pools each round: the second round's workers find the store themselves.
    assert run_round(pool_kind, method, wrapped, runs) == want
    assert steps.count_runs(str(runs)) == N
    assert run_round(pool_kind, method, wrapped, runs) == want
    assert steps.count_runs(str(runs)) == N  # all hits: the step never ran again
    ckpt = get_checkpointer()
    assert ckpt is not None and sorted(ckpt.store.keys()) == sorted(f"sq/{i}" for i in range(N))


@pytest.mark.parametrize("method", METHODS)
def test_module_level_decorated_step_travels(tmp_path: Path, method: str) -> None:
    # pickle by name fails for such a function (its module name means the
    # wrapper); the wrapper sends the name and unwraps it in the worker.
    set_checkpoint_dir(tmp_path / "ckpt.d")
    runs = tmp_path / "runs"
    assert run_round("executor", method, steps.square_decorated, runs) == [i * i for i in range(N)]
    assert run_round("executor", method, steps.square_decorated, runs) == [i * i for i in range(N)]
    assert steps.count_runs(str(runs)) == N


def test_spawned_worker_finds_the_default_through_its_environment(tmp_path: Path) -> None:
    # The task is a plain function; the checkpointed step is looked up by the
    # worker itself, which never received a wrapper: only the environment
    # tells it where the workflow's store is.
    set_checkpoint_file(tmp_path / "ckpt.db")
    runs = tmp_path / "runs"
    for _ in range(2):
        assert run_round("executor", "spawn", steps.through_module_wrapper, runs) == [i * i for i in range(N)]
    assert steps.count_runs(str(runs)) == N


def test_default_turned_off_travels_as_off(tmp_path: Path) -> None:
    set_checkpoint_file(tmp_path / "ckpt.db")
    wrapped = apply_checkpoint(steps.key_of)(steps.square)
    reset_checkpoint()
    runs = tmp_path / "runs"
    run_round("executor", "spawn", wrapped, runs)
    run_round("executor", "spawn", wrapped, runs)
    assert steps.count_runs(str(runs)) == 2 * N  # off when sent: no checkpoints in the worker


@pytest.mark.parametrize("store_kind", ["sqlite", "directory", "postgres"])
def test_checkpointer_object_wrapper_hit_in_a_spawn_worker(tmp_path: Path, store_kind: str) -> None:
    location, options = location_for(store_kind, tmp_path)
    ckpt = Checkpointer(location, prefer="dir" if store_kind == "directory" else "file", store_options=options)
    try:
        wrapped = ckpt(steps.key_of)(steps.square)
        runs = tmp_path / "runs"
        assert wrapped(3, str(runs)) == 9  # computed and saved here, in the parent
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            assert ex.submit(wrapped, 3, str(runs)).result() == 9  # a hit in the worker
            assert ex.submit(wrapped, 4, str(runs)).result() == 16  # computed and saved there
        assert steps.count_runs(str(runs)) == 2
        assert sorted(ckpt.store.keys()) == ["sq/3", "sq/4"]
    finally:
        ckpt.close()
        if store_kind == "postgres":
            from conftest import _drop_pg_schema

            _drop_pg_schema(location, options["schema"])


def test_wrapper_pickles_by_description(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "c.db", strict=True, signing_key="s3cret") as ckpt:
        wrapped = ckpt("k")(steps.square)
        data = pickle.dumps(wrapped)
        assert b"_thread" not in data and b"sqlite3" not in data
        again = pickle.loads(data)
        assert isinstance(again, CheckpointedFunction)
        # In the same process the description finds the open checkpointer.
        assert again._resolve() is ckpt
        assert pickle.loads(pickle.dumps(ckpt)) is ckpt
        assert "s3cret" not in repr(ckpt.spec)
    local = [1]
    lam = apply_checkpoint(lambda info: f"l/{info.args[0]}")(lambda x: x + local[0])
    assert pickle.loads(pickle.dumps(lam))(2) == 3  # lambdas travel too (cloudpickle)


def test_unreachable_store_is_one_warning_not_silence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("x")
    spec = StoreSpec(location=str(tmp_path / "a-file" / "ckpt.db"))  # cannot exist: its folder is a file
    received = CheckpointedFunction(steps.square, steps.key_of, spec=spec, received=True)
    runs = tmp_path / "runs"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert received(2, str(runs)) == 4
        assert received(2, str(runs)) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Checkpointing is OFF" in warnings[0].getMessage()
    assert str(spec.location) in warnings[0].getMessage()
    assert steps.count_runs(str(runs)) == 2


def test_wrapper_of_a_checkpointer_made_from_a_store_object_travels(
    store_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The description is taken from the open store (path, or URL and schema).
    ckpt = Checkpointer(store=store_factory())
    wrapped = ckpt(steps.key_of)(steps.square)
    runs = tmp_path / "runs"
    assert wrapped(5, str(runs)) == 25
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        assert ex.submit(wrapped, 5, str(runs)).result() == 25
    assert steps.count_runs(str(runs)) == 1


def test_a_received_store_is_opened_once_per_process(tmp_path: Path) -> None:
    import threading

    from ai2_kit.core.checkpoint import _checkpointer

    ckpt = Checkpointer(tmp_path / "c.db")
    data = pickle.dumps(ckpt(steps.key_of)(steps.square))
    spec = ckpt.spec
    ckpt.close()  # now this process has that store closed, as a fresh worker would
    received = pickle.loads(data)
    runs = tmp_path / "runs"
    threads = [threading.Thread(target=lambda i=i: received(i % 3, str(runs))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opened = _checkpointer.checkpointer_for(spec)  # type: ignore[arg-type]
    assert opened is not None and opened is not ckpt
    assert opened is received._resolve()
    assert sorted(opened.store.keys()) == ["sq/0", "sq/1", "sq/2"]
    opened.close()


def test_forks_while_async_saves_run_in_threads(tmp_path: Path) -> None:
    # A fork lands while the pool's threads are saving and holding the
    # checkpointer's locks; each child must still save promptly (its pool,
    # locks and registries are fresh). Directory store: no SQLite lock state.
    import asyncio
    import threading

    ckpt = set_checkpoint_dir(tmp_path / "ckpt.d")
    stop = threading.Event()

    async def filler(i: int) -> bytes:
        return b"x" * 1000

    def background() -> None:
        async def loop() -> None:
            n = 0
            while not stop.is_set():
                await asyncio.gather(*(apply_checkpoint(f"bg/{n}-{j}")(filler)(j) for j in range(16)))
                n += 1

        asyncio.run(loop())

    bg = threading.Thread(target=background)
    bg.start()
    try:
        wrapped = ckpt(lambda info: f"child/{info.args[0]}")(steps._async_square)
        ctx = multiprocessing.get_context("fork")
        for round_ in range(10):
            with ctx.Pool(2) as pool:
                res = pool.map_async(steps.async_square_in_child, [(wrapped, round_ * 2 + j) for j in range(2)])
                assert res.get(timeout=120) == [(round_ * 2 + j) ** 2 for j in range(2)]
    finally:
        stop.set()
        bg.join()
    assert len(ckpt.store.keys("child")) == 20
