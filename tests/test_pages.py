"""Cursor pages (`page_sessions`) and metadata filters (`SessionFilter.meta`): pages that
walk `list_sessions`' order exactly, cursors refused when altered or reused with another
filter, and metadata conditions in every call that takes a filter."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from aisopod_session import (
    Role,
    SessionFilter,
    SessionKey,
    SessionRepository,
    SessionStatus,
    export_jsonl,
)
from tests.dbtools import before_io, no_statements, run_sql

START = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def key(agent: str, peer: str, channel: str = "telegram") -> SessionKey:
    return SessionKey(agent, channel, "bot-A", "dm", peer)


def sessions(repo: SessionRepository) -> None:
    """23 sessions of two agents, several updated at the very same microsecond (ties)."""
    with freeze_time(START) as clock:
        for index in range(23):
            if index % 3:
                clock.tick(timedelta(seconds=1))
            agent = "agent-1" if index % 4 else "agent-2"
            repo.get_or_create(
                key(agent, f"peer-{index:02d}", "slack" if index % 5 else "telegram")
            )


def walk(repo: SessionRepository, filter: Any = None, limit: int = 5) -> list[int | None]:
    page = repo.page_sessions(filter, limit=limit)
    seen = [session.id for session in page.sessions]
    while page.next_cursor is not None:
        assert len(page.sessions) == limit
        page = repo.page_sessions(filter, limit=limit, cursor=page.next_cursor)
        seen += [session.id for session in page.sessions]
    return seen


@pytest.mark.parametrize(
    "filter",
    [
        None,
        {"agent_id": "agent-1"},
        {"channel": "slack"},
        {"agent_id": "agent-2", "channel": "slack"},
    ],
)
def test_pages_walk_list_sessions_order_exactly_ties_included(
    repo: SessionRepository, filter: Any
) -> None:
    sessions(repo)
    everything = [session.id for session in repo.list_sessions(filter, limit=1000)]
    for limit in (1, 2, 5, 7, 100):
        assert walk(repo, filter, limit) == everything, limit
    last = repo.page_sessions(filter, limit=len(everything))
    assert last.next_cursor is None  # exactly one page: no empty page after it


def test_a_confined_repository_pages_its_own_agent(repo: SessionRepository) -> None:
    sessions(repo)
    mine = repo.for_agent("agent-2")
    assert walk(mine, None, 2) == [s.id for s in repo.list_sessions({"agent_id": "agent-2"})]
    assert walk(mine, {"agent_id": "agent-1"}, 2) == []


def test_a_session_updated_while_paging_is_neither_seen_twice_nor_skipped_unchanged(
    repo: SessionRepository,
) -> None:
    sessions(repo)
    first = repo.page_sessions(limit=10)
    assert first.next_cursor is not None
    moved = first.sessions[0].key
    repo.append_message(moved, Role.USER, "back to the front")
    rest = walk_from(repo, first.next_cursor, 10)
    seen = [s.id for s in first.sessions] + rest
    assert len(seen) == len(set(seen)) == 23


def walk_from(repo: SessionRepository, cursor: str | None, limit: int) -> list[int | None]:
    seen: list[int | None] = []
    while cursor is not None:
        page = repo.page_sessions(limit=limit, cursor=cursor)
        seen += [session.id for session in page.sessions]
        cursor = page.next_cursor
    return seen


def altered(cursor: str) -> list[str]:
    """The cursor changed as a user or a proxy might: a character flipped, cut short,
    its JSON re-encoded with another id (a valid base64 string without its checksum)."""
    flipped = cursor[:-3] + ("A" if cursor[-3] != "A" else "B") + cursor[-2:]
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    body = json.loads(raw[12:])
    body[3] += 1
    forged = base64.urlsafe_b64encode((raw[:12] + json.dumps(body)).encode()).decode()
    return [flipped, cursor[:-4], cursor + "x", forged, "", "not-a-cursor", "🦀", "A" * 5000]


def test_an_altered_cursor_or_one_from_another_filter_is_refused_naming_it(
    repo: SessionRepository,
) -> None:
    sessions(repo)
    cursor = repo.page_sessions({"agent_id": "agent-1"}, limit=3).next_cursor
    assert cursor is not None
    for bad in altered(cursor):
        with pytest.raises(ValueError, match="cursor"):
            repo.page_sessions({"agent_id": "agent-1"}, limit=3, cursor=bad)
    for other in (None, {"agent_id": "agent-2"}, {"agent_id": "agent-1", "status": "active"}):
        with pytest.raises(ValueError, match="cursor: it belongs to a page with another filter"):
            repo.page_sessions(other, limit=3, cursor=cursor)
    with pytest.raises(ValueError, match="cursor"):
        repo.for_agent("agent-1").page_sessions({"agent_id": "agent-1"}, cursor=cursor)
    # Another page size is the same filter: the cursor goes on.
    assert repo.page_sessions({"agent_id": "agent-1"}, limit=50, cursor=cursor).sessions


@before_io
@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "5"}, "limit"),
        ({"cursor": 5}, "cursor"),
        ({"cursor": b"abc"}, "cursor"),
        ({"filter": {"meta": ["title"]}}, "meta"),
        ({"filter": {"meta": {1: "x"}}}, "meta"),
        ({"filter": {"meta": {"x": {1, 2}}}}, "meta"),
        ({"filter": {"meta": {"x": 2**70}}}, "meta"),
        ({"filter": {"meta": {"x": "a\x00"}}}, "meta"),
        ({"filter": {"meta": {"x\x00": 1}}}, "meta"),
    ],
)
def test_bad_page_arguments_are_refused_naming_the_field_before_any_io(
    repo: SessionRepository, arguments: dict[str, Any], field: str
) -> None:
    with no_statements(), pytest.raises(ValueError, match=field):
        repo.page_sessions(**arguments)


def test_the_sqlite_page_query_reads_the_agent_index_without_sorting(
    engine: Engine, db_path: Path
) -> None:
    from aisopod_session.statements import SQLITE, page_sessions

    conn = sqlite3.connect(db_path)
    try:
        for fields, index in (
            (("agent_scope",), "idx_sessions_agent_updated"),
            ((), "idx_sessions_updated_at"),
        ):
            for after in (False, True):
                sql = page_sessions(fields, after=after).on(SQLITE)
                plan = " | ".join(
                    row[3]
                    for row in conn.execute(
                        f"EXPLAIN QUERY PLAN {sql.text}", [None] * len(sql.names)
                    )
                )
                assert index in plan, plan
                assert "TEMP B-TREE" not in plan, plan
    finally:
        conn.close()


# --- metadata filters ------------------------------------------------------------------------

META = {
    "oslo": {"title": "Oslo trip", "tags": ["vip"], "n": 3, "ok": True, "o": {"a": 1}},
    "bergen": {"title": "Bergen", "tags": ["vip", "new"], "n": 3.5, "ok": False, "x": None},
    "plain": {},
}


def tagged(repo: SessionRepository) -> dict[str, int | None]:
    found = {}
    for name, meta in META.items():
        session = repo.get_or_create(key("agent-1", name))
        repo.append_message(session.key, Role.USER, f"hello from {name}")
        found[name] = repo.update_metadata(session.key, meta).id
    return found


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"title": "Oslo trip"}, ["oslo"]),
        ({"title": "oslo trip"}, []),
        ({"tags": ["vip"]}, ["oslo"]),  # an equal value, not containment
        ({"tags": ["vip", "new"]}, ["bergen"]),
        ({"tags": "vip"}, []),
        ({"n": 3}, ["oslo"]),
        ({"n": 3.5}, ["bergen"]),
        ({"n": "3"}, []),
        ({"ok": True}, ["oslo"]),
        ({"ok": False}, ["bergen"]),
        ({"ok": 1}, []),
        ({"x": None}, ["bergen"]),
        ({"missing": None}, []),
        ({"o": {"a": 1}}, ["oslo"]),
        ({"title": "Oslo trip", "n": 3}, ["oslo"]),
        ({"title": "Oslo trip", "n": 4}, []),
        ({}, ["bergen", "oslo", "plain"]),
    ],
)
def test_a_metadata_filter_matches_each_key_with_an_equal_json_value(
    repo: SessionRepository, meta: dict[str, Any], expected: list[str]
) -> None:
    ids = tagged(repo)
    names = {session_id: name for name, session_id in ids.items()}
    listed = sorted(names[s.id] for s in repo.list_sessions({"meta": meta}))
    assert listed == expected
    assert repo.count_sessions(SessionFilter(meta=meta)) == len(expected)
    assert sorted(names[s.id] for s in repo.page_sessions({"meta": meta}).sessions) == expected
    assert (
        sorted(
            names[h.message.session_id]
            for h in repo.search_messages("hello", filter={"meta": meta})
        )
        == expected
    )


def test_metadata_filters_combine_and_reach_export_and_prune(
    repo: SessionRepository, store: Engine
) -> None:
    ids = tagged(repo)
    vip = {"meta": {"tags": ["vip"]}, "agent_id": "agent-1", "status": "active"}
    assert [s.id for s in repo.list_sessions(vip)] == [ids["oslo"]]
    out = io.StringIO()
    export_jsonl(store, out, {"meta": {"title": "Bergen"}})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {line.get("peer_id") for line in lines if line.get("type") == "session"} == {"bergen"}
    later = repo.now() + timedelta(days=1)
    assert repo.prune(updated_before=later, filter={"meta": {"ok": False}}, dry_run=True) == 1
    assert repo.prune(updated_before=later, filter={"meta": {"ok": False}}) == 1
    assert repo.get(key("agent-1", "bergen")) is None
    assert repo.count_sessions() == 2
    assert repo.prune(updated_before=later, status=SessionStatus.IDLE, filter=vip) == 0


def test_metadata_that_is_not_json_matches_no_filter_and_fails_nothing(
    repo: SessionRepository, store: Engine
) -> None:
    ids = tagged(repo)
    run_sql(store, "UPDATE sessions SET metadata = ? WHERE id = ?", ("{oops", ids["plain"]))
    assert [s.id for s in repo.list_sessions({"meta": {"title": "Oslo trip"}})] == [ids["oslo"]]
    assert repo.count_sessions({"meta": {"title": "Oslo trip"}}) == 1
    assert repo.count_sessions({"meta": {"oops": None}}) == 0


def test_a_filter_s_status_and_prune_s_own_status_both_apply(repo: SessionRepository) -> None:
    tagged(repo)
    repo.set_status(key("agent-1", "bergen"), SessionStatus.IDLE)
    later = repo.now() + timedelta(days=1)
    assert repo.prune(updated_before=later, status="idle", filter={"status": "active"}) == 0
    assert repo.prune(updated_before=later, filter={"status": "idle"}, dry_run=True) == 1
    assert repo.prune(updated_before=later, filter={"status": "idle"}) == 1
    assert repo.get(key("agent-1", "bergen")) is None
    assert repo.count_sessions() == 2


def test_a_cursor_survives_metadata_keys_given_in_another_order(repo: SessionRepository) -> None:
    for index in range(5):
        session = repo.get_or_create(key("agent-1", f"p{index}"))
        repo.update_metadata(session.key, {"a": 1, "b": [2]})
    first = repo.page_sessions({"meta": {"a": 1, "b": [2]}}, limit=2)
    assert first.next_cursor is not None
    rest = repo.page_sessions({"meta": {"b": [2], "a": 1}}, limit=10, cursor=first.next_cursor)
    assert len(first.sessions) + len(rest.sessions) == 5


def test_metadata_holding_nul_still_matches_its_other_keys(repo: SessionRepository) -> None:
    session = repo.get_or_create(key("agent-1", "nul"))
    repo.update_metadata(session.key, {"tag": "vip", "note": "a\x00b"})
    assert [s.id for s in repo.list_sessions({"meta": {"tag": "vip"}})] == [session.id]


def test_page_size_up_to_the_largest_integer_is_taken(repo: SessionRepository) -> None:
    sessions(repo)
    page = repo.page_sessions(limit=2**63 - 1)
    assert (len(page.sessions), page.next_cursor) == (23, None)


def test_a_forged_cursor_with_values_out_of_range_is_refused(repo: SessionRepository) -> None:
    import hashlib

    sessions(repo)
    cursor = repo.page_sessions(limit=2).next_cursor
    assert cursor is not None
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    for forged in (
        [1, json.loads(raw[12:])[1], "2026", 2**70],
        [1, json.loads(raw[12:])[1], "a\x00", 5],
    ):
        body = json.dumps(forged)
        check = hashlib.sha256(body.encode()).hexdigest()[:12]
        token = base64.urlsafe_b64encode((check + body).encode()).decode().rstrip("=")
        with pytest.raises(ValueError, match="cursor"):
            repo.page_sessions(limit=2, cursor=token)
