"""The wrapped function keeps its signature for type checkers (ParamSpec)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SNIPPET = '''
from ai2_kit.core.checkpoint import Checkpointer, apply_checkpoint

def train(steps: int, lr: float = 0.1) -> str:
    return "model"

async def label(n: int) -> list[float]:
    return [0.0] * n

wrapped = apply_checkpoint("k")(train)
reveal_type(wrapped)
wrapped("three")
alabel = Checkpointer("x.db")("l")(label)
reveal_type(alabel)
'''


def test_apply_checkpoint_keeps_the_signature(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    (tmp_path / "snippet.py").write_text(SNIPPET)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports", "snippet.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    ).stdout
    assert 'Revealed type is "def (steps: int, lr: float =) -> str"' in out, out
    assert 'Argument 1 has incompatible type "str"; expected "int"' in out, out
    assert 'Revealed type is "def (n: int) -> typing.Coroutine[Any, Any, list[float]]"' in out, out
