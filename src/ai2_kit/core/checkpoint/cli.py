"""``ai2-kit tool checkpoint ...``: list, show, remove, verify, copy and migrate checkpoint entries.

The seed's lines work verbatim, in their chaining grammar (``-`` separates
commands that work on the same store)::

    ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls
    ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls --verbose
    ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - rm "iters-000/deepmd"

and so do the conventional forms, with the store as the command's first
argument::

    ai2-kit tool checkpoint ls ./checkpoint.pkl "iters-000/*" --json

``ai2-kit-checkpoint`` takes the same commands.

The line is split at each ``-`` and every segment is parsed by its command's
own ``argparse`` parser, where each option is declared once, with its help
(the help text lists the options from those declarations). Every value
reaches the command as the string that was typed: a key such as ``1_000``,
``[ab]`` or ``a#b`` is never converted. The whole line is checked before
anything runs, so a mistake in the last command changes nothing.

Thin by design: each command opens the store, calls one function of the
library (``_ops``, ``_maintenance``), and formats what it returns. The code
lives in the ``_cli`` package (one module per job); this module is its
public face, and the console scripts (``_main``) call ``run`` from here.
"""

from __future__ import annotations

from ._cli import PROG, CheckpointTool, CommandError, UsageError, overview, parse, run
from ._cli import command_help as command_help  # the help page of one command

__all__ = ["run", "PROG", "CheckpointTool", "parse", "overview", "UsageError", "CommandError"]
