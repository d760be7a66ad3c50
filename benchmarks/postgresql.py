"""The PostgreSQL half of `make bench`: run when `AISOPOD_BENCH_POSTGRES_URL` names a
server (a loud line says it was not, otherwise).

On that server, each store in a schema of its own (`bench_pg_<pid>_<n>_<name>`, made
and dropped here; the URL's own database and schema are left alone), the same
contenders as on SQLite:

- **floor**: psycopg 3 running the repository's own SQL, prepared, on one open
  connection, in the same transaction shapes (`floor_postgresql.py`);
- **ours** (`SessionRepository` on `open_database(url)`) and **ours, async**
  (`AsyncSessionRepository` on `open_async_database(url)`, scenarios 1 and 3);
- **peers** on the same server through their public APIs: openai-agents
  `SQLAlchemySession`, google-adk `DatabaseSessionService` (both on psycopg's asyncio
  connection) and langchain-community `SQLChatMessageHistory` (`peers.py`).

Scenarios 1–5 as on SQLite; growth (scenarios 3 and 4 in stores of 10³, 10⁵ and 10⁶
messages); concurrent writers: 1, 4 and 16 threads over (up to) 4 processes, each thread
appending one message per transaction to its own session, total appends per second of
ours against the floor's doing the same (one connection per writer), and every error
counted. Sizes scale with `AISOPOD_BENCH_SCALE` like the SQLite scenarios.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import Pool

from aisopod_session import (
    AsyncSessionRepository,
    SessionKey,
    SessionRepository,
    open_async_database,
    open_database,
)
from aisopod_session.statements import KEY as KEY_NAMES
from aisopod_session.statements import append_in_one
from benchmarks import floor
from benchmarks import floor_postgresql as pg_floor
from benchmarks.bench import (
    KEY,
    KEY_PARAMS,
    LIMIT,
    PEER_SESSION,
    TOKENS,
    Bench,
    Scenario,
    Stats,
    run,
    spec,
)

POSTGRES_ENV = "AISOPOD_BENCH_POSTGRES_URL"
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
SKIPPED = f"not measured: set {POSTGRES_ENV}"
WRITER_THREADS = (1, 4, 16)
WRITER_PROCESSES = 4


def writer_name(contender: str, threads: int) -> str:
    """The concurrent-writers stat of `contender` ("floor" or "ours") at `threads`."""
    return f"{contender}, {threads} threads"


# --- one core ---------------------------------------------------------------------------
#
# On this 2-core virtual machine a round trip to a server process on the client's own
# core takes about 40 µs, and about 93 µs to one on the other core; which core each
# connection's server process lands on is chance, and a connection keeps it. Timing the
# floor on one connection against ours on another would then compare cores, not code.
# So for scenarios 1-6 the client and every server process it connects to (the floor's,
# ours, the peers', through a pool listener) are pinned to one core; the concurrent
# writers run unpinned, over every core.

_pinned_cpu: int | None = None


def _backend_pid(dbapi_connection: Any) -> int | None:
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    info = getattr(driver, "info", None)
    pid = getattr(info, "backend_pid", None)
    return pid if isinstance(pid, int) else None


def pin_backend(pid: int | None) -> None:
    """Put the local server process `pid` on the pinned core, if pinning is on (a
    process not named postgres, or not ours to move, is left alone)."""
    if _pinned_cpu is None or pid is None:
        return
    try:
        with open(f"/proc/{pid}/comm") as comm:
            if comm.read().strip() != "postgres":
                return
        os.sched_setaffinity(pid, {_pinned_cpu})
    except OSError:
        return


def _pin_new_connection(dbapi_connection: Any, _record: Any) -> None:
    pin_backend(_backend_pid(dbapi_connection))


def pinned(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """The floor's connection, its server process on the pinned core."""
    pin_backend(conn.info.backend_pid)
    return conn


@contextmanager
def one_core(url: str) -> Iterator[str]:
    """This process, and the server processes of every connection made meanwhile, on one
    core (only for a server on this machine, where Linux lets us); what was done."""
    global _pinned_cpu
    host = make_url(url).host or "localhost"
    if host not in _LOOPBACK or not hasattr(os, "sched_setaffinity"):
        yield f"not pinned (server at {host})"
        return
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    _pinned_cpu = cpu
    listening = not event.contains(Pool, "connect", _pin_new_connection)
    if listening:
        event.listen(Pool, "connect", _pin_new_connection)
    try:
        yield f"client and server processes pinned to CPU {cpu} (of {len(before)})"
    finally:
        _pinned_cpu = None
        if listening:
            event.remove(Pool, "connect", _pin_new_connection)
        os.sched_setaffinity(0, before)


# --- the server and its schemas ---------------------------------------------------------


class Server:
    """The PostgreSQL server of `url`, handing out schemas of this run's own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"bench_pg_{os.getpid()}"
        self._made = 0

    def version(self) -> str:
        """`PostgreSQL 15.20`: the server's product and version."""
        with self._admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return f"PostgreSQL {row[0].split()[0] if row else '?'}"

    @contextmanager
    def _admin(self) -> Iterator[psycopg.Connection[Any]]:
        conn = psycopg.connect(pg_floor.conninfo(self.url), autocommit=True)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def schema(self, name: str) -> Iterator[str]:
        """A new, empty schema; its URL (`postgresql+psycopg`, `search_path` set to it
        alone); dropped with everything in it afterwards."""
        self._made += 1
        schema = f"{self.prefix}_{self._made}_{name}".replace("-", "_")[:63]
        with self._admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{schema}"')
        url = (
            make_url(self.url)
            .set(drivername="postgresql+psycopg")
            .update_query_dict({"options": f"-csearch_path={schema}"})
        )
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with self._admin() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @contextmanager
    def store(self, name: str) -> Iterator[tuple[str, SessionRepository]]:
        """A new store in a schema of its own, migrated and holding the empty session
        `KEY`, made through our API (as on SQLite); its URL and our repository."""
        with self.schema(name) as url:
            engine = open_database(url)
            try:
                repository = SessionRepository(engine)
                repository.get_or_create(KEY)
                yield url, repository
            finally:
                engine.dispose()


@contextmanager
def async_store(runner: asyncio.Runner, url: str) -> Iterator[AsyncSessionRepository]:
    """Our async repository on the store at `url`, its engine on `runner`'s loop."""
    engine = runner.run(open_async_database(url))
    try:
        yield AsyncSessionRepository(engine)
    finally:
        runner.run(engine.dispose())


# --- set-up in plain SQL (not measured) -------------------------------------------------


def _stamp(start: datetime, seconds: int) -> str:
    return (start + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def fill_messages(url: str, sessions: int, per_session: int) -> None:
    """`sessions` sessions (the last one is `KEY`, which exists) of `per_session`
    messages each, with COPY; counters kept true to the rows; then ANALYZE."""
    start = datetime.now(UTC) - timedelta(days=30)
    conn = pg_floor.connect(url)
    try:
        with conn.transaction():
            with conn.cursor().copy(
                "COPY sessions (agent_id, channel, account_id, peer_kind, peer_id, "
                "created_at, updated_at, message_count) FROM STDIN"
            ) as copy:
                for number in range(sessions - 1):
                    stamp = _stamp(start, number)
                    copy.write_row((*KEY_PARAMS[:4], f"u{number}", stamp, stamp, per_session))
            conn.execute(
                "UPDATE sessions SET message_count = %s WHERE peer_id = %s",
                (per_session, KEY_PARAMS[4]),
            )
            ids = [row[0] for row in conn.execute("SELECT id FROM sessions ORDER BY id")]
            with conn.cursor().copy(
                "COPY messages (session_id, role, content, tool_calls, created_at, metadata) "
                "FROM STDIN"
            ) as copy:
                for number, session_id in enumerate(ids):
                    stamp = _stamp(start, number)
                    for i in range(per_session):
                        role, content, calls = spec(i)
                        copy.write_row(
                            (
                                session_id,
                                role,
                                floor.dumps(content),
                                floor.json_or_none(calls),
                                stamp,
                                "{}",
                            )
                        )
        conn.execute("ANALYZE sessions")
        conn.execute("ANALYZE messages")
    finally:
        conn.close()


def fill_sessions(url: str, sessions: int, agents: int) -> None:
    """`sessions` empty sessions spread over `agents` agents, with COPY; then ANALYZE."""
    start = datetime.now(UTC) - timedelta(days=30)
    conn = pg_floor.connect(url)
    try:
        with (
            conn.transaction(),
            conn.cursor().copy(
                "COPY sessions (agent_id, channel, account_id, peer_kind, peer_id, created_at, "
                "updated_at) FROM STDIN"
            ) as copy,
        ):
            for number in range(sessions):
                stamp = _stamp(start, number)
                copy.write_row(
                    (
                        f"agent-{number % agents}",
                        "telegram",
                        "bot",
                        "dm",
                        f"peer-{number}",
                        stamp,
                        stamp,
                    )
                )
        conn.execute("ANALYZE sessions")
    finally:
        conn.close()


# --- the scenarios ----------------------------------------------------------------------


class PostgresBench(Bench):
    """The PostgreSQL half: `Bench`'s scenarios 1-6 on PostgreSQL schemas (its store,
    floor and peer hooks overridden), then the concurrent writers; sized as `bench`."""

    floor: ModuleType = pg_floor

    def __init__(self, bench: Bench, server: Server, peers: list[Any]) -> None:
        super().__init__(bench.folder, bench.scale, peers)
        self.server = server
        self.plans: dict[str, list[str]] = {}

    def run(self) -> dict[str, Any]:
        """Every PostgreSQL scenario; the results `Report.postgresql` takes."""
        began = time.perf_counter()
        results: dict[str, Any] = {"server": self.server.version()}
        steps: list[tuple[str, Callable[[], Scenario]]] = [
            ("1", self.append_one),
            ("2", self.append_batch),
            ("3", self.read_newest),
            ("4", self.get_existing),
            ("5", self.list_page),
        ]
        scenarios = []
        with one_core(self.server.url) as pinning:
            results["pinning"] = pinning
            for number, step in steps:
                print(f"PostgreSQL scenario {number} ...", file=sys.stderr, flush=True)
                scenarios.append(step())
            print("PostgreSQL growth ...", file=sys.stderr, flush=True)
            results["growth"] = self.growth()
            results["plans"] = self.plans
        results["scenarios"] = scenarios
        print("PostgreSQL concurrent writers ...", file=sys.stderr, flush=True)
        results["writers"], results["errors"] = self.writers()
        results["seconds"] = round(time.perf_counter() - began, 1)
        return results

    # Bench's hooks, for schemas of the server
    def backend_store(self, name: str) -> AbstractContextManager[tuple[Any, SessionRepository]]:
        return self.server.store(name)

    def backend_async_store(
        self, runner: asyncio.Runner, target: Any
    ) -> AbstractContextManager[AsyncSessionRepository]:
        return async_store(runner, target)

    def floor_connect(self, target: Any) -> Any:
        return pinned(pg_floor.connect(target))

    def fill_messages(self, target: Any, sessions: int, per_session: int) -> None:
        fill_messages(target, sessions, per_session)

    def fill_sessions(self, target: Any, sessions: int, agents: int) -> None:
        fill_sessions(target, sessions, agents)

    def read_plans(self, conn: Any) -> None:
        self.plans = query_plans(conn)

    # each peer in a schema of its own, with a session to work on
    @contextmanager
    def peer_store(self, peer: Any, name: str) -> Iterator[None]:
        with self.server.schema(f"{name}_peer") as url:
            peer.open_server(url)
            try:
                run(peer.create_session(PEER_SESSION))
                yield
            finally:
                peer.close()

    def writers(self) -> tuple[Scenario, dict[str, int]]:
        """Concurrent writers: for each count of threads, floor and ours in turn, each in
        a new store; total appends per second (as µs per append overall) and errors."""
        scenario = Scenario(
            7, f"concurrent writers over up to {WRITER_PROCESSES} processes (aggregate)"
        )
        errors: dict[str, int] = {}
        total = self.count(8000)
        for threads in WRITER_THREADS:
            per_thread = max(10, total // threads)
            for contender in ("floor", "ours"):
                with self.server.store(f"s7_{contender}_{threads}") as (url, repository):
                    for number in range(threads):
                        repository.get_or_create(writer_key(number))
                    repository.engine.dispose()  # nothing pooled crosses the fork
                    stats, failed = parallel_writers(url, contender, threads, per_thread)
                    check_writer_counts(repository, threads, per_thread, failed)
                name = writer_name(contender, threads)
                scenario.stats[name] = stats
                errors[name] = failed
        return scenario, errors


def query_plans(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """`EXPLAIN (COSTS OFF)` of the hot statements (the floor's texts, which are the
    repository's), with the values a call binds; nothing is run."""
    newest = {**dict(zip(KEY_NAMES, KEY_PARAMS, strict=True)), "limit": LIMIT, "offset": 0}
    rooms = (2**31 - 2, 2**63 - 1, 2**63 - 1, 2**63 - 1)
    append = (*KEY_PARAMS, 1, 0, 0, 0, *rooms, "user", '"hi"', None, "{}")
    statements: dict[str, tuple[str, tuple[Any, ...]]] = {
        "get_or_create / get (by key)": (pg_floor.SELECT.text, KEY_PARAMS),
        "get_history(limit=50)": (pg_floor.NEWEST.text, pg_floor.NEWEST.bind(newest)),
        "list_sessions(agent_id=...)": (pg_floor.LIST_FOR_AGENT.text, ("bench", LIMIT, 0)),
        "append_message (one statement)": (append_in_one(1).on(pg_floor.POSTGRESQL).text, append),
    }
    return {
        name: [
            str(row[0]) for row in conn.execute(f"EXPLAIN (COSTS OFF) {sql}", params, prepare=False)
        ]
        for name, (sql, params) in statements.items()
    }


# --- concurrent writers -----------------------------------------------------------------


def writer_key(number: int) -> SessionKey:
    return SessionKey("bench", "cli", "local", "dm", f"writer-{number}")


def check_writer_counts(
    repository: SessionRepository, threads: int, per_thread: int, failed: int
) -> None:
    """Every acknowledged append is stored: the counters add up to the appends that
    returned (each writer's one untimed warm-up included)."""
    stored = 0
    for number in range(threads):
        session = repository.get(writer_key(number))
        stored += 0 if session is None else session.message_count
    if stored != threads * (per_thread + 1) - failed:
        raise RuntimeError(
            f"concurrent writers: {stored} messages stored, expected "
            f"{threads * (per_thread + 1) - failed}"
        )


def _writer(append: Callable[[int], object], count: int, start: Any, out: Any) -> None:
    """One writer thread: a warm-up append, the start line, `count` timed appends (an
    error is counted, not raised), then (began, ended, errors, first error) to `out`."""
    errors = 0
    first = ""
    try:
        append(0)
    except Exception as exc:
        errors, first = 1, f"{type(exc).__name__}: {exc}"
    start.wait()
    began = time.perf_counter_ns()
    for i in range(1, count + 1):
        try:
            append(i)
        except Exception as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
    out.put((began, time.perf_counter_ns(), errors, first))


def _floor_appender(conn: psycopg.Connection[Any], key: SessionKey) -> Callable[[int], object]:
    params = key.parts()
    return lambda i: pg_floor.append(conn, params, [spec(i)], TOKENS)


def _our_appender(repository: SessionRepository, key: SessionKey) -> Callable[[int], object]:
    def append(i: int) -> object:
        role, content, calls = spec(i)
        return repository.append_message(key, role, content, tool_calls=calls, tokens=TOKENS)

    return append


def _writers_in_process(
    url: str, contender: str, first: int, threads: int, count: int, start: Any, out: Any
) -> None:
    """`threads` writers in this process, writers `first` … `first + threads - 1`: the
    floor's with one connection each, ours sharing one engine and repository."""
    repository = SessionRepository(open_database(url)) if contender == "ours" else None
    connections: list[psycopg.Connection[Any]] = []
    workers = []
    for number in range(first, first + threads):
        if repository is None:
            connections.append(pg_floor.connect(url))
            append = _floor_appender(connections[-1], writer_key(number))
        else:
            append = _our_appender(repository, writer_key(number))
        workers.append(threading.Thread(target=_writer, args=(append, count, start, out)))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for conn in connections:
        conn.close()
    if repository is not None:
        repository.engine.dispose()


def parallel_writers(url: str, contender: str, threads: int, per_thread: int) -> tuple[Stats, int]:
    """`threads` writers over up to `WRITER_PROCESSES` processes (forked), each appending
    `per_thread` messages one per transaction to its own session after all are ready;
    the wall time over every append as µs per append, and how many appends failed."""
    processes = min(WRITER_PROCESSES, threads)
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(threads), context.Queue()
    spread = [
        threads // processes + (1 if n < threads % processes else 0) for n in range(processes)
    ]
    workers = []
    first = 0
    for share in spread:
        workers.append(
            context.Process(
                target=_writers_in_process,
                args=(url, contender, first, share, per_thread, start, out),
            )
        )
        first += share
    for worker in workers:
        worker.start()
    spans = [out.get(timeout=600) for _ in range(threads)]
    for worker in workers:
        worker.join()
    failed = sum(errors for _, _, errors, _ in spans)
    first_error = next((text for *_, text in spans if text), "")
    if first_error:
        print(f"PostgreSQL writers, {contender}: {failed} errors, e.g. {first_error}")
    wall = max(end for _, end, _, _ in spans) - min(began for began, _, _, _ in spans)
    per_append = wall / 1000 / (threads * per_thread)
    return Stats(count=threads * per_thread, median_us=per_append, p90_us=math.nan), failed


def unanswered(url: str) -> str | None:
    """Why the server of `url` cannot be measured (it does not answer), or None."""
    try:
        psycopg.connect(pg_floor.conninfo(url), connect_timeout=5).close()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"not measured: the server of {POSTGRES_ENV} does not answer ({first})"
    return None


def measure_postgresql(bench: Bench, with_peers: bool) -> dict[str, Any]:
    """The PostgreSQL half's results, or `{"skipped": why}` (printed loudly) when
    `AISOPOD_BENCH_POSTGRES_URL` is not set."""
    url = os.environ.get(POSTGRES_ENV)
    why = SKIPPED if not url else unanswered(url)
    if why is not None:
        print(f"PostgreSQL half: {why}", flush=True)
        print(f"PostgreSQL half: {why}", file=sys.stderr, flush=True)
        return {"skipped": why}
    assert url is not None
    peers: list[Any] = []
    if with_peers:
        from benchmarks.peers import available_server_peers

        peers = available_server_peers()
    return PostgresBench(bench, Server(url), peers).run()
