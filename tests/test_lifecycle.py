"""Session lifecycle: compaction, reset, idle marking and pruning, each atomic, counters
equal to the rows after every operation, time rules under freezegun; and migration 2
upgrading a version-1 file full of data."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine, text

import aisopod_session.repository
from aisopod_session import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AccessDeniedError,
    Role,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    SessionStatus,
    open_database,
    run_migrations,
)
from aisopod_session.models import utc_text
from aisopod_session.validation import dump_json
from tests.dbtools import before_io, no_statements, snapshot

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def counters_match_rows(engine: Engine) -> None:
    with engine.connect() as conn:
        wrong = conn.execute(
            text(
                "SELECT id, message_count FROM sessions s WHERE message_count != "
                "(SELECT count(*) FROM messages m WHERE m.session_id = s.id)"
            )
        ).all()
    assert wrong == []


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Every test of this module runs on SQLite and on PostgreSQL (see conftest), but
    refusals made before any I/O, on SQLite alone (`dbtools.before_io`)."""
    return store_repo


@pytest.fixture
def talked(repo: SessionRepository, key: SessionKey) -> SessionRepository:
    """`key` with ten messages m0 … m9 (3 tokens each), appended at T0 + i minutes."""
    repo.get_or_create(key)
    # One frozen clock moved along: starting freezegun costs ~10 ms (it scans every module).
    with freeze_time(T0) as clock:
        for i in range(10):
            clock.move_to(T0 + timedelta(minutes=i))
            repo.append_message(key, Role.USER if i % 2 else Role.ASSISTANT, f"m{i}", tokens=3)
    return repo


# --- compact ------------------------------------------------------------------------------


def test_compact_keeps_the_newest_in_order_with_the_summary_first(
    talked: SessionRepository, key: SessionKey, store: Engine
) -> None:
    before = talked.get_history(key)
    with freeze_time(T0 + timedelta(hours=1)):
        result = talked.compact(key, keep_last=3, summary="m0 to m6, in short")
    after = talked.get_history(key)
    assert [m.content for m in after] == ["m0 to m6, in short", "m7", "m8", "m9"]
    assert [m.id for m in after[1:]] == [m.id for m in before[-3:]]  # kept ids unchanged
    summary = after[0]
    assert summary.role is Role.SYSTEM
    assert summary.tool_calls is None
    # The summary stands for the removed messages: it takes the newest one's place.
    assert (summary.id, summary.created_at) == (before[6].id, before[6].created_at)
    assert result.summary is not None
    assert result.summary.model_dump() == summary.model_dump()
    assert result.removed == 7
    session = result.session
    assert (result.message_count, session.message_count) == (4, 4)
    assert (result.compaction_count, session.compaction_count) == (1, 1)
    assert session.token_usage == 30  # what the conversation cost is kept
    assert session.status is SessionStatus.COMPACTED
    assert session.last_compacted_at == session.updated_at == T0 + timedelta(hours=1)
    assert session.last_compaction_summary == "m0 to m6, in short"
    assert talked.get(key) == session
    counters_match_rows(store)


def test_compact_without_a_summary_only_removes(
    talked: SessionRepository, key: SessionKey, store: Engine
) -> None:
    result = talked.compact(key, keep_last=2)
    assert [m.content for m in talked.get_history(key)] == ["m8", "m9"]
    assert (result.removed, result.summary, result.message_count) == (8, None, 2)
    assert result.session.last_compaction_summary is None
    counters_match_rows(store)


def test_compact_to_nothing_leaves_only_the_summary(
    talked: SessionRepository, key: SessionKey, store: Engine
) -> None:
    result = talked.compact(key, keep_last=0, summary="all of it")
    assert [m.content for m in talked.get_history(key)] == ["all of it"]
    assert (result.removed, result.message_count) == (10, 1)
    counters_match_rows(store)


def test_compacting_again_replaces_the_old_summary(
    talked: SessionRepository, key: SessionKey, store: Engine
) -> None:
    talked.compact(key, keep_last=5, summary="first")
    talked.append_message(key, Role.USER, "m10")
    result = talked.compact(key, keep_last=2, summary="second")
    assert [m.content for m in talked.get_history(key)] == ["second", "m9", "m10"]
    assert result.compaction_count == 2
    assert result.session.last_compaction_summary == "second"
    counters_match_rows(store)


def test_compact_with_nothing_to_remove_changes_nothing(
    talked: SessionRepository, key: SessionKey, store: Engine
) -> None:
    before = snapshot(store)
    for keep_last in (10, 50):
        result = talked.compact(key, keep_last=keep_last, summary="nothing to summarise")
        assert (result.removed, result.summary, result.compaction_count) == (0, None, 0)
        assert result.session.status is SessionStatus.ACTIVE
    assert snapshot(store) == before


def test_appending_after_a_compaction_makes_the_session_active(
    talked: SessionRepository, key: SessionKey
) -> None:
    talked.compact(key, keep_last=1)
    talked.append_message(key, Role.USER, "and now?")
    session = talked.get(key)
    assert session is not None
    assert (session.status, session.message_count) == (SessionStatus.ACTIVE, 2)


# --- reset --------------------------------------------------------------------------------


def test_reset_returns_the_session_to_its_fresh_state_keeping_id_created_and_meta(
    talked: SessionRepository, key: SessionKey, store: Engine
) -> None:
    talked.update_metadata(key, {"lang": "pt"})
    talked.compact(key, keep_last=4, summary="s")
    old = talked.get(key)
    assert old is not None
    with freeze_time(T0 + timedelta(days=1)):
        session = talked.reset(key)
    assert talked.get_history(key) == []
    assert (session.id, session.created_at, session.meta) == (old.id, old.created_at, old.meta)
    assert (session.message_count, session.token_usage, session.compaction_count) == (0, 0, 0)
    assert (session.last_compacted_at, session.last_compaction_summary) == (None, None)
    assert session.status is SessionStatus.ACTIVE
    assert session.updated_at == T0 + timedelta(days=1)
    assert talked.get(key) == session
    counters_match_rows(store)


# --- mark_idle ----------------------------------------------------------------------------


def make_sessions(repo: SessionRepository, ages: dict[str, timedelta]) -> dict[str, SessionKey]:
    """A session per name, each last appended to `age` before T0 + 1 day."""
    keys = {}
    with freeze_time(T0) as clock:
        for name, age in ages.items():
            key = SessionKey(f"agent-{name[0]}", "telegram", "bot", "dm", name)
            clock.move_to(T0 + timedelta(days=1) - age)
            repo.get_or_create(key)
            repo.append_message(key, Role.USER, f"hello from {name}")
            keys[name] = key
    return keys


def test_mark_idle_marks_only_active_sessions_quiet_for_long_enough(
    repo: SessionRepository,
) -> None:
    keys = make_sessions(
        repo,
        {"a-old": timedelta(hours=5), "a-new": timedelta(minutes=5), "b-old": timedelta(hours=3)},
    )
    with freeze_time(T0 + timedelta(days=1) - timedelta(hours=3)):
        repo.set_status(keys["b-old"], "archived")  # archived, and as old as the others
    before = {name: repo.get(key) for name, key in keys.items()}
    with freeze_time(T0 + timedelta(days=1)):
        assert repo.mark_idle(idle_for=timedelta(hours=1)) == 1
        assert repo.mark_idle(idle_for=timedelta(hours=1)) == 0  # already idle
    after = {name: repo.get(key) for name, key in keys.items()}
    assert {name: s.status for name, s in after.items() if s} == {
        "a-old": SessionStatus.IDLE,
        "a-new": SessionStatus.ACTIVE,
        "b-old": SessionStatus.ARCHIVED,
    }
    old_before, old_after = before["a-old"], after["a-old"]
    assert old_before is not None
    assert old_after is not None
    assert old_after.updated_at == old_before.updated_at  # last activity stays true
    repo.append_message(keys["a-old"], Role.USER, "back again")
    back = repo.get(keys["a-old"])
    assert back is not None
    assert back.status is SessionStatus.ACTIVE


def test_the_idle_boundary_is_exact(repo: SessionRepository) -> None:
    keys = make_sessions(repo, {"a-edge": timedelta(hours=1)})
    with freeze_time(T0 + timedelta(days=1)):
        assert repo.mark_idle(idle_for=timedelta(hours=1, microseconds=1)) == 0
        assert repo.mark_idle(idle_for=timedelta(minutes=59)) == 1
    session = repo.get(keys["a-edge"])
    assert session is not None
    assert session.status is SessionStatus.IDLE


# --- prune --------------------------------------------------------------------------------


def test_prune_deletes_old_sessions_with_their_messages_and_dry_run_only_counts(
    repo: SessionRepository, store: Engine
) -> None:
    keys = make_sessions(
        repo,
        {"a-old": timedelta(days=40), "a-older": timedelta(days=90), "a-new": timedelta(days=1)},
    )
    cutoff = T0 - timedelta(days=30)
    before = snapshot(store)
    assert repo.prune(updated_before=cutoff, dry_run=True) == 2
    assert snapshot(store) == before
    assert repo.prune(updated_before=cutoff) == 2
    assert [s.peer_id for s in repo.list_sessions()] == ["a-new"]
    assert repo.get(keys["a-old"]) is None
    with store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 1
    counters_match_rows(store)


def test_prune_can_be_limited_to_a_status(repo: SessionRepository) -> None:
    keys = make_sessions(repo, {"a-1": timedelta(days=40), "a-2": timedelta(days=40)})
    with freeze_time(T0 - timedelta(days=35)):
        repo.set_status(keys["a-2"], SessionStatus.ARCHIVED)
    assert repo.prune(updated_before=T0, status="archived") == 1
    assert [s.peer_id for s in repo.list_sessions()] == ["a-1"]


def test_prune_batches_step_by_step_and_stopped_early_keeps_the_rest(
    repo: SessionRepository, store: Engine
) -> None:
    """`prune_batches` (an iterator; `async for` on the async API): each step deletes one
    whole batch; stopping after the first keeps every other session and its messages."""
    fill_old_sessions(store, 1_200, 1)  # three batches of at most 500 sessions
    with pytest.raises(ValueError, match="updated_before"):
        repo.prune_batches(updated_before=datetime(2026, 1, 1))  # checked before any batch
    steps = repo.prune_batches(updated_before=T0)
    assert repo.count_sessions() == 1_200  # nothing deleted before the first step
    first = next(iter(steps))
    assert first == 500
    assert repo.count_sessions() == 700
    counters_match_rows(store)
    assert list(repo.prune_batches(updated_before=T0)) == [500, 700]
    assert repo.count_sessions() == 0
    assert list(repo.prune_batches(updated_before=T0)) == []


def fill_old_sessions(engine: Engine, sessions: int, messages_each: int) -> None:
    """Plain-SQL set-up: `sessions` sessions of agent `bulk`, last updated a year ago."""
    stamp = (T0 - timedelta(days=365)).isoformat(timespec="microseconds")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
                "created_at, updated_at, message_count) "
                "VALUES ('bulk', 'telegram', 'bot', 'dm', :peer, :stamp, :stamp, :count)"
            ),
            [{"peer": f"p{i}", "stamp": stamp, "count": messages_each} for i in range(sessions)],
        )
        conn.execute(
            text(
                "INSERT INTO messages (session_id, role, content, created_at) "
                "SELECT s.id, 'user', 'old', :stamp FROM sessions s, "
                "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < :each) SELECT i FROM n) AS numbers"
            ),
            {"stamp": stamp, "each": messages_each},
        )


def test_a_large_prune_lets_another_writer_go_on(
    repo: SessionRepository, key: SessionKey, store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches a tenth of the usual size over a tenth of the rows: the same 100 batches.
    monkeypatch.setattr(aisopod_session.repository, "PRUNE_BATCH_SESSIONS", 50)
    fill_old_sessions(store, 5_000, 2)
    repo.get_or_create(key)
    events: list[str] = []
    done = threading.Event()
    writing = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            while not done.is_set():
                repo.append_message(key, Role.USER, "still here")
                events.append("write")
                writing.set()
        except BaseException as exc:
            errors.append(exc)
            writing.set()

    writer = threading.Thread(target=write)
    writer.start()
    # The prune starts once the writer is writing, not while its thread may still be
    # starting: what is tested is that it goes on between batches.
    writing.wait(timeout=60)
    try:
        deleted = repo.prune(
            updated_before=T0 - timedelta(days=30), on_batch=lambda _: events.append("batch")
        )
    finally:
        done.set()
        writer.join()
    assert errors == []
    assert deleted == 5_000
    batches = [i for i, event in enumerate(events) if event == "batch"]
    # 100 batches (at most PRUNE_BATCH_SESSIONS, here 50, a batch): a writer in SQLite's busy
    # handler sleeps up to 100 ms between tries, so a shorter prune may end before it tries.
    assert len(batches) >= 20
    # The writer appended between the prune's first and last batch, not only after it.
    assert "write" in events[batches[0] : batches[-1]]
    assert [s.key for s in repo.list_sessions()] == [key]
    session = repo.get(key)
    assert session is not None
    assert session.message_count == events.count("write")
    counters_match_rows(store)


# --- confinement and bad input ------------------------------------------------------------


def test_a_confined_repository_compacts_resets_marks_and_prunes_only_its_agent(
    repo: SessionRepository,
) -> None:
    keys = make_sessions(repo, {"a-x": timedelta(days=40), "b-x": timedelta(days=40)})
    mine = repo.for_agent("agent-a")
    with pytest.raises(AccessDeniedError):
        mine.compact(keys["b-x"], keep_last=0)
    with pytest.raises(AccessDeniedError):
        mine.reset(keys["b-x"])
    assert mine.mark_idle(idle_for=timedelta(days=1)) == 1
    assert mine.prune(updated_before=T0, dry_run=True) == 1
    assert mine.prune(updated_before=T0) == 1
    assert [s.peer_id for s in repo.list_sessions()] == ["b-x"]
    other = repo.get(keys["b-x"])
    assert other is not None
    assert other.status is SessionStatus.ACTIVE


BAD_CALLS: dict[str, tuple[str, Callable[[SessionRepository, SessionKey], Any]]] = {
    "negative keep_last": ("keep_last", lambda r, k: r.compact(k, keep_last=-1)),
    "keep_last not int": ("keep_last", lambda r, k: r.compact(k, keep_last=2.0)),  # type: ignore[arg-type]
    "empty summary": ("summary", lambda r, k: r.compact(k, keep_last=1, summary="")),
    "blank summary": ("summary", lambda r, k: r.compact(k, keep_last=1, summary=" \n\t")),
    "summary not text": ("summary", lambda r, k: r.compact(k, keep_last=1, summary=5)),  # type: ignore[arg-type]
    "summary surrogate": ("summary", lambda r, k: r.compact(k, keep_last=1, summary="\ud800")),
    "idle_for seconds": ("idle_for", lambda r, k: r.mark_idle(idle_for=60)),  # type: ignore[arg-type]
    "idle_for zero": ("idle_for", lambda r, k: r.mark_idle(idle_for=timedelta(0))),
    "idle_for negative": ("idle_for", lambda r, k: r.mark_idle(idle_for=timedelta(hours=-1))),
    "naive updated_before": (
        "updated_before",
        lambda r, k: r.prune(updated_before=datetime(2026, 1, 1)),
    ),
    "updated_before text": (
        "updated_before",
        lambda r, k: r.prune(updated_before="2026-01-01"),  # type: ignore[arg-type]
    ),
    "unknown prune status": ("status", lambda r, k: r.prune(updated_before=T0, status="gone")),
}


@before_io
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_lifecycle_arguments_are_refused_and_change_nothing(
    talked: SessionRepository, key: SessionKey, store: Engine, case: str
) -> None:
    field, call = BAD_CALLS[case]
    before = snapshot(store)
    with pytest.raises(ValueError, match=field), no_statements():
        call(talked, key)
    assert snapshot(store) == before


def test_compact_and_reset_need_a_session(repo: SessionRepository, key: SessionKey) -> None:
    with pytest.raises(SessionNotFoundError):
        repo.compact(key, keep_last=1)
    with pytest.raises(SessionNotFoundError):
        repo.reset(key)


# --- migration 2 --------------------------------------------------------------------------


# Contents a version-1 store held as plain text, which must read back as the same text
# after migration 3 turns content into JSON, however much of it looks like JSON.
OLD_CONTENTS = ["123", '{"a": 1}', "null", "true", '"quoted"', "[1, 2]", "", "{not json", " 7 "]


def test_a_version_1_store_full_of_data_upgrades_with_nothing_lost(store_url: str) -> None:
    engine = open_database(store_url, migrate=False)
    assert run_migrations(engine, MIGRATIONS[:1]) == 1
    fill_old_sessions(engine, 100, 100)  # 10 000 messages, as version 1 stores them
    with engine.begin() as conn:  # and some text that looks like JSON, as version 1 kept it
        conn.execute(
            text(
                "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
                "SELECT id, 'assistant', :content, :tool_calls, created_at FROM sessions "
                "WHERE peer_id = 'p0'"
            ),
            [{"content": c, "tool_calls": '[{"id": "t1"}]'} for c in OLD_CONTENTS],
        )
        conn.execute(
            text("UPDATE sessions SET message_count = :count WHERE peer_id = 'p0'"),
            {"count": 100 + len(OLD_CONTENTS)},
        )
    before = snapshot(engine)
    engine.dispose()

    engine = open_database(store_url)
    after = snapshot(engine)
    # Migration 3: every content cell becomes the JSON string of its text; metadata '{}'.
    assert after["messages"] == [
        (*row[:3], dump_json(row[3]), *row[4:], "{}") for row in before["messages"]
    ]
    old_columns = len(before["sessions"][0])
    assert [row[:old_columns] for row in after["sessions"]] == before["sessions"]
    # Migrations 2, 3 and 4: compaction fields, token split, no lineage.
    assert {row[old_columns:] for row in after["sessions"]} == {(0, None, None, 0, 0, None, None)}
    assert [row[0] for row in after["schema_version"]] == list(range(1, SCHEMA_VERSION + 1))
    counters_match_rows(engine)
    repo = SessionRepository(engine)
    session = repo.get(SessionKey("bulk", "telegram", "bot", "dm", "p7"))
    assert session is not None
    assert (session.message_count, session.compaction_count) == (100, 0)
    assert (session.input_tokens, session.output_tokens) == (0, 0)
    # Every message reads back exactly as version 1 stored it.
    read_back = sorted(
        (
            (
                m.id or 0,
                m.session_id,
                m.role,
                m.content,
                m.tool_calls,
                utc_text(m.created_at),
                m.meta,
            )
            for listed in repo.list_sessions(limit=1000)
            for m in repo.get_history(listed.key)
        ),
        key=lambda row: row[0],
    )
    assert read_back == [
        (
            id_,
            session_id,
            role,
            content,
            None if tool_calls is None else json.loads(tool_calls),
            created_at,
            {},
        )
        for id_, session_id, role, content, tool_calls, created_at in before["messages"]
    ]
    assert [row[3] for row in read_back if row[2] == "assistant"] == OLD_CONTENTS
    engine.dispose()
