"""The command line's grammar: split ``load F - ls`` at each ``-``, parse every segment, check the whole line.

Each segment is parsed by its command's own parser (built from the
command's declaration), and every value reaches the command as the string
that was typed. The whole line is checked here, before anything runs, so a
mistake in the last command changes nothing. The help pages are served
from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..stores._base import library_version
from ._commands import COMMANDS
from ._declare import PROG, Command, UsageError, build_parser, help_text

__all__ = ["Step", "Plan", "parse", "overview", "command_help"]


def command_help(name: str, prog: str = PROG) -> str:
    """The help text of one command: usage, description, options (from the parser), examples."""
    return help_text(COMMANDS[name], prog)


_OVERVIEW = """\
usage: {prog} load STORE - COMMAND [ARGS] [- COMMAND [ARGS] ...]
       {prog} COMMAND STORE [ARGS]

Inspect and edit checkpoint stores: single-file and directory stores, the
reference design's 2023 pickle files and 2024 directories, postgresql:// URLs.
Listing, showing metadata and removing never unpickle a value.

commands:
{commands}

In the first form, '-' separates commands that work on the same store; in the
second, the store is the command's first argument.

examples:
  {prog} load ./path/to/checkpoint.pkl - ls
  {prog} load ./path/to/checkpoint.pkl - ls --verbose
  {prog} load ./path/to/checkpoint.pkl - rm "iters-000/deepmd"
  {prog} ls ./path/to/checkpoint.pkl "iters-000/*" --json
  {prog} migrate ./path/to/checkpoint.pkl

Run '{prog} COMMAND --help' for the options of a command.
"""


def overview(prog: str = PROG) -> str:
    """The help text of the command group."""
    lines = [f"  {c.name:<9} {c.summary}" for c in COMMANDS.values()]
    return _OVERVIEW.format(prog=prog, commands="\n".join(lines))


@dataclass
class Step:
    """One command of the line, with its arguments as ``CheckpointTool`` takes them."""

    name: str
    kwargs: dict[str, Any]


@dataclass
class Plan:
    steps: list[Step]
    help: Optional[str] = None


def _split_chain(argv: Sequence[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for tok in argv:
        if tok == "-":
            segments.append([])
        else:
            segments[-1].append(tok)
    return segments


def _is_option(tok: str) -> bool:
    return tok.startswith("-") and tok != "-"


def _usage_message(message: str, cmd: Command, prog: str) -> str:
    """argparse's wording, made to name the option and the fix."""
    see = f"see '{prog} {cmd.name} --help'"
    head, sep, tail = message.partition(": ")
    if sep and head.startswith("argument "):
        names = head[len("argument "):].split("/")
        name = next((n for n in names if n.startswith("--") and not n.startswith("--no-")), names[0])
        if tail.startswith("expected one argument"):
            return f"{name} needs a value; {see}"
        if tail.startswith("ignored explicit argument"):
            return f"{name} takes no value (use --no-{name.lstrip('-')} to switch it off), not " \
                   f"{tail.split('argument ', 1)[1]}; {see}"
        return f"{tail}; {see}" if name in tail else f"{name}: {tail}; {see}"
    if message.startswith("the following arguments are required"):
        missing = message.split(": ", 1)[1].split(",")[0].strip()
        return f"'{cmd.name}' needs {missing}; {see}"
    return f"{message}; {see}"


def _parse_segment(cmd: Command, tokens: list[str], prog: str, with_store: bool) -> dict[str, Any]:
    parser, _ = build_parser(cmd, prog, with_store)
    # Options first, then positionals, wherever they stand ('ls --json F pat').
    try:
        ns, extra = parser.parse_known_intermixed_args(tokens)
    except UsageError as e:
        raise UsageError(_usage_message(str(e), cmd, prog)) from None
    see = f"see '{prog} {cmd.name} --help'"
    for tok in extra:
        if _is_option(tok):
            raise UsageError(f"unknown option {tok.partition('=')[0]!r} for '{cmd.name}'; {see}")
    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r} for '{cmd.name}'; {see}")
    kwargs = vars(ns)
    for a in cmd.args:
        given = kwargs.pop(f"{a.dest}_option")
        if given is not None:
            if kwargs.get(a.dest) is not None:
                raise UsageError(f"'{cmd.name}' got {a.metavar} twice")
            kwargs[a.dest] = given
    if with_store and kwargs.get("store") is None:
        raise UsageError(f"'{cmd.name}' needs a store: '{prog} load STORE - {cmd.name} ...' "
                         f"or '{prog} {cmd.name} STORE ...'")
    missing = [a for a in cmd.args if a.required and kwargs.get(a.dest) is None]
    if missing:
        raise UsageError(f"'{cmd.name}' needs {missing[0].metavar}; {see}")
    if cmd.check is not None:
        cmd.check(kwargs)
    return kwargs


def parse(argv: Sequence[str], prog: str = PROG) -> Plan:
    """Check the whole line and turn it into steps; nothing runs here.

    Raises UsageError with a one-line message naming the word at fault.
    """
    argv = list(argv)
    if argv == ["--version"]:
        return Plan([], help=f"{prog} {library_version()}\n")
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help" and argv[1] in COMMANDS:
            return Plan([], help=command_help(argv[1], prog))
        return Plan([], help=overview(prog))
    if "--" in argv:
        # '--' would end the options of one segment only, and the chain makes
        # that ambiguous; values that start with '-' have the --NAME=VALUE form.
        rest = argv[argv.index("--") + 1:]
        if rest in (["--help"], ["-h"]):
            argv = argv[: argv.index("--")] + ["--help"]
        else:
            raise UsageError(
                "'--' is not supported; to name a key that starts with '-', write --pattern=KEY or --key=KEY"
            )
    steps: list[Step] = []
    have_store = False
    for i, seg in enumerate(_split_chain(argv)):
        if not seg:
            where = "before the first '-'" if i == 0 else "after '-'"
            raise UsageError(f"a command is missing {where}; commands are: {', '.join(COMMANDS)}")
        word = seg[0]
        if word in ("-h", "--help"):
            return Plan([], help=overview(prog))
        cmd = COMMANDS.get(word)
        if cmd is None:
            kind = "option" if _is_option(word) else "command"
            raise UsageError(
                f"unknown {kind} {word!r}; commands are: {', '.join(COMMANDS)}. Try '{prog} --help'"
            )
        if "--help" in seg[1:] or "-h" in seg[1:]:
            return Plan([], help=command_help(cmd.name, prog))
        # Conventional form: without an earlier 'load', the store comes first.
        with_store = cmd.name != "load" and not have_store
        kwargs = _parse_segment(cmd, seg[1:], prog, with_store)
        if with_store:
            steps.append(Step("load", {"path": kwargs.pop("store")}))
        steps.append(Step(cmd.name, kwargs))
        have_store = True
    return Plan(steps)
