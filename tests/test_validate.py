"""``validate=``: a hit the workflow cannot use (its file is gone) runs the step again."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from ai2_kit.core.checkpoint import Checkpointer, apply_checkpoint, get_checkpointer, set_checkpoint_file

LOGGER = "ai2_kit.core.checkpoint"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith(LOGGER)]


CALLS: list[str] = []


def make_file(folder: str, name: str) -> str:
    """A step whose result is the path of a file it writes (a scratch output)."""
    CALLS.append(name)
    path = os.path.join(folder, f"{name}.{os.getpid()}.{len(CALLS)}.out")  # unique across workers
    with open(path, "w") as f:
        f.write("data")
    return path


SQ_CALLS: list[int] = []


def square_counted(x: int) -> int:
    SQ_CALLS.append(x)
    return x * len(SQ_CALLS)


class MakeFile:
    """Calls of ``make_file`` in one folder, counted (the module function keeps the fingerprint stable)."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        CALLS.clear()

    @property
    def calls(self) -> int:
        return len(CALLS)


def test_hit_whose_file_is_gone_reruns_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The aiida-core#3735 case: the saved result names a scratch file purged since.
    set_checkpoint_file(tmp_path / "ckpt.db")
    step = MakeFile(tmp_path)
    first = apply_checkpoint("make", validate=os.path.exists)(make_file)(step.folder, "a")
    assert step.calls == 1 and os.path.exists(first)
    os.unlink(first)
    caplog.set_level(logging.INFO, logger=LOGGER)
    second = apply_checkpoint("make", validate=os.path.exists)(make_file)(step.folder, "a")
    assert step.calls == 2 and second != first and os.path.exists(second)
    # The rerun's entry carries the call's fingerprints, as any save does (the hit had none at hand).
    assert get_checkpointer().store.get_meta("make").get("fingerprint")  # type: ignore[union-attr]
    warned = _warnings(caplog)
    assert len(warned) == 1 and "make" in warned[0] and "rejected" in warned[0]
    # The new result was saved: the next call is a hit on it.
    caplog.clear()
    assert apply_checkpoint("make", validate=os.path.exists)(make_file)(step.folder, "a") == second
    assert step.calls == 2 and _warnings(caplog) == []


def test_validator_that_passes_keeps_the_hit(tmp_path: Path) -> None:
    seen: list[Any] = []

    def check(value: Any) -> Any:
        seen.append(value)
        return "truthy"  # anything true keeps the hit

    with Checkpointer(tmp_path / "ckpt.db") as ckpt:
        step = MakeFile(tmp_path)
        first = ckpt("make", validate=check)(make_file)(step.folder, "a")
        again = ckpt("make", validate=check)(make_file)(step.folder, "a")
    assert again == first and step.calls == 1 and seen == [first]


def test_validator_that_raises_reruns_naming_the_exception(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def check(value: Any) -> bool:
        raise ValueError(f"cannot read {value}")

    with Checkpointer(tmp_path / "ckpt.db") as ckpt:
        calls = SQ_CALLS
        calls.clear()
        assert ckpt("sq", validate=check)(square_counted)(3) == 3
        caplog.set_level(logging.WARNING, logger=LOGGER)
        assert ckpt("sq", validate=check)(square_counted)(3) == 6
        assert calls == [3, 3]
        warned = _warnings(caplog)
        assert len(warned) == 1 and "sq" in warned[0] and "ValueError" in warned[0] and "cannot read 3" in warned[0]
        # Without a validator the rerun's result is the hit; ls/show see one entry.
        assert ckpt("sq")(square_counted)(3) == 6 and calls == [3, 3]
        assert list(ckpt.store.keys()) == ["sq"]


def test_async_step_validates_the_awaited_result(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Checkpointer(tmp_path / "ckpt.db") as ckpt:
        step = MakeFile(tmp_path)

        async def astep(name: str) -> str:
            await asyncio.sleep(0)
            return make_file(step.folder, name)

        wrapped = ckpt("amake", validate=os.path.exists)(astep)
        first = asyncio.run(wrapped("a"))
        assert asyncio.run(wrapped("a")) == first and step.calls == 1  # the file is there: a hit
        os.unlink(first)
        caplog.set_level(logging.WARNING, logger=LOGGER)
        second = asyncio.run(wrapped("a"))
        assert step.calls == 2 and second != first and os.path.exists(second)
        assert len(_warnings(caplog)) == 1 and "amake" in _warnings(caplog)[0]
        assert asyncio.run(wrapped("a")) == second and step.calls == 2


def test_wrapper_with_a_validator_pickles_with_it(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "ckpt.db") as ckpt:
        folder = MakeFile(tmp_path).folder
        wrapped = ckpt("make", validate=lambda v: os.path.exists(v))(make_file)
        first = wrapped(folder, "a")
        os.unlink(first)
        received = pickle.loads(pickle.dumps(wrapped))
        second = received(folder, "a")  # the validator travelled: the gone file is not a hit
        assert second != first and os.path.exists(second)
        plain = ckpt("other")(make_file)
        assert pickle.loads(pickle.dumps(plain))._ck_validate is None


def test_validator_travels_to_a_spawned_pool_worker(tmp_path: Path) -> None:
    # A lambda validator: cloudpickle sends it by value with the step.
    with Checkpointer(tmp_path / "ckpt.db") as ckpt:
        folder = MakeFile(tmp_path).folder
        wrapped = ckpt("pooled", validate=lambda v: os.path.exists(v))(make_file)
        first = wrapped(folder, "p")
        os.unlink(first)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            second = ex.submit(wrapped, folder, "p").result(timeout=120)
        assert second != first and os.path.exists(second)  # the worker reran the step
        assert wrapped(folder, "p") == second  # and saved its result: a hit here
