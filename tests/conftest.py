"""Shared fixtures: one factory that opens every kind of store on real storage."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any, Callable, Iterator

import pytest

from ai2_kit.core.checkpoint import reset_checkpoint
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

STORE_KINDS = ["sqlite", "directory", "postgres"]
PG_URL_ENV = "AI2_KIT_TEST_PG_URL"


def pg_url_or_skip() -> str:
    """The test server's URL; a missing server fails under CI=true, else skips."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PG_URL_ENV} is not set under CI=true: PostgreSQL tests must run in CI")
        pytest.skip(f"{PG_URL_ENV} is not set (run through scripts/test.sh)")
    return url


def location_for(kind: str, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """A fresh location for a store of ``kind`` and the options to open it with."""
    if kind == "sqlite":
        return str(tmp_path / "ckpt.db"), {}
    if kind == "directory":
        return str(tmp_path / "ckpt.d"), {}
    if kind == "postgres":
        return pg_url_or_skip(), {"schema": "t_" + uuid.uuid4().hex[:12]}
    raise ValueError(kind)


def open_kind(kind: str, location: str, options: dict[str, Any], **extra: Any) -> Store:
    if kind == "sqlite":
        return SQLiteStore(location, **extra)
    if kind == "directory":
        return DirectoryStore(location, **extra)
    from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

    return PostgresStore(location, **options, **extra)


@pytest.fixture
def reap() -> Iterator[Callable[[list[subprocess.Popen[str]]], list[subprocess.Popen[str]]]]:
    """``reap(procs)`` returns ``procs``, killed and waited for at the end of the test if still alive.

    Without it a failed assertion left the other workers running, and their
    pipes were collected open in a later test (under ``-W error``, as its failure).
    """
    started: list[subprocess.Popen[str]] = []

    def register(procs: list[subprocess.Popen[str]]) -> list[subprocess.Popen[str]]:
        started.extend(procs)
        return procs

    yield register
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(store_kind: str, tmp_path: Any) -> Iterator[Callable[..., Store]]:
    """Opens (and later closes) stores of one kind on one fresh location."""
    location, options = location_for(store_kind, tmp_path)
    opened: list[Store] = []

    def factory(**extra: Any) -> Store:
        store = open_kind(store_kind, location, options, **extra)
        opened.append(store)
        return store

    factory.location = location  # type: ignore[attr-defined]
    factory.options = options  # type: ignore[attr-defined]
    factory.kind = store_kind  # type: ignore[attr-defined]
    yield factory
    for store in opened:
        store.close()
    if store_kind == "postgres":
        _drop_pg_schema(location, options["schema"])


def _drop_pg_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    return store_factory()


@pytest.fixture(autouse=True)
def _no_default_checkpointer() -> Iterator[None]:
    """Each test starts and ends with checkpointing off in the module facade."""
    reset_checkpoint()
    yield
    reset_checkpoint()
