"""Scenario 9 of `make bench`: find, branch and page (`page_sessions`, `search_messages`,
`fork`), each against the baseline a user would otherwise have.

- pages: `page_sessions` for one agent of 10, page of 50: the first page and page 1 000
  in a store of 10⁶ sessions against the first page in a store of 10³; and at 10⁵
  sessions against schema 3's `list_sessions` (the same query without migration 4's
  `(agent_id, updated_at, id)` index: what a store had before);
- search: `search_messages` top 20 in a store of 10⁶ messages (twenty words each, drawn
  uniformly from a vocabulary of 5 000, in 1 000 sessions), for two-word queries (about
  16 messages hold both words) and one-word queries (about 4 000 hold the word), against
  `LIKE '%word%'`
  on the content (newest 20 first), the scan a user would write; on PostgreSQL too when
  `AISOPOD_BENCH_POSTGRES_URL` names a server (in a schema of its own);
- fork: of a session of 10 000 messages, against the floor: plain SQL in one
  transaction (the session's INSERT, the messages' `INSERT … SELECT`, the count);
- plans: `EXPLAIN QUERY PLAN` (PostgreSQL: `EXPLAIN`) of each new hot query.

Sizes scale with `AISOPOD_BENCH_SCALE` like every scenario (never below 1 000).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from aisopod_session import SessionKey, SessionRepository, open_database
from aisopod_session.statements import SEARCH_QUERY, SQLITE, fts_query, page_sessions, search
from benchmarks import floor
from benchmarks.bench import LIMIT, Stats, fill_sessions, measure, store

POSTGRES_ENV = "AISOPOD_BENCH_POSTGRES_URL"
AGENTS = 10
HITS = 20
VOCABULARY = 5000
WORDS = 20
SESSIONS_OF_MESSAGES = 1000
DEEP_PAGE = 1000


def texts(count: int, seed: int = 16) -> Iterator[str]:
    """`count` messages' JSON content: `WORDS` words each, drawn uniformly from the
    vocabulary (so a word is in about 0.4 % of messages, two given words together in
    about 0.0016 %), the same for every run."""
    chooser = random.Random(seed)
    vocabulary = [f"w{number}" for number in range(VOCABULARY)]
    for _ in range(count):
        yield json.dumps(" ".join(chooser.choices(vocabulary, k=WORDS)))


def fill_texts(engine: Engine, messages: int) -> float:
    """`messages` messages in `SESSIONS_OF_MESSAGES` sessions of agents `agent-<i % 10>`,
    inserted with plain SQL in batches of 10 000 (the database keeping the search index
    as it goes); the seconds it took."""
    marker = "%s" if engine.dialect.name == "postgresql" else "?"
    stamp = "2026-11-30T00:00:00.000000+00:00"
    started = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("BEGIN IMMEDIATE")  # the store's connections run in autocommit
        cursor.executemany(
            "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
            f"created_at, updated_at, message_count) VALUES ({marker}, 'telegram', 'bot', "
            f"'dm', {marker}, {marker}, {marker}, {marker})",
            [
                (f"agent-{n % AGENTS}", f"peer-{n}", stamp, stamp, messages // SESSIONS_OF_MESSAGES)
                for n in range(1, SESSIONS_OF_MESSAGES + 1)
            ],
        )
        batch: list[tuple[int, str, str]] = []
        for number, content in enumerate(texts(messages)):
            batch.append((1 + number % SESSIONS_OF_MESSAGES, content, stamp))
            if len(batch) == 10_000 or number == messages - 1:
                cursor.executemany(
                    "INSERT INTO messages (session_id, role, content, created_at) "
                    f"VALUES ({marker}, 'user', {marker}, {marker})",
                    batch,
                )
                batch = []
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - started


def queries(count: int, words: int, seed: int) -> list[str]:
    chooser = random.Random(seed)
    return [
        " ".join(f"w{chooser.randrange(VOCABULARY)}" for _ in range(words)) for _ in range(count)
    ]


class Find:
    """Scenario 9's measurements (see the module's docstring)."""

    def __init__(self, folder: Path, size: Callable[[int], int], count: Callable[..., int]):
        self.folder = folder
        self.size = size
        self.count = count
        self.results: dict[str, Any] = {"stats": {}, "figures": {}, "plans": {}}

    def stat(self, name: str, stats: Stats) -> None:
        self.results["stats"][name] = stats

    def run(self) -> dict[str, Any]:
        self.pages()
        self.search_sqlite()
        self.fork()
        from benchmarks.postgresql import unanswered

        url = os.environ.get(POSTGRES_ENV)
        why = f"not measured: set {POSTGRES_ENV}" if not url else unanswered(url)
        if url and why is None:
            self.search_postgresql(url)
        else:
            self.results["figures"]["postgresql"] = why
        return self.results

    # --- pages --------------------------------------------------------------------------

    def pages(self) -> None:
        small, middle, large = 1000, self.size(100_000), self.size(1_000_000)
        count = self.count(300)
        agent = {"agent_id": "agent-3"}
        for name, sessions in (("small", small), ("large", large)):
            with store(self.folder, f"s9-pages-{name}") as (path, repository):
                fill_sessions(path, sessions, AGENTS)
                self.stat(
                    f"page_sessions, first page, {sessions:,} sessions",
                    measure(lambda _: repository.page_sessions(agent, limit=LIMIT), count),
                )
                if name == "large":
                    deep, reached = deep_cursor(repository, agent, DEEP_PAGE)

                    def deep_page(_: int, deep: str | None = deep) -> Any:
                        return repository.page_sessions(agent, limit=LIMIT, cursor=deep)

                    self.stat(
                        f"page_sessions, page {reached:,}, {sessions:,} sessions",
                        measure(deep_page, count),
                    )
                    self.results["plans"].update(sqlite_page_plans(path))
        with store(self.folder, "s9-pages-baseline") as (path, repository):
            fill_sessions(path, middle, AGENTS)
            self.stat(
                f"page_sessions, first page, {middle:,} sessions",
                measure(lambda _: repository.page_sessions(agent, limit=LIMIT), count),
            )
            conn = floor.connect(path)
            conn.execute("DROP INDEX idx_sessions_agent_updated")  # schema 3's indexes
            conn.close()
            self.stat(
                f"schema 3's list_sessions, first page, {middle:,} sessions",
                measure(lambda _: repository.list_sessions(agent, limit=LIMIT), self.count(30)),
            )

    # --- search -------------------------------------------------------------------------

    def search_sqlite(self) -> None:
        messages = self.size(1_000_000)
        path = self.folder / "s9-search.db"
        engine = open_database(path)
        try:
            self.results["figures"]["sqlite fill seconds"] = round(fill_texts(engine, messages), 1)
            repository = SessionRepository(engine)
            self.measure_search(repository, "SQLite", messages)
            conn = floor.connect(path)
            pairs = queries(self.count(10, 3), 2, seed=9)
            self.stat(
                f"SQLite LIKE '%word%' scan, two words, {messages:,} messages",
                measure(lambda i: like_scan(conn, pairs[i % len(pairs)]), self.count(10, 3), 1),
            )
            self.results["plans"].update(sqlite_search_plans(conn))
            conn.close()
        finally:
            engine.dispose()

    def measure_search(self, repository: SessionRepository, backend: str, messages: int) -> None:
        count = self.count(200)
        for words, label in ((2, "two words"), (1, "one word")):
            asked = queries(count + 20, words, seed=words)

            def one_search(i: int, asked: list[str] = asked) -> Any:
                return repository.search_messages(asked[i], limit=HITS)

            self.stat(
                f"{backend} search_messages top {HITS}, {label}, {messages:,} messages",
                measure(one_search, count, 10),
            )

    def search_postgresql(self, server_url: str) -> None:
        from benchmarks.postgresql import Server

        with Server(server_url).schema("search") as url:
            self._search_postgresql(url)

    def _search_postgresql(self, url: str) -> None:
        """In a schema of its own (made and dropped by `postgresql.Server`), so that
        nothing else on the server is touched."""
        messages = self.size(1_000_000)
        engine = open_database(url)
        try:
            seconds = fill_texts(engine, messages)
            self.results["figures"]["postgresql fill seconds"] = round(seconds, 1)
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE messages")
                conn.exec_driver_sql("ANALYZE sessions")
            repository = SessionRepository(engine)
            self.measure_search(repository, "PostgreSQL", messages)
            self.results["plans"].update(postgresql_plans(engine))
        finally:
            engine.dispose()

    # --- fork ---------------------------------------------------------------------------

    def fork(self) -> None:
        messages = self.size(10_000)
        count = self.count(20, 5)
        with store(self.folder, "s9-fork") as (path, repository):
            source = SessionKey("bench", "cli", "local", "dm", "user-1")
            conn = floor.connect(path)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO messages (session_id, role, content, created_at) "
                "VALUES (1, 'user', ?, '2026-11-30T00:00:00.000000+00:00')",
                ((content,) for content in texts(messages)),
            )
            conn.execute("UPDATE sessions SET message_count = ? WHERE id = 1", (messages,))
            conn.execute("COMMIT")
            self.stat(
                f"fork of {messages:,} messages, ours",
                measure(lambda i: repository.fork(source, branch("ours", i)), count, 1),
            )
            self.stat(
                f"fork of {messages:,} messages, floor",
                measure(lambda i: floor_fork(conn, branch("floor", i)), count, 1),
            )
            conn.close()


def branch(who: str, number: int) -> SessionKey:
    return SessionKey("bench", "cli", "local", "dm", f"{who}-branch-{number}")


def floor_fork(conn: Any, key: SessionKey) -> None:
    """A fork in plain SQL: the new session, its messages copied, its count."""
    conn.execute("BEGIN IMMEDIATE")
    now = "2026-11-30T12:00:00.000000+00:00"
    new_id = conn.execute(
        "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, created_at, "
        "updated_at, parent_id) VALUES (?, ?, ?, ?, ?, ?, ?, 1) RETURNING id",
        (*key.parts(), now, now),
    ).fetchone()[0]
    copied = conn.execute(
        "INSERT INTO messages (session_id, role, content, tool_calls, created_at, metadata) "
        "SELECT ?, role, content, tool_calls, created_at, metadata FROM messages "
        "WHERE session_id = 1 ORDER BY id",
        (new_id,),
    ).rowcount
    conn.execute("UPDATE sessions SET message_count = ? WHERE id = ?", (copied, new_id))
    conn.execute("COMMIT")


def deep_cursor(
    repository: SessionRepository, agent: dict[str, str], page: int
) -> tuple[str | None, int]:
    """The cursor of page `page` (or of the last page there is) and that page's number."""
    cursor = None
    reached = 1
    while reached < page:
        found = repository.page_sessions(agent, limit=LIMIT, cursor=cursor)
        if found.next_cursor is None:
            break
        cursor, reached = found.next_cursor, reached + 1
    return cursor, reached


def like_scan(conn: Any, words: str) -> list[Any]:
    """The messages holding every word, newest 20 first, found by `LIKE`: each word
    between spaces (the content is a JSON string of words), so the same messages as the
    search finds (`LIKE '%w12%'` alone would also match `w120`)."""
    clauses = " AND ".join("(' ' || trim(content, '\"') || ' ') LIKE ?" for _ in words.split())
    rows: list[Any] = conn.execute(
        f"SELECT id, content FROM messages WHERE {clauses} ORDER BY id DESC LIMIT {HITS}",
        [f"% {word} %" for word in words.split()],
    ).fetchall()
    return rows


def sqlite_page_plans(path: Path) -> dict[str, list[str]]:
    conn = floor.connect(path)
    try:
        return {
            f"page_sessions({name})": explain(conn, page_sessions(fields, after=True).on(SQLITE))
            for name, fields in (("agent_id=..., cursor=...", ("agent_id",)), ("cursor=...", ()))
        }
    finally:
        conn.close()


def sqlite_search_plans(conn: Any) -> dict[str, list[str]]:
    return {
        f"search_messages({name})": explain(conn, search(fields, 0).on(SQLITE))
        for name, fields in (("query", ()), ("query, agent_id=...", ("agent_id",)))
    }


def explain(conn: Any, sql: Any) -> list[str]:
    values = dict.fromkeys(sql.names)
    values["query"] = fts_query(["w1"])
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql.text}", sql.bind(values))]


def postgresql_plans(engine: Engine) -> dict[str, list[str]]:
    """EXPLAIN of PostgreSQL's search and page queries, with the parameters given."""
    from aisopod_session.statements import driver_dialect

    dialect = driver_dialect(engine.dialect)
    plans: dict[str, list[str]] = {}
    shapes: dict[str, tuple[Any, dict[str, Any]]] = {
        "PostgreSQL search_messages(query)": (search((), 0).on(dialect), {"tsquery": None}),
        "PostgreSQL page_sessions(agent_id=..., cursor=...)": (
            page_sessions(("agent_id",), after=True).on(dialect),
            {
                "agent_id": "agent-3",
                "cursor_updated_at": "2026-11-30T00:00:00.000000+00:00",
                "cursor_id": 500,
            },
        ),
    }
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # The search's query, as `search_messages` makes it first.
        made = SEARCH_QUERY.on(dialect)
        cursor.execute(made.text, made.bind({"terms": ["w1", "w2"], "long": False}))
        query, _ = cursor.fetchall()[0]  # the query, and whether a term is too long
        shapes["PostgreSQL search_messages(query)"][1]["tsquery"] = query
        for name, (sql, values) in shapes.items():
            bound = {"limit": HITS, **values}
            cursor.execute(f"EXPLAIN {sql.text}", sql.bind(bound))
            plans[name] = [row[0] for row in cursor.fetchall()]
    finally:
        raw.close()
    return plans
