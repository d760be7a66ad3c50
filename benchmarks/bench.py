"""`make bench`: our `SessionRepository` against the floor (plain `sqlite3` running the same
SQL, see `floor.py`) and the peer stores (see `peers.py`), in one run.

Scenarios (file databases, one process unless said):

1. append one message per transaction, 10 000 messages;
2. append batches of 50 messages per transaction (10 000 messages);
3. read the newest 50 messages of a session that has 10 000;
4. `get_or_create` of an existing key;
5. `list_sessions` for one agent, page of 50, in a store of 100 000 sessions;
6. growth: scenarios 3 and 4 in stores of 10^3, 10^5 and 10^6 messages;
7. 4 processes appending to different sessions of one file at once;
8. memory: peak RSS while appending 10^6 messages, one per transaction;
9. find, branch and page: `page_sessions` at 10^3, 10^5 and 10^6 sessions, `search_messages`
   in 10^6 messages against a `LIKE` scan, `fork` of 10^4 messages (`find.py`);
10. through the OpenAI Agents SDK's `Session` interface: `AisopodSession` against the SDK's
    `SQLiteSession`, add one item and the latest 50 of 10^4 (`frameworks.py`);
pg. the PostgreSQL half, when `AISOPOD_BENCH_POSTGRES_URL` names a server (a loud line
    says it was not measured otherwise): scenarios 1-6 against the psycopg floor
    (`floor_postgresql.py`) and the peers on the same server, and concurrent writers
    (`postgresql.py`); `--only pg` runs it alone;
start-up: `aisopod-session --help`, `--version` and `status` (on a small SQLite file), and
`python -c "import sqlmodel"` for reference, each run as a new process 5 times (medians).

Scenarios 1 and 3 also time our `AsyncSessionRepository` (each await timed inside one
event loop). Every operation is timed on its own (`perf_counter_ns`) after a warm-up;
tables show medians. `AISOPOD_BENCH_SCALE=0.05 make bench` scales every count and size
down for a quick run (sizes never below 1 000). Raw results go to `benchmarks/results/latest.json`;
`docs/benchmarks.md` and `docs/benchmarks.png` are regenerated from them (`--no-docs` to
keep them; `--no-peers` to measure only the floor and ours).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from aisopod_session import (
    AsyncSessionRepository,
    NewMessage,
    SessionKey,
    SessionRepository,
    open_async_database,
    open_database,
)
from aisopod_session.statements import KEY as KEY_NAMES
from aisopod_session.statements import SELECT_SESSION, history, list_sessions
from benchmarks import floor
from benchmarks.report import (
    ASYNC,
    STARTUP_HELP,
    STARTUP_INTERPRETER,
    STARTUP_SQLMODEL,
    STARTUP_STATUS,
    STARTUP_VERSION,
    Report,
    postgresql_text,
    write_docs,
)

SCALE_ENV = "AISOPOD_BENCH_SCALE"
ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = ROOT / "benchmarks" / "results" / "latest.json"

KEY = SessionKey("bench", "cli", "local", "dm", "user-1")
KEY_PARAMS = KEY.parts()
PEER_SESSION = "bench-user-1"
TOKENS = 12
BATCH = 50
LIMIT = 50
PROCESSES = 4
STARTUP_RUNS = 5

# A realistic mix, so every contender encodes and decodes JSON tool calls as well as text.
CONVERSATION: tuple[floor.MessageSpec, ...] = (
    ("user", "What is the weather in Lisbon tomorrow? " * 4, None),
    (
        "assistant",
        "",
        [{"id": "call_1", "name": "weather", "arguments": {"city": "Lisbon", "day": 1}}],
    ),
    ("tool", '{"forecast": "sunny", "high_c": 24, "low_c": 15}', None),
    ("assistant", "Tomorrow in Lisbon: sunny, 15 to 24 °C. " * 3, None),
)


def spec(i: int) -> floor.MessageSpec:
    return CONVERSATION[i % len(CONVERSATION)]


# --- measuring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Timings of one contender in one scenario, in microseconds per operation."""

    count: int
    median_us: float
    p90_us: float

    def as_json(self) -> dict[str, float]:
        return {
            "count": self.count,
            "median_us": round(self.median_us, 3),
            "p90_us": round(self.p90_us, 3),
        }


def _stats(samples: Sequence[int]) -> Stats:
    micros = [sample / 1000 for sample in samples]
    return Stats(
        count=len(micros),
        median_us=statistics.median(micros),
        # One sample (a smoke run's start-up) is its own 90th percentile.
        p90_us=statistics.quantiles(micros, n=10, method="inclusive")[-1]
        if len(micros) > 1
        else micros[0],
    )


def measure(operation: Callable[[int], Any], count: int, warmup: int | None = None) -> Stats:
    """Time `count` calls of `operation(i)` one by one, after untimed warm-up calls (which
    fill statement caches and leases). An operation that returns an awaitable (a peer's
    async API) is awaited inside one event loop, each await timed."""
    warmup = max(3, count // 20) if warmup is None else warmup
    first = operation(0)
    if inspect.isawaitable(first):
        return asyncio.run(_measure_async(operation, first, count, warmup))
    for i in range(1, warmup):
        operation(i)
    gc.collect()
    samples: list[int] = []
    for i in range(warmup, warmup + count):
        start = time.perf_counter_ns()
        operation(i)
        samples.append(time.perf_counter_ns() - start)
    return _stats(samples)


ROUNDS = 10
WARMUP = 3


def measure_together(
    operations: dict[str, Callable[[int], Any]],
    count: int,
    runner: asyncio.Runner | None = None,
) -> dict[str, Stats]:
    """Time `count` calls of each operation, taking turns in `ROUNDS` rounds, so that the
    machine's drift during a run (it is shared, and its disk's speed varies) weighs on
    every contender alike instead of on whichever ran at a bad moment. Each operation is
    warmed up `WARMUP` times first (`i` = 0); the timed calls get `i` = 1 … `count`.
    An operation that returns a coroutine (our async API) is awaited on `runner`'s event
    loop, each await timed on its own inside the loop."""
    samples: dict[str, list[int]] = {name: [] for name in operations}
    awaited: set[str] = set()
    for name, operation in operations.items():
        for _ in range(WARMUP):
            result = operation(0)
            if inspect.iscoroutine(result):
                assert runner is not None, f"{name} is async: pass a runner"
                runner.run(result)
                awaited.add(name)
    per_round = max(1, count // ROUNDS)
    done = 0
    # What exists before the timing is collected once and frozen: each round's collection
    # then walks only what the rounds made, not a framework's whole heap (ADK's models
    # made it 0.13 s a round), and timed calls meet the same cheap collections.
    gc.collect()
    gc.freeze()
    try:
        while done < count:
            block = range(done + 1, done + 1 + min(per_round, count - done))
            gc.collect()
            for name, operation in operations.items():
                timings = samples[name]
                if name in awaited:
                    assert runner is not None
                    runner.run(_time_awaits(operation, block, timings))
                    continue
                for i in block:
                    start = time.perf_counter_ns()
                    operation(i)
                    timings.append(time.perf_counter_ns() - start)
            done += len(block)
    finally:
        gc.unfreeze()
    return {name: _stats(timings) for name, timings in samples.items()}


async def _time_awaits(operation: Callable[[int], Any], calls: range, timings: list[int]) -> None:
    for i in calls:
        start = time.perf_counter_ns()
        await operation(i)
        timings.append(time.perf_counter_ns() - start)
        await _turn()


async def _turn() -> None:
    """One turn of the event loop between two timed awaits, outside their timing, as a
    server's loop turns between requests: without it, a task awaiting hundreds of short
    calls in a row spends our inline budget (docs/async.md) and the rest of its calls go
    to the worker threads, which no request of a running service does."""
    await asyncio.sleep(0)


async def _measure_async(
    operation: Callable[[int], Any], first: Any, count: int, warmup: int
) -> Stats:
    await first
    for i in range(1, warmup):
        await operation(i)
    gc.collect()
    samples: list[int] = []
    for i in range(warmup, warmup + count):
        start = time.perf_counter_ns()
        await operation(i)
        samples.append(time.perf_counter_ns() - start)
        await _turn()
    return _stats(samples)


def run(result: Any) -> Any:
    """The value of a peer call, awaiting it if it is awaitable (set-up steps)."""
    if inspect.isawaitable(result):

        async def wait() -> Any:
            return await result

        return asyncio.run(wait())
    return result


# --- stores -----------------------------------------------------------------------------


@contextmanager
def async_store(runner: asyncio.Runner, path: Path) -> Iterator[AsyncSessionRepository]:
    """Our async repository on the store at `path`, its engine on `runner`'s loop."""
    engine = runner.run(open_async_database(path))
    try:
        yield AsyncSessionRepository(engine)
    finally:
        runner.run(engine.dispose())


@contextmanager
def store(folder: Path, name: str) -> Iterator[tuple[Path, SessionRepository]]:
    """A new store holding the empty session `KEY`, created through our API, so that
    every contender on it sees the schema, pragmas and WAL mode of a real store."""
    path = folder / f"{name}.db"
    engine = open_database(path)
    try:
        repository = SessionRepository(engine)
        repository.get_or_create(KEY)
        yield path, repository
    finally:
        engine.dispose()


def fill_messages(path: Path, sessions: int, per_session: int) -> None:
    """Plain-SQL set-up (not measured): `sessions` sessions (the last one is `KEY`) of
    `per_session` messages each, counters kept true to the rows."""
    start = datetime.now(UTC) - timedelta(days=30)
    conn = floor.connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for number in range(sessions):
            parts = KEY.parts() if number == sessions - 1 else (*KEY.parts()[:4], f"u{number}")
            stamp = (start + timedelta(seconds=number)).isoformat(timespec="microseconds")
            conn.execute(
                "INSERT OR IGNORE INTO sessions (agent_id, channel, account_id, peer_kind, "
                "peer_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*parts, stamp, stamp),
            )
            (session_id,) = conn.execute(
                "SELECT id FROM sessions WHERE agent_id = ? AND channel = ? AND account_id = ? "
                "AND peer_kind = ? AND peer_id = ?",
                parts,
            ).fetchone()
            conn.executemany(
                "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    (session_id, role, floor.dumps(content), floor.json_or_none(calls), stamp)
                    for role, content, calls in map(spec, range(per_session))
                ),
            )
            conn.execute(
                "UPDATE sessions SET message_count = message_count + ? WHERE id = ?",
                (per_session, session_id),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def fill_sessions(path: Path, sessions: int, agents: int) -> None:
    """Plain-SQL set-up: `sessions` empty sessions spread over `agents` agents."""
    start = datetime.now(UTC) - timedelta(days=30)
    conn = floor.connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
            "created_at, updated_at) VALUES (?, 'telegram', 'bot', 'dm', ?, ?, ?)",
            (
                (
                    f"agent-{number % agents}",
                    f"peer-{number}",
                    stamp := (start + timedelta(seconds=number)).isoformat(timespec="microseconds"),
                    stamp,
                )
                for number in range(sessions)
            ),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


# --- scenarios --------------------------------------------------------------------------


@dataclass
class Scenario:
    """One scenario's results: contender name to stats, or to why it has none."""

    number: int
    title: str
    stats: dict[str, Stats] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Stats] = field(default_factory=dict)
    """Variants of ours shown beside the table, not compared."""


class Bench:
    def __init__(self, folder: Path, scale: float, peers: list[Any]) -> None:
        self.folder = folder
        self.scale = scale
        self.peers = peers
        self.journal_modes: dict[str, str] = {}

    def count(self, base: int, minimum: int = 30) -> int:
        """How many timed calls: `base` scaled, never below `minimum`, or 5 in a smoke run
        (scale below 0.01, tests/test_bench.py), which checks that every measurement
        runs and is reported, not its figures."""
        return max(minimum if self.scale >= 0.01 else 5, round(base * self.scale))

    def size(self, base: int) -> int:
        """A store's size: never below 1 000 rows, or 100 in a smoke run (scale below
        0.01, tests/test_bench.py), where scenario 10's peers would otherwise spend most
        of the run filling their stores."""
        return max(1000 if self.scale >= 0.01 else 100, round(base * self.scale))

    # each peer on its own fresh file, with a session to work on
    @contextmanager
    def peer_store(self, peer: Any, name: str) -> Iterator[None]:
        path = self.folder / f"{name}-{len(os.listdir(self.folder))}.db"
        peer.open(path)
        try:
            self.journal_modes[peer.name] = peer.journal_mode()
            run(peer.create_session(PEER_SESSION))
            yield
        finally:
            peer.close()

    def on_peers(self, scenario: Scenario, measure_peer: Callable[[Any], Stats]) -> None:
        from benchmarks.peers import NotSupported

        for peer in self.peers:
            try:
                scenario.stats[peer.name] = measure_peer(peer)
            except NotSupported as exc:
                scenario.missing[peer.name] = str(exc) or "not in its public API"

    # Where scenarios 1-6 run: SQLite files here; PostgreSQL schemas in
    # `postgresql.PostgresBench`, which overrides these and runs the same scenarios.
    floor: ModuleType = floor

    def backend_store(self, name: str) -> AbstractContextManager[tuple[Any, SessionRepository]]:
        """A new store holding the empty session `KEY`: its target and our repository."""
        return store(self.folder, name)

    def backend_async_store(
        self, runner: asyncio.Runner, target: Any
    ) -> AbstractContextManager[AsyncSessionRepository]:
        return async_store(runner, target)

    def floor_connect(self, target: Any) -> Any:
        """The floor's one connection to the store at `target`."""
        return floor.connect(target)

    def fill_messages(self, target: Any, sessions: int, per_session: int) -> None:
        fill_messages(target, sessions, per_session)

    def fill_sessions(self, target: Any, sessions: int, agents: int) -> None:
        fill_sessions(target, sessions, agents)

    def read_plans(self, conn: Any) -> None:
        """The hot queries' plans, read on the floor's connection to the largest growth
        store (SQLite's are read by `query_plans` at the end of the run instead)."""

    def append_one(self) -> Scenario:
        scenario = Scenario(1, "append one message per transaction")
        count = self.count(10_000)
        with (
            asyncio.Runner() as runner,
            self.backend_store("s1-floor") as (floor_path, _),
            self.backend_store("s1-ours") as (_, repository),
            self.backend_store("s1-ours-async") as (async_path, checker),
            self.backend_async_store(runner, async_path) as async_repository,
        ):
            conn = self.floor_connect(floor_path)

            def ours(i: int) -> object:
                role, content, calls = spec(i)
                return repository.append_message(
                    KEY, role, content, tool_calls=calls, tokens=TOKENS
                )

            def ours_async(i: int) -> Coroutine[Any, Any, object]:
                role, content, calls = spec(i)
                return async_repository.append_message(
                    KEY, role, content, tool_calls=calls, tokens=TOKENS
                )

            scenario.stats.update(
                measure_together(
                    {
                        "floor": lambda i: self.floor.append(conn, KEY_PARAMS, [spec(i)], TOKENS),
                        "ours": ours,
                        ASYNC: ours_async,
                    },
                    count,
                    runner,
                )
            )
            conn.close()
            check_counter(repository, count + WARMUP)
            check_counter(checker, count + WARMUP)

        def peer_append(peer: Any) -> Stats:
            with self.peer_store(peer, "s1"):
                return measure(lambda i: peer.append_one(PEER_SESSION, *spec(i)[:2]), count)

        self.on_peers(scenario, peer_append)
        return scenario

    def append_batch(self) -> Scenario:
        scenario = Scenario(2, f"append batches of {BATCH} messages per transaction")
        count = self.count(200, minimum=20)
        batches = [[spec(i * BATCH + j) for j in range(BATCH)] for i in range(4)]
        # The floor is handed ready tuples; ours is handed ready NewMessage objects (each
        # validated when it was made, as a gateway makes one per message it receives).
        # A third contender shows the cost of making them in the timed call too.
        messages = [[NewMessage(*message) for message in batch] for batch in batches]
        making = "ours, making the 50 NewMessage objects in the call"
        with (
            self.backend_store("s2-floor") as (floor_path, _),
            self.backend_store("s2-ours") as (_, repository),
            self.backend_store("s2-ours-new") as (_, making_repository),
        ):
            conn = self.floor_connect(floor_path)

            def making_them(i: int) -> object:
                made = [NewMessage(*message) for message in batches[i % 4]]
                return making_repository.append_messages(KEY, made, tokens=TOKENS)

            results = measure_together(
                {
                    "floor": lambda i: self.floor.append(conn, KEY_PARAMS, batches[i % 4], TOKENS),
                    "ours": lambda i: repository.append_messages(
                        KEY, messages[i % 4], tokens=TOKENS
                    ),
                    making: making_them,
                },
                count,
            )
            conn.close()
        scenario.extra[making] = results.pop(making)
        scenario.stats.update(results)

        def peer_batch(peer: Any) -> Stats:
            pairs = [[(role, content) for role, content, _ in batch] for batch in batches]
            with self.peer_store(peer, "s2"):
                return measure(lambda i: peer.append_batch(PEER_SESSION, pairs[i % 4]), count)

        self.on_peers(scenario, peer_batch)
        return scenario

    def read_newest(self) -> Scenario:
        size = self.size(10_000)
        scenario = Scenario(3, f"read the newest {LIMIT} of {size:,} messages")
        count = self.count(1000)
        with asyncio.Runner() as runner, self.backend_store("s3") as (path, repository):
            self.fill_messages(path, 1, size)
            conn = self.floor_connect(path)
            check_same_history(self.floor.read_newest(conn, KEY_PARAMS, LIMIT), repository)
            with self.backend_async_store(runner, path) as async_repository:
                scenario.stats.update(
                    measure_together(
                        {
                            "floor": lambda _: self.floor.read_newest(conn, KEY_PARAMS, LIMIT),
                            "ours": lambda _: repository.get_history(KEY, limit=LIMIT),
                            ASYNC: lambda _: async_repository.get_history(KEY, limit=LIMIT),
                        },
                        count,
                        runner,
                    )
                )
            conn.close()

        def peer_read(peer: Any) -> Stats:
            with self.peer_store(peer, "s3"):
                fill_peer(peer, size)
                return measure(lambda _: peer.read_newest(PEER_SESSION, LIMIT), count)

        self.on_peers(scenario, peer_read)
        return scenario

    def get_existing(self) -> Scenario:
        scenario = Scenario(4, "get_or_create of an existing key")
        count = self.count(5000)
        with self.backend_store("s4") as (path, repository):
            self.fill_messages(path, 100, 10)
            conn = self.floor_connect(path)
            scenario.stats.update(
                measure_together(
                    {
                        "floor": lambda _: self.floor.get_session(conn, KEY_PARAMS),
                        "ours": lambda _: repository.get_or_create(KEY),
                    },
                    count,
                )
            )
            conn.close()

        def peer_get(peer: Any) -> Stats:
            with self.peer_store(peer, "s4"):
                return measure(lambda _: peer.get_or_create(PEER_SESSION), count)

        self.on_peers(scenario, peer_get)
        return scenario

    def list_page(self) -> Scenario:
        sessions = self.size(100_000)
        agents = 10
        scenario = Scenario(
            5, f"list_sessions of one agent, page of {LIMIT}, {sessions:,} sessions"
        )
        count = self.count(300)
        with self.backend_store("s5") as (path, repository):
            self.fill_sessions(path, sessions, agents)
            conn = self.floor_connect(path)
            scenario.stats.update(
                measure_together(
                    {
                        "floor": lambda _: self.floor.list_for_agent(conn, "agent-3", LIMIT),
                        "ours": lambda _: repository.list_sessions(
                            {"agent_id": "agent-3"}, limit=LIMIT
                        ),
                    },
                    count,
                )
            )
            conn.close()
        peer_sessions = min(sessions, self.size(2000))

        def peer_list(peer: Any) -> Stats:
            with self.peer_store(peer, "s5"):
                for number in range(peer_sessions):
                    run(peer.create_session(f"peer-{number}"))
                return measure(lambda _: peer.list_sessions(LIMIT), count)

        self.on_peers(scenario, peer_list)
        if self.peers:
            scenario.title += f" (peers: {peer_sessions:,} sessions)"
        return scenario

    def find(self) -> dict[str, Any]:
        """Scenario 9: find, branch and page (`benchmarks/find.py`)."""
        from benchmarks.find import Find

        return Find(self.folder, self.size, self.count).run()

    def frameworks(self) -> dict[str, Any]:
        """Scenario 10: through an agent framework's session interface
        (`benchmarks/frameworks.py`)."""
        from benchmarks.frameworks import Frameworks

        return Frameworks(self.folder, self.size, self.count).run()

    def postgresql(self, with_peers: bool) -> dict[str, Any]:
        """The PostgreSQL half (`benchmarks/postgresql.py`), when
        `AISOPOD_BENCH_POSTGRES_URL` names a server; else `{"skipped": why}`, said loudly."""
        from benchmarks.postgresql import measure_postgresql

        return measure_postgresql(self, with_peers)

    def growth(self) -> list[Scenario]:
        """Scenarios 3 and 4 as the store grows; sessions of 1 000 messages each. The hot
        queries' plans are read in the largest store (`read_plans`)."""
        sizes = [1000, self.size(100_000), self.size(1_000_000)]
        return [
            self.grown(size, self.count(1000), plans=index == len(sizes) - 1)
            for index, size in enumerate(sizes)
        ]

    def grown(self, size: int, count: int, *, plans: bool = False) -> Scenario:
        scenario = Scenario(6, f"{size:,} messages")
        with self.backend_store(f"s6-{size}") as (path, repository):
            self.fill_messages(path, max(1, size // 1000), min(size, 1000))
            conn = self.floor_connect(path)
            if plans:
                self.read_plans(conn)
            scenario.stats.update(
                measure_together(
                    {
                        "floor: read newest 50": lambda _: self.floor.read_newest(
                            conn, KEY_PARAMS, LIMIT
                        ),
                        "floor: get_or_create": lambda _: self.floor.get_session(conn, KEY_PARAMS),
                        "ours: read newest 50": lambda _: repository.get_history(KEY, limit=LIMIT),
                        "ours: get_or_create": lambda _: repository.get_or_create(KEY),
                    },
                    count,
                )
            )
            conn.close()
        return scenario

    def processes(self) -> Scenario:
        per_process = self.count(2500)
        scenario = Scenario(
            7, f"{PROCESSES} processes appending to their own sessions, one file (aggregate)"
        )
        for contender in ("floor", "ours"):
            with store(self.folder, f"s7-{contender}") as (path, repository):
                for number in range(PROCESSES):
                    repository.get_or_create(process_key(number))
            scenario.stats[contender] = parallel_appends(path, contender, per_process)
        return scenario

    def startup(self) -> Scenario:
        """How long the command takes from start to exit, each timing a new process."""
        scenario = Scenario(0, "start-up of the aisopod-session command (new process each run)")
        with store(self.folder, "startup") as (path, _):
            fill_messages(path, 10, 10)
        script = Path(sys.executable).parent / "aisopod-session"
        command = (
            [str(script)] if script.exists() else [sys.executable, "-m", "aisopod_session.cli"]
        )
        scenario.stats.update(
            startup_times(
                {
                    STARTUP_HELP: [*command, "--help"],
                    STARTUP_VERSION: [*command, "--version"],
                    STARTUP_STATUS: [*command, "--db", str(path), "status"],
                    STARTUP_SQLMODEL: [sys.executable, "-c", "import sqlmodel"],
                    STARTUP_INTERPRETER: [sys.executable, "-c", "pass"],
                },
                self.folder,
                # A smoke run (tests/test_bench.py) times each command once.
                runs=STARTUP_RUNS if self.scale >= 0.01 else 1,
            )
        )
        return scenario

    def memory(self) -> dict[str, Any]:
        """Scenario 8 in a child process, so that its peak RSS is its own."""
        # A smoke run (tests/test_bench.py, scale below 0.01) appends a thousand.
        count = max(10_000, round(1_000_000 * self.scale)) if self.scale >= 0.01 else 1_000
        path = self.folder / "s8.db"
        command = f"{sys.executable} -m benchmarks.bench --memory {count} {path}"
        with os.popen(f"cd {ROOT} && {command}") as child:
            output = child.read()
        return dict(json.loads(output.strip().splitlines()[-1]))


def startup_times(
    commands: dict[str, list[str]], folder: Path, runs: int = STARTUP_RUNS
) -> dict[str, Stats]:
    """Each command run `runs` times in turns (so that the machine's drift weighs on all
    alike), after one untimed run each (none for a smoke run of 1), timed from start to
    exit. The children use and keep bytecode caches, as an installed package has them:
    the environment's, compiled when it was installed (`UV_COMPILE_BYTECODE`), and our
    sources' in `__pycache__` beside them (ignored by git), so PYTHONDONTWRITEBYTECODE
    is not passed on (with it, every run would compile every module of ours again)."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("AISOPOD_SESSION_DB", "PYTHONDONTWRITEBYTECODE")
    }
    samples: dict[str, list[int]] = {name: [] for name in commands}

    def run_once(command: list[str]) -> int:
        start = time.perf_counter_ns()
        subprocess.run(
            command,
            cwd=folder,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        return time.perf_counter_ns() - start

    if runs > 1:
        for command in commands.values():
            run_once(command)
    for _ in range(runs):
        for name, command in commands.items():
            samples[name].append(run_once(command))
    return {name: _stats(timings) for name, timings in samples.items()}


def fill_peer(peer: Any, size: int) -> None:
    from benchmarks.peers import NotSupported

    try:
        for start in range(0, size, 500):
            batch = [spec(i)[:2] for i in range(start, min(size, start + 500))]
            run(peer.append_batch(PEER_SESSION, batch))
    except NotSupported:
        for i in range(size):
            run(peer.append_one(PEER_SESSION, *spec(i)[:2]))


def check_counter(repository: SessionRepository, expected: int) -> None:
    session = repository.get(KEY)
    if session is None or session.message_count != expected:
        raise RuntimeError(f"append: expected {expected} messages, found {session!r}")


def check_same_history(rows: list[tuple[Any, ...]], repository: SessionRepository) -> None:
    ours = [
        (m.id, m.session_id, str(m.role), m.content, m.tool_calls, m.created_at, m.meta)
        for m in repository.get_history(KEY, limit=LIMIT)
    ]
    if len(rows) != LIMIT or rows != ours:
        raise RuntimeError("history: the floor and our repository read different messages")


def process_key(number: int) -> SessionKey:
    return SessionKey("bench", "cli", "local", "dm", f"process-{number}")


def _append_in_process(
    path: Path, contender: str, number: int, count: int, start: Any, out: Any
) -> None:
    key = process_key(number)
    if contender == "floor":
        conn = floor.connect(path)
        params = key.parts()

        def append(i: int) -> object:
            return floor.append(conn, params, [spec(i)], TOKENS)

    else:
        engine = open_database(path)
        repository = SessionRepository(engine)

        def append(i: int) -> object:
            role, content, calls = spec(i)
            return repository.append_message(key, role, content, tool_calls=calls, tokens=TOKENS)

    append(0)
    start.wait()
    began = time.perf_counter_ns()
    for i in range(count):
        append(i)
    out.put((began, time.perf_counter_ns()))


def parallel_appends(path: Path, contender: str, per_process: int) -> Stats:
    """Aggregate throughput of PROCESSES writers, as microseconds per append overall."""
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(PROCESSES), context.Queue()
    workers = [
        context.Process(
            target=_append_in_process, args=(path, contender, n, per_process, start, out)
        )
        for n in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    spans = [out.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    wall = max(end for _, end in spans) - min(began for began, _ in spans)
    per_append = wall / 1000 / (PROCESSES * per_process)
    return Stats(count=PROCESSES * per_process, median_us=per_append, p90_us=math.nan)


def memory_child(count: int, path: Path) -> None:
    """Append `count` messages one per transaction, sampling peak RSS ten times."""
    engine = open_database(path)
    repository = SessionRepository(engine)
    repository.get_or_create(KEY)
    samples = []
    step = count // 10
    began = time.perf_counter()
    for i in range(count):
        role, content, calls = spec(i)
        repository.append_message(KEY, role, content, tool_calls=calls, tokens=TOKENS)
        if (i + 1) % step == 0:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            samples.append({"appended": i + 1, "peak_rss_mib": round(peak_kib / 1024, 1)})
    seconds = time.perf_counter() - began
    engine.dispose()
    print(json.dumps({"count": count, "seconds": round(seconds, 1), "samples": samples}))


# --- main -------------------------------------------------------------------------------


def read_scale() -> float:
    raw = os.environ.get(SCALE_ENV, "1.0")
    try:
        scale = float(raw)
    except ValueError:
        raise SystemExit(f"{SCALE_ENV}: must be a number, got {raw!r}") from None
    if not math.isfinite(scale) or scale <= 0:
        raise SystemExit(f"{SCALE_ENV}: must be a positive number, got {raw!r}")
    return scale


def query_plans(folder: Path) -> dict[str, list[str]]:
    """`EXPLAIN QUERY PLAN` of each hot query, on a store with the schema's indexes."""
    queries = {
        "get_or_create / get (by key)": SELECT_SESSION.sqlite,
        "get_history(limit=50)": history(
            newest_first=True, limit=True, after=False, before=False
        ).sqlite,
        "get_history(after_id=...)": history(
            newest_first=False, limit=False, after=True, before=False
        ).sqlite,
        "list_sessions(agent_id=...)": list_sessions(("agent_id",), count=False).sqlite,
    }
    with store(folder, "plans") as (path, _):
        conn = floor.connect(path)
        values = {
            **dict(zip(KEY_NAMES, KEY.parts(), strict=True)),
            "limit": 50,
            "offset": 0,
            "after_id": 0,
            "agent_id": "bench",
        }
        plans = {
            name: [
                row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql.text}", sql.bind(values))
            ]
            for name, sql in queries.items()
        }
        conn.close()
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-peers", action="store_true", help="measure floor and ours only")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="JSON output")
    parser.add_argument(
        "--only",
        help="comma-separated scenario numbers (pg: the PostgreSQL half), for a partial run "
        "(no report)",
    )
    parser.add_argument("--memory", nargs=2, metavar=("COUNT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--docs-from", type=Path, help="rewrite docs/ from saved results instead of running"
    )
    args = parser.parse_args()
    if args.docs_from:
        saved = Report.from_json(json.loads(args.docs_from.read_text()))
        print(saved.text())
        write_docs(saved, ROOT / "docs")
        return
    if args.memory:
        memory_child(int(args.memory[0]), Path(args.memory[1]))
        return

    scale = read_scale()
    peers: list[Any] = []
    if not args.no_peers:
        from benchmarks.peers import available_peers

        peers = available_peers()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aisopod-bench-") as tmp:
        folder = Path(tmp)
        bench = Bench(folder, scale, peers)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("1", bench.append_one),
            ("2", bench.append_batch),
            ("3", bench.read_newest),
            ("4", bench.get_existing),
            ("5", bench.list_page),
            ("6", bench.growth),
            ("7", bench.processes),
            ("8", bench.memory),
            ("startup", bench.startup),
            ("9", bench.find),
            ("10", bench.frameworks),
            ("pg", lambda: bench.postgresql(with_peers=not args.no_peers)),
        ]
        outcomes: dict[str, Any] = {}
        for number, step in steps:
            if args.only and number not in args.only.split(","):
                continue
            print(
                f"scenario {number} ..." if number.isdigit() else f"{number} ...",
                file=sys.stderr,
                flush=True,
            )
            outcomes[number] = step()
        if args.only:
            for number, outcome in outcomes.items():
                if number == "pg":
                    print(postgresql_text(outcome))
                else:
                    print(number, outcome)
            return
        plans = query_plans(folder)
    report = Report(
        scale=scale,
        scenarios=[outcomes[n] for n in "12345"],
        growth=outcomes["6"],
        processes=outcomes["7"],
        memory=outcomes["8"],
        startup=outcomes["startup"],
        find=outcomes["9"],
        frameworks=outcomes["10"],
        postgresql=outcomes["pg"],
        plans=plans,
        journal_modes=bench.journal_modes,
        seconds=time.perf_counter() - began,
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report.as_json(), indent=2, ensure_ascii=False) + "\n")
    print(report.text())
    if not args.no_docs:
        write_docs(report, ROOT / "docs")
    print(f"Raw results: {args.results}")


if __name__ == "__main__":
    main()
