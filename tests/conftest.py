"""Shared fixtures: real SQLite files in a temporary folder, never a mocked database."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    AsyncSessionRepository,
    SessionKey,
    SessionRepository,
    open_async_database,
    open_database,
)
from tests.dbtools import (
    AwaitingRepository,
    event_loop_thread,
    python_clock,
    run_on,
    store_location,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a test's database file goes (not created yet)."""
    return tmp_path / "sessions.db"


@pytest.fixture(scope="session")
def migrated_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store file made and migrated by `open_database` once per test process: each
    test's store starts as a copy of it (a copy costs a fraction of migrating a new file;
    tests/test_migrations.py and test_database.py open new files themselves)."""
    path = tmp_path_factory.mktemp("template") / "migrated.db"
    open_database(path).dispose()  # closed: the WAL is checkpointed into the file
    return path


@pytest.fixture
def engine(db_path: Path, migrated_file: Path) -> Iterator[Engine]:
    """A freshly opened and migrated store on a real file."""
    shutil.copyfile(migrated_file, db_path)
    engine = open_database(db_path)
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: Engine) -> SessionRepository:
    """The repository over `engine`."""
    return SessionRepository(engine)


@pytest.fixture
def key() -> SessionKey:
    """A typical key: a Telegram DM of agent-1."""
    return SessionKey("agent-1", "telegram", "bot-A", "dm", "User-42")


@pytest.fixture
def other_key() -> SessionKey:
    """A second key, of the same agent on another channel."""
    return SessionKey("agent-1", "slack", "T01", "channel", "C99")


# --- both backends ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a backend-neutral test's store lives (see `dbtools.store_location`): for a
    test that takes `store` too, a PostgreSQL schema comes migrated already."""
    migrated = "store" in request.fixturenames
    with store_location(request.param, tmp_path, migrated=migrated) as location:
        yield location


@pytest.fixture
def store(store_url: str, migrated_file: Path) -> Iterator[Engine]:
    """A freshly opened and migrated store on either backend. Its clock is Python's
    (`python_clock`), so freezegun sets the time on PostgreSQL too (whose own clock is
    the server's: tests/test_clock.py tests that one)."""
    if "://" not in store_url:
        shutil.copyfile(migrated_file, store_url)
    engine = open_database(store_url, clock=python_clock)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new PostgreSQL schema of its own, for tests that are about PostgreSQL alone
    (skipped, or failed under AISOPOD_REQUIRE_POSTGRES, without a server)."""
    migrated = "pg_store" in request.fixturenames
    with store_location("postgresql", tmp_path, migrated=migrated) as url:
        yield url


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Engine]:
    """A store opened on `pg_url`, on the server's own clock."""
    engine = open_database(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sync", "async"])
def store_repo(
    request: pytest.FixtureRequest, store: Engine, store_url: str
) -> Iterator[SessionRepository]:
    """The repository over `store`'s database, through either API: `SessionRepository`,
    or an `AsyncSessionRepository` on its own `open_async_database` engine, driven
    through the same calls by `AwaitingRepository` (so no test is written twice)."""
    if request.param == "sync":
        yield SessionRepository(store)
        return
    with event_loop_thread() as loop:
        engine = run_on(loop, open_async_database(store_url, clock=python_clock))
        try:
            yield AwaitingRepository.over(AsyncSessionRepository(engine), loop)
        finally:
            run_on(loop, engine.dispose())
