"""Code written for the real ai2-kit 1.1.1's checkpoint module runs unchanged on ours."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from ai2_kit.core.checkpoint import (
    EMPTY,
    CheckpointService,
    FnInfo,
    KeyFn,
    NotACheckpointStoreError,
    apply_checkpoint,
    checkpoint_service,
    get_checkpointer,
    set_checkpoint_dir,
)
from helpers_cli import record, write_reference_dir


def test_keywords_of_the_real_api(tmp_path: Path) -> None:
    calls: list[int] = []

    def step(n: int) -> int:
        calls.append(n)
        return n * 2

    set_checkpoint_dir(checkpoint_dir=str(tmp_path / "ckpt"))
    assert apply_checkpoint(key_fn="step", disable=False)(step)(3) == 6
    assert apply_checkpoint(key_fn="step")(step)(3) == 6
    assert calls == [3]
    assert apply_checkpoint(key_fn="step", disable=True)(step)(4) == 8  # disabled: just runs
    assert calls == [3, 4]


def test_key_functions_and_names(tmp_path: Path) -> None:
    key_fn: KeyFn = lambda info: f"{info.fn_name}/{info.args[0]}"  # noqa: E731
    set_checkpoint_dir(str(tmp_path / "ckpt"))
    assert apply_checkpoint(key_fn)(lambda x: x + 1)(1) == 2
    assert (tmp_path / "ckpt").is_dir()
    assert FnInfo._fields == ("fn_name", "args", "kwargs", "call_site")
    assert EMPTY is not None and EMPTY is not EMPTY.__class__()


def test_a_file_where_the_folder_belongs_is_a_file_exists_error(tmp_path: Path) -> None:
    a_file = tmp_path / "checkpoint"
    a_file.write_text("not a folder")
    # The real package raised FileExistsError (from os.makedirs); ours says
    # more and is still caught by code that catches that.
    with pytest.raises(FileExistsError):
        set_checkpoint_dir(str(a_file))
    with pytest.raises(NotACheckpointStoreError, match="it is a file"):
        CheckpointService().set_checkpoint_dir(str(a_file))
    assert a_file.read_text() == "not a folder"


def test_hits_are_logged_under_the_module_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    set_checkpoint_dir(str(tmp_path / "ckpt"))
    apply_checkpoint("k")(lambda: 1)()
    with caplog.at_level(logging.INFO, logger="ai2_kit.core.checkpoint"):
        apply_checkpoint("k")(lambda: 1)()
    assert [r.name for r in caplog.records if "Hit checkpoint" in r.getMessage()] == ["ai2_kit.core.checkpoint"]


def test_the_service_object(tmp_path: Path) -> None:
    service = CheckpointService()
    assert service.checkpoint_dir is None
    ran: list[str] = []
    step = service.apply_checkpoint("a")(lambda: ran.append("a") or "A")
    assert step() == "A" and step() == "A" and ran == ["a", "a"]  # no directory yet: just runs
    service.set_checkpoint_dir(str(tmp_path / "svc"))
    assert service.checkpoint_dir == str(tmp_path / "svc")
    assert step() == "A" and step() == "A" and ran == ["a", "a", "a"]
    assert get_checkpointer() is None  # its own store, not the module default


def test_the_default_service_is_the_module_default(tmp_path: Path) -> None:
    checkpoint_service.set_checkpoint_dir(str(tmp_path / "dflt"))
    ckpt = get_checkpointer()
    assert ckpt is not None and checkpoint_service.checkpoint_dir == ckpt.location
    assert checkpoint_service.apply_checkpoint("x")(lambda: 5)() == 5
    assert ckpt.lookup("x")[:2] == (True, 5)


def test_a_directory_the_real_package_wrote_is_read(tmp_path: Path) -> None:
    """The real's files, and its calling style (cll_mlp: awaited steps under a prefix)."""
    folder = tmp_path / "ckpt"
    write_reference_dir(folder, {"iters-000/label-cp2k": record("iters-000/label-cp2k", value=["labelled"],
                                                                 awaitable=True)})
    ran: list[str] = []

    async def cll_cp2k(inp: Any, ctx: Any) -> list[str]:
        ran.append("cp2k")
        return ["fresh"]

    async def cll_deepmd(inp: Any, ctx: Any) -> str:
        ran.append("deepmd")
        return "model"

    async def workflow() -> tuple[Any, Any]:
        set_checkpoint_dir(str(folder))
        cp_prefix = "iters-000"
        label = await apply_checkpoint(f"{cp_prefix}/label-cp2k")(cll_cp2k)(None, None)
        train = await apply_checkpoint(f"{cp_prefix}/train-deepmd")(cll_deepmd)(None, None)
        return label, train

    assert asyncio.run(workflow()) == (["labelled"], "model")
    assert ran == ["deepmd"]
    assert asyncio.run(workflow()) == (["labelled"], "model")
    assert ran == ["deepmd"]
