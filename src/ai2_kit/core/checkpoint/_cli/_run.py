"""``run``: parse the whole line, run its commands in order, and turn every failure into one line and an exit status.

Exit statuses: 0 done, 1 a command could not do what was asked, 2 the
command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import sys
from typing import IO, Optional, Sequence

from .._errors import CheckpointError, NewerFormatError
from ._commands import CheckpointTool
from ._declare import PROG, CommandError, UsageError
from ._grammar import parse
from ._output import library_logs_to, one_line, os_error

__all__ = ["run", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def run(
    argv: Sequence[str],
    *,
    stdout: Optional[IO[str]] = None,
    stderr: Optional[IO[str]] = None,
    stdin: Optional[IO[str]] = None,
    prog: str = PROG,
) -> int:
    """Run ``ai2-kit tool checkpoint ARGV...``; return the exit status.

    Errors are one line on stderr naming the path or word and what to do:
    2 for a wrong command line, 1 for anything else, 130 on Ctrl-C.
    ``prog`` is the command's name in messages and help
    (``ai2-kit-checkpoint`` for that script).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    inp = stdin if stdin is not None else sys.stdin
    try:
        p = parse(argv, prog)
    except UsageError as e:
        err.write(f"{prog}: {e}\n")
        return EXIT_USAGE
    if p.help is not None:
        out.write(p.help)
        return EXIT_OK
    tool = CheckpointTool(out, err, inp, prog)
    try:
        with library_logs_to(err, prog):
            for step in p.steps:
                getattr(tool, step.name)(**step.kwargs)
            tool.finish()
    except UsageError as e:
        err.write(f"{prog}: {e}\n")
        return EXIT_USAGE
    except CommandError as e:
        err.write(f"{prog}: {e}\n")
        return EXIT_ERROR
    except NewerFormatError as e:
        by = f" {e.writer}" if e.writer else ""
        err.write(f"{prog}: error: {e.location!r} was written by a newer ai2-kit-checkpoint{by} "
                  f"(format {e.found}; this one reads up to {e.supported}). Upgrade it to use this store: "
                  "pip install -U ai2-kit-checkpoint\n")
        return EXIT_ERROR
    except CheckpointError as e:
        err.write(f"{prog}: error: {one_line(str(e))}\n")
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # the reader went away (ls | head): the entry point handles it
    except OSError as e:
        err.write(f"{prog}: error: {one_line(os_error(e))}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            tool.close()
    return EXIT_OK
