"""The rest of the real ai2-kit 1.1.1 checkpoint API: ``CheckpointService`` and ``checkpoint_service``.

Code written against the real package's ``ai2_kit/core/checkpoint.py`` may
hold its service object instead of calling the module functions. These
classes give it the same methods over this package's stores; the default
service is a view of the module-level default (``set_checkpoint_dir``), as
the real package's module functions were a view of its service.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, TypeVar

from ._checkpointer import Checkpointer, Key, make_wrapper
from ._errors import NotACheckpointStoreError

__all__ = ["CheckpointService", "checkpoint_service"]

F = TypeVar("F", bound=Callable[..., Any])


class CheckpointService:
    """A directory store and the decorator that uses it, as ai2-kit 1.1.1 had them.

    ``set_checkpoint_dir(checkpoint_dir)`` picks (or creates) the directory;
    ``apply_checkpoint(key_fn, disable=False)`` decorates a step. Before a
    directory is set, steps just run. Results are saved in this package's
    format and the real package's per-key files are read as they are.
    """

    def __init__(self) -> None:
        self._ckpt: Optional[Checkpointer] = None

    @property
    def checkpoint_dir(self) -> Optional[str]:
        """The directory in use, or None while checkpointing is off."""
        ckpt = self._checkpointer()
        return None if ckpt is None else ckpt.location

    def _checkpointer(self) -> Optional[Checkpointer]:
        return self._ckpt

    def set_checkpoint_dir(self, checkpoint_dir: str) -> None:
        """Use the directory store at ``checkpoint_dir`` (created when missing)."""
        if os.path.isfile(os.fspath(checkpoint_dir)):
            raise NotACheckpointStoreError(
                os.path.abspath(os.fspath(checkpoint_dir)), "it is a file",
                "ai2-kit keeps its checkpoints in a directory; pick another path",
            )
        old, self._ckpt = self._ckpt, Checkpointer(checkpoint_dir, prefer="dir")
        if old is not None:
            old.close()

    def apply_checkpoint(self, key_fn: Key, disable: bool = False) -> Callable[[F], F]:
        """Checkpoint calls of a function under ``key_fn`` (a string, or a function of ``FnInfo``)."""

        def decorate(fn: F) -> F:
            wrapped: F = make_wrapper(fn, key_fn, disable, self._checkpointer)  # type: ignore[assignment]
            return wrapped

        return decorate


class _DefaultService(CheckpointService):
    """``checkpoint_service``: the same default store as the module functions."""

    def _checkpointer(self) -> Optional[Checkpointer]:
        from . import get_checkpointer

        return get_checkpointer()

    def set_checkpoint_dir(self, checkpoint_dir: str) -> None:
        from . import set_checkpoint_dir

        set_checkpoint_dir(checkpoint_dir)


#: The real package's module-level service; shares the default store with
#: ``set_checkpoint_dir``/``apply_checkpoint``.
checkpoint_service: CheckpointService = _DefaultService()
