"""Helpers for the tests behind PgBouncer (tests/test_pgbouncer.py): where PgBouncer is, a
fresh database per test reached through it, the tenant roles, and plain-SQL checks made
on a direct connection to the server (never through the pooler under test).

PgBouncer (`.ci/start-pgbouncer`, `.ci/pgbouncer.ini`) runs in transaction pooling mode
and drops a URL's `options` (`ignore_startup_parameters`), so a per-test schema chosen
with `?options=-csearch_path=...` (as `dbtools.store_location` does) cannot isolate
tests here: each test gets a database of its own instead, which PgBouncer's wildcard
`[databases]` entry routes by name.
"""

from __future__ import annotations

import multiprocessing.queues
import multiprocessing.synchronize
import os
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

from aisopod_session import SessionKey, SessionRepository, open_database

PGBOUNCER_ENV = "AISOPOD_TEST_PGBOUNCER_URL"
REQUIRE_ENV = "AISOPOD_REQUIRE_PGBOUNCER"
POSTGRES_ENV = "AISOPOD_TEST_POSTGRES_URL"

TENANT_ROLES = ("aisopod_tenant_a", "aisopod_tenant_b")
"""The login roles of the per-role tenant test. PgBouncer's `auth_type = trust` only lets
in users its auth_file lists, so these names are also in `.ci/pgbouncer-users.txt`."""


@dataclass(frozen=True)
class PooledDatabase:
    """A test's own database: `pooled` reaches it through PgBouncer, `direct` on the
    server itself (for setting up and for checking what really is stored)."""

    name: str
    pooled_server: URL
    direct_server: URL

    @property
    def pooled(self) -> str:
        """The plain URL through PgBouncer, nothing added: what a gateway is given."""
        return self.pooled_as()

    @property
    def direct(self) -> str:
        """The database on the server itself, bypassing PgBouncer."""
        return _render(self.direct_server.set(database=self.name))

    def pooled_as(self, user: str | None = None) -> str:
        """The URL through PgBouncer, as `user` (default: the configured one)."""
        url = self.pooled_server.set(database=self.name)
        if user is not None:
            url = url.set(username=user, password=None)
        return _render(url)

    def direct_with_schema(self, schema: str) -> str:
        """The database on the server itself with `schema` as search path (the server
        honours a URL's options; PgBouncer here drops them)."""
        return f"{self.direct}?options=-csearch_path%3D{schema}"

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on the database, directly on the server, in autocommit;
        the rows it returns (none for a statement without result)."""
        with psycopg.connect(self.direct, autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return list(cursor.fetchall()) if cursor.description is not None else []


def _render(url: URL) -> str:
    # libpq's form (psycopg.connect and open_database both take it), password kept.
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def servers() -> tuple[URL, URL]:
    """PgBouncer's URL (AISOPOD_TEST_PGBOUNCER_URL) and the server's behind it
    (AISOPOD_TEST_POSTGRES_URL). Without them the test is skipped, saying so loudly, or
    fails under AISOPOD_REQUIRE_PGBOUNCER (which `.ci/run` sets), like
    `dbtools.store_location`."""
    pooled = os.environ.get(PGBOUNCER_ENV)
    direct = os.environ.get(POSTGRES_ENV)
    if not pooled or not direct:
        missing = " and ".join(
            name for name, value in ((PGBOUNCER_ENV, pooled), (POSTGRES_ENV, direct)) if not value
        )
        reason = (
            f"PgBouncer NOT TESTED: set {missing} (.ci/run starts PgBouncer with "
            ".ci/start-pgbouncer and sets both)"
        )
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(reason)
        pytest.skip(reason)
    return make_url(pooled), make_url(direct)


def _direct_admin(direct_server: URL) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(_render(direct_server), autocommit=True)


@contextmanager
def pooled_database() -> Iterator[PooledDatabase]:
    """A new, empty database made directly on the server, dropped afterwards (WITH
    (FORCE): PgBouncer keeps server connections to it open)."""
    pooled_server, direct_server = servers()
    name = f"aisopod_pgb_{uuid.uuid4().hex[:12]}"
    with _direct_admin(direct_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PooledDatabase(name, pooled_server, direct_server)
    finally:
        with _direct_admin(direct_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ensure_tenant_role(database: PooledDatabase, role: str, schema: str) -> None:
    """The per-role tenant set-up: `role` may log in, owns `schema` in this database, and
    its search path there is `schema` alone. The setting is the role's own, so PgBouncer
    (pooling per database and user) applies it on every server connection of that
    role's pool, with nothing sent by the client."""
    assert role in TENANT_ROLES, f"{role} must be listed in .ci/pgbouncer-users.txt"
    # Roles belong to the whole server: made once, kept (tests may run concurrently).
    database.sql(
        "DO $$ BEGIN "
        f'CREATE ROLE "{role}" LOGIN; '
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; "
        "END $$"
    )
    database.sql(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"')
    # Scoped to this test's database: dropping the database drops the setting too.
    database.sql(f'ALTER ROLE "{role}" IN DATABASE "{database.name}" SET search_path = "{schema}"')


def tables_in(database: PooledDatabase, schema: str) -> list[str]:
    """The tables of `schema` in the database, read directly on the server."""
    rows = database.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
        "ORDER BY table_name",
        (schema,),
    )
    return [str(row[0]) for row in rows]


# --- the migration test's worker processes (spawned: importable by name) ----------------


def open_when_released(
    url: str,
    index: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[tuple[int, str | None]],
) -> None:
    """A worker of the migration test: wait for the others, open (and so migrate) the
    store through PgBouncer, create one session, and report `(index, None)` or
    `(index, the traceback)`."""
    try:
        barrier.wait(timeout=60)
        engine = open_database(url)
        try:
            SessionRepository(engine).get_or_create(
                SessionKey("migrator", "telegram", "bot", "dm", f"process-{index}")
            )
        finally:
            engine.dispose()
    except BaseException:
        results.put((index, traceback.format_exc()))
        return
    results.put((index, None))
