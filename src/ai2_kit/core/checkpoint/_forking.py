"""The package's one at-fork registry: what each module resets around ``os.fork()``.

Modules register their hooks here (``at_fork``) instead of with
``os.register_at_fork`` themselves, so the order they run in is defined in one
place and follows the same rule as the operating system's registry: ``before``
hooks run in the reverse order of registration (a module registered later,
which may use an earlier one, takes its locks first), ``after_in_parent`` and
``after_in_child`` hooks in the order of registration (a lower module is
usable again before the modules above it reset themselves). Modules register
at import, so the order is the import order: a module imports what it uses.

A hook that raises does not stop the others (as with ``os.register_at_fork``):
its error is printed to stderr and the next hook runs.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

__all__ = ["at_fork"]

Hook = Callable[[], object]

_before: list[Hook] = []
_after_in_parent: list[Hook] = []
_after_in_child: list[Hook] = []


def at_fork(
    *,
    before: Optional[Hook] = None,
    after_in_parent: Optional[Hook] = None,
    after_in_child: Optional[Hook] = None,
) -> None:
    """Register hooks to run around ``os.fork()``, like ``os.register_at_fork``."""
    if before is None and after_in_parent is None and after_in_child is None:
        raise TypeError("at_fork() needs at least one of before, after_in_parent, after_in_child")
    if before is not None:
        _before.append(before)
    if after_in_parent is not None:
        _after_in_parent.append(after_in_parent)
    if after_in_child is not None:
        _after_in_child.append(after_in_child)


def _run(hooks: list[Hook]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:  # as os.register_at_fork does: report it, and the other hooks still run
            print(f"Exception ignored in at-fork hook {hook!r}:", file=sys.stderr)
            traceback.print_exc()


def _run_before() -> None:
    _run(_before[::-1])


def _run_after_in_parent() -> None:
    _run(list(_after_in_parent))


def _run_after_in_child() -> None:
    _run(list(_after_in_child))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_run_before, after_in_parent=_run_after_in_parent,
                        after_in_child=_run_after_in_child)
