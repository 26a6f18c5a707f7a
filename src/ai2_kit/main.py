"""The ``ai2-kit`` command group: ``ai2-kit tool checkpoint ...``."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .core.checkpoint.cli import run

    return run(sys.argv[1:] if argv is None else argv)
