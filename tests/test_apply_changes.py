"""Several changes in one write transaction (`apply_changes`), several sessions in one
read (`get_many`) and one chat account's sessions in key order (`list_sessions(...,
order="key")`): what is written, what is returned, that a refusal or a failing check
writes nothing, and that concurrent writers guarded by a check never both win."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from aisopod_session import (
    AccessDeniedError,
    NewMessage,
    Role,
    SessionExistsError,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
)
from aisopod_session.statements import SQLITE, list_sessions
from tests.dbtools import snapshot

KEY = SessionKey("agent-1", "adk", "app:alice", "thread", "s1")
SHARED = SessionKey("agent-1", "adk-state", "app:", "dm", "user:alice")
APP = SessionKey("agent-1", "adk-state", "app:", "channel", "app")
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def test_create_with_meta_and_related_sessions_in_one_call(repo: SessionRepository) -> None:
    with freeze_time(START):
        result = repo.apply_changes(
            KEY, create=True, meta={"topic": "x"}, related_meta={SHARED: {"lang": "nb"}}
        )
    assert result.session.key == KEY
    assert result.session.meta == {"topic": "x"}
    assert result.session.created_at == result.session.updated_at == START
    assert result.messages == []
    assert result.related[SHARED].meta == {"lang": "nb"}
    assert repo.get(SHARED) == result.related[SHARED]
    assert repo.get(KEY) == result.session


def test_messages_meta_and_related_changes_are_merged_and_appended(
    repo: SessionRepository,
) -> None:
    repo.apply_changes(KEY, create=True, meta={"a": 1, "b": 1}, related_meta={SHARED: {"x": 1}})
    with freeze_time(START + timedelta(minutes=1)):
        result = repo.apply_changes(
            KEY,
            messages=[
                NewMessage("user", [{"text": "hi"}], meta={"n": 1}),
                {"role": "assistant", "content": "yo"},
            ],
            meta={"b": 2, "c": None},
            related_meta={SHARED: {"y": 2}, APP: {"z": 3}},
        )
    assert result.session.meta == {"a": 1, "b": 2, "c": None}
    assert result.session.message_count == 2
    assert result.session.updated_at == START + timedelta(minutes=1)
    assert [(m.role, m.content, m.meta) for m in result.messages] == [
        (Role.USER, [{"text": "hi"}], {"n": 1}),
        (Role.ASSISTANT, "yo", {}),
    ]
    assert repo.get_history(KEY) == result.messages
    assert result.related[SHARED].meta == {"x": 1, "y": 2}
    assert result.related[APP].meta == {"z": 3}
    assert result.related[APP].message_count == 0


def test_a_failing_check_sees_the_metadata_and_writes_nothing(
    repo: SessionRepository, store: Engine
) -> None:
    repo.apply_changes(KEY, create=True, meta={"version": 3})
    before = snapshot(store)
    seen: list[Any] = []

    def stale(meta: Any) -> None:
        seen.append(dict(meta))
        raise LookupError("changed since read")

    with pytest.raises(LookupError, match="changed since read"):
        repo.apply_changes(
            KEY,
            messages=[NewMessage("user", "x")],
            meta={"version": 4},
            related_meta={SHARED: {"y": 1}},
            check=stale,
        )
    assert seen == [{"version": 3}]
    assert snapshot(store) == before


def test_refusals_name_the_argument_and_write_nothing(
    repo: SessionRepository, store: Engine
) -> None:
    repo.apply_changes(KEY, create=True)
    before = snapshot(store)
    with pytest.raises(SessionExistsError):
        repo.apply_changes(KEY, create=True, related_meta={SHARED: {"y": 1}})
    with pytest.raises(SessionNotFoundError):
        repo.apply_changes(
            SessionKey("agent-1", "adk", "app:bob", "thread", "s9"),
            meta={"a": 1},
            related_meta={SHARED: {"y": 1}},
        )
    bad: list[tuple[dict[str, Any], str]] = [
        ({"meta": {1: "x"}}, "meta"),
        ({"meta": "x"}, "meta"),
        ({"related_meta": {SHARED: {"y": float("nan")}}}, "related_meta"),
        ({"related_meta": {KEY: {"y": 1}}}, "related_meta"),
        ({"related_meta": [SHARED]}, "related_meta"),
        ({"related_meta": {"not a key": {}}}, "key"),
        ({"messages": [NewMessage("user", "ok"), {"role": "nobody"}]}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"check": 3}, "check"),
        ({"check": _async_check}, "check: .*coroutine or generator function"),
        ({"check": lambda meta: _async_check(meta)}, "check: returned an awaitable"),
        ({"check": lambda meta: (n for n in [meta])}, "check: returned an awaitable or a gen"),
    ]
    for arguments, field in bad:
        with pytest.raises(ValueError, match=field):
            repo.apply_changes(KEY, **{"meta": {"changed": True}, **arguments})
    assert snapshot(store) == before


async def _async_check(meta: Any) -> None:
    raise LookupError("changed since read")


def test_a_confined_repository_refuses_related_keys_of_another_agent(
    repo: SessionRepository,
) -> None:
    confined = repo.for_agent("agent-1")
    confined.apply_changes(KEY, create=True, related_meta={SHARED: {}})
    with pytest.raises(AccessDeniedError):
        confined.apply_changes(
            KEY, related_meta={SessionKey("agent-2", "adk-state", "a:", "dm", "u"): {"x": 1}}
        )
    with pytest.raises(AccessDeniedError):
        confined.get_many([KEY, SessionKey("agent-2", "adk", "a:u", "thread", "s")])


def test_get_many_returns_the_sessions_in_the_order_asked(repo: SessionRepository) -> None:
    repo.apply_changes(KEY, create=True, meta={"k": 1}, related_meta={SHARED: {"s": 1}})
    missing = SessionKey("agent-1", "adk", "app:alice", "thread", "nope")
    found = repo.get_many([SHARED, missing, KEY, str(SHARED)])
    assert [None if s is None else s.meta for s in found] == [{"s": 1}, None, {"k": 1}, {"s": 1}]
    assert repo.get_many([]) == []
    with pytest.raises(ValueError, match="keys"):
        repo.get_many(KEY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys"):
        repo.get_many([KEY] * 101)


def test_concurrent_writers_checking_a_version_never_both_win(
    repo: SessionRepository,
) -> None:
    """The check runs under the write lock: of writers that all read version 0, one
    writes version 1 and every other is refused, on both databases."""
    repo.apply_changes(KEY, create=True, meta={"version": 0})
    results: list[str] = []
    barrier = threading.Barrier(4)

    def write(name: str) -> None:
        def unchanged(meta: Any) -> None:
            if meta["version"] != 0:
                raise LookupError("stale")

        barrier.wait()
        try:
            repo.apply_changes(
                KEY,
                messages=[NewMessage("user", name)],
                meta={"version": 1, "by": name},
                related_meta={SHARED: {"last": name}},
                check=unchanged,
            )
            results.append(name)
        except LookupError:
            pass

    threads = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 1
    session = repo.get(KEY)
    assert session is not None
    assert session.meta == {"version": 1, "by": results[0]}
    assert [m.content for m in repo.get_history(KEY)] == results
    shared = repo.get(SHARED)
    assert shared is not None
    assert shared.meta == {"last": results[0]}


def test_list_sessions_in_key_order_reads_one_account_on_the_key_index(
    repo: SessionRepository,
) -> None:
    account = {"agent_id": "agent-1", "channel": "adk", "account_id": "app:alice"}
    for peer in ["s3", "s1", "s2"]:
        repo.get_or_create(SessionKey("agent-1", "adk", "app:alice", "thread", peer))
    repo.get_or_create(SessionKey("agent-1", "adk", "app:bob", "thread", "s0"))
    repo.get_or_create(SessionKey("agent-1", "adk", "app:alice", "dm", "s9"))
    by_key = repo.list_sessions(account, order="key")
    assert [(s.peer_kind, s.peer_id) for s in by_key] == [
        ("dm", "s9"),
        ("thread", "s1"),
        ("thread", "s2"),
        ("thread", "s3"),
    ]
    assert [s.peer_id for s in repo.list_sessions(account, order="key", limit=2, offset=1)] == [
        "s1",
        "s2",
    ]
    newest_first = repo.list_sessions(account)
    assert [s.peer_id for s in newest_first] == ["s9", "s2", "s1", "s3"]
    with pytest.raises(ValueError, match="order"):
        repo.list_sessions(account, order="random")


def test_the_sqlite_key_order_query_reads_the_key_index_without_sorting(
    engine: Engine, db_path: Path
) -> None:
    """Without `ANALYZE` statistics SQLite would read `idx_sessions_agent_updated` for a
    newest-first list and filter the whole agent's sessions; in key order it reads only
    the account's range of the key's index."""
    fields = ("agent_id", "channel", "account_id")
    sql = list_sessions(fields, count=False, by_key=True).on(SQLITE)
    conn = sqlite3.connect(db_path)
    try:
        plan = " | ".join(
            row[3]
            for row in conn.execute(f"EXPLAIN QUERY PLAN {sql.text}", [None] * len(sql.names))
        )
    finally:
        conn.close()
    assert "sqlite_autoindex_sessions_1 (agent_id=? AND channel=? AND account_id=?)" in plan
    assert "TEMP B-TREE" not in plan, plan
