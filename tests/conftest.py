"""Shared fixtures: real SQLite files in a temporary folder, never a mocked database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from aisopod_session import SessionKey, SessionRepository, open_database
from tests.dbtools import store_location


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a test's database file goes (not created yet)."""
    return tmp_path / "sessions.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    """A freshly opened and migrated store on a real file."""
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
    """Where a backend-neutral test's store lives (see `dbtools.store_location`)."""
    with store_location(request.param, tmp_path) as location:
        yield location


@pytest.fixture
def store(store_url: str) -> Iterator[Engine]:
    """A freshly opened and migrated store on either backend."""
    engine = open_database(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store_repo(store: Engine) -> SessionRepository:
    """The repository over `store`."""
    return SessionRepository(store)
