"""The command set: ``CheckpointTool`` with every command, and their declarations in the order the help lists them."""

from __future__ import annotations

from ._change import ChangeCommands
from ._declare import Command, declaration
from ._inspect import InspectCommands

__all__ = ["CheckpointTool", "COMMANDS"]


class CheckpointTool(InspectCommands, ChangeCommands):
    """The commands: ``load`` picks the store, the others act on it.

    One method per command, each calling one library function (``_ops``,
    ``_maintenance``) and printing what it returns as it goes. Every command
    returns the tool itself, so that a script can chain them as the command
    line does (``load F - rm X --yes - ls``).
    """


#: Every command, by name, in the order of the overview and of "commands are: ...".
COMMANDS: dict[str, Command] = {
    name: declaration(getattr(CheckpointTool, name))
    for name in ("load", "ls", "show", "rm", "verify", "copy", "runs", "report", "migrate")
}
