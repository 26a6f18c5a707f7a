"""typing.get_type_hints() works on every public function, on every supported Python.

Documentation generators, pydantic and the real ai2-kit's own tooling call
it; a name that exists only for type checkers (``P`` under TYPE_CHECKING) or
an ``X | None`` annotation on Python 3.9 makes it raise.
"""

from __future__ import annotations

import inspect
import typing
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest

import ai2_kit.core.checkpoint as api
from ai2_kit.core.checkpoint import _main, cli, stores


def _public_functions(module: ModuleType) -> Iterator[tuple[str, Callable[..., Any]]]:
    """Every function in ``module.__all__``, and every public method of its classes.

    A class's methods include those it inherits from bases that the module
    does not export itself (``CheckpointTool``'s commands live in mixins).
    """
    exported = {id(getattr(module, name)) for name in module.__all__}
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj) and obj.__module__.startswith("ai2_kit."):
            members: dict[str, Any] = {}
            for cls in reversed(obj.__mro__):
                if cls is obj or (cls.__module__.startswith("ai2_kit.") and id(cls) not in exported):
                    members.update(vars(cls))
            for attr, member in members.items():
                if attr.startswith("_") and attr not in ("__init__", "__call__"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield f"{module.__name__}.{name}.{attr}", member


FUNCTIONS = dict(item for m in (api, stores, cli, _main) for item in _public_functions(m))


def test_the_list_is_not_empty() -> None:
    assert "ai2_kit.core.checkpoint.apply_checkpoint" in FUNCTIONS
    assert "ai2_kit.core.checkpoint.Checkpointer.__call__" in FUNCTIONS
    assert "ai2_kit.core.checkpoint.stores.Store.put" in FUNCTIONS
    assert len(FUNCTIONS) > 40


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_get_type_hints(name: str) -> None:
    hints = typing.get_type_hints(FUNCTIONS[name])
    assert "return" in hints or name.endswith("__init__"), f"{name} has no return annotation"


def test_apply_checkpoint_hints_name_the_paramspec() -> None:
    hints = typing.get_type_hints(api.apply_checkpoint)
    assert "P" in repr(hints["return"])
