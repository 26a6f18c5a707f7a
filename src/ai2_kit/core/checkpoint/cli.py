"""``ai2-kit tool checkpoint ...``: list, show, remove, verify and migrate checkpoint entries.

The seed's lines work verbatim, in python-fire's chaining grammar::

    ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls
    ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls --verbose
    ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - rm "iters-000/deepmd"

and so do the conventional forms, with the store as the first argument::

    ai2-kit tool checkpoint ls ./checkpoint.pkl "iters-000/*" --json

Thin by design: each command opens the store, calls one function of the
library (``_ops``), and formats what it returns. This is the only module
that imports python-fire.

Fire executes the chain (``load`` returns the tool, ``-`` moves on to the
next command), but the arguments are checked here first and handed to fire
in one canonical shape (``--name=value``, every value a plain string),
because left to itself fire would:

- turn a key into another type (``rm 1_000`` -> 1000, ``rm "[ab]"`` -> a list,
  ``rm "a#b"`` -> ``"a"``, the ``#`` read as a comment: removing the wrong
  entries);
- read ``ls --verbose PATTERN`` as ``verbose=PATTERN``;
- print usage errors over several lines and help through a pager.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pprint
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, Sequence

import fire
from fire import decorators as fire_decorators
from fire.core import FireExit

from . import _maintenance, _ops
from ._errors import CheckpointError, NewerFormatError
from .stores import Store, is_postgres_url, open_store

__all__ = ["run", "PROG", "CheckpointTool"]

PROG = "ai2-kit tool checkpoint"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """The command line itself is wrong: exit status 2."""


class CommandError(Exception):
    """A command could not do what was asked (no such key, declined...): exit status 1."""


# -- the command table: what each command takes, and its help --------------------------
@dataclass
class _Command:
    name: str
    positionals: tuple[str, ...]  # parameter names, in order
    required: int  # how many positionals are required
    flags: dict[str, str] = field(default_factory=dict)  # '--verbose' / '-v' -> parameter (bool)
    options: dict[str, str] = field(default_factory=dict)  # '--exclude' -> parameter (takes a value)
    repeatable: frozenset[str] = frozenset()
    summary: str = ""
    help: str = ""


_PATTERN_HELP = """\
patterns:
  A pattern without * ? [ names a key and every key below it: iters-000/deepmd
  matches iters-000/deepmd and iters-000/deepmd/red, not iters-000/deepmd-old.
  With * ? [ it is a glob over whole keys, where * also crosses '/':
  "iters-00[0-2]/*", "*/deepmd/*". Quote patterns so the shell leaves them alone."""

_COMMANDS: dict[str, _Command] = {
    "load": _Command(
        "load", ("path",), 1,
        options={"--path": "path"},
        summary="choose the store that the following commands work on",
        help=f"""\
usage: {PROG} load STORE [- COMMAND ...]

Choose the store the commands after '-' work on. STORE is a single-file store,
a directory store, a reference 2023 pickle file, a reference 2024 directory,
or a postgresql:// URL (a path starting with '-' is written --path=-NAME).
Nothing is read until a command needs it, and nothing
is ever created: a path that does not exist is an error. On its own, 'load'
prints a one-line summary of the store.

examples:
  {PROG} load ./checkpoint.pkl
  {PROG} load ./checkpoint.pkl - ls
  {PROG} load ./checkpoint.pkl - rm "iters-000/deepmd" - ls
""",
    ),
    "ls": _Command(
        "ls", ("pattern",), 0,
        flags={"--verbose": "verbose", "-v": "verbose", "--json": "as_json", "--tree": "as_tree"},
        options={"--exclude": "exclude", "--pattern": "pattern", "--depth": "depth"},
        repeatable=frozenset({"exclude"}),
        summary="list keys in sorted order (--verbose, --json, --tree)",
        help=f"""\
usage: {PROG} load STORE - ls [PATTERN] [options]
       {PROG} ls STORE [PATTERN] [options]

List the keys of the store in sorted order, one per line, as they are read
(a store of any size starts printing at once). Only metadata is read: no value
is ever unpickled.

options:
  -v, --verbose     add created time, duration of the original call, size,
                    function and call site
  --json            one JSON object per entry (all its metadata), for scripts
  --tree            group keys by '/' with entry counts and sizes per level
  --depth N         with --tree: show N levels
  --exclude GLOB    leave out keys matching GLOB (repeatable)

{_PATTERN_HELP}

examples:
  {PROG} load ./checkpoint.pkl - ls
  {PROG} load ./checkpoint.pkl - ls --verbose
  {PROG} load ./checkpoint.pkl - ls "iters-000/*" --json
  {PROG} ls ./checkpoint.pkl --tree --depth 2
""",
    ),
    "show": _Command(
        "show", ("key",), 1,
        flags={"--value": "value", "--json": "as_json"},
        options={"--key": "key"},
        summary="all metadata of one entry (--value also prints the value)",
        help=f"""\
usage: {PROG} load STORE - show KEY [--value] [--json]
       {PROG} show STORE KEY [--value] [--json]

Print every metadata field of one entry: function, call site, created time,
duration of the original call, size, checksum, host, pid, format.

options:
  --value   also print the stored value. This unpickles it, which runs code
            from the store: use it only on stores you trust.
  --json    print the metadata as one JSON object

examples:
  {PROG} load ./checkpoint.pkl - show iters-000/deepmd/red
  {PROG} show ./checkpoint.pkl iters-000/deepmd/red --value
""",
    ),
    "rm": _Command(
        "rm", ("pattern",), 0,
        flags={"--yes": "yes", "-y": "yes", "--dry-run": "dry_run", "-n": "dry_run"},
        options={"--exclude": "exclude", "--pattern": "pattern", "--from": "from_key"},
        repeatable=frozenset({"exclude"}),
        summary="remove entries, e.g. to redo a workflow from some step on",
        help=f"""\
usage: {PROG} load STORE - rm PATTERN [options]
       {PROG} load STORE - rm --from KEY [PATTERN] [options]
       {PROG} rm STORE PATTERN [options]

Remove the entries matching PATTERN, so that those steps run again next time.
With --from KEY, remove KEY and every entry created after it (within PATTERN
if one is given): "redo everything from this step on".
No value is unpickled. Matching nothing is reported and is not an error.

When stdin is a terminal, rm shows what will go and asks once. When it is not
(scripts, job files, pipes), it proceeds as the reference tool always did and
prints every key it removed; use --dry-run to look first.

options:
  -y, --yes         do not ask
  -n, --dry-run     only show what would be removed
  --from KEY        KEY and every entry created after it
  --exclude GLOB    keep keys matching GLOB (repeatable)

{_PATTERN_HELP}

A reference 2023 file is converted to the SQLite format before the first
removal, with a backup copy written beside it (FILE.legacy-<time>.bak).

examples:
  {PROG} load ./checkpoint.pkl - rm "iters-000/deepmd"
  {PROG} load ./checkpoint.pkl - rm "iters-00[3-9]/*" --exclude "*/cp2k/*" --yes
  {PROG} rm ./checkpoint.pkl "iters-003" --dry-run
  {PROG} load ./checkpoint.pkl - rm --from iters-003/label --dry-run
""",
    ),
    "verify": _Command(
        "verify", (), 0,
        options={"--salvage": "salvage"},
        summary="check every entry's bytes; --salvage NEW copies the readable ones",
        help=f"""\
usage: {PROG} load STORE - verify [--salvage NEW]
       {PROG} verify STORE [--salvage NEW]

Check every entry's checksum (and signature, where the store signs), and for a
single-file store the database's own structure. Nothing is unpickled and
nothing is changed. The exit status is 1 when something is damaged.

options:
  --salvage NEW   copy every readable entry into a new store at NEW (the same
                  kind as STORE); the damaged store is left as it is. Copying
                  reads the values, so it unpickles them.

examples:
  {PROG} load ./checkpoint.pkl - verify
  {PROG} verify ./checkpoint.pkl --salvage ./checkpoint-salvaged.pkl
""",
    ),
    "copy": _Command(
        "copy", ("dest", "pattern"), 1,
        options={"--exclude": "exclude", "--pattern": "pattern", "--dest": "dest"},
        flags={"--skip-existing": "skip_existing"},
        repeatable=frozenset({"exclude"}),
        summary="copy entries into another store (file, directory, postgresql://), verified",
        help=f"""\
usage: {PROG} load SRC - copy DEST [PATTERN] [options]
       {PROG} copy SRC DEST [PATTERN] [options]

Copy entries (all, or those matching PATTERN) from SRC into DEST, for example
a local file into a shared PostgreSQL store. DEST may be a new path (created
as the same kind of store as SRC), an existing store, or a postgresql:// URL.
Each entry is read (checksum checked), written, and read back from DEST
before it counts; metadata (function, call site, created time, duration,
fingerprints) is kept. Copying reads the values, so it unpickles them.

options:
  --exclude GLOB      leave out keys matching GLOB (repeatable)
  --skip-existing     keep DEST's entry where both stores have a key

{_PATTERN_HELP}

examples:
  {PROG} load ./checkpoint.pkl - copy postgresql://me@db-host/team
  {PROG} copy ./checkpoint.pkl ./backup.db "iters-00[0-2]/*"
""",
    ),
    "migrate": _Command(
        "migrate", (), 0,
        summary="convert a reference-format store to this project's format",
        help=f"""\
usage: {PROG} load STORE - migrate
       {PROG} migrate STORE

Convert a store written by the reference design, with a backup first:
  - a 2023 pickle file becomes a single-file (SQLite) store in place; the
    original is kept as FILE.legacy-<time>.bak;
  - in a 2024 directory every per-key pickle file is rewritten as this
    project's entry file, after the whole directory was copied to
    DIR.legacy-<time>.bak.
Every converted entry is read back and checked; the counts are reported. A
store already in this project's format is left alone.

examples:
  {PROG} load ./checkpoint.pkl - migrate
  {PROG} migrate ./checkpoint-dir
""",
    ),
}

_OVERVIEW = f"""\
usage: {PROG} load STORE - COMMAND [ARGS] [- COMMAND [ARGS] ...]
       {PROG} COMMAND STORE [ARGS]

Inspect and edit checkpoint stores: single-file and directory stores, the
reference design's 2023 pickle files and 2024 directories, postgresql:// URLs.
Listing, showing metadata and removing never unpickle a value.

commands:
{{commands}}

The first form is python-fire's chaining grammar ('-' separates commands on
the same store); in the second, the store is the command's first argument.

examples:
  {PROG} load ./path/to/checkpoint.pkl - ls
  {PROG} load ./path/to/checkpoint.pkl - ls --verbose
  {PROG} load ./path/to/checkpoint.pkl - rm "iters-000/deepmd"
  {PROG} ls ./path/to/checkpoint.pkl "iters-000/*" --json
  {PROG} migrate ./path/to/checkpoint.pkl

Run '{PROG} COMMAND --help' for the options of a command.
"""


def overview() -> str:
    """The help text of the command group."""
    lines = [f"  {c.name:<9} {c.summary}" for c in _COMMANDS.values()]
    return _OVERVIEW.format(commands="\n".join(lines))


# -- argument checking and the canonical form handed to fire ---------------------------
@dataclass
class _Plan:
    fire_args: list[str]
    help: str | None = None


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _parse_bool(flag: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise UsageError(f"{flag} takes no value (or true/false), not {text!r}")


def _split_chain(argv: Sequence[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for tok in argv:
        if tok == "-":
            segments.append([])
        else:
            segments[-1].append(tok)
    return segments


def _is_option(tok: str) -> bool:
    # '-' alone separates commands; '-5' could be a key, but keys never come
    # first in a segment and options are checked against the table anyway.
    return tok.startswith("-") and tok != "-"


def plan(argv: Sequence[str]) -> _Plan:
    """Check ``argv`` and translate it to fire's canonical arguments.

    Raises UsageError with a one-line message naming the word at fault.
    """
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help" and argv[1] in _COMMANDS:
            return _Plan([], help=_COMMANDS[argv[1]].help)
        return _Plan([], help=overview())
    if "--" in argv:
        # Fire reads what follows '--' as its own flags (--interactive opens a
        # Python shell, --trace...). None of that belongs in this tool.
        rest = argv[argv.index("--") + 1:]
        if rest in (["--help"], ["-h"]):
            argv = argv[: argv.index("--")] + ["--help"]
        else:
            raise UsageError(
                "'--' is not supported; to name a key that starts with '-', write --pattern=KEY or --key=KEY"
            )
    out: list[str] = []
    have_store = False
    segments = _split_chain(argv)
    for i, seg in enumerate(segments):
        if not seg:
            where = "before the first '-'" if i == 0 else "after '-'"
            raise UsageError(f"a command is missing {where}; commands are: {', '.join(_COMMANDS)}")
        word = seg[0]
        if word in ("-h", "--help"):
            return _Plan([], help=overview())
        cmd = _COMMANDS.get(word)
        if cmd is None:
            kind = "option" if _is_option(word) else "command"
            raise UsageError(
                f"unknown {kind} {word!r}; commands are: {', '.join(_COMMANDS)}. "
                f"Try '{PROG} --help'"
            )
        if "--help" in seg[1:] or "-h" in seg[1:]:
            return _Plan([], help=cmd.help)
        positionals, kwargs = _parse_segment(cmd, seg[1:])
        if cmd.name == "load":
            have_store = True
        elif not have_store:
            # Conventional form: the store is the command's first argument.
            if not positionals:
                raise UsageError(
                    f"'{cmd.name}' needs a store: '{PROG} load STORE - {cmd.name} ...' "
                    f"or '{PROG} {cmd.name} STORE ...'"
                )
            out += ["load", "--path=" + positionals.pop(0), "-"]
            have_store = True
        if len(positionals) > len(cmd.positionals):
            raise UsageError(f"unexpected argument {positionals[len(cmd.positionals)]!r} for '{cmd.name}'")
        for name, value in zip(cmd.positionals, positionals):
            if name in kwargs:
                raise UsageError(f"'{cmd.name}' got {name.upper()} twice")
            kwargs[name] = value
        missing = [n for n in cmd.positionals[: cmd.required] if n not in kwargs]
        if missing:
            raise UsageError(f"'{cmd.name}' needs {missing[0].upper()}; see '{PROG} {cmd.name} --help'")
        if "depth" in kwargs and not kwargs.get("as_tree"):
            raise UsageError("--depth goes with --tree")
        if kwargs.get("as_tree") and kwargs.get("as_json"):
            raise UsageError("choose one of --tree and --json")
        if kwargs.get("yes") and kwargs.get("dry_run"):
            raise UsageError("choose one of --yes and --dry-run")
        if out:
            out.append("-")
        out.append(cmd.name)
        for name, value in kwargs.items():
            # Canonical '--name=value': fire splits at the first '=', so any
            # value (even one starting with '-') arrives as it was typed.
            out.append(f"--{name}={_encode(value)}")
    return _Plan(out)


def _encode(value: Any) -> str:
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _parse_segment(cmd: _Command, tokens: list[str]) -> tuple[list[str], dict[str, Any]]:
    positionals: list[str] = []
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not _is_option(tok):
            positionals.append(tok)
            continue
        name, eq, value = tok.partition("=")
        if name in cmd.flags:
            kwargs[cmd.flags[name]] = _parse_bool(name, value) if eq else True
        elif name in cmd.options:
            param = cmd.options[name]
            if not eq:
                if i >= len(tokens) or tokens[i] == "-":
                    raise UsageError(f"{name} needs a value; see '{PROG} {cmd.name} --help'")
                value = tokens[i]
                i += 1
            if param == "depth":
                if not value.isdigit() or int(value) < 1:
                    raise UsageError(f"--depth takes a whole number >= 1, not {value!r}")
                kwargs[param] = int(value)
            elif param in cmd.repeatable:
                kwargs.setdefault(param, []).append(value)
            else:
                kwargs[param] = value
        elif name.startswith("--no-") and "--" + name[5:] in cmd.flags and not eq:
            kwargs[cmd.flags["--" + name[5:]]] = False
        else:
            raise UsageError(f"unknown option {name!r} for '{cmd.name}'; see '{PROG} {cmd.name} --help'")
    return positionals, kwargs


# -- output helpers ----------------------------------------------------------------------
def _printable(key: str) -> str:
    """A key on one line: control characters escaped, everything else as is."""
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return key.encode("unicode_escape").decode("ascii")
    return key


def _when(t: object) -> str:
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _shorten(keys: Sequence[str], head: int = 10, tail: int = 5) -> list[str]:
    shown = [_printable(k) for k in keys]
    if len(shown) <= head + tail + 5:
        return shown
    return [*shown[:head], f"... ({len(shown) - head - tail} more) ...", *shown[-tail:]]


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def _str(value: str) -> str:
    return value


def _bool(value: str) -> bool:
    return value == "True"


# -- the commands -------------------------------------------------------------------------
class CheckpointTool:
    """What fire drives: ``load`` picks the store, the other commands act on it.

    Every command returns the tool itself so that commands chain
    (``load F - rm X --yes - ls``); ``run`` tells fire to print nothing for
    it, since each command prints its own output as it goes.
    """

    def __init__(self, out: IO[str], err: IO[str], stdin: IO[str] | None) -> None:
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

        Called as fire's ``serialize`` and returns None, so fire prints
        nothing itself (it would print to ``sys.stdout``, not to ``out``).
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
            f"List them with: {PROG} load {shlex.quote(self._shown())} - ls"
        )

    # -- commands ---------------------------------------------------------------------
    @fire_decorators.SetParseFn(_str)
    def load(self, path: str) -> CheckpointTool:
        """Choose the store (see ``--help``)."""
        if path != self._location:
            self.close()
        self._location = path
        return self

    @fire_decorators.SetParseFn(_str)
    @fire_decorators.SetParseFn(_bool, "verbose", "as_json", "as_tree")
    @fire_decorators.SetParseFn(json.loads, "exclude")
    @fire_decorators.SetParseFn(int, "depth")
    def ls(
        self,
        pattern: str | None = None,
        exclude: list[str] | None = None,
        verbose: bool = False,
        as_json: bool = False,
        as_tree: bool = False,
        depth: int | None = None,
    ) -> CheckpointTool:
        """List keys (see ``--help``)."""
        self._ran = True
        store = self._open()
        metas = _ops.iter_select(store, pattern, exclude)
        if as_tree:
            count = self._print_tree(store, metas, depth)
        elif as_json:
            count = self._print_lines(metas, lambda m: json.dumps(m, sort_keys=True, ensure_ascii=False,
                                                                  default=str))
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
        rows: list[tuple[str, str, str]] = [(root.name, _entries(root.count), _ops.format_size(root.size))]
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

    @fire_decorators.SetParseFn(_str)
    @fire_decorators.SetParseFn(_bool, "value", "as_json")
    def show(self, key: str, value: bool = False, as_json: bool = False) -> CheckpointTool:
        """Show one entry (see ``--help``)."""
        self._ran = True
        store = self._open()
        meta = store.get_meta(key)
        if meta is None:
            below = sum(1 for _ in _ops.iter_select(store, key.rstrip("/") + "/")) if key else 0
            where = shlex.quote(self._shown())
            hint = (f"; {_entries(below)} below it: {PROG} load {where} - ls {shlex.quote(key)}"
                    if below else f"; list the keys with: {PROG} load {where} - ls")
            raise CommandError(f"no entry {key!r} in {store.location}{hint}")
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
            self._emit(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str))
            return self
        self._emit(f"{'key':<13} {_printable(meta.get('key', key))}")
        self._emit(f"{'store':<13} {store.location} ({store.kind})")
        shown = {"key"}
        for name, label, fmt in _SHOW_FIELDS:
            if name in meta:
                self._emit(f"{label:<13} {fmt(meta[name])}")
                shown.add(name)
        for name in sorted(set(meta) - shown):
            self._emit(f"{name:<13} {meta[name]}")
        if value:
            self._emit("value:")
            self._emit(pprint.pformat(loaded, width=100))
        return self

    @fire_decorators.SetParseFn(_str)
    @fire_decorators.SetParseFn(_bool, "yes", "dry_run")
    @fire_decorators.SetParseFn(json.loads, "exclude")
    def copy(
        self, dest: str, pattern: str | None = None, exclude: list[str] | None = None,
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
                                               exclude=exclude)
            where = dst.location
        self._emit(f"Copied {_entries(len(report.copied))} from {src.location} to {where}, "
                   "each read back and checked.")
        for key, reason in sorted(report.failed.items()):
            self._note(f"  not copied: {_printable(key)}: {_one_line(reason)}")
        if report.failed:
            raise CommandError(f"{_entries(len(report.failed))} could not be copied (listed above)")
        return self

    @fire_decorators.SetParseFn(_str)
    @fire_decorators.SetParseFn(_bool, "yes", "dry_run")
    @fire_decorators.SetParseFn(json.loads, "exclude")
    def rm(
        self, pattern: str | None = None, exclude: list[str] | None = None, yes: bool = False,
        dry_run: bool = False, from_key: str | None = None,
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
        where = store.location
        if not keys:
            excl = " (after --exclude)" if exclude else ""
            self._emit(f"No entries {what}{excl} in {where}; nothing removed.")
            return self
        if dry_run:
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
        # A reference 2023 file was converted first: the library logs that
        # with the backup's path, shown as one warning line on stderr.
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

    @fire_decorators.SetParseFn(_str)
    def verify(self, salvage: str | None = None) -> CheckpointTool:
        """Check a store (see ``--help``)."""
        self._ran = True
        store = self._open()
        report = _maintenance.verify_store(store)
        self._emit(f"{store.location}: {_entries(report.entries)} checked, {len(report.damaged)} damaged.")
        for key, reason in sorted(report.damaged.items()):
            self._emit(f"  damaged: {_printable(key)}: {_one_line(reason)}")
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
                copied = _maintenance.salvage(store, dst)
                where = dst.location
            self._emit(f"Salvaged {_entries(len(copied.copied))} into {where}; "
                       f"{len(copied.failed)} could not be read.")
            for key, reason in sorted(copied.failed.items()):
                self._note(f"  not salvaged: {_printable(key)}: {_one_line(reason)}")
            return self
        if not report.ok:
            raise CommandError(
                f"{store.location} is damaged. Remove the damaged entries so their steps run again "
                f"({PROG} load {shlex.quote(self._shown())} - rm KEY), or copy the readable ones to "
                f"a new store with: {PROG} verify {shlex.quote(self._shown())} --salvage NEW"
            )
        return self

    def migrate(self) -> CheckpointTool:
        """Convert a reference-format store (see ``--help``)."""
        self._ran = True
        if self._location is None:
            raise UsageError("no store: start with 'load STORE'")
        self.close()
        with _quiet(_is_migration_log):  # the report below says the same, and more
            report = _ops.migrate(self._location)
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


def _verbose_line(meta: dict[str, Any]) -> str:
    key = _printable(meta["key"])
    if "damaged" in meta:
        return f"{'-':<19}  {'-':>8}  {'-':>9}  {key}  DAMAGED: {_one_line(str(meta['damaged']))}"
    fn = meta.get("fn_name") or "-"
    site = meta.get("call_site") or "-"
    if meta.get("legacy") == "reference-dir" and "crc32" not in meta:
        fn, site = "-", "(reference 2024 file)"
    return (f"{_when(meta.get('created')):<19}  {_ops.format_duration(meta.get('duration')):>8}  "
            f"{_ops.format_size(meta.get('size')).replace(' ', ''):>9}  {key}  {fn}  {site}")


def _size_long(n: object) -> str:
    return f"{_ops.format_size(n)} ({n} bytes)" if isinstance(n, int) else str(n)


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
]


# -- entry point ------------------------------------------------------------------------------
class _OneLineLogs(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


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
def _library_logs_to(stream: IO[str]) -> Iterator[None]:
    """Show the library's warnings as one line each, for this run only.

    The CLI is the host application, so it may decide how logs look; the
    handler is removed afterwards so that callers of ``run`` keep theirs.
    """
    logger = logging.getLogger("ai2_kit")
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLineLogs())
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
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
) -> int:
    """Run ``ai2-kit tool checkpoint ARGV...``; return the exit status.

    Errors are one line on stderr naming the path or word and what to do:
    2 for a wrong command line, 1 for anything else, 130 on Ctrl-C.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    inp = stdin if stdin is not None else sys.stdin
    try:
        p = plan(argv)
    except UsageError as e:
        err.write(f"{PROG}: {e}\n")
        return EXIT_USAGE
    if p.help is not None:
        out.write(p.help)
        return EXIT_OK
    tool = CheckpointTool(out, err, inp)
    fire_err = io.StringIO()
    try:
        # Fire's own messages go to a buffer: with the arguments checked
        # above it should have none, and if it does they become one line.
        with _library_logs_to(err), contextlib.redirect_stderr(fire_err):
            fire.Fire(tool, command=p.fire_args, name=PROG, serialize=lambda _: tool.finish())
    except FireExit as e:
        if e.code in (0, None):
            return EXIT_OK
        first = next((ln for ln in fire_err.getvalue().splitlines() if ln.strip()), "invalid arguments")
        err.write(f"{PROG}: {_one_line(first.replace('ERROR:', ''))}; see '{PROG} --help'\n")
        return EXIT_USAGE
    except UsageError as e:
        err.write(f"{PROG}: {e}\n")
        return EXIT_USAGE
    except CommandError as e:
        err.write(f"{PROG}: {e}\n")
        return EXIT_ERROR
    except NewerFormatError as e:
        by = f" {e.writer}" if e.writer else ""
        err.write(f"{PROG}: error: {e.location!r} was written by a newer ai2-kit-checkpoint{by} "
                  f"(format {e.found}; this one reads up to {e.supported}). Upgrade it to use this store: "
                  "pip install -U ai2-kit-checkpoint\n")
        return EXIT_ERROR
    except CheckpointError as e:
        err.write(f"{PROG}: error: {_one_line(str(e))}\n")
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # the reader went away (ls | head): the entry point handles it
    except OSError as e:
        err.write(f"{PROG}: error: {_one_line(_os_error(e))}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            tool.close()
    return EXIT_OK

