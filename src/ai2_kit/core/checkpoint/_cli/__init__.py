"""The ``ai2-kit tool checkpoint`` command line, one module per job.

Modules import each other in one direction, top to bottom:

- ``_declare``: a command's declaration (help, arguments, options, examples
  as data, attached by ``@command`` to the method that does it), the parser
  and the help page built from it, the two errors;
- ``_output``: escaping, counts, one-line errors, the library's log lines;
- ``_tool``: the state every command shares (streams, the store opened on
  first use, progress, prompts);
- ``_inspect`` (``load``, ``ls``, ``show``, ``runs``, ``report``) and
  ``_change`` (``rm``, ``verify``, ``copy``, ``migrate``): the commands;
- ``_commands``: ``CheckpointTool`` and the command set in help order;
- ``_grammar``: the chain split at ``-``, the whole line checked before
  anything runs, the help pages;
- ``_run``: ``run``, exit statuses and the one-line errors.

``ai2_kit.core.checkpoint.cli`` is the public face of this package.
"""

from __future__ import annotations

from ._commands import CheckpointTool
from ._declare import PROG, CommandError, UsageError
from ._grammar import command_help, overview, parse
from ._run import run

__all__ = ["run", "PROG", "CheckpointTool", "parse", "overview", "command_help", "UsageError", "CommandError"]
