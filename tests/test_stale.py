"""Stale entries: a hit whose arguments or code changed is reported (or rerun), by policy."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer

LOGGER = "ai2_kit.core.checkpoint"


def stale_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "saved for" in r.getMessage()]


def step(x: Any, y: Any = 1, *, cfg: Any = None) -> str:
    return f"{x!r}-{y!r}"


@pytest.fixture
def ckpt(tmp_path: Path) -> Any:
    with Checkpointer(tmp_path / "c.db") as c:
        yield c


@pytest.mark.parametrize(
    "first, second, words",
    [
        (((1,), {}), ((2,), {}), "argument 'x' changed"),
        (((1,), {"y": 2}), ((1,), {"y": 3}), "argument 'y' changed"),
        (((1,), {"cfg": {"a": {"b": [1, 2]}}}), ((1,), {"cfg": {"a": {"b": [1, 3]}}}), "argument 'cfg' changed"),
        (((np.arange(10),), {}), ((np.arange(10) * 2,), {}), "argument 'x' changed"),
    ],
    ids=["positional", "keyword", "nested-dict", "numpy"],
)
def test_changed_inputs_warn_and_return_the_saved_value(
    ckpt: Any, caplog: pytest.LogCaptureFixture, first: Any, second: Any, words: str
) -> None:
    saved = ckpt("k")(step)(*first[0], **first[1])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("k")(step)(*second[0], **second[1]) == saved
    msgs = stale_warnings(caplog)
    assert len(msgs) == 1 and "'k'" in msgs[0] and words in msgs[0], msgs


@pytest.mark.parametrize(
    "first, second",
    [
        (((np.arange(10),), {}), ((np.arange(10).copy(),), {})),
        (((1,), {"cfg": {"a": 1, "b": 2}}), ((1,), {"cfg": {"b": 2, "a": 1}})),
        (((1,), {}), ((), {"x": 1})),
        (((1,), {}), ((1,), {"y": 1})),  # an explicit default equals an omitted one
        ((([1, {"s": {3, 2, 1}}],), {}), (([1, {"s": {1, 2, 3}}],), {})),
    ],
    ids=["equal-array-anew", "reordered-dict", "positional-as-keyword", "explicit-default", "set-order"],
)
def test_equal_inputs_raise_no_alarm(ckpt: Any, caplog: pytest.LogCaptureFixture, first: Any, second: Any) -> None:
    ckpt("k")(step)(*first[0], **first[1])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt("k")(step)(*second[0], **second[1])
    assert stale_warnings(caplog) == []


def test_unfingerprintable_argument_is_no_error(ckpt: Any, caplog: pytest.LogCaptureFixture) -> None:
    lock = threading.Lock()
    assert ckpt("k")(step)(lock) == repr(lock) + "-1"
    meta = ckpt.store.get_meta("k")
    assert "x" in meta["fingerprint"]["unhashable"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt("k")(step)(threading.Lock())
    assert stale_warnings(caplog) == []


def test_policy_rerun_replaces_the_entry(ckpt: Any, caplog: pytest.LogCaptureFixture) -> None:
    ckpt("k", stale="rerun")(step)(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("k", stale="rerun")(step)(2) == "2-1"
    assert any("running the step again" in m for m in stale_warnings(caplog))
    assert ckpt("k")(step)(2) == "2-1"  # the replaced entry matches the new call


def test_policy_ignore_records_nothing_and_says_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Checkpointer(tmp_path / "c.db", stale="ignore") as c:
        c("k")(step)(1)
        assert "fingerprint" not in c.store.get_meta("k")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert c("k")(step)(2) == "1-1"
        assert stale_warnings(caplog) == []


def test_unknown_policy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stale must be one of"):
        Checkpointer(tmp_path / "c.db", stale="sometimes")


def test_metadata_says_what_was_fingerprinted(ckpt: Any) -> None:
    ckpt("k")(step)(3, y="abc")
    fp = ckpt.store.get_meta("k")["fingerprint"]
    assert fp["args"]["x"] == "3" and fp["args"]["y"] == "'abc'" and fp["code"] and fp["fn"].endswith("step")


def load_version(tmp_path: Path, name: str, source: str) -> Callable[..., Any]:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train  # type: ignore[no-any-return]


V1 = '''
def train(x):
    return x + 1
'''
V1_COMMENTS = '''


# a comment added above
def train(x):
    """Now with a docstring."""

    # and a comment inside
    return x + 1  # and one at the end
'''
V2 = '''
def train(x):
    return x + 2
'''


def test_code_edits(ckpt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt("train")(load_version(tmp_path, "v1", V1))(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("train")(load_version(tmp_path, "v1c", V1_COMMENTS))(1) == 2
    assert stale_warnings(caplog) == []  # comments, docstrings, blank lines do not count
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("train")(load_version(tmp_path, "v2", V2))(1) == 2
    msgs = stale_warnings(caplog)
    assert len(msgs) == 1 and "code of train changed" in msgs[0]
