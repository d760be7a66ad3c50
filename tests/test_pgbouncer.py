"""The store behind a real PgBouncer in transaction pooling mode, as a gateway fleet runs
it: many client connections (threads, engines, processes) share a few server
connections, each server connection serving one client for one transaction only.

PgBouncer is the one `.ci/start-pgbouncer` starts (`.ci/pgbouncer.ini`: 127.0.0.1:6432,
`pool_mode = transaction`, 4 server connections per database and user,
`ignore_startup_parameters = extra_float_digits, options`). Without
AISOPOD_TEST_PGBOUNCER_URL (and AISOPOD_TEST_POSTGRES_URL, the server behind it) these
tests are skipped, or fail under AISOPOD_REQUIRE_PGBOUNCER, as `.ci/run` sets it. Every
test gets a database of its own (`tests.pgbouncer.pooled_database`); what it checks at
the end it reads directly on the server, never through the pooler under test.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from aisopod_session import (
    SCHEMA_VERSION,
    AsyncSessionRepository,
    Message,
    NewMessage,
    Role,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    SessionStoreError,
    applied_migrations,
    open_async_database,
    open_database,
)
from aisopod_session.validation import dump_json
from tests.dbtools import AwaitingRepository, event_loop_thread, run_on, run_threads, stress
from tests.pgbouncer import (
    TENANT_ROLES,
    PooledDatabase,
    ensure_tenant_role,
    open_when_released,
    pooled_database,
    tables_in,
)

PREPARE_THRESHOLD = 5
"""psycopg 3 prepares a statement on a connection once it has run this many times there
(`prepare_threshold`), under a per-connection name (`_pg3_0`, `_pg3_1`, ...). Tests call
everything more often than this, so a store that leaves it on is caught."""

COLLISION_SECONDS = 2.0
"""How long the collision test churns at AISOPOD_STRESS=1 (`make stress`: 10 times)."""


@pytest.fixture
def pooled_db() -> Iterator[PooledDatabase]:
    """A fresh database of this test's own, reached through PgBouncer by name."""
    with pooled_database() as database:
        yield database


def _disposing(engines: list[Engine]) -> None:
    for engine in engines:
        engine.dispose()


# --- a: prepared statements ---------------------------------------------------------------

VICTIM = SessionKey("victim", "telegram", "bot-main", "dm", "1001")
VICTIM_MESSAGES = [f"victim message {number}" for number in range(6)]
VICTIM_META = {"plan": "pro", "locale": "nb-NO"}


def _churn(repo: SessionRepository, worker: int, deadline: float, rounds: list[int]) -> None:
    """One gateway worker's traffic on throwaway sessions of its own: every kind of
    statement the repository has, each run far more than PREPARE_THRESHOLD times."""
    number = 0
    while time.monotonic() < deadline:
        key = SessionKey("churn", "telegram", "bot-main", "dm", f"worker-{worker}-{number}")
        number += 1
        repo.get_or_create(key)
        repo.append_message(key, Role.USER, "question", tokens=3)
        repo.get_history(key)
        if worker % 2:
            # Half the workers run the rest of the API too, so the statements (and the
            # names psycopg gives them) differ from one client connection to the next.
            repo.append_messages(
                key, [NewMessage(Role.USER, "question"), NewMessage(Role.ASSISTANT, "answer")]
            )
            repo.update_metadata(key, {"worker": worker})
            repo.compact(key, keep_last=1, summary="summary")
            repo.get(key)
            repo.reset(key)
            repo.count_sessions({"agent_id": "churn"})
        repo.delete(key)
        rounds[worker] += 1


def _read_victim(repo: SessionRepository, deadline: float, seen: Counter[str]) -> None:
    """The victim's own worker: it only ever reads its session."""
    while time.monotonic() < deadline:
        session = repo.get(VICTIM)
        if session is None:
            seen["get(victim) returned None"] += 1
        elif session.message_count != len(VICTIM_MESSAGES) or session.meta != VICTIM_META:
            seen[f"get(victim) returned {session.message_count} messages, {session.meta}"] += 1
        seen["get"] += 1
        contents = [message.content for message in repo.get_history(VICTIM)]
        if contents != VICTIM_MESSAGES:
            seen[f"get_history(victim) returned {contents}"] += 1
        seen["get_history"] += 1


def _collide(database: PooledDatabase, seconds: float) -> list[str]:
    """Seven churning workers and one victim reader on three engines (three worker
    processes' pools) for `seconds`; the problems found, none if the store is safe."""
    direct = open_database(database.direct)
    engines: list[Engine] = []
    try:
        setup = SessionRepository(direct)
        setup.get_or_create(VICTIM)
        setup.append_messages(VICTIM, [NewMessage(Role.USER, text) for text in VICTIM_MESSAGES])
        setup.update_metadata(VICTIM, VICTIM_META)
        engines = [open_database(database.pooled) for _ in range(3)]
        repos = [SessionRepository(engine) for engine in engines]
        churners = 7
        rounds = [0] * churners
        seen: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        errors_lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def worker(index: int) -> None:
            # Each worker keeps going after an error, so the run shows every kind of
            # damage, not only the first; nothing may be raised at all.
            while time.monotonic() < deadline:
                try:
                    if index == churners:
                        _read_victim(repos[index % 3], deadline, seen)
                    else:
                        _churn(repos[index % 3], index, deadline, rounds)
                except Exception as exc:
                    who = "the victim's reader" if index == churners else "a churner"
                    # psycopg numbers its statements per connection: one kind of error
                    # whatever the number.
                    text = re.sub(r"_pg3_\d+", "_pg3_N", _first_line(exc))
                    with errors_lock:
                        errors[f"{who}: {type(exc).__name__}: {text}"] += 1

        run_threads(worker, churners + 1)

        problems: list[str] = []
        if errors:
            total = sum(errors.values())
            kinds = "\n    ".join(f"{count} x {text}" for text, count in errors.most_common(12))
            problems.append(f"{total} calls raised:\n    {kinds}")
        wrong_reads = {text: count for text, count in seen.items() if "victim" in text}
        if wrong_reads:
            problems.append(f"the victim's reader saw other data: {wrong_reads}")
        # What really is stored, read directly on the server.
        session = setup.get(VICTIM)
        if session is None:
            left = database.sql("SELECT count(*) FROM messages WHERE content LIKE 'victim %%'")
            problems.append(
                "the victim session was DELETED (by a statement its reader never issued); "
                f"{left[0][0]} of its {len(VICTIM_MESSAGES)} messages are left"
            )
        else:
            stored = [message.content for message in setup.get_history(VICTIM)]
            if stored != VICTIM_MESSAGES or session.meta != VICTIM_META:
                problems.append(f"the victim session changed: {stored}, {session.meta}")
        orphans = database.sql(
            "SELECT count(*) FROM messages WHERE session_id NOT IN (SELECT id FROM sessions)"
        )[0][0]
        if orphans:
            problems.append(f"{orphans} messages without a session")
        print(
            f"\nbehind PgBouncer for {seconds:.0f} s: {sum(rounds)} churn rounds, "
            f"{seen['get']} victim reads, {sum(errors.values())} errors"
        )
        # Proof that the run crossed psycopg's threshold (else it would prove nothing).
        if not problems:
            if min(rounds) <= PREPARE_THRESHOLD:
                problems.append(f"too little traffic to prove anything: rounds {rounds}")
            if min(seen["get"], seen["get_history"]) <= PREPARE_THRESHOLD:
                problems.append(f"too few victim reads to prove anything: {dict(seen)}")
        return problems
    finally:
        _disposing([*engines, direct])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else ""


def test_a_reader_behind_pgbouncer_never_runs_another_clients_statement(
    pooled_db: PooledDatabase,
) -> None:
    """Workers on three engines (as three gateway processes) run every kind of statement
    on their own sessions for 2 s (x AISOPOD_STRESS), beside a worker that only reads the
    victim session, all through PgBouncer with the plain URL. Server connections change
    hands between clients at every transaction, so a statement prepared on one under a
    per-client name must never be what another client's same-named statement runs: no
    call raises, the victim reads back the same on every call, and it is intact after."""
    problems = _collide(pooled_db, COLLISION_SECONDS * stress())
    assert not problems, "behind PgBouncer:\n  " + "\n  ".join(problems)


# --- b: the search path ---------------------------------------------------------------------


def _with_search_path(url: str, schema: str) -> str:
    return f"{url}?options=-csearch_path%3D{schema}"


def test_a_search_path_in_the_url_that_pgbouncer_drops_is_refused_at_open(
    pooled_db: PooledDatabase,
) -> None:
    """PgBouncer (`ignore_startup_parameters = options`) drops a URL's
    `?options=-csearch_path=tenant_a` without a word: the store would then live in
    whatever schema the server's default search path gives. Opening must refuse that,
    naming the schema asked for, before writing anything anywhere."""
    pooled_db.sql("CREATE SCHEMA tenant_a")
    url = _with_search_path(pooled_db.pooled, "tenant_a")
    with pytest.raises(SessionStoreError, match="tenant_a"):
        open_database(url).dispose()
    assert tables_in(pooled_db, "public") == []
    assert tables_in(pooled_db, "tenant_a") == []


def test_the_async_opener_refuses_a_dropped_search_path_too(pooled_db: PooledDatabase) -> None:
    """The same refusal from `open_async_database`, which shares the checks at open."""
    pooled_db.sql("CREATE SCHEMA tenant_a")
    url = _with_search_path(pooled_db.pooled, "tenant_a")

    async def open_and_dispose() -> None:
        engine = await open_async_database(url)
        await engine.dispose()

    with pytest.raises(SessionStoreError, match="tenant_a"):
        asyncio.run(open_and_dispose())
    assert tables_in(pooled_db, "public") == []
    assert tables_in(pooled_db, "tenant_a") == []


SHARED = SessionKey("support", "telegram", "bot-main", "dm", "42")
"""The same key in every tenant: only the schema tells the tenants' sessions apart."""


def _seed_tenant(database: PooledDatabase, schema: str) -> None:
    """A tenant's store in `schema`, migrated and holding one session, made directly on
    the server (which honours the URL's search path)."""
    database.sql(f"CREATE SCHEMA {schema}")
    engine = open_database(database.direct_with_schema(schema))
    try:
        repo = SessionRepository(engine)
        repo.get_or_create(SHARED)
        repo.append_message(SHARED, Role.USER, f"secret of {schema}")
    finally:
        engine.dispose()


def _texts(messages: Iterable[Message]) -> list[str]:
    """The contents of messages that hold text (every message these tests write)."""
    texts: list[str] = []
    for message in messages:
        assert isinstance(message.content, str), message
        texts.append(message.content)
    return texts


def _visible(repo: SessionRepository) -> list[str]:
    """Every message content a repository can list, session by session."""
    contents: list[str] = []
    for session in repo.list_sessions(limit=1000):
        contents += _texts(repo.get_history(session.key))
    return contents


def test_tenants_chosen_by_the_urls_search_path_never_read_each_others_rows(
    pooled_db: PooledDatabase,
) -> None:
    """Two tenants in schemas tenant_a and tenant_b of one database, the same key in
    each, opened through PgBouncer with `?options=-csearch_path=<schema>` as
    docs/postgresql.md used to suggest. Each opening must either be refused (naming its
    schema) or see exactly its own rows: never the other tenant's, also not what the
    other writes through PgBouncer afterwards."""
    tenants = ("tenant_a", "tenant_b")
    for schema in tenants:
        _seed_tenant(pooled_db, schema)
    repos: dict[str, SessionRepository] = {}
    engines: list[Engine] = []
    problems: list[str] = []
    try:
        for schema in tenants:
            try:
                engine = open_database(_with_search_path(pooled_db.pooled, schema))
            except SessionStoreError as exc:
                if schema not in str(exc):
                    problems.append(f"{schema}: refused without naming the schema: {exc}")
                continue
            engines.append(engine)
            repos[schema] = SessionRepository(engine)
        if "tenant_a" in repos:
            # What a gateway does with its next message: the session, then the append.
            repos["tenant_a"].get_or_create(SHARED)
            repos["tenant_a"].append_message(SHARED, Role.ASSISTANT, "written by tenant_a")
        for schema, repo in repos.items():
            other = next(name for name in tenants if name != schema)
            seen = _visible(repo)
            leaked = [text for text in seen if other in text]
            if leaked:
                problems.append(f"{schema} READ {other}'s rows: {leaked}")
            if f"secret of {schema}" not in seen:
                problems.append(f"{schema} does not see its own session (it sees {seen})")
    finally:
        _disposing(engines)
    stray = tables_in(pooled_db, "public")
    if stray:
        problems.append(f"tables were created in schema public, shared by both: {stray}")
    assert not problems, "behind PgBouncer:\n  " + "\n  ".join(problems)


def test_a_per_role_search_path_keeps_tenants_apart_behind_pgbouncer(
    pooled_db: PooledDatabase,
) -> None:
    """The per-tenant set-up that works behind PgBouncer: a login role per tenant whose
    own setting is its schema (`ALTER ROLE ... IN DATABASE ... SET search_path`), owning
    that schema. PgBouncer pools per database and user, so a role's server connections
    all carry its setting and no client sends anything. Each tenant, connecting through
    PgBouncer as its role with the plain URL from two engines (two gateway processes),
    migrates and uses its own schema only, with the same key as the other tenant and
    all four engines busy at once."""
    roles = dict(zip(("tenant_a", "tenant_b"), TENANT_ROLES, strict=True))
    for schema, role in roles.items():
        ensure_tenant_role(pooled_db, role, schema)
    # Workers 0 and 2 are tenant_a's, 1 and 3 tenant_b's.
    schemas = [schema for _ in range(2) for schema in roles]
    engines = [open_database(pooled_db.pooled_as(roles[schema])) for schema in schemas]
    rounds = 2 * PREPARE_THRESHOLD
    try:
        repos = [SessionRepository(engine) for engine in engines]

        def tenant_worker(index: int) -> None:
            schema, repo = schemas[index], repos[index]
            mine: list[str] = []
            for number in range(rounds):
                repo.get_or_create(SHARED)
                mine.append(f"{schema} worker {index} message {number}")
                repo.append_message(SHARED, Role.USER, mine[-1])
                history = _texts(repo.get_history(SHARED))
                foreign = [text for text in history if not text.startswith(schema)]
                assert not foreign, f"{schema} READ another tenant's rows: {foreign}"
                assert [text for text in history if f" worker {index} " in text] == mine
                assert [session.key for session in repo.list_sessions()] == [SHARED]

        run_threads(tenant_worker, len(repos))
    finally:
        _disposing(engines)
    for schema in roles:
        # Content is stored as JSON text: the cell of a string is its JSON string.
        cells = [row[0] for row in pooled_db.sql(f"SELECT content FROM {schema}.messages")]
        stored = [json.loads(cell) for cell in cells]
        assert cells == [dump_json(text) for text in stored]
        assert len(stored) == 2 * rounds
        assert all(text.startswith(f"{schema} worker ") for text in stored), stored
    assert tables_in(pooled_db, "public") == []


# --- c: migrations ------------------------------------------------------------------------


def test_processes_migrating_a_fresh_database_through_pgbouncer_apply_each_version_once(
    pooled_db: PooledDatabase,
) -> None:
    """Four processes open the same new database through PgBouncer at the same moment.
    The migrator's lock is transaction-scoped (`pg_advisory_xact_lock`), which PgBouncer
    keeps on one server connection for the transaction: all four succeed and
    `schema_version` records each version once."""
    processes = 4
    # Fresh processes, as separate gateway hosts would be: none inherits this one's
    # threads or connections. The fork server imports the store once and forks each worker
    # from that clean process (4 spawned interpreters importing it would take 6 s here).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.pgbouncer"])
    barrier = context.Barrier(processes)
    results: Any = context.Queue()
    workers = [
        context.Process(target=open_when_released, args=(pooled_db.pooled, index, barrier, results))
        for index in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports: dict[int, str | None] = {}
    try:
        for _ in range(processes):
            index, failure = results.get(timeout=120)
            reports[index] = failure
    except queue.Empty:
        pass
    for worker in workers:
        worker.join(timeout=60)
    failures = {index: failure for index, failure in reports.items() if failure}
    assert not failures, "\n".join(f"process {i}:\n{text}" for i, text in failures.items())
    assert sorted(reports) == list(range(processes))
    assert [worker.exitcode for worker in workers] == [0] * processes
    direct = open_database(pooled_db.direct, migrate=False)
    try:
        rows = applied_migrations(direct)
        assert [row.version for row in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert SessionRepository(direct).count_sessions() == processes
    finally:
        direct.dispose()


# --- d: every call, repeatedly ----------------------------------------------------------


def _exercise(repos: list[SessionRepository]) -> None:
    """Every repository call, each well over PREPARE_THRESHOLD times, alternating
    between two engines (two gateway processes' pools), each result checked."""
    keeper = SessionKey("smoke", "slack", "T024", "channel", "keeper")
    repos[0].get_or_create(keeper)
    for number in range(2 * PREPARE_THRESHOLD):
        repo, other = repos[number % 2], repos[(number + 1) % 2]
        key = SessionKey("smoke", "telegram", "bot-main", "dm", f"user-{number}")
        created = repo.get_or_create(key)
        assert created.message_count == 0
        assert other.get_or_create(key).id == created.id
        texts = [f"{number}.{part}" for part in range(4)]
        appended = other.append_messages(
            key, [NewMessage(Role.USER, text) for text in texts], tokens=10
        )
        assert [message.content for message in appended] == texts
        assert [message.content for message in repo.get_history(key)] == texts
        assert repo.update_metadata(key, {"round": number}).meta == {"round": number}
        compacted = other.compact(key, keep_last=2, summary=f"summary {number}")
        assert compacted.removed == 2
        assert [message.content for message in repo.get_history(key)] == [
            f"summary {number}",
            *texts[2:],
        ]
        assert compacted.session.token_usage == 10
        reset = repo.reset(key)
        assert (reset.message_count, reset.token_usage, reset.meta) == (0, 0, {"round": number})
        assert other.get_history(key) == []
        listed = repo.list_sessions({"agent_id": "smoke"})
        assert sorted(session.key.peer_id for session in listed) == sorted(
            ["keeper", f"user-{number}"]
        )
        assert other.delete(key) is True
        assert repo.get(key) is None
        assert repo.delete(key) is False
        with pytest.raises(SessionNotFoundError):
            other.get_history(key)
    assert [session.key for session in repos[1].list_sessions({"agent_id": "smoke"})] == [keeper]


def test_every_repository_call_works_repeatedly_through_pgbouncer(
    pooled_db: PooledDatabase,
) -> None:
    """get_or_create, append_messages, get_history, update_metadata, compact, reset,
    list_sessions and delete, each run more than PREPARE_THRESHOLD times through
    PgBouncer on two engines, give the right results every time."""
    engines = [open_database(pooled_db.pooled) for _ in range(2)]
    try:
        _exercise([SessionRepository(engine) for engine in engines])
    finally:
        _disposing(engines)


def test_every_async_repository_call_works_repeatedly_through_pgbouncer(
    pooled_db: PooledDatabase,
) -> None:
    """The same calls through `AsyncSessionRepository` on psycopg's asyncio connection."""
    with event_loop_thread() as loop:
        engines = [run_on(loop, open_async_database(pooled_db.pooled)) for _ in range(2)]
        try:
            _exercise([AwaitingRepository.over(AsyncSessionRepository(e), loop) for e in engines])
        finally:
            for engine in engines:
                run_on(loop, engine.dispose())


def test_pgbouncer_really_pools_in_transaction_mode(pooled_db: PooledDatabase) -> None:
    """The set-up itself: two client connections through PgBouncer, one after the
    other, are served by the same server backend (so session state is shared), and a
    URL's options do not reach the server. Without this the other tests prove nothing."""
    pids: set[int] = set()
    for _ in range(2):
        with psycopg.connect(pooled_db.pooled, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pids.add(int(row[0]))
    assert len(pids) == 1, f"PgBouncer gave fresh server connections: {pids}"
    url = _with_search_path(pooled_db.pooled, "somewhere_else")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW search_path").fetchone()
        assert row is not None
        assert "somewhere_else" not in row[0]


def _prepare_threshold(url: str) -> int | None:
    """The prepare threshold psycopg was left with on a new connection of `url`."""
    engine = open_database(url)
    try:
        pooled = engine.raw_connection()
        try:
            threshold: int | None = pooled.driver_connection.prepare_threshold  # type: ignore[union-attr]
        finally:
            pooled.close()
        return threshold
    finally:
        engine.dispose()


def test_statements_are_prepared_only_on_a_connection_straight_to_the_server(
    pooled_db: PooledDatabase,
) -> None:
    """The store asks each new connection whether it reaches the server directly (its
    address and port are the server's own): there psycopg prepares hot statements (a
    parse and a plan saved per call), through PgBouncer never. A URL can decide."""
    assert _prepare_threshold(pooled_db.direct) == 5
    assert _prepare_threshold(pooled_db.pooled) is None
    assert _prepare_threshold(f"{pooled_db.direct}?prepare_threshold=none") is None
    assert _prepare_threshold(f"{pooled_db.pooled}?prepare_threshold=2") == 2
    with pytest.raises(ValueError, match="prepare_threshold"):
        open_database(f"{pooled_db.direct}?prepare_threshold=soon")
