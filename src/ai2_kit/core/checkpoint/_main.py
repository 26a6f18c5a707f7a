"""The console scripts: ``ai2-kit-checkpoint ...`` and ``ai2-kit tool checkpoint ...``.

This distribution installs two scripts. ``ai2-kit-checkpoint`` is the tool
under its own name. ``ai2-kit`` is the seed's command: its
``tool checkpoint ...`` is ours, and every other command goes, with its
arguments, to the real ai2-kit package's entry point (``ai2_kit.main:main``)
when that package is installed beside this one. Both distributions declare
an ``ai2-kit`` script; whichever was installed last owns the file, which is
why ours must behave like the real one for everything but its own tool.

``ai2_kit.main`` is never part of this distribution (only
``ai2_kit/core/checkpoint/`` is), so finding that module means finding the
real package, and handing over cannot come back here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional, Sequence

from .stores._base import library_version

__all__ = ["main", "checkpoint_main", "REAL_ENTRY_POINT"]

#: The real ai2-kit's console entry point, ``module:function``.
REAL_ENTRY_POINT = "ai2_kit.main:main"

_OURS = ("tool", "checkpoint")

_USAGE = """\
usage: ai2-kit COMMAND ...

commands:
  tool checkpoint  list, show, remove, verify, copy and migrate checkpoint entries

This is ai2-kit-checkpoint's 'ai2-kit' command; the other ai2-kit commands
(workflow, tool hpc, ...) come with the ai2-kit package, which is not
installed here: pip install ai2-kit

example:
  ai2-kit tool checkpoint load ./checkpoint.pkl - ls

Run 'ai2-kit tool checkpoint --help' for more.
"""

_TOOL_USAGE = """\
usage: ai2-kit tool TOOL ...

tools:
  checkpoint  list, show, remove, verify, copy and migrate checkpoint entries

Run 'ai2-kit tool checkpoint --help' for more.
"""


def _real_main() -> Optional[Callable[[], object]]:
    """The real ai2-kit's ``main``, or None when that package is not installed."""
    module_name, _, func = REAL_ENTRY_POINT.partition(":")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    module = importlib.import_module(module_name)
    real: Callable[[], object] = getattr(module, func)
    return real


_forwarding = False  # True while the real entry point runs in this process


def _forward(argv: list[str], real: Callable[[], object]) -> int:
    """Run the real ai2-kit as if its own script had been started with ``argv``."""
    global _forwarding
    # The real entry point takes no arguments: python-fire reads sys.argv.
    sys.argv = ["ai2-kit", *argv]
    _forwarding = True
    try:
        status = real()
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        sys.stderr.write(f"{code}\n")
        return 1
    finally:
        _forwarding = False
    return status if isinstance(status, int) else 0


def _loops_back(real: Callable[[], object]) -> bool:
    """Whether "the real ai2-kit" found is this script again (an ai2_kit.main that calls us)."""
    return _forwarding or real is main or getattr(real, "__module__", "").startswith(__package__ or __name__)


def _dispatch(argv: list[str]) -> int:
    if argv[:2] == list(_OURS):
        from . import cli

        return cli.run(argv[2:])
    try:
        real = _real_main()
    except Exception as e:  # the real package is there but does not import
        sys.stderr.write(f"ai2-kit: the ai2-kit package is installed but failed to start "
                         f"({type(e).__name__}: {' '.join(str(e).split())}); "
                         "'ai2-kit tool checkpoint' still works\n")
        return 1
    if real is not None and _loops_back(real):
        sys.stderr.write("ai2-kit: the installed ai2_kit.main hands commands back to ai2-kit-checkpoint; "
                         "reinstall the real package: pip install --force-reinstall --no-deps ai2-kit\n")
        return 1
    if real is not None:
        return _forward(argv, real)
    # Only our own tool is here: help for it, one line for everything else.
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE)
        return 0
    if argv[0] == "--version":
        sys.stdout.write(f"ai2-kit-checkpoint {library_version()}\n")
        return 0
    if argv[0] == "tool" and (len(argv) == 1 or argv[1] in ("-h", "--help", "help")):
        sys.stdout.write(_TOOL_USAGE)
        return 0
    what = f"tool {argv[1]!r}" if argv[0] == "tool" else f"command {argv[0]!r}"
    sys.stderr.write(f"ai2-kit: unknown {what}: only 'ai2-kit tool checkpoint' is installed here; "
                     "the other ai2-kit commands come with the ai2-kit package: pip install ai2-kit\n")
    return 2


def _guarded(run: Callable[[], int], prog: str) -> int:
    try:
        return run()
    except BrokenPipeError:
        # The reader went away (``... ls | head``). Point stdout at /dev/null
        # so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``ai2-kit`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    return _guarded(lambda: _dispatch(args), "ai2-kit")


def checkpoint_main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``ai2-kit-checkpoint`` console script: the same commands as ``ai2-kit tool checkpoint``."""
    from . import cli

    args = list(sys.argv[1:] if argv is None else argv)
    return _guarded(lambda: cli.run(args, prog="ai2-kit-checkpoint"), "ai2-kit-checkpoint")


if __name__ == "__main__":
    sys.exit(main())
