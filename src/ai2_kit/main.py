"""The ``ai2-kit`` command group: ``ai2-kit tool checkpoint ...``.

A small dispatcher rather than a framework: each group maps a word to a tool,
and a tool is a module with ``run(argv) -> int`` imported only when it is
used, so ``ai2-kit tool checkpoint ls`` pays for nothing else, and a new tool
joins by adding one line to ``TOOLS``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, NamedTuple, Sequence

__all__ = ["main", "TOOLS"]


class Tool(NamedTuple):
    module: str  # has run(argv: list[str]) -> int
    summary: str


#: ``ai2-kit tool NAME ...``
TOOLS: dict[str, Tool] = {
    "checkpoint": Tool(
        "ai2_kit.core.checkpoint.cli",
        "list, show, remove, verify and migrate checkpoint entries",
    ),
}

GROUPS: dict[str, tuple[str, dict[str, Tool]]] = {
    "tool": ("tools for the files that workflows leave behind", TOOLS),
}


def _version() -> str:
    from . import __version__

    return __version__


def _usage(prefix: str, entries: dict[str, str]) -> str:
    width = max(len(n) for n in entries)
    lines = [f"usage: {prefix} COMMAND ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in entries.items()]
    lines += ["", f"Run '{prefix} COMMAND --help' for more."]
    return "\n".join(lines) + "\n"


def _top_usage() -> str:
    text = _usage("ai2-kit", {name: summary for name, (summary, _) in GROUPS.items()})
    example = "\nexample:\n  ai2-kit tool checkpoint load ./checkpoint.pkl - ls\n"
    return text + example


def _dispatch(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_top_usage())
        return 0
    if argv[0] == "--version":
        sys.stdout.write(f"ai2-kit-checkpoint {_version()}\n")
        return 0
    group = GROUPS.get(argv[0])
    if group is None:
        sys.stderr.write(f"ai2-kit: unknown command {argv[0]!r}; commands are: {', '.join(GROUPS)}. "
                         "Try 'ai2-kit --help'\n")
        return 2
    summary, tools = group
    prefix = f"ai2-kit {argv[0]}"
    rest = argv[1:]
    if not rest or rest[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage(prefix, {name: t.summary for name, t in tools.items()}))
        return 0
    tool = tools.get(rest[0])
    if tool is None:
        sys.stderr.write(f"{prefix}: unknown tool {rest[0]!r}; tools are: {', '.join(tools)}. "
                         f"Try '{prefix} --help'\n")
        return 2
    run: Callable[[list[str]], int] = importlib.import_module(tool.module).run
    return run(rest[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point; returns the exit status."""
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The reader went away (``ai2-kit ... ls | head``). Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("ai2-kit: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
