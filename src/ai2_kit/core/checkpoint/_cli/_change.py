"""The commands that change a store or write a new one: ``rm``, ``verify``, ``copy``, ``migrate``.

Each command's declaration (help, arguments, options, examples) sits on the
method that does it; each calls one function of ``_ops`` or ``_maintenance``
and reports what it returns.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any, Optional, TypeVar

from .. import _display, _maintenance, _ops
from ..stores import is_postgres_url, open_store
from ._declare import PATTERN_ARG, PATTERN_HELP, Arg, CommandError, UsageError, command, flag, value
from ._output import entries, is_migration_log, not_a_key, one_line, printable, quiet, shorten
from ._tool import ToolBase

__all__ = ["ChangeCommands"]

# Every command returns the tool it was called on, so that a script chains
# them as the command line does (``load F - rm X --yes - ls``).
_Self = TypeVar("_Self", bound="ChangeCommands")


def _check_rm(kwargs: dict[str, Any]) -> None:
    if kwargs.get("yes") and kwargs.get("dry_run"):
        raise UsageError("choose one of --yes and --dry-run")
    if not kwargs.get("pattern") and kwargs.get("from_key") is None:
        raise UsageError("rm needs a PATTERN or --from KEY; use '*' to remove every entry")
    if kwargs.get("by") is not None and kwargs.get("from_key") is None:
        raise UsageError("--by goes with --from KEY")


def _by(text: str) -> str:
    if text not in ("key", "time"):
        raise argparse.ArgumentTypeError(f"--by takes 'key' or 'time', not {text!r}")
    return text


class ChangeCommands(ToolBase):
    @command(
        "remove entries, e.g. to redo a workflow from some step on",
        usage=["load STORE - rm PATTERN [options]", "load STORE - rm --from KEY [--by key|time] [PATTERN] [options]",
               "rm STORE PATTERN [options]"],
        description="""\
Remove the entries matching PATTERN, so that those steps run again next time.
With --from KEY, remove KEY and every entry created after it (within PATTERN
if one is given): "redo everything from this step on". With --from KEY --by key,
remove every entry whose key comes at or after KEY in key order instead, whenever
it was saved: for keys that carry the workflow's order (iters-003/...), where an
earlier iteration redone later would otherwise keep the later ones. Key order
compares the '/' parts in turn, runs of digits as numbers (iters-9 before
iters-10); there KEY need not be an entry: --from iters-003 starts at that
iteration.
No value is unpickled. Matching nothing is reported and is not an error.

When stdin is a terminal, rm shows what will go and asks once. When it is not
(scripts, job files, pipes), it proceeds as the reference tool always did and
prints every key it removed; use --dry-run to look first.""",
        args=[PATTERN_ARG],
        options=[
            flag("-y", "--yes", dest="yes", help="do not ask"),
            flag("-n", "--dry-run", dest="dry_run", help="only show what would be removed"),
            value("--from", dest="from_key", metavar="KEY", help="KEY and every entry created after it"),
            value("--by", dest="by", metavar="key|time", type=_by,
                  help="with --from: created at or after KEY (time, the default), or at or after it in "
                       "key order (key)"),
            value("--exclude", dest="exclude", metavar="GLOB", repeat=True, help="keep keys matching GLOB"),
        ],
        footer=PATTERN_HELP + """
A reference 2023 file is rewritten without the removed entries, never
unpickled, after a backup copy beside it (FILE.legacy-<time>.bak).
""",
        check=_check_rm,
        examples=['load ./checkpoint.pkl - rm "iters-000/deepmd"',
                  'load ./checkpoint.pkl - rm "iters-00[3-9]/*" --exclude "*/cp2k/*" --yes',
                  'rm ./checkpoint.pkl "iters-003" --dry-run',
                  "load ./checkpoint.pkl - rm --from iters-003/label --dry-run",
                  "load ./checkpoint.pkl - rm --from iters-003 --by key --dry-run"],
    )
    def rm(
        self: _Self, pattern: Optional[str] = None, exclude: Optional[list[str]] = None, yes: bool = False,
        dry_run: bool = False, from_key: Optional[str] = None, by: Optional[str] = None,
    ) -> _Self:
        """Remove entries (see ``--help``)."""
        self._ran = True
        if not pattern and from_key is None:
            raise UsageError("rm needs a PATTERN or --from KEY; use '*' to remove every entry")
        # List first with a read-only store: a dry run or a declined prompt
        # must not convert a reference file or touch anything.
        store = self._open(write=False)
        if by is not None and from_key is None:
            raise UsageError("--by goes with --from KEY")
        if from_key is not None and by == "key":
            keys = _ops.from_key_on(store, from_key, pattern or None, exclude)
            what = f"from {from_key!r} on in key order" + (f" matching {pattern!r}" if pattern else "")
        elif from_key is not None:
            keys = _ops.created_since(store, from_key, pattern or None, exclude)
            what = f"{from_key!r} and every entry created after it" + (f" matching {pattern!r}" if pattern else "")
        else:
            keys = [m["key"] for m in _ops.iter_select(store, pattern, exclude)]
            what = f"matching {pattern!r}"
        if not keys and from_key is None and pattern and _display.unescape(pattern) != pattern:
            # The escaped form that 'ls' and 'verify' print for a name that is
            # not UTF-8 (or holds a control character) names that entry.
            keys = [m["key"] for m in _ops.iter_select(store, _display.unescape(pattern), exclude)]
        for k in keys:
            problem = not_a_key(store, k)
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
            self._emit(f"Would remove {entries(len(keys))} from {where}:")
            for line in shorten(keys):
                self._emit("  " + line)
            return self
        if not yes and self._interactive():
            self._note(f"About to remove {entries(len(keys))} from {where}:")
            for line in shorten(keys):
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
            for line in shorten(keys):
                self._emit("removed " + line)
        self._emit(f"Removed {entries(len(keys))} ({what}) from {store.location}.")
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

    @command(
        "check every entry's bytes; --salvage NEW copies the readable ones",
        usage=["load STORE - verify [--salvage NEW]", "verify STORE [--salvage NEW]"],
        description="""\
Check every entry's checksum (and signature, where the store signs), and for a
single-file store the database's own structure. Nothing is unpickled and
nothing is changed. The exit status is 1 when something is damaged.""",
        options=[
            value("--salvage", dest="salvage", metavar="NEW",
                  help="copy every readable entry into a new store at NEW (the same kind as STORE); the "
                       "damaged store is left as it is. Copying reads the values, so it unpickles them"),
        ],
        examples=["load ./checkpoint.pkl - verify", "verify ./checkpoint.pkl --salvage ./checkpoint-salvaged.pkl"],
    )
    def verify(self: _Self, salvage: Optional[str] = None) -> _Self:
        """Check a store (see ``--help``)."""
        self._ran = True
        store = self._open()
        report = _maintenance.verify_store(store, self._progress())
        self._emit(f"{store.location}: {entries(report.entries)} checked, {len(report.damaged)} damaged.")
        for key, reason in sorted(report.damaged.items()):
            self._emit(f"  damaged: {not_a_key(store, key) or (printable(key) + ': ' + one_line(reason))}")
        for problem in report.store_problems:
            self._emit(f"  store problem: {one_line(problem)}")
        if report.orphan_files:
            self._emit(f"  {len(report.orphan_files)} side files belong to no entry "
                       "(left by a writer killed mid-save; harmless)")
        if salvage is not None:
            if not salvage or os.path.lexists(salvage):
                raise CommandError(f"--salvage needs a new path; {salvage!r} already exists")
            prefer = store.prefer
            with open_store(salvage, prefer=prefer) as dst:
                copied = _maintenance.salvage(store, dst, self._progress())
                where = dst.location
            self._emit(f"Salvaged {entries(len(copied.copied))} into {where}; "
                       f"{len(copied.failed)} could not be read.")
            for key, reason in sorted(copied.failed.items()):
                self._note(f"  not salvaged: {printable(key)}: {one_line(reason)}")
            return self
        if report.missing_side_files is not None:
            self._emit(f"  store problem: {one_line(report.missing_side_files)}")
        if not report.ok:
            if len(report.unreadable_here) == len(report.damaged) and not report.store_problems:
                # Their values may well exist beside the original: removing
                # these entries would throw away results that can be restored.
                raise CommandError(
                    f"{store.location}: {entries(len(report.unreadable_here))} cannot be read because the "
                    f"side-file folder is missing; restore it rather than removing them (see above)"
                )
            raise CommandError(
                f"{store.location} is damaged. Remove the damaged entries so their steps run again "
                f"({self._prog} load {shlex.quote(self._shown())} - rm KEY), or copy the readable ones to "
                f"a new store with: {self._prog} verify {shlex.quote(self._shown())} --salvage NEW"
                + (f" ({entries(len(report.unreadable_here))} only lack their side-file folder: restore it "
                   "instead of removing those)" if report.unreadable_here else "")
            )
        return self

    @command(
        "copy entries into another store (file, directory, postgresql://), verified",
        usage=["load SRC - copy DEST [PATTERN] [options]", "copy SRC DEST [PATTERN] [options]"],
        description="""\
Copy entries (all, or those matching PATTERN) from SRC into DEST, for example
a local file into a shared PostgreSQL store. DEST may be a new path (created
as the same kind of store as SRC), an existing store, or a postgresql:// URL.
Each entry is read (checksum checked), written, and read back from DEST
before it counts; metadata (function, call site, created time, duration,
fingerprints) is kept. Copying reads the values, so it unpickles them.
Where DEST already has a key, its entry is replaced, unless --skip-existing.""",
        args=[Arg("dest", "DEST", True, "the store to copy into"), PATTERN_ARG],
        options=[
            flag("--skip-existing", dest="skip_existing",
                 help="keep DEST's entry where both stores have a key (the default replaces it)"),
            value("--exclude", dest="exclude", metavar="GLOB", repeat=True, help="leave out keys matching GLOB"),
        ],
        footer=PATTERN_HELP,
        examples=["load ./checkpoint.pkl - copy postgresql://me@db-host/team",
                  'copy ./checkpoint.pkl ./backup.db "iters-00[0-2]/*"',
                  "copy ./checkpoint.pkl ./backup.db --skip-existing"],
    )
    def copy(
        self: _Self, dest: str, pattern: Optional[str] = None, exclude: Optional[list[str]] = None,
        skip_existing: bool = False,
    ) -> _Self:
        """Copy entries into another store (see ``--help``)."""
        self._ran = True
        src = self._open()
        prefer = src.prefer
        with open_store(dest, prefer=prefer) as dst:
            if not is_postgres_url(dest) and os.path.abspath(dest) == os.path.abspath(str(src.location)):
                raise UsageError("copy needs a DEST other than the store itself")
            report = _maintenance.copy_entries(src, dst, pattern or None, overwrite=not skip_existing,
                                               progress=self._progress(), exclude=exclude)
            where = dst.location
        self._emit(f"Copied {entries(len(report.copied))} from {src.location} to {where}, "
                   "each read back and checked.")
        if report.skipped:
            # Asked for with --skip-existing: reported, and not a failure.
            self._emit(f"Kept {entries(len(report.skipped))} that {where} already had (--skip-existing).")
        for key, reason in sorted(report.failed.items()):
            self._note(f"  not copied: {printable(key)}: {one_line(reason)}")
        if report.failed:
            raise CommandError(f"{entries(len(report.failed))} could not be copied (listed above)")
        return self

    @command(
        "convert a reference-format store to this project's format",
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
    )
    def migrate(self: _Self) -> _Self:
        """Convert a reference-format store (see ``--help``)."""
        self._ran = True
        if self._location is None:
            raise UsageError("no store: start with 'load STORE'")
        self.close()
        with quiet(is_migration_log):  # the report below says the same, and more
            report = _ops.migrate(self._location, self._progress())
        loc = report.location
        if report.source_format == "current":
            self._emit(f"{loc} is already in this project's format ({report.store_kind} store, "
                       f"{entries(report.already)}); nothing to migrate.")
            return self
        origin = {"reference-file": "reference 2023 file", "reference-dir": "reference 2024 directory"}
        self._emit(f"Migrated {loc} ({origin.get(report.source_format, report.source_format)}) "
                   f"to the {report.store_kind} format.")
        self._emit(f"  converted and verified: {entries(report.migrated)}")
        if report.already:
            self._emit(f"  already in this format: {entries(report.already)}")
        if report.backup:
            self._emit(f"  backup of the original: {report.backup}")
        if report.failed:
            for key, reason in report.failed:
                self._note(f"  not converted: {printable(key)}: {one_line(reason)}")
            raise CommandError(
                f"{entries(len(report.failed))} could not be converted and were left as they were"
                + (f"; the backup at {report.backup} has everything" if report.backup else "")
            )
        return self
