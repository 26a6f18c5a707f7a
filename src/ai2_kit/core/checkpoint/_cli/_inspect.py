"""The commands that only read a store: ``load``, ``ls``, ``show``, ``runs``, ``report``.

Each command's declaration (help, arguments, options, examples) sits on the
method that does it. None of them changes the store, and only
``show --value`` unpickles anything.
"""

from __future__ import annotations

import argparse
import pprint
import shlex
from typing import Any, Callable, Iterator, Optional, TypeVar

from .. import _display, _fingerprint, _ops
from .._report import command_line, write_report
from .._runs import mask_argv
from ..stores import Store
from ._declare import PATTERN_ARG, PATTERN_HELP, STORE_HELP, Arg, CommandError, UsageError, command, flag, value
from ._output import dash, entries, not_a_key, one_line, os_error, printable, when
from ._tool import ToolBase

__all__ = ["InspectCommands"]

# Every command returns the tool it was called on, so that a script chains
# them as the command line does (``load F - show K``).
_Self = TypeVar("_Self", bound="InspectCommands")


def _depth(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--depth takes a whole number >= 1, not {text!r}")
    return int(text)


def _check_ls(kwargs: dict[str, Any]) -> None:
    if kwargs.get("depth") is not None and not kwargs.get("as_tree"):
        raise UsageError("--depth goes with --tree")
    if kwargs.get("as_tree") and kwargs.get("as_json"):
        raise UsageError("choose one of --tree and --json")
    if kwargs.get("stale") and kwargs.get("as_tree"):
        raise UsageError("choose one of --stale and --tree")


def _verbose_line(meta: dict[str, Any]) -> str:
    key = printable(meta["key"])
    if "damaged" in meta:
        return f"{'-':<19}  {'-':>8}  {'-':>9}  {key}  DAMAGED: {one_line(str(meta['damaged']))}"
    fn = printable(meta.get("fn_name") or "-")
    site = printable(meta.get("call_site") or "-")
    if meta.get("legacy") == "reference-dir" and "crc32" not in meta:
        fn, site = "-", "(reference 2024 file)"
    return (f"{when(meta.get('created')):<19}  {_display.format_duration(meta.get('duration')):>8}  "
            f"{_display.format_size(meta.get('size')).replace(' ', ''):>9}  {key}  {fn}  {site}")


def _size_long(n: object) -> str:
    return f"{_display.format_size(n)} ({n} bytes)" if _display.count(n) is not None else str(n)


def _show_fingerprint(fp: object) -> str:
    """The fingerprint's lines for ``show``'s two columns, each escaped: a name in it may hold a newline."""
    return ("\n" + " " * 14).join(printable(line) for line in _fingerprint.format_fingerprint(fp))


def _when_long(t: object) -> str:
    return f"{when(t)} ({t})"


_SHOW_FIELDS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("fn_name", "function", str),
    ("call_site", "call site", str),
    ("created", "created", _when_long),
    ("duration", "duration", lambda d: f"{_display.format_duration(d)} ({d} s)"),
    ("size", "size", _size_long),
    ("is_awaitable", "awaitable", str),
    ("legacy", "legacy", str),
    ("damaged", "damaged", str),
    ("fingerprint", "fingerprint", _show_fingerprint),
]


class InspectCommands(ToolBase):
    @command(
        "choose the store that the following commands work on",
        usage=["load STORE [- COMMAND ...]"],
        description="""\
Choose the store the commands after '-' work on. STORE is a single-file store,
a directory store, a reference 2023 pickle file, a reference 2024 directory,
or a postgresql:// URL (a path starting with '-' is written --path=-NAME).
Nothing is read until a command needs it, and nothing
is ever created: a path that does not exist is an error. On its own, 'load'
prints a one-line summary of the store.""",
        args=[Arg("path", "STORE", True, STORE_HELP)],
        examples=["load ./checkpoint.pkl", "load ./checkpoint.pkl - ls",
                  'load ./checkpoint.pkl - rm "iters-000/deepmd" - ls'],
    )
    def load(self: _Self, path: str) -> _Self:
        """Choose the store (see ``--help``)."""
        if path != self._location:
            self.close()
        self._location = path
        return self

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
            f"{store.location}: {store.kind} store, {entries(len(store))}{ro}\n"
            f"List them with: {self._prog} load {shlex.quote(self._shown())} - ls"
        )

    @command(
        "list keys in sorted order (--verbose, --json, --tree)",
        usage=["load STORE - ls [PATTERN] [options]", "ls STORE [PATTERN] [options]"],
        description="""\
List the keys of the store in sorted order, one per line, as they are read
(a store of any size starts printing at once). Only metadata is read: no value
is ever unpickled.""",
        args=[PATTERN_ARG],
        options=[
            flag("-v", "--verbose", dest="verbose",
                 help="add created time, duration of the original call, size, function and call site"),
            flag("--json", dest="as_json", help="one JSON object per entry (all its metadata), for scripts"),
            flag("--tree", dest="as_tree", help="group keys by '/' with entry counts and sizes per level"),
            value("--depth", dest="depth", metavar="N", type=_depth, help="with --tree: show N levels"),
            value("--exclude", dest="exclude", metavar="GLOB", repeat=True, help="leave out keys matching GLOB"),
            flag("--stale", dest="stale",
                 help="only the entries stale now: judged stale by a run after they were saved, and not "
                      "replaced or removed since"),
        ],
        footer=PATTERN_HELP, check=_check_ls,
        examples=["load ./checkpoint.pkl - ls", "load ./checkpoint.pkl - ls --verbose",
                  'load ./checkpoint.pkl - ls "iters-000/*" --json', "ls ./checkpoint.pkl --tree --depth 2"],
    )
    def ls(
        self: _Self,
        pattern: Optional[str] = None,
        exclude: Optional[list[str]] = None,
        verbose: bool = False,
        as_json: bool = False,
        as_tree: bool = False,
        depth: Optional[int] = None,
        stale: bool = False,
    ) -> _Self:
        """List keys (see ``--help``)."""
        self._ran = True
        store = self._open()
        metas = (_ops.iter_stale if stale else _ops.iter_select)(store, pattern, exclude)
        if as_tree:
            count = self._print_tree(store, metas, depth)
        elif as_json:
            count = self._print_lines(metas, _display.json_line)
        elif verbose:
            self._emit(f"{'CREATED':<19}  {'DURATION':>8}  {'SIZE':>9}  KEY  FUNCTION  CALL SITE")
            count = self._print_lines(metas, _verbose_line)
        else:
            count = self._print_lines(metas, lambda m: printable(m["key"]))
        if count == 0:
            what = f"no entries match {pattern!r}" if pattern else "no entries"
            if stale:
                what = f"no stale entries match {pattern!r}" if pattern else "no stale entries"
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
        size = _display.format_size(root.size)
        rows: list[tuple[str, str, str]] = [(printable(root.name), entries(root.count), size)]
        for level, node in root.walk(depth):
            label = "  " * level + printable(node.name)
            if node.children:
                label += "/"
                counts = entries(node.count) + (" (one at the folder's own key)" if node.entry else "")
            else:
                counts = ""
            rows.append((label, counts, _display.format_size(node.size)))
        width = min(max(len(r[0]) for r in rows), 70)
        cwidth = max(len(r[1]) for r in rows)
        for label, counts, size in rows:
            self._emit(f"{label:<{width}}  {counts:<{cwidth}}  {size:>9}".rstrip())
        return root.count

    @command(
        "all metadata of one entry (--value also prints the value)",
        usage=["load STORE - show KEY [--value] [--json]", "show STORE KEY [--value] [--json]"],
        description="""\
Print every metadata field of one entry: function, call site, created time,
duration of the original call, size, checksum, host, pid, format.""",
        args=[Arg("key", "KEY", True, "the entry's key (exact, no patterns)")],
        options=[
            flag("--value", dest="value", help="also print the stored value. This unpickles it, which runs "
                                               "code from the store: use it only on stores you trust"),
            flag("--json", dest="as_json", help="print the metadata as one JSON object"),
        ],
        examples=["load ./checkpoint.pkl - show iters-000/deepmd/red",
                  "show ./checkpoint.pkl iters-000/deepmd/red --value"],
    )
    def show(self: _Self, key: str, value: bool = False, as_json: bool = False) -> _Self:
        """Show one entry (see ``--help``)."""
        self._ran = True
        store = self._open()
        real = _display.unescape(key)
        for name in dict.fromkeys((key, real)):
            problem = not_a_key(store, name)
            if problem is not None and any(m["key"] == name for m in store.iter_meta()):
                raise CommandError(problem)  # listed, but no key can name it: what removes it instead
        if real != key and not_a_key(store, key) is None and not_a_key(store, real) is None \
                and store.get_meta(key) is None and store.get_meta(real) is not None:
            key = real  # the escaped form that 'ls' printed (a control character in a key)
        meta = store.get_meta(key)
        if meta is None:
            below = sum(1 for _ in _ops.iter_select(store, key.rstrip("/") + "/")) if key else 0
            where = shlex.quote(self._shown())
            hint = (f"; {entries(below)} below it: {self._prog} load {where} - ls {shlex.quote(key)}"
                    if below else f"; list the keys with: {self._prog} load {where} - ls")
            raise CommandError(f"no entry {printable(repr(key))} in {printable(store.location)}{printable(hint)}")
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
            self._emit(_display.json_line(record))
            return self
        self._emit(f"{'key':<13} {printable(meta.get('key', key))}")
        self._emit(f"{'store':<13} {printable(store.location)} ({store.kind})")
        shown = {"key"}
        for name, label, fmt in _SHOW_FIELDS:
            if name in meta:
                # A field may hold anything: escaped whole (the fingerprint's
                # lines each on their own, in _show_fingerprint).
                text = fmt(meta[name])
                self._emit(f"{label:<13} {text if name == 'fingerprint' else printable(text)}")
                shown.add(name)
        for name in sorted(set(meta) - shown, key=str):
            self._emit(f"{printable(name):<13} {printable(meta[name])}")
        if value:
            self._emit("value:")
            self._emit(pprint.pformat(loaded, width=100))
        return self

    @command(
        "the runs that used the store: when, where, steps run and hit, time saved",
        usage=["load STORE - runs [--json]", "runs STORE [--json]"],
        description="""\
List the runs recorded in the store, oldest first: each process that saved
or hit a step, with its start, how long it lasted, host, pid, user, how many
steps it ran and hit, stale warnings, reruns, failed saves, and the time its
hits saved (what those steps took when they ran). Stores written before runs
were recorded list none. Nothing is unpickled.""",
        options=[flag("--json", dest="as_json", help="one JSON object per run (the whole record), for scripts")],
        examples=["load ./checkpoint.pkl - runs", "runs ./checkpoint.pkl --json"],
    )
    def runs(self: _Self, as_json: bool = False) -> _Self:
        """List runs (see ``--help``)."""
        self._ran = True
        store = self._open()
        runs = store.iter_runs()
        if as_json:
            for run in runs:
                argv = run.get("argv")
                self._emit(_display.json_line(dict(run, argv=mask_argv(argv) if argv else argv)))
            return self
        if not runs:
            self._note(f"{store.location}: no runs recorded (written before runs were recorded, "
                       "or by the reference design)")
            return self
        rows = [("STARTED", "LASTED", "HOST", "PID", "RAN", "HITS", "STALE", "SAVED", "COMMAND")]
        for r in runs:  # checked field by field by iter_runs: a bad field is None, shown as '-'
            started, last = r["started"], r["last"]
            lasted = last - started if started is not None and last is not None and last >= started else None
            rows.append((when(started), _display.format_duration(lasted), printable(dash(r["host"])),
                         dash(r["pid"]), dash(r["steps_run"]), dash(r["hits"]), dash(r["stale"]),
                         _display.format_duration(r["saved_seconds"]), printable(command_line(r["argv"]))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            self._emit("  ".join(f"{c:<{w}}" if i in (0, 2) else f"{c:>{w}}"
                                 for i, (c, w) in enumerate(zip(row, widths))) + "  " + row[-1])
        return self

    @command(
        "write one self-contained HTML page: timeline, runs, key tree, problems",
        usage=["load STORE - report OUT.html", "report STORE OUT.html"],
        description="""\
Write an HTML page about the store to OUT.html: a timeline of every saved step
(one lane per first key component, coloured by run; hover a bar for its key,
function, call site, duration, size and host), the runs, stale and damaged
entries, and the key tree with counts, sizes and durations. The page needs no
network and no server. Only metadata is read: nothing is unpickled.""",
        args=[Arg("out", "OUT.html", True, "the page to write (replaced if it exists)")],
        examples=["load ./checkpoint.pkl - report report.html", "report ./checkpoint.pkl /tmp/run.html"],
    )
    def report(self: _Self, out: str) -> _Self:
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
            raise CommandError(f"cannot write the report: {os_error(e)}") from e
        self._emit(f"report written to {printable(out)}")
        return self
