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
library (``_ops``, ``_maintenance``), and formats what it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import pprint
import shlex
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, NoReturn, Optional, Sequence

from . import _fingerprint, _maintenance, _ops
from ._errors import CheckpointError, InvalidKeyError, NewerFormatError
from ._keys import validate_key
from ._report import command_line, write_report
from ._runs import mask_argv
from .stores import Store, is_postgres_url, open_store
from .stores._base import library_version

__all__ = ["run", "PROG", "CheckpointTool", "parse", "overview", "UsageError", "CommandError"]

PROG = "ai2-kit tool checkpoint"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """The command line itself is wrong: exit status 2."""


class CommandError(Exception):
    """A command could not do what was asked (no such key, declined...): exit status 1."""


# -- declaring a command: its arguments once, for the parser and the help ---------------
class _Parser(argparse.ArgumentParser):
    """argparse without its exits: errors become UsageError, help is ours."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class _Arg:
    """A positional argument (``dest``) that may also be given as ``--dest=VALUE``.

    The option form exists for values that start with '-' (``--pattern=-x``),
    which would otherwise read as options.
    """

    dest: str
    metavar: str
    required: bool
    help: str


@dataclass
class _Command:
    name: str
    summary: str
    usage: list[str]  # forms after '{prog} ', chained first
    description: str
    examples: list[str]  # after '{prog} '
    args: list[_Arg] = field(default_factory=list)
    # Declares the options on the parser, each with its help.
    options: Callable[[_Options], None] = lambda o: None
    footer: str = ""


class _Options:
    """Adds options to a parser and remembers each one's help line."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.rows: list[tuple[str, str]] = []

    def flag(self, *names: str, dest: str, help: str) -> None:
        """A boolean ``--x``, with ``--no-x`` to switch it off again."""
        self.parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                                 default=False, help=help)
        shown = ["--[no-]" + n[2:] if n.startswith("--") else n for n in names]
        self.rows.append((", ".join(shown), help))

    def value(self, *names: str, dest: str, metavar: str, help: str, repeat: bool = False,
              type: Callable[[str], Any] | None = None) -> None:
        kw: dict[str, Any] = {"dest": dest, "metavar": metavar, "help": help}
        if repeat:
            kw["action"] = "append"
        if type is not None:
            kw["type"] = type
        self.parser.add_argument(*names, **kw)
        self.rows.append((", ".join(names) + f" {metavar}", help + (" (repeatable)" if repeat else "")))

    def format(self) -> str:
        if not self.rows:
            return ""
        width = max(len(r[0]) for r in self.rows)
        return "options:\n" + "\n".join(f"  {flags:<{width}}  {text}" for flags, text in self.rows) + "\n"


def _depth(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--depth takes a whole number >= 1, not {text!r}")
    return int(text)


_PATTERN_HELP = """\
patterns:
  A pattern without * ? [ names a key and every key below it: iters-000/deepmd
  matches iters-000/deepmd and iters-000/deepmd/red, not iters-000/deepmd-old.
  With * ? [ it is a glob over whole keys, where * also crosses '/':
  "iters-00[0-2]/*", "*/deepmd/*". A pattern that is exactly an existing key
  names that key alone (a key copied from 'ls', such as iter[0]). Quote
  patterns so the shell leaves them alone.
"""


def _ls_options(o: _Options) -> None:
    o.flag("-v", "--verbose", dest="verbose",
           help="add created time, duration of the original call, size, function and call site")
    o.flag("--json", dest="as_json", help="one JSON object per entry (all its metadata), for scripts")
    o.flag("--tree", dest="as_tree", help="group keys by '/' with entry counts and sizes per level")
    o.value("--depth", dest="depth", metavar="N", type=_depth, help="with --tree: show N levels")
    o.value("--exclude", dest="exclude", metavar="GLOB", repeat=True, help="leave out keys matching GLOB")


def _show_options(o: _Options) -> None:
    o.flag("--value", dest="value", help="also print the stored value. This unpickles it, which runs "
                                         "code from the store: use it only on stores you trust")
    o.flag("--json", dest="as_json", help="print the metadata as one JSON object")


def _rm_options(o: _Options) -> None:
    o.flag("-y", "--yes", dest="yes", help="do not ask")
    o.flag("-n", "--dry-run", dest="dry_run", help="only show what would be removed")
    o.value("--from", dest="from_key", metavar="KEY", help="KEY and every entry created after it")
    o.value("--exclude", dest="exclude", metavar="GLOB", repeat=True, help="keep keys matching GLOB")


def _verify_options(o: _Options) -> None:
    o.value("--salvage", dest="salvage", metavar="NEW",
            help="copy every readable entry into a new store at NEW (the same kind as STORE); the "
                 "damaged store is left as it is. Copying reads the values, so it unpickles them")


def _copy_options(o: _Options) -> None:
    o.flag("--skip-existing", dest="skip_existing",
           help="keep DEST's entry where both stores have a key (the default replaces it)")
    o.value("--exclude", dest="exclude", metavar="GLOB", repeat=True, help="leave out keys matching GLOB")


def _runs_options(o: _Options) -> None:
    o.flag("--json", dest="as_json", help="one JSON object per run (the whole record), for scripts")


_STORE_HELP = "the store: a file, a directory, or a postgresql:// URL"
_PATTERN_ARG = _Arg("pattern", "PATTERN", False, "the keys to select (see 'patterns' below)")

_COMMANDS: dict[str, _Command] = {c.name: c for c in [
    _Command(
        "load", "choose the store that the following commands work on",
        usage=["load STORE [- COMMAND ...]"],
        description="""\
Choose the store the commands after '-' work on. STORE is a single-file store,
a directory store, a reference 2023 pickle file, a reference 2024 directory,
or a postgresql:// URL (a path starting with '-' is written --path=-NAME).
Nothing is read until a command needs it, and nothing
is ever created: a path that does not exist is an error. On its own, 'load'
prints a one-line summary of the store.""",
        args=[_Arg("path", "STORE", True, _STORE_HELP)],
        examples=["load ./checkpoint.pkl", "load ./checkpoint.pkl - ls",
                  'load ./checkpoint.pkl - rm "iters-000/deepmd" - ls'],
    ),
    _Command(
        "ls", "list keys in sorted order (--verbose, --json, --tree)",
        usage=["load STORE - ls [PATTERN] [options]", "ls STORE [PATTERN] [options]"],
        description="""\
List the keys of the store in sorted order, one per line, as they are read
(a store of any size starts printing at once). Only metadata is read: no value
is ever unpickled.""",
        args=[_PATTERN_ARG], options=_ls_options, footer=_PATTERN_HELP,
        examples=["load ./checkpoint.pkl - ls", "load ./checkpoint.pkl - ls --verbose",
                  'load ./checkpoint.pkl - ls "iters-000/*" --json', "ls ./checkpoint.pkl --tree --depth 2"],
    ),
    _Command(
        "show", "all metadata of one entry (--value also prints the value)",
        usage=["load STORE - show KEY [--value] [--json]", "show STORE KEY [--value] [--json]"],
        description="""\
Print every metadata field of one entry: function, call site, created time,
duration of the original call, size, checksum, host, pid, format.""",
        args=[_Arg("key", "KEY", True, "the entry's key (exact, no patterns)")], options=_show_options,
        examples=["load ./checkpoint.pkl - show iters-000/deepmd/red",
                  "show ./checkpoint.pkl iters-000/deepmd/red --value"],
    ),
    _Command(
        "rm", "remove entries, e.g. to redo a workflow from some step on",
        usage=["load STORE - rm PATTERN [options]", "load STORE - rm --from KEY [PATTERN] [options]",
               "rm STORE PATTERN [options]"],
        description="""\
Remove the entries matching PATTERN, so that those steps run again next time.
With --from KEY, remove KEY and every entry created after it (within PATTERN
if one is given): "redo everything from this step on".
No value is unpickled. Matching nothing is reported and is not an error.

When stdin is a terminal, rm shows what will go and asks once. When it is not
(scripts, job files, pipes), it proceeds as the reference tool always did and
prints every key it removed; use --dry-run to look first.""",
        args=[_PATTERN_ARG], options=_rm_options,
        footer=_PATTERN_HELP + """
A reference 2023 file is rewritten without the removed entries, never
unpickled, after a backup copy beside it (FILE.legacy-<time>.bak).
""",
        examples=['load ./checkpoint.pkl - rm "iters-000/deepmd"',
                  'load ./checkpoint.pkl - rm "iters-00[3-9]/*" --exclude "*/cp2k/*" --yes',
                  'rm ./checkpoint.pkl "iters-003" --dry-run',
                  "load ./checkpoint.pkl - rm --from iters-003/label --dry-run"],
    ),
    _Command(
        "verify", "check every entry's bytes; --salvage NEW copies the readable ones",
        usage=["load STORE - verify [--salvage NEW]", "verify STORE [--salvage NEW]"],
        description="""\
Check every entry's checksum (and signature, where the store signs), and for a
single-file store the database's own structure. Nothing is unpickled and
nothing is changed. The exit status is 1 when something is damaged.""",
        options=_verify_options,
        examples=["load ./checkpoint.pkl - verify", "verify ./checkpoint.pkl --salvage ./checkpoint-salvaged.pkl"],
    ),
    _Command(
        "copy", "copy entries into another store (file, directory, postgresql://), verified",
        usage=["load SRC - copy DEST [PATTERN] [options]", "copy SRC DEST [PATTERN] [options]"],
        description="""\
Copy entries (all, or those matching PATTERN) from SRC into DEST, for example
a local file into a shared PostgreSQL store. DEST may be a new path (created
as the same kind of store as SRC), an existing store, or a postgresql:// URL.
Each entry is read (checksum checked), written, and read back from DEST
before it counts; metadata (function, call site, created time, duration,
fingerprints) is kept. Copying reads the values, so it unpickles them.
Where DEST already has a key, its entry is replaced, unless --skip-existing.""",
        args=[_Arg("dest", "DEST", True, "the store to copy into"), _PATTERN_ARG],
        options=_copy_options, footer=_PATTERN_HELP,
        examples=["load ./checkpoint.pkl - copy postgresql://me@db-host/team",
                  'copy ./checkpoint.pkl ./backup.db "iters-00[0-2]/*"',
                  "copy ./checkpoint.pkl ./backup.db --skip-existing"],
    ),
    _Command(
        "runs", "the runs that used the store: when, where, steps run and hit, time saved",
        usage=["load STORE - runs [--json]", "runs STORE [--json]"],
        description="""\
List the runs recorded in the store, oldest first: each process that saved
or hit a step, with its start, how long it lasted, host, pid, user, how many
steps it ran and hit, stale warnings, reruns, failed saves, and the time its
hits saved (what those steps took when they ran). Stores written before runs
were recorded list none. Nothing is unpickled.""",
        options=_runs_options,
        examples=["load ./checkpoint.pkl - runs", "runs ./checkpoint.pkl --json"],
    ),
    _Command(
        "report", "write one self-contained HTML page: timeline, runs, key tree, problems",
        usage=["load STORE - report OUT.html", "report STORE OUT.html"],
        description="""\
Write an HTML page about the store to OUT.html: a timeline of every saved step
(one lane per first key component, coloured by run; hover a bar for its key,
function, call site, duration, size and host), the runs, stale and damaged
entries, and the key tree with counts, sizes and durations. The page needs no
network and no server. Only metadata is read: nothing is unpickled.""",
        args=[_Arg("out", "OUT.html", True, "the page to write (replaced if it exists)")],
        examples=["load ./checkpoint.pkl - report report.html", "report ./checkpoint.pkl /tmp/run.html"],
    ),
    _Command(
        "migrate", "convert a reference-format store to this project's format",
        usage=["load STORE - migrate", "migrate STORE"],
        description="""\
Convert a store written by the reference design, with a backup first:
  - a 2023 pickle file becomes a single-file (SQLite) store in place; the
    original is kept as FILE.legacy-<time>.bak;
  - in a 2024 directory every per-key pickle file is rewritten as this
    project's entry file, after the whole directory was copied to
    DIR.legacy-<time>.bak.
Every converted entry is read back and checked; the counts are reported. A
store already in this project's format is left alone.""",
        examples=["load ./checkpoint.pkl - migrate", "migrate ./checkpoint-dir"],
    ),
]}


def _build(cmd: _Command, prog: str, with_store: bool) -> tuple[_Parser, _Options]:
    """The parser of one segment; ``with_store``: the store is its first argument."""
    parser = _Parser(prog=f"{prog} {cmd.name}", add_help=False, allow_abbrev=False)
    if with_store:
        parser.add_argument("store", metavar="STORE", nargs="?", help=_STORE_HELP)  # checked below
    opts = _Options(parser)
    for a in cmd.args:
        # Optional for argparse even when required: it may come as --DEST=VALUE
        # instead; _parse_segment checks that one of the two forms is there.
        parser.add_argument(a.dest, metavar=a.metavar, nargs="?", help=a.help)
    cmd.options(opts)
    for a in cmd.args:
        # No dest clash: argparse stores the option form under its own name.
        parser.add_argument(f"--{a.dest}", dest=f"{a.dest}_option", metavar=a.metavar,
                            help=f"{a.metavar}, for a value that starts with '-'")
        opts.rows.append((f"--{a.dest}={a.metavar}", f"{a.metavar}, for a value that starts with '-'"))
    return parser, opts


def command_help(name: str, prog: str = PROG) -> str:
    """The help text of one command: usage, description, options (from the parser), examples."""
    cmd = _COMMANDS[name]
    _, opts = _build(cmd, prog, with_store=False)
    usage = "usage: " + "\n       ".join(f"{prog} {u}" for u in cmd.usage)
    width = max(len(a.metavar) for a in cmd.args) if cmd.args else 0
    args = "".join(f"  {a.metavar:<{width}}  {a.help}\n" for a in cmd.args)
    parts = [usage, "", cmd.description, ""]
    if args:
        parts += ["arguments:\n" + args.rstrip("\n"), ""]
    if opts.rows:
        parts += [opts.format().rstrip("\n"), ""]
    if cmd.footer:
        parts += [cmd.footer.rstrip("\n"), ""]
    parts += ["examples:"] + [f"  {prog} {e}" for e in cmd.examples]
    return "\n".join(parts) + "\n"


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
    lines = [f"  {c.name:<9} {c.summary}" for c in _COMMANDS.values()]
    return _OVERVIEW.format(prog=prog, commands="\n".join(lines))


# -- parsing the line -----------------------------------------------------------------
@dataclass
class _Step:
    """One command of the line, with its arguments as ``CheckpointTool`` takes them."""

    name: str
    kwargs: dict[str, Any]


@dataclass
class _Plan:
    steps: list[_Step]
    help: str | None = None


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


def _usage_message(message: str, cmd: _Command, prog: str) -> str:
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


def _parse_segment(cmd: _Command, tokens: list[str], prog: str, with_store: bool) -> dict[str, Any]:
    parser, _ = _build(cmd, prog, with_store)
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
    if kwargs.get("depth") is not None and not kwargs.get("as_tree"):
        raise UsageError("--depth goes with --tree")
    if kwargs.get("as_tree") and kwargs.get("as_json"):
        raise UsageError("choose one of --tree and --json")
    if kwargs.get("yes") and kwargs.get("dry_run"):
        raise UsageError("choose one of --yes and --dry-run")
    if cmd.name == "rm" and not kwargs.get("pattern") and kwargs.get("from_key") is None:
        raise UsageError("rm needs a PATTERN or --from KEY; use '*' to remove every entry")
    return kwargs


def parse(argv: Sequence[str], prog: str = PROG) -> _Plan:
    """Check the whole line and turn it into steps; nothing runs here.

    Raises UsageError with a one-line message naming the word at fault.
    """
    argv = list(argv)
    if argv == ["--version"]:
        return _Plan([], help=f"{prog} {library_version()}\n")
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help" and argv[1] in _COMMANDS:
            return _Plan([], help=command_help(argv[1], prog))
        return _Plan([], help=overview(prog))
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
    steps: list[_Step] = []
    have_store = False
    for i, seg in enumerate(_split_chain(argv)):
        if not seg:
            where = "before the first '-'" if i == 0 else "after '-'"
            raise UsageError(f"a command is missing {where}; commands are: {', '.join(_COMMANDS)}")
        word = seg[0]
        if word in ("-h", "--help"):
            return _Plan([], help=overview(prog))
        cmd = _COMMANDS.get(word)
        if cmd is None:
            kind = "option" if _is_option(word) else "command"
            raise UsageError(
                f"unknown {kind} {word!r}; commands are: {', '.join(_COMMANDS)}. Try '{prog} --help'"
            )
        if "--help" in seg[1:] or "-h" in seg[1:]:
            return _Plan([], help=command_help(cmd.name, prog))
        # Conventional form: without an earlier 'load', the store comes first.
        with_store = cmd.name != "load" and not have_store
        kwargs = _parse_segment(cmd, seg[1:], prog, with_store)
        if with_store:
            steps.append(_Step("load", {"path": kwargs.pop("store")}))
        steps.append(_Step(cmd.name, kwargs))
        have_store = True
    return _Plan(steps)


# -- output helpers ----------------------------------------------------------------------
def _printable(text: object) -> str:
    """Any field from a store on one terminal line (``_ops.printable``: the one escaping function)."""
    return _ops.printable(text)


_when = _ops.when


def _shorten(keys: Sequence[str], head: int = 10, tail: int = 5) -> list[str]:
    shown = [_printable(k) for k in keys]
    if len(shown) <= head + tail + 5:
        return shown
    return [*shown[:head], f"... ({len(shown) - head - tail} more) ...", *shown[-tail:]]


def _shell_path(path: str) -> str:
    """``path`` as a shell word that names its exact bytes: ``$'...\\xe9...'`` for a name that is not UTF-8."""
    raw = os.fsencode(path)
    if raw.isascii() and path.isprintable():
        return shlex.quote(path)
    return "$'" + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b"'\\" else f"\\x{b:02x}" for b in raw) + "'"


def _not_a_key(store: Store, key: str) -> Optional[str]:
    """Why a listed name cannot be used as a key, and what removes it; None for a valid key.

    A reference 2024 folder may hold a file whose name is not UTF-8 (or
    holds a control character): listing shows it escaped, but no workflow
    and no command can address it as a key, so its file is named for ``rm``
    the way a shell can type it.
    """
    try:
        validate_key(key)
        return None
    except InvalidKeyError as e:
        why = _one_line(e.reason)
    root = getattr(store, "root", None)
    where = (f"; remove its file with: rm {_shell_path(os.path.join(root, *key.split('/')))}"
             if isinstance(root, str) else "")
    return f"{_printable(key)} is not a valid key ({why}), so no step can use it{where}"


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _one_line(text: object) -> str:
    return _printable(" ".join(str(text).split()))


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    target = f" {e.filename!r}" if e.filename else ""
    hint = {
        errno.EACCES: "Check the permissions",
        errno.EPERM: "Check the permissions",
        errno.EROFS: "The file system is read-only",
        errno.ENOSPC: "Free some disk space and retry",
        errno.ENOENT: "Check the path",
    }.get(e.errno or 0, "")
    return f"{what}:{target}" + (f". {hint}" if hint else "")


# -- the commands -------------------------------------------------------------------------
class CheckpointTool:
    """The commands: ``load`` picks the store, the others act on it.

    One method per command, each calling one library function (``_ops``,
    ``_maintenance``) and printing what it returns as it goes. Every command
    returns the tool itself, so that a script can chain them as the command
    line does (``load F - rm X --yes - ls``).
    """

    def __init__(self, out: IO[str], err: IO[str], stdin: Optional[IO[str]], prog: str = PROG) -> None:
        self._prog = prog
        self._out = out
        self._err = err
        self._stdin = stdin
        self._location: str | None = None
        self._store: Store | None = None
        self._writable = False
        self._ran = False

    # -- plumbing ---------------------------------------------------------------------
    def _emit(self, line: str = "") -> None:
        self._out.write(line + "\n")

    def _note(self, line: str) -> None:
        self._err.write(line + "\n")

    def _open(self, write: bool = False) -> Store:
        if self._location is None:  # plan() always puts a load first
            raise UsageError("no store: start with 'load STORE'")
        if self._store is not None and (self._writable or not write):
            return self._store
        self.close()
        # Read-only for ls/show: they must never create, migrate or lock anything.
        self._store = _ops.open_existing(self._location, readonly=not write, allow_newer=False)
        self._writable = write
        return self._store

    def _progress(self) -> _maintenance.Progress:
        """A progress bar on stderr when it is a terminal; nothing when piped or redirected."""
        try:
            tty = self._err.isatty()
        except (ValueError, OSError):
            tty = False
        if not tty:
            return _maintenance.no_progress
        from tqdm import tqdm  # only interactive runs pay for the import

        err = self._err

        def bar(items: Iterable[str], total: Optional[int], label: str) -> Iterable[str]:
            return tqdm(items, total=total, desc=label, unit=" entries", file=err, leave=False,
                        dynamic_ncols=True, mininterval=0.2)

        return bar

    def _shown(self) -> str:
        """The store as the user named it, for hints; a URL without its password."""
        if self._location is not None and is_postgres_url(self._location) and self._store is not None:
            return self._store.location
        return self._location or ""

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    def finish(self) -> None:
        """After the chain: a lone ``load`` prints a summary of the store.

        Called by ``run`` once every command of the line has run.
        """
        if not self._ran and self._location is not None:
            self._emit(self._summary())

    def _summary(self) -> str:
        store = self._open()
        # Opened read-only on purpose; mention only a reason of the store's own.
        own = store.readonly and store.readonly_reason != "opened read-only"
        ro = f"; read-only: {store.readonly_reason}" if own else ""
        return (
            f"{store.location}: {store.kind} store, {_entries(len(store))}{ro}\n"
            f"List them with: {self._prog} load {shlex.quote(self._shown())} - ls"
        )

    # -- commands ---------------------------------------------------------------------
    def load(self, path: str) -> CheckpointTool:
        """Choose the store (see ``--help``)."""
        if path != self._location:
            self.close()
        self._location = path
        return self

    def ls(
        self,
        pattern: Optional[str] = None,
        exclude: Optional[list[str]] = None,
        verbose: bool = False,
        as_json: bool = False,
        as_tree: bool = False,
        depth: Optional[int] = None,
    ) -> CheckpointTool:
        """List keys (see ``--help``)."""
        self._ran = True
        store = self._open()
        metas = _ops.iter_select(store, pattern, exclude)
        if as_tree:
            count = self._print_tree(store, metas, depth)
        elif as_json:
            count = self._print_lines(metas, _ops.json_line)
        elif verbose:
            self._emit(f"{'CREATED':<19}  {'DURATION':>8}  {'SIZE':>9}  KEY  FUNCTION  CALL SITE")
            count = self._print_lines(metas, _verbose_line)
        else:
            count = self._print_lines(metas, lambda m: _printable(m["key"]))
        if count == 0:
            what = f"no entries match {pattern!r}" if pattern else "no entries"
            excl = " (after --exclude)" if exclude else ""
            self._note(f"{store.location}: {what}{excl}")
        return self

    def _print_lines(self, metas: Iterator[dict[str, Any]], fmt: Callable[[dict[str, Any]], str]) -> int:
        count = 0
        for meta in metas:
            self._emit(fmt(meta))
            count += 1
        return count

    def _print_tree(self, store: Store, metas: Iterator[dict[str, Any]], depth: int | None) -> int:
        root = _ops.tree(metas, name=store.location)
        if root.count == 0:
            return 0
        rows: list[tuple[str, str, str]] = [(_printable(root.name), _entries(root.count), _ops.format_size(root.size))]
        for level, node in root.walk(depth):
            label = "  " * level + _printable(node.name)
            if node.children:
                label += "/"
                counts = _entries(node.count) + (" (one at the folder's own key)" if node.entry else "")
            else:
                counts = ""
            rows.append((label, counts, _ops.format_size(node.size)))
        width = min(max(len(r[0]) for r in rows), 70)
        cwidth = max(len(r[1]) for r in rows)
        for label, counts, size in rows:
            self._emit(f"{label:<{width}}  {counts:<{cwidth}}  {size:>9}".rstrip())
        return root.count

    def show(self, key: str, value: bool = False, as_json: bool = False) -> CheckpointTool:
        """Show one entry (see ``--help``)."""
        self._ran = True
        store = self._open()
        real = _ops.unescape(key)
        for name in dict.fromkeys((key, real)):
            problem = _not_a_key(store, name)
            if problem is not None and any(m["key"] == name for m in store.iter_meta()):
                raise CommandError(problem)  # listed, but no key can name it: what removes it instead
        if real != key and _not_a_key(store, key) is None and _not_a_key(store, real) is None \
                and store.get_meta(key) is None and store.get_meta(real) is not None:
            key = real  # the escaped form that 'ls' printed (a control character in a key)
        meta = store.get_meta(key)
        if meta is None:
            below = sum(1 for _ in _ops.iter_select(store, key.rstrip("/") + "/")) if key else 0
            where = shlex.quote(self._shown())
            hint = (f"; {_entries(below)} below it: {self._prog} load {where} - ls {shlex.quote(key)}"
                    if below else f"; list the keys with: {self._prog} load {where} - ls")
            raise CommandError(f"no entry {_printable(repr(key))} in {_printable(store.location)}{_printable(hint)}")
        meta = dict(meta)
        loaded: Any = None
        if value:
            # The only place the CLI unpickles: asked for explicitly.
            hit = store.lookup(key)
            if hit is None:
                raise CommandError(f"entry {key!r} disappeared from {store.location} while reading it")
            meta, loaded = dict(hit.meta), hit.value
        if as_json:
            record = dict(meta)
            if value:
                record["value_repr"] = repr(loaded)
            self._emit(_ops.json_line(record))
            return self
        self._emit(f"{'key':<13} {_printable(meta.get('key', key))}")
        self._emit(f"{'store':<13} {_printable(store.location)} ({store.kind})")
        shown = {"key"}
        for name, label, fmt in _SHOW_FIELDS:
            if name in meta:
                # A field may hold anything: escaped whole (the fingerprint's
                # lines each on their own, in _show_fingerprint).
                text = fmt(meta[name])
                self._emit(f"{label:<13} {text if name == 'fingerprint' else _printable(text)}")
                shown.add(name)
        for name in sorted(set(meta) - shown, key=str):
            self._emit(f"{_printable(name):<13} {_printable(meta[name])}")
        if value:
            self._emit("value:")
            self._emit(pprint.pformat(loaded, width=100))
        return self

    def copy(
        self, dest: str, pattern: Optional[str] = None, exclude: Optional[list[str]] = None,
        skip_existing: bool = False,
    ) -> CheckpointTool:
        """Copy entries into another store (see ``--help``)."""
        self._ran = True
        src = self._open()
        prefer = "dir" if src.kind == "directory" else "file"
        with open_store(dest, prefer=prefer) as dst:
            if not is_postgres_url(dest) and os.path.abspath(dest) == os.path.abspath(str(src.location)):
                raise UsageError("copy needs a DEST other than the store itself")
            report = _maintenance.copy_entries(src, dst, pattern or None, overwrite=not skip_existing,
                                                  progress=self._progress(),
                                               exclude=exclude)
            where = dst.location
        self._emit(f"Copied {_entries(len(report.copied))} from {src.location} to {where}, "
                   "each read back and checked.")
        if report.skipped:
            # Asked for with --skip-existing: reported, and not a failure.
            self._emit(f"Kept {_entries(len(report.skipped))} that {where} already had (--skip-existing).")
        for key, reason in sorted(report.failed.items()):
            self._note(f"  not copied: {_printable(key)}: {_one_line(reason)}")
        if report.failed:
            raise CommandError(f"{_entries(len(report.failed))} could not be copied (listed above)")
        return self

    def rm(
        self, pattern: Optional[str] = None, exclude: Optional[list[str]] = None, yes: bool = False,
        dry_run: bool = False, from_key: Optional[str] = None,
    ) -> CheckpointTool:
        """Remove entries (see ``--help``)."""
        self._ran = True
        if not pattern and from_key is None:
            raise UsageError("rm needs a PATTERN or --from KEY; use '*' to remove every entry")
        # List first with a read-only store: a dry run or a declined prompt
        # must not convert a reference file or touch anything.
        store = self._open(write=False)
        if from_key is not None:
            keys = _ops.created_since(store, from_key, pattern or None, exclude)
            what = f"{from_key!r} and every entry created after it" + (f" matching {pattern!r}" if pattern else "")
        else:
            keys = [m["key"] for m in _ops.iter_select(store, pattern, exclude)]
            what = f"matching {pattern!r}"
        if not keys and from_key is None and pattern and _ops.unescape(pattern) != pattern:
            # The escaped form that 'ls' and 'verify' print for a name that is
            # not UTF-8 (or holds a control character) names that entry.
            keys = [m["key"] for m in _ops.iter_select(store, _ops.unescape(pattern), exclude)]
        for k in keys:
            problem = _not_a_key(store, k)
            if problem is not None:
                raise CommandError(problem)
        where = store.location
        if not keys:
            excl = " (after --exclude)" if exclude else ""
            self._emit(f"No entries {what}{excl} in {where}; nothing removed.")
            return self
        if dry_run:
            if from_key is None:
                self._note(_ops.describe_rule(_ops.pattern_rule(store, pattern), pattern))
            self._emit(f"Would remove {_entries(len(keys))} from {where}:")
            for line in _shorten(keys):
                self._emit("  " + line)
            return self
        if not yes and self._interactive():
            self._note(f"About to remove {_entries(len(keys))} from {where}:")
            for line in _shorten(keys):
                self._note("  " + line)
            if not self._confirm(f"Remove {'it' if len(keys) == 1 else 'them'}? [y/N] "):
                raise CommandError("nothing removed")
            shown = True
        else:
            # Not asking without a terminal: the seed's documented line
            # ('load F - rm KEY', no --yes) runs in scripts and job files, and
            # the reference removed without asking. Refusing would break them;
            # instead every removed key is printed, and --dry-run previews.
            shown = False
        store = self._open(write=True)
        store.delete_many(keys)
        if not shown:
            for line in _shorten(keys):
                self._emit("removed " + line)
        self._emit(f"Removed {_entries(len(keys))} ({what}) from {store.location}.")
        # A reference 2023 file was rewritten after a backup: the library
        # logs the backup's path, shown as one warning line on stderr.
        return self

    def _interactive(self) -> bool:
        try:
            return self._stdin is not None and self._stdin.isatty()
        except (ValueError, OSError):  # closed or detached stdin
            return False

    def _confirm(self, prompt: str) -> bool:
        self._err.write(prompt)
        self._err.flush()
        answer = self._stdin.readline() if self._stdin is not None else ""
        if not answer:
            self._err.write("\n")
        return answer.strip().lower() in ("y", "yes")

    def verify(self, salvage: Optional[str] = None) -> CheckpointTool:
        """Check a store (see ``--help``)."""
        self._ran = True
        store = self._open()
        report = _maintenance.verify_store(store, self._progress())
        self._emit(f"{store.location}: {_entries(report.entries)} checked, {len(report.damaged)} damaged.")
        for key, reason in sorted(report.damaged.items()):
            self._emit(f"  damaged: {_not_a_key(store, key) or (_printable(key) + ': ' + _one_line(reason))}")
        for problem in report.store_problems:
            self._emit(f"  store problem: {_one_line(problem)}")
        if report.orphan_files:
            self._emit(f"  {len(report.orphan_files)} side files belong to no entry "
                       "(left by a writer killed mid-save; harmless)")
        if salvage is not None:
            if not salvage or os.path.lexists(salvage):
                raise CommandError(f"--salvage needs a new path; {salvage!r} already exists")
            prefer = "dir" if store.kind == "directory" else "file"
            with open_store(salvage, prefer=prefer) as dst:
                copied = _maintenance.salvage(store, dst, self._progress())
                where = dst.location
            self._emit(f"Salvaged {_entries(len(copied.copied))} into {where}; "
                       f"{len(copied.failed)} could not be read.")
            for key, reason in sorted(copied.failed.items()):
                self._note(f"  not salvaged: {_printable(key)}: {_one_line(reason)}")
            return self
        if not report.ok:
            raise CommandError(
                f"{store.location} is damaged. Remove the damaged entries so their steps run again "
                f"({self._prog} load {shlex.quote(self._shown())} - rm KEY), or copy the readable ones to "
                f"a new store with: {self._prog} verify {shlex.quote(self._shown())} --salvage NEW"
            )
        return self

    def runs(self, as_json: bool = False) -> CheckpointTool:
        """List runs (see ``--help``)."""
        self._ran = True
        store = self._open()
        runs = store.iter_runs()
        if as_json:
            for run in runs:
                argv = run.get("argv")
                self._emit(_ops.json_line(dict(run, argv=mask_argv(argv) if argv else argv)))
            return self
        if not runs:
            self._note(f"{store.location}: no runs recorded (written before runs were recorded, "
                       "or by the reference design)")
            return self
        rows = [("STARTED", "LASTED", "HOST", "PID", "RAN", "HITS", "STALE", "SAVED", "COMMAND")]
        for r in runs:  # checked field by field by iter_runs: a bad field is None, shown as '-'
            started, last = r["started"], r["last"]
            lasted = last - started if started is not None and last is not None and last >= started else None
            rows.append((_when(started), _ops.format_duration(lasted), _printable(_dash(r["host"])),
                         _dash(r["pid"]), _dash(r["steps_run"]), _dash(r["hits"]), _dash(r["stale"]),
                         _ops.format_duration(r["saved_seconds"]), _printable(command_line(r["argv"]))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            self._emit("  ".join(f"{c:<{w}}" if i in (0, 2) else f"{c:>{w}}"
                                 for i, (c, w) in enumerate(zip(row, widths))) + "  " + row[-1])
        return self

    def report(self, out: str) -> CheckpointTool:
        """Write the HTML report (see ``--help``)."""
        self._ran = True
        if not out:
            raise UsageError("'report' needs OUT.html, the name of the page to write, not an empty one")
        store = self._open()
        try:
            write_report(out, self._shown(), store.iter_meta(), store.iter_runs())
        except ValueError as e:  # OUT is a link, a FIFO, a device or a folder
            raise CommandError(f"cannot write the report: {e}") from e
        except OSError as e:
            raise CommandError(f"cannot write the report: {_os_error(e)}") from e
        self._emit(f"report written to {_printable(out)}")
        return self

    def migrate(self) -> CheckpointTool:
        """Convert a reference-format store (see ``--help``)."""
        self._ran = True
        if self._location is None:
            raise UsageError("no store: start with 'load STORE'")
        self.close()
        with _quiet(_is_migration_log):  # the report below says the same, and more
            report = _ops.migrate(self._location, self._progress())
        loc = report.location
        if report.source_format == "current":
            self._emit(f"{loc} is already in this project's format ({report.store_kind} store, "
                       f"{_entries(report.already)}); nothing to migrate.")
            return self
        origin = {"reference-file": "reference 2023 file", "reference-dir": "reference 2024 directory"}
        self._emit(f"Migrated {loc} ({origin.get(report.source_format, report.source_format)}) "
                   f"to the {report.store_kind} format.")
        self._emit(f"  converted and verified: {_entries(report.migrated)}")
        if report.already:
            self._emit(f"  already in this format: {_entries(report.already)}")
        if report.backup:
            self._emit(f"  backup of the original: {report.backup}")
        if report.failed:
            for key, reason in report.failed:
                self._note(f"  not converted: {_printable(key)}: {_one_line(reason)}")
            raise CommandError(
                f"{_entries(len(report.failed))} could not be converted and were left as they were"
                + (f"; the backup at {report.backup} has everything" if report.backup else "")
            )
        return self


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _verbose_line(meta: dict[str, Any]) -> str:
    key = _printable(meta["key"])
    if "damaged" in meta:
        return f"{'-':<19}  {'-':>8}  {'-':>9}  {key}  DAMAGED: {_one_line(str(meta['damaged']))}"
    fn = _printable(meta.get("fn_name") or "-")
    site = _printable(meta.get("call_site") or "-")
    if meta.get("legacy") == "reference-dir" and "crc32" not in meta:
        fn, site = "-", "(reference 2024 file)"
    return (f"{_when(meta.get('created')):<19}  {_ops.format_duration(meta.get('duration')):>8}  "
            f"{_ops.format_size(meta.get('size')).replace(' ', ''):>9}  {key}  {fn}  {site}")


def _size_long(n: object) -> str:
    return f"{_ops.format_size(n)} ({n} bytes)" if _ops.count(n) is not None else str(n)


def _show_fingerprint(fp: object) -> str:
    """The fingerprint's lines for ``show``'s two columns, each escaped: a name in it may hold a newline."""
    return ("\n" + " " * 14).join(_printable(line) for line in _fingerprint.format_fingerprint(fp))


def _when_long(t: object) -> str:
    return f"{_when(t)} ({t})"


_SHOW_FIELDS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("fn_name", "function", str),
    ("call_site", "call site", str),
    ("created", "created", _when_long),
    ("duration", "duration", lambda d: f"{_ops.format_duration(d)} ({d} s)"),
    ("size", "size", _size_long),
    ("is_awaitable", "awaitable", str),
    ("legacy", "legacy", str),
    ("damaged", "damaged", str),
    ("fingerprint", "fingerprint", _show_fingerprint),
]


# -- entry point ------------------------------------------------------------------------------
class _OneLineLogs(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self._prog = prog

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._prog}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


def _is_migration_log(record: logging.LogRecord) -> bool:
    return record.funcName == "migrate_legacy_file" and record.levelno == logging.WARNING


@contextlib.contextmanager
def _quiet(drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """Leave out the library's log records that ``drop`` picks, for a moment."""
    logger = logging.getLogger("ai2_kit")

    def keep(record: logging.LogRecord) -> bool:
        return not drop(record)

    handlers = list(logger.handlers)
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


@contextlib.contextmanager
def _library_logs_to(stream: IO[str], prog: str) -> Iterator[None]:
    """Show the library's warnings as one line each, for this run only.

    The CLI is the host application, so it may decide how logs look; the
    handler is removed afterwards so that callers of ``run`` keep theirs.
    """
    logger = logging.getLogger("ai2_kit")
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLineLogs(prog))
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


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
        with _library_logs_to(err, prog):
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
        err.write(f"{prog}: error: {_one_line(str(e))}\n")
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # the reader went away (ls | head): the entry point handles it
    except OSError as e:
        err.write(f"{prog}: error: {_one_line(_os_error(e))}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            tool.close()
    return EXIT_OK
