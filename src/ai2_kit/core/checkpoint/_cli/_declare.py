"""Declaring a command: its arguments, options, help text and examples as data, and the parser built from them.

A command is declared once, by the ``@command(...)`` decorator on the method
that does it. The segment's ``argparse`` parser and the help page are both
built from that one declaration, so an option cannot be accepted without
being shown, or shown without being accepted.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar, Union

__all__ = [
    "PROG", "UsageError", "CommandError", "Parser", "Arg", "Flag", "Value", "Option", "Command",
    "flag", "value", "command", "declaration", "build_parser", "help_text",
    "STORE_HELP", "PATTERN_ARG", "PATTERN_HELP",
]

PROG = "ai2-kit tool checkpoint"


class UsageError(Exception):
    """The command line itself is wrong: exit status 2."""


class CommandError(Exception):
    """A command could not do what was asked (no such key, declined...): exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse without its exits: errors become UsageError, help is ours."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class Arg:
    """A positional argument (``dest``) that may also be given as ``--dest=VALUE``.

    The option form exists for values that start with '-' (``--pattern=-x``),
    which would otherwise read as options.
    """

    dest: str
    metavar: str
    required: bool
    help: str


@dataclass(frozen=True)
class Flag:
    """A boolean ``--x``, with ``--no-x`` to switch it off again."""

    names: tuple[str, ...]
    dest: str
    help: str


@dataclass(frozen=True)
class Value:
    """An option that takes a value; ``repeat``: may be given more than once (a list)."""

    names: tuple[str, ...]
    dest: str
    metavar: str
    help: str
    repeat: bool = False
    type: Optional[Callable[[str], Any]] = None


Option = Union[Flag, Value]


def flag(*names: str, dest: str, help: str) -> Flag:
    return Flag(names, dest, help)


def value(*names: str, dest: str, metavar: str, help: str, repeat: bool = False,
          type: Optional[Callable[[str], Any]] = None) -> Value:
    return Value(names, dest, metavar, help, repeat, type)


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    usage: Sequence[str]  # forms after '{prog} ', chained first
    description: str
    examples: Sequence[str]  # after '{prog} '
    args: Sequence[Arg] = ()
    options: Sequence[Option] = ()
    footer: str = ""
    # Checks that span options (``--depth`` needs ``--tree``), run on the
    # parsed keyword arguments while the whole line is checked.
    check: Optional[Callable[[dict[str, Any]], None]] = None


F = TypeVar("F", bound=Callable[..., Any])
_ATTRIBUTE = "__cli_command__"


def command(summary: str, *, usage: Sequence[str], description: str, examples: Sequence[str],
            args: Sequence[Arg] = (), options: Sequence[Option] = (), footer: str = "",
            check: Optional[Callable[[dict[str, Any]], None]] = None) -> Callable[[F], F]:
    """Declare the decorated method as the command of its own name; the method is returned unchanged."""

    def attach(fn: F) -> F:
        setattr(fn, _ATTRIBUTE, Command(fn.__name__, summary, usage, description, examples,
                                        args, options, footer, check))
        return fn

    return attach


def declaration(fn: Callable[..., Any]) -> Command:
    """The declaration ``@command`` attached to ``fn``."""
    declared = getattr(fn, _ATTRIBUTE, None)
    if not isinstance(declared, Command):
        raise TypeError(f"{fn!r} is not declared as a command")
    return declared


def _add_option(parser: argparse.ArgumentParser, opt: Option) -> tuple[str, str]:
    """Add ``opt`` to the parser; its row in the help's options table."""
    if isinstance(opt, Flag):
        parser.add_argument(*opt.names, dest=opt.dest, action=argparse.BooleanOptionalAction,
                            default=False, help=opt.help)
        shown = ["--[no-]" + n[2:] if n.startswith("--") else n for n in opt.names]
        return ", ".join(shown), opt.help
    kw: dict[str, Any] = {"dest": opt.dest, "metavar": opt.metavar, "help": opt.help}
    if opt.repeat:
        kw["action"] = "append"
    if opt.type is not None:
        kw["type"] = opt.type
    parser.add_argument(*opt.names, **kw)
    return ", ".join(opt.names) + f" {opt.metavar}", opt.help + (" (repeatable)" if opt.repeat else "")


STORE_HELP = "the store: a file, a directory, or a postgresql:// URL"


def build_parser(cmd: Command, prog: str, with_store: bool) -> tuple[Parser, list[tuple[str, str]]]:
    """The parser of one segment and its options table; ``with_store``: the store is its first argument."""
    parser = Parser(prog=f"{prog} {cmd.name}", add_help=False, allow_abbrev=False)
    if with_store:
        parser.add_argument("store", metavar="STORE", nargs="?", help=STORE_HELP)  # checked by the grammar
    for a in cmd.args:
        # Optional for argparse even when required: it may come as --DEST=VALUE
        # instead; the grammar checks that one of the two forms is there.
        parser.add_argument(a.dest, metavar=a.metavar, nargs="?", help=a.help)
    rows = [_add_option(parser, opt) for opt in cmd.options]
    for a in cmd.args:
        # No dest clash: argparse stores the option form under its own name.
        parser.add_argument(f"--{a.dest}", dest=f"{a.dest}_option", metavar=a.metavar,
                            help=f"{a.metavar}, for a value that starts with '-'")
        rows.append((f"--{a.dest}={a.metavar}", f"{a.metavar}, for a value that starts with '-'"))
    return parser, rows


def _options_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "options:\n" + "\n".join(f"  {flags:<{width}}  {text}" for flags, text in rows)


def help_text(cmd: Command, prog: str) -> str:
    """The help page of one command: usage, description, arguments, options (from the parser), examples."""
    _, rows = build_parser(cmd, prog, with_store=False)
    usage = "usage: " + "\n       ".join(f"{prog} {u}" for u in cmd.usage)
    width = max(len(a.metavar) for a in cmd.args) if cmd.args else 0
    args = "".join(f"  {a.metavar:<{width}}  {a.help}\n" for a in cmd.args)
    parts = [usage, "", cmd.description, ""]
    if args:
        parts += ["arguments:\n" + args.rstrip("\n"), ""]
    if rows:
        parts += [_options_table(rows), ""]
    if cmd.footer:
        parts += [cmd.footer.rstrip("\n"), ""]
    parts += ["examples:"] + [f"  {prog} {e}" for e in cmd.examples]
    return "\n".join(parts) + "\n"


# -- shared by the commands that select keys ------------------------------------------------
PATTERN_HELP = """\
patterns:
  A pattern without * ? [ names a key and every key below it: iters-000/deepmd
  matches iters-000/deepmd and iters-000/deepmd/red, not iters-000/deepmd-old.
  With * ? [ it is a glob over whole keys, where * also crosses '/':
  "iters-00[0-2]/*", "*/deepmd/*". A pattern that is exactly an existing key
  names that key alone (a key copied from 'ls', such as iter[0]). Quote
  patterns so the shell leaves them alone.
"""

PATTERN_ARG = Arg("pattern", "PATTERN", False, "the keys to select (see 'patterns' below)")
