"""A first honest benchmark: appends and history reads through `SessionRepository`,
against plain `sqlite3` doing the same work.

What is measured, one operation per timed repetition (`time.perf_counter_ns`):

* `append`: `append_message(key, role, content, tokens=...)`, one message per write
  transaction, N messages into one session that starts empty.
* `history`: `get_history(key, limit=50)`, the newest 50 messages of a session that
  holds 10 000, repeated R times.

Why the floor is a fair floor: it runs on a database created by `open_database`, so the
schema and indexes are identical, and opens its own `sqlite3` connection with the same
pragmas (`foreign_keys=ON`, `busy_timeout=5000`, `synchronous=NORMAL`, WAL) and the same
transaction mode (`isolation_level=None`, `BEGIN IMMEDIATE` for writes, `BEGIN` for
reads). It runs the statements our repository emits, one round trip each, and decodes
every returned row into the same kinds of Python values our API returns (an aware
`datetime`, decoded JSON tool calls), so only the layers in between differ: validation,
SQLAlchemy's statement handling and connection pool, and model objects. It skips those
layers, builds plain tuples and keeps one connection open, so it is about the least a
Python store on sqlite3 can spend on the same work; the ratio says how much of it we keep.

Run `python benchmarks/bench.py`; `AISOPOD_BENCH_SCALE=0.1` shrinks N and R for a quick
run. Results are medians on this machine; raw numbers go to `benchmarks/results/`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from aisopod_session import SessionKey, SessionRepository, open_database

APPEND_COUNT = 2000
HISTORY_REPEATS = 300
HISTORY_SIZE = 10_000
HISTORY_LIMIT = 50
TOKENS_PER_APPEND = 12
MIN_REPEATS = 10
SCALE_ENV = "AISOPOD_BENCH_SCALE"
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"

KEY = SessionKey("bench", "cli", "local", "dm", "user-1")

# A realistic mix, so both sides encode and decode JSON tool calls as well as plain text.
MessageSpec = tuple[str, str, list[Any] | None]
CONVERSATION: tuple[MessageSpec, ...] = (
    ("user", "What is the weather in Lisbon tomorrow? " * 4, None),
    (
        "assistant",
        "",
        [{"id": "call_1", "name": "weather", "arguments": {"city": "Lisbon", "day": 1}}],
    ),
    ("tool", '{"forecast": "sunny", "high_c": 24, "low_c": 15}', None),
    ("assistant", "Tomorrow in Lisbon: sunny, 15 to 24 °C. " * 3, None),
)

# The statements `SessionRepository` emits (see `echo=True`), written by hand.
UPDATE_SESSION = (
    "UPDATE sessions SET message_count = message_count + ?, token_usage = token_usage + ?, "
    "updated_at = ?, status = 'active' WHERE agent_id = ? AND channel = ? AND account_id = ? "
    "AND peer_kind = ? AND peer_id = ? RETURNING id"
)
INSERT_MESSAGE = (
    "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
INSERT_MESSAGE_RETURNING = (
    INSERT_MESSAGE + " RETURNING id, session_id, role, content, tool_calls, created_at"
)
SELECT_SESSION_ID = (
    "SELECT id FROM sessions WHERE agent_id = ? AND channel = ? AND account_id = ? "
    "AND peer_kind = ? AND peer_id = ?"
)
SELECT_NEWEST = (
    "SELECT id, session_id, role, content, tool_calls, created_at FROM messages "
    "WHERE session_id = ? ORDER BY id DESC LIMIT ?"
)

MessageRow = tuple[int, int, str, str, list[Any] | None, datetime]


@dataclass(frozen=True)
class Stats:
    """Timings of one contender in one scenario, in microseconds per operation."""

    count: int
    median_us: float
    p90_us: float

    @property
    def ops_per_s(self) -> float:
        return 1_000_000 / self.median_us

    def as_json(self) -> dict[str, float]:
        return {
            "count": self.count,
            "median_us": round(self.median_us, 3),
            "p90_us": round(self.p90_us, 3),
            "ops_per_s": round(self.ops_per_s, 1),
        }


@dataclass(frozen=True)
class Result:
    """One scenario: the floor against our repository."""

    scenario: str
    floor: Stats
    ours: Stats

    @property
    def throughput_ratio(self) -> float:
        return self.floor.median_us / self.ours.median_us


# --- the floor: plain sqlite3 ---------------------------------------------------------


def connect_floor(path: Path) -> sqlite3.Connection:
    """A connection set up as `open_database` sets up each of its pooled connections."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = NORMAL")
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RuntimeError(f"{path}: expected WAL mode, found {mode!r}")
    return conn


@contextmanager
def floor_transaction(conn: sqlite3.Connection, begin: str) -> Iterator[sqlite3.Connection]:
    conn.execute(begin)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def encode_json(value: list[Any] | None) -> str | None:
    # The same compact form our JSON column writes, so both sides store the same bytes.
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def decode_message(row: tuple[Any, ...]) -> MessageRow:
    message_id, session_id, role, content, tool_calls, created_at = row
    return (
        message_id,
        session_id,
        role,
        content,
        None if tool_calls is None else json.loads(tool_calls),
        datetime.fromisoformat(created_at),
    )


def floor_append(
    conn: sqlite3.Connection, role: str, content: str, tool_calls: list[Any] | None
) -> MessageRow:
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    with floor_transaction(conn, "BEGIN IMMEDIATE"):
        found = conn.execute(UPDATE_SESSION, (1, TOKENS_PER_APPEND, now, *KEY.parts())).fetchone()
        if found is None:
            raise LookupError(f"no session for key {KEY}")
        row = conn.execute(
            INSERT_MESSAGE_RETURNING, (found[0], role, content, encode_json(tool_calls), now)
        ).fetchone()
    return decode_message(row)


def floor_history(conn: sqlite3.Connection) -> list[MessageRow]:
    with floor_transaction(conn, "BEGIN"):
        found = conn.execute(SELECT_SESSION_ID, KEY.parts()).fetchone()
        if found is None:
            raise LookupError(f"no session for key {KEY}")
        rows = conn.execute(SELECT_NEWEST, (found[0], HISTORY_LIMIT)).fetchall()
    messages = [decode_message(row) for row in rows]
    messages.reverse()
    return messages


# --- measuring ------------------------------------------------------------------------


def measure(operation: Callable[[int], object], count: int, warmup: int) -> Stats:
    """Time `count` calls of `operation(i)` one by one, after `warmup` untimed calls that
    fill statement caches and the pool, so that first-call costs do not skew the tail."""
    for i in range(warmup):
        operation(i)
    # Collect now so that garbage from setup is not charged to the timed calls.
    gc.collect()
    samples: list[int] = []
    for i in range(warmup, warmup + count):
        start = time.perf_counter_ns()
        operation(i)
        samples.append(time.perf_counter_ns() - start)
    micros = [sample / 1000 for sample in samples]
    return Stats(
        count=count,
        median_us=statistics.median(micros),
        p90_us=statistics.quantiles(micros, n=10, method="inclusive")[-1],
    )


@contextmanager
def fresh_database(folder: Path, name: str) -> Iterator[tuple[Path, SessionRepository]]:
    """A new store holding one empty session for `KEY`, created through our API so that
    both contenders see the schema, pragmas and WAL mode of a real store."""
    path = folder / f"{name}.db"
    engine = open_database(path)
    try:
        repository = SessionRepository(engine)
        repository.get_or_create(KEY)
        yield path, repository
    finally:
        engine.dispose()


def spec(i: int) -> MessageSpec:
    return CONVERSATION[i % len(CONVERSATION)]


def bench_append(folder: Path, count: int) -> Result:
    warmup = max(1, count // 20)

    # Each contender appends to its own empty store, so neither pays for the other's rows.
    with fresh_database(folder, "append-floor") as (path, _):
        conn = connect_floor(path)
        try:
            floor = measure(lambda i: floor_append(conn, *spec(i)), count, warmup)
            check_floor_appended(conn, count + warmup)
        finally:
            conn.close()

    with fresh_database(folder, "append-ours") as (_, repository):

        def append(i: int) -> object:
            role, content, tool_calls = spec(i)
            return repository.append_message(
                KEY, role, content, tool_calls=tool_calls, tokens=TOKENS_PER_APPEND
            )

        ours = measure(append, count, warmup)
        check_appended(repository, count + warmup)
    return Result("append", floor, ours)


def check_floor_appended(conn: sqlite3.Connection, expected: int) -> None:
    found = conn.execute(
        "SELECT message_count, (SELECT count(*) FROM messages) FROM sessions"
    ).fetchall()
    if found != [(expected, expected)]:
        raise RuntimeError(f"append floor: expected {expected} messages, found {found!r}")


def check_appended(repository: SessionRepository, expected: int) -> None:
    session = repository.get(KEY)
    if session is None or session.message_count != expected:
        raise RuntimeError(f"append: expected {expected} messages, found {session!r}")


def fill_history(path: Path, size: int) -> None:
    """Insert `size` messages in one transaction; setup, not measured, so it may be fast."""
    start = datetime.now(UTC) - timedelta(days=1)
    rows = [
        (
            role,
            content,
            encode_json(tool_calls),
            (start + timedelta(milliseconds=i)).isoformat(timespec="microseconds"),
        )
        for i, (role, content, tool_calls) in enumerate(map(spec, range(size)))
    ]
    conn = connect_floor(path)
    try:
        with floor_transaction(conn, "BEGIN IMMEDIATE"):
            (session_id,) = conn.execute(SELECT_SESSION_ID, KEY.parts()).fetchone()
            conn.executemany(INSERT_MESSAGE, [(session_id, *row) for row in rows])
            # Keep the session's counter true to its rows, as appends would have.
            conn.execute("UPDATE sessions SET message_count = ? WHERE id = ?", (size, session_id))
    finally:
        conn.close()


def bench_history(folder: Path, repeats: int) -> Result:
    warmup = max(1, repeats // 20)

    # Reads change nothing, so both contenders read the same store and must agree.
    with fresh_database(folder, "history") as (path, repository):
        fill_history(path, HISTORY_SIZE)
        conn = connect_floor(path)
        try:
            check_same_history(floor_history(conn), repository)
            floor = measure(lambda _: floor_history(conn), repeats, warmup)
        finally:
            conn.close()
        ours = measure(lambda _: repository.get_history(KEY, limit=HISTORY_LIMIT), repeats, warmup)
    return Result("history", floor, ours)


def check_same_history(floor: list[MessageRow], repository: SessionRepository) -> None:
    ours = [
        (m.id, m.session_id, m.role.value, m.content, m.tool_calls, m.created_at)
        for m in repository.get_history(KEY, limit=HISTORY_LIMIT)
    ]
    if len(floor) != HISTORY_LIMIT or floor != ours:
        raise RuntimeError("history: the floor and our repository read different messages")


# --- reporting ------------------------------------------------------------------------


def read_scale() -> float:
    raw = os.environ.get(SCALE_ENV, "1.0")
    try:
        scale = float(raw)
    except ValueError:
        raise SystemExit(f"{SCALE_ENV}: must be a number, got {raw!r}") from None
    if not math.isfinite(scale) or scale <= 0:
        raise SystemExit(f"{SCALE_ENV}: must be a positive number, got {raw!r}")
    return scale


def scaled(count: int, scale: float) -> int:
    # Enough samples for a median and a p90 to mean something even at tiny scales.
    return max(MIN_REPEATS, round(count * scale))


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "packages": {
            name: metadata.version(name)
            for name in ("aisopod-session", "sqlalchemy", "sqlmodel", "pydantic")
        },
    }


def format_table(results: list[Result]) -> str:
    header = (
        f"{'scenario':<10}{'floor µs/op':>13}{'ours µs/op':>13}"
        f"{'floor ops/s':>13}{'ours ops/s':>13}{'ours/floor throughput':>24}"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"{r.scenario:<10}{r.floor.median_us:>13.1f}{r.ours.median_us:>13.1f}"
            f"{r.floor.ops_per_s:>13,.0f}{r.ours.ops_per_s:>13,.0f}"
            f"{r.throughput_ratio:>23.2f}\N{MULTIPLICATION SIGN}"
        )
    return "\n".join(lines)


def write_results(results: list[Result], scale: float) -> None:
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "scale": scale,
        "settings": {
            "history_size": HISTORY_SIZE,
            "history_limit": HISTORY_LIMIT,
            "tokens_per_append": TOKENS_PER_APPEND,
        },
        "scenarios": {
            r.scenario: {
                "floor": r.floor.as_json(),
                "ours": r.ours.as_json(),
                "ours_over_floor_throughput": round(r.throughput_ratio, 4),
            }
            for r in results
        },
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    scale = read_scale()
    with tempfile.TemporaryDirectory(prefix="aisopod-bench-") as tmp:
        folder = Path(tmp)
        results = [
            bench_append(folder, scaled(APPEND_COUNT, scale)),
            bench_history(folder, scaled(HISTORY_REPEATS, scale)),
        ]
    write_results(results, scale)
    print(format_table(results))
    print(
        f"Medians on this machine (scale {scale:g}); targets come in a later issue. "
        f"Raw results: {RESULTS_PATH}"
    )


if __name__ == "__main__":
    main()
