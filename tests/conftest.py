"""Shared fixtures: real SQLite files in a temporary folder, never a mocked database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from aisopod_session import SessionKey, SessionRepository, open_database


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

POSTGRES_ENV = "AISOPOD_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a backend-neutral test's store lives: a new SQLite file, or a new schema of
    the PostgreSQL server named by AISOPOD_TEST_POSTGRES_URL, dropped afterwards. Without
    that variable the PostgreSQL case is skipped, saying so."""
    if request.param == "sqlite":
        yield str(tmp_path / "sessions.db")
        return
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        reason = f"PostgreSQL not tested: set {POSTGRES_ENV} (.ci/run does)"
        if os.environ.get("AISOPOD_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = make_url(server).set(drivername="postgresql+psycopg")
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


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
