"""Shared fixtures: real SQLite files in a temporary folder, never a mocked database."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import freezegun
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

# Every `freeze_time` start walks sys.modules to swap the time functions that modules
# imported by name, ~0.15 s each in a test process that has loaded the frameworks (2 000
# modules; ~200 starts in the suite). None of these packages calls our clock or reads the
# time in a test, so they are left alone. (A frame of an ignored package near a time call
# would get the real time: pydantic, SQLModel, Hypothesis, asyncio, pytest and Typer,
# which run our code, are not listed.)
freezegun.configure(
    extend_ignore_list=[
        *("google", "grpc", "opentelemetry", "openai", "agents", "mcp", "mcp_types", "griffe"),
        *("fastapi", "starlette", "httpx", "httpx2", "httpcore", "anyio", "uvicorn", "h11"),
        *("rich", "pygments", "websockets", "yaml", "jsonschema"),
        *("referencing", "rpds", "tenacity", "cryptography", "dateutil", "email"),
        *("sqlalchemy", "psycopg", "psycopg_binary"),
    ]
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a test's database file goes (not created yet)."""
    return tmp_path / "sessions.db"


# --- markers: `pytest -m "not slow and not processes and not postgres"` for a quick run --

PROCESS_MODULES = {
    "test_bench",
    "test_concurrent_writers",
    "test_crash_safety",
    "test_demo",
    "test_fork_and_dispose",
    "test_openclaw_kill",
    "test_pgbouncer",
}
"""Modules whose tests start processes (forks, children, the installed command)."""

SLOW_TESTS = {
    "test_a_batch_of_big_lines_is_cut_short_by_its_size",
    "test_a_big_export_runs_in_flat_memory",
    "test_a_text_value_over_256_mib_is_refused_naming_the_field_before_writing",
    "test_the_text_limit_counts_utf8_bytes_not_characters",
    "test_200_tasks_append_at_once_without_blocking_the_loop",
    "test_export_then_import_round_trips_10000_messages_exactly",
    "test_a_message_of_megabytes_of_distinct_words_is_stored_and_found",
}
"""Tests that take seconds each (hundreds of MiB of text, 10⁴–10⁵ rows, 200 tasks)."""

TIMING_TESTS = {
    "test_writes_wait_off_the_loop_for_the_lock_then_fail_clearly",
    "test_200_tasks_append_at_once_without_blocking_the_loop",
    "test_short_calls_in_a_row_do_not_hold_the_loop",
}
"""Tests that hold the event loop's lag to limits: `make test` runs them on their own,
after the rest, so that the other test workers do not take the cores they measure. They
live in `TIMING_MODULE`, the one file that second run collects."""

TIMING_MODULE = "test_async"

PG_FIXTURES = {"pg_url", "pg_store", "pgbouncer_url"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test `postgres` (it needs the server), `processes`, `slow` or `timing`."""
    for item in items:
        module = item.path.stem
        params = getattr(item, "callspec", None)
        values = [] if params is None else [v for v in params.params.values() if isinstance(v, str)]
        fixtures = set(getattr(item, "fixturenames", ()))
        if "postgresql" in values or fixtures & PG_FIXTURES or module == "test_pgbouncer":
            item.add_marker(pytest.mark.postgres)
        if module in PROCESS_MODULES:
            item.add_marker(pytest.mark.processes)
        if item.name.partition("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if item.name.partition("[")[0] in TIMING_TESTS:
            if module != TIMING_MODULE:
                raise pytest.UsageError(f"{item.nodeid}: `timing` tests live in {TIMING_MODULE}")
            item.add_marker(pytest.mark.timing)


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
