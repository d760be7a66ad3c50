"""SessionRepository: every method, its guarantees and its errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import InvalidRequestError

from aisopod_session import (
    Message,
    NewMessage,
    PeerKind,
    Role,
    Session,
    SessionFilter,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    SessionStatus,
    SessionStoreError,
    Totals,
)
from tests.dbtools import count_rows, refuse_boom, run_sql, run_threads, snapshot

T0 = datetime(2026, 11, 26, 3, 59, 48, 123456, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Every test of this module runs through both APIs on both backends (see conftest)."""
    return store_repo


@pytest.fixture
def engine(store: Engine) -> Engine:
    """Every test of this module runs on SQLite and on PostgreSQL (see conftest)."""
    return store


# --- get_or_create / get / get_by_id ----------------------------------------------------


def test_get_or_create_creates_an_empty_active_session(
    repo: SessionRepository, key: SessionKey
) -> None:
    with freeze_time(T0):
        session = repo.get_or_create(key)
    assert isinstance(session.id, int)
    assert session.key == key
    assert (session.agent_id, session.channel, session.account_id) == (
        "agent-1",
        "telegram",
        "bot-A",
    )
    assert session.peer_kind is PeerKind.DM
    assert session.peer_id == "User-42"
    assert session.created_at == session.updated_at == T0
    assert (session.message_count, session.token_usage) == (0, 0)
    assert session.meta == {}
    assert session.status is SessionStatus.ACTIVE


def test_get_or_create_returns_the_existing_session_unchanged(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    with freeze_time(T0):
        first = repo.get_or_create(key)
    before = snapshot(engine)
    with freeze_time(T0 + timedelta(hours=1)):
        again = repo.get_or_create(key)
    assert again.id == first.id
    assert again.updated_at == T0
    assert snapshot(engine) == before


def test_get_or_create_accepts_the_key_as_text(repo: SessionRepository, key: SessionKey) -> None:
    assert repo.get_or_create(str(key)).id == repo.get_or_create(key).id


def test_get_or_create_is_race_free(engine: Engine) -> None:
    key = SessionKey("racer", "discord", "guild", "group", "g1")
    ids: list[int | None] = []
    run_threads(lambda _: ids.append(SessionRepository(engine).get_or_create(key).id), 8)
    assert len(ids) == 8
    assert len(set(ids)) == 1
    assert count_rows(engine, "sessions") == 1


def test_get_and_get_by_id(repo: SessionRepository, key: SessionKey, other_key: SessionKey) -> None:
    assert repo.get(key) is None
    created = repo.get_or_create(key)
    assert created.id is not None
    found = repo.get(key)
    assert found is not None
    assert found.id == created.id
    by_id = repo.get_by_id(created.id)
    assert by_id is not None
    assert by_id.key == key
    assert repo.get(other_key) is None
    assert repo.get_by_id(created.id + 1000) is None


def test_returned_objects_are_detached_and_fully_loaded(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    session = repo.get_or_create(key)
    message = repo.append_message(key, Role.USER, "hi")
    engine.dispose()  # nothing below may need the database
    for obj in (session, message):
        state = inspect(obj)
        assert state.detached
        assert state.unloaded == ({"messages"} if isinstance(obj, Session) else {"session"})
    assert session.meta == {}
    assert message.content == "hi"
    assert message.session_id == session.id
    with pytest.raises(InvalidRequestError, match="lazy='raise'"):
        _ = session.messages
    assert isinstance(session.model_dump()["created_at"], datetime)


# --- append -------------------------------------------------------------------------


def test_append_messages_stores_them_in_order_and_updates_the_counters(
    repo: SessionRepository, key: SessionKey
) -> None:
    with freeze_time(T0):
        repo.get_or_create(key)
    later = T0 + timedelta(minutes=5)
    with freeze_time(later):
        stored = repo.append_messages(
            key,
            [
                NewMessage(Role.USER, "What's the weather?"),
                NewMessage(Role.ASSISTANT, "", [{"id": "c1", "name": "weather", "args": {}}]),
                {"role": "tool", "content": '{"temp": 21}'},
            ],
            tokens=42,
        )
    message_ids = [m.id for m in stored if m.id is not None]
    assert len(message_ids) == 3
    assert message_ids == sorted(set(message_ids))
    assert [(m.role, m.content, m.tool_calls) for m in stored] == [
        (Role.USER, "What's the weather?", None),
        (Role.ASSISTANT, "", [{"id": "c1", "name": "weather", "args": {}}]),
        (Role.TOOL, '{"temp": 21}', None),
    ]
    assert all(m.created_at == later for m in stored)
    session = repo.get(key)
    assert session is not None
    assert all(m.session_id == session.id for m in stored)
    assert (session.message_count, session.token_usage) == (3, 42)
    assert session.updated_at == later
    assert session.created_at == T0
    assert repo.get_history(key) == stored


def test_append_message_is_the_one_message_form(repo: SessionRepository, key: SessionKey) -> None:
    repo.get_or_create(key)
    first = repo.append_message(key, "user", "hi", tokens=2)
    second = repo.append_message(key, Role.ASSISTANT, "calling", tool_calls=[{"id": "x"}], tokens=3)
    assert isinstance(first, Message)
    assert first.id is not None
    assert second.id is not None
    assert second.id > first.id
    assert second.tool_calls == [{"id": "x"}]
    session = repo.get(key)
    assert session is not None
    assert (session.message_count, session.token_usage) == (2, 5)


def test_append_makes_an_idle_session_active_again(
    repo: SessionRepository, key: SessionKey
) -> None:
    repo.get_or_create(key)
    assert repo.set_status(key, SessionStatus.IDLE).status is SessionStatus.IDLE
    repo.append_message(key, Role.USER, "back")
    session = repo.get(key)
    assert session is not None
    assert session.status is SessionStatus.ACTIVE


def test_append_to_a_missing_session_raises_and_writes_nothing(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    before = snapshot(engine)
    with pytest.raises(SessionNotFoundError, match=str(key)):
        repo.append_message(key, Role.USER, "into the void")
    with pytest.raises(SessionNotFoundError):
        repo.append_messages(key, [NewMessage(Role.USER, "a")], tokens=1)
    assert snapshot(engine) == before


def test_append_is_all_or_nothing_when_the_database_refuses_a_row(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "kept")
    # The database itself fails on the third row of the batch.
    refuse_boom(engine)
    before = snapshot(engine)
    with pytest.raises(SessionStoreError, match="boom refused"):
        repo.append_messages(
            key,
            [
                NewMessage(Role.USER, "one"),
                NewMessage(Role.USER, "two"),
                NewMessage(Role.USER, "boom"),
            ],
            tokens=10,
        )
    assert snapshot(engine) == before
    session = repo.get(key)
    assert session is not None
    assert (session.message_count, session.token_usage) == (1, 0)


def test_counters_equal_rows_after_many_appends_from_threads(
    engine: Engine, key: SessionKey
) -> None:
    repo = SessionRepository(engine)
    repo.get_or_create(key)

    def worker(n: int) -> None:
        for i in range(20):
            repo.append_messages(key, [NewMessage(Role.USER, f"{n}-{i}")] * 2, tokens=3)

    run_threads(worker, 4)
    session = repo.get(key)
    assert session is not None
    assert session.message_count == count_rows(engine, "messages") == 4 * 20 * 2
    assert session.token_usage == 4 * 20 * 3
    contents: list[str] = []
    for message in repo.get_history(key):
        assert isinstance(message.content, str)
        contents.append(message.content)
    for n in range(4):
        mine = [c for c in contents if c.startswith(f"{n}-")]
        assert mine == [f"{n}-{i}" for i in range(20) for _ in range(2)]


# --- list / count -------------------------------------------------------------------


def make_sessions(repo: SessionRepository) -> list[Session]:
    """Five sessions of two agents, created one minute apart from T0."""
    keys = [
        SessionKey("agent-1", "telegram", "bot-A", "dm", "u1"),
        SessionKey("agent-1", "telegram", "bot-B", "group", "g1"),
        SessionKey("agent-1", "slack", "T01", "channel", "C1"),
        SessionKey("agent-2", "telegram", "bot-A", "dm", "u1"),
        SessionKey("agent-2", "discord", "guild", "thread", "t1"),
    ]
    sessions = []
    with freeze_time(T0) as clock:
        for index, key in enumerate(keys):
            clock.move_to(T0 + timedelta(minutes=index))
            sessions.append(repo.get_or_create(key))
    return sessions


def ids(sessions: list[Session]) -> list[int | None]:
    return [s.id for s in sessions]


def test_list_sessions_is_newest_updated_first(repo: SessionRepository) -> None:
    sessions = make_sessions(repo)
    assert ids(repo.list_sessions()) == ids(sessions[::-1])
    with freeze_time(T0 + timedelta(hours=1)):
        repo.append_message(sessions[1].key, Role.USER, "bump")
    listed = repo.list_sessions()
    assert listed[0].id == sessions[1].id
    assert ids(listed[1:]) == ids([sessions[4], sessions[3], sessions[2], sessions[0]])


def test_list_sessions_breaks_ties_by_higher_id_first(repo: SessionRepository) -> None:
    with freeze_time(T0):
        made = [repo.get_or_create(SessionKey("a", "c", "x", "dm", f"p{i}")) for i in range(4)]
    assert ids(repo.list_sessions()) == ids(made[::-1])


def test_list_sessions_pages_with_limit_and_offset(repo: SessionRepository) -> None:
    sessions = make_sessions(repo)[::-1]
    assert ids(repo.list_sessions(limit=2)) == ids(sessions[:2])
    assert ids(repo.list_sessions(limit=2, offset=2)) == ids(sessions[2:4])
    assert ids(repo.list_sessions(limit=2, offset=4)) == ids(sessions[4:])
    assert repo.list_sessions(limit=2, offset=10) == []
    assert repo.list_sessions(limit=0) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"agent_id": "agent-1"}, [0, 1, 2]),
        ({"agent_id": " AGENT-2 "}, [3, 4]),
        ({"channel": "telegram"}, [0, 1, 3]),
        ({"account_id": "bot-A"}, [0, 3]),
        ({"account_id": "BOT-A"}, []),
        ({"peer_kind": "dm"}, [0, 3]),
        ({"peer_kind": PeerKind.THREAD}, [4]),
        ({"peer_id": "u1"}, [0, 3]),
        ({"agent_id": "agent-1", "channel": "telegram", "peer_kind": "group"}, [1]),
        ({"created_after": T0 + timedelta(minutes=2)}, [3, 4]),
        ({"created_before": T0 + timedelta(minutes=2)}, [0, 1]),
        ({"updated_after": T0, "updated_before": T0 + timedelta(minutes=3)}, [1, 2]),
        ({"agent_id": "nobody"}, []),
    ],
)
def test_list_and_count_filter_by_every_field(
    repo: SessionRepository, spec: dict[str, object], expected: list[int]
) -> None:
    sessions = make_sessions(repo)
    want = {sessions[i].id for i in expected}
    assert {s.id for s in repo.list_sessions(SessionFilter.model_validate(spec))} == want
    assert {s.id for s in repo.list_sessions(spec)} == want
    assert repo.count_sessions(SessionFilter.model_validate(spec)) == len(want)


def test_filter_by_status(repo: SessionRepository) -> None:
    sessions = make_sessions(repo)
    repo.set_status(sessions[2].key, SessionStatus.ARCHIVED)
    archived = repo.list_sessions(SessionFilter(status=SessionStatus.ARCHIVED))
    assert ids(archived) == [sessions[2].id]
    assert repo.count_sessions(SessionFilter(status="active")) == 4
    assert repo.count_sessions() == 5


def test_time_bounds_compare_instants_not_local_clock_text(repo: SessionRepository) -> None:
    sessions = make_sessions(repo)
    plus_two = timezone(timedelta(hours=2))
    # T0 + 1 min expressed at UTC+2 must still mean the same instant.
    spec = SessionFilter(created_after=(T0 + timedelta(minutes=1)).astimezone(plus_two))
    assert ids(repo.list_sessions(spec)) == ids(sessions[:1:-1])


# --- metadata, status, delete -------------------------------------------------------


def test_update_metadata_merges_by_default_and_replaces_on_request(
    repo: SessionRepository, key: SessionKey
) -> None:
    with freeze_time(T0):
        repo.get_or_create(key)
    with freeze_time(T0 + timedelta(seconds=1)):
        merged = repo.update_metadata(key, {"lang": "en", "prefs": {"units": "metric"}})
    assert merged.meta == {"lang": "en", "prefs": {"units": "metric"}}
    assert merged.updated_at == T0 + timedelta(seconds=1)
    merged = repo.update_metadata(key, {"lang": "nb", "tier": 2})
    assert merged.meta == {"lang": "nb", "prefs": {"units": "metric"}, "tier": 2}
    replaced = repo.update_metadata(key, {"only": True}, replace=True)
    assert replaced.meta == {"only": True}
    cleared = repo.update_metadata(key, {}, replace=True)
    assert cleared.meta == {}
    stored = repo.get(key)
    assert stored is not None
    assert stored.meta == {}


def test_set_status_changes_status_and_bumps_updated_at(
    repo: SessionRepository, key: SessionKey
) -> None:
    with freeze_time(T0):
        repo.get_or_create(key)
    with freeze_time(T0 + timedelta(days=1)):
        archived = repo.set_status(key, "ARCHIVED")
    assert archived.status is SessionStatus.ARCHIVED
    assert archived.updated_at == T0 + timedelta(days=1)
    assert repo.set_status(key, SessionStatus.COMPACTED).status is SessionStatus.COMPACTED


def test_delete_cascades_to_the_sessions_messages_only(
    repo: SessionRepository, key: SessionKey, other_key: SessionKey, engine: Engine
) -> None:
    for k in (key, other_key):
        repo.get_or_create(k)
        repo.append_messages(k, [NewMessage(Role.USER, "a"), NewMessage(Role.ASSISTANT, "b")])
    assert repo.delete(key) is True
    assert repo.get(key) is None
    assert count_rows(engine, "messages") == 2
    assert [m.content for m in repo.get_history(other_key)] == ["a", "b"]
    assert repo.delete(key) is False


@pytest.mark.parametrize(
    "call",
    [
        lambda r, k: r.get_history(k),
        lambda r, k: r.update_metadata(k, {"a": 1}),
        lambda r, k: r.set_status(k, "idle"),
        lambda r, k: r.append_message(k, "user", "x"),
    ],
    ids=["get_history", "update_metadata", "set_status", "append_message"],
)
def test_methods_that_need_a_session_raise_not_found(
    repo: SessionRepository, key: SessionKey, engine: Engine, call: object
) -> None:
    before = snapshot(engine)
    with pytest.raises(SessionNotFoundError) as caught:
        call(repo, key)  # type: ignore[operator]
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, SessionStoreError)
    assert snapshot(engine) == before


def test_content_is_stored_exactly(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    repo.get_or_create(key)
    samples = [
        "",
        "emoji 🦀🎉 and CJK 漢字",
        "'; DROP TABLE sessions; --",
        "x" * 1_000_000,
        "line\r\nbreaks\ttabs",
    ]
    if engine.dialect.name == "sqlite":
        samples.append("nul\x00inside")
    else:  # PostgreSQL's text cannot hold NUL: refused before anything is written
        with pytest.raises(ValueError, match="content: holds a NUL character"):
            repo.append_message(key, Role.USER, "nul\x00inside")
    stored = repo.append_messages(key, [NewMessage(Role.USER, text) for text in samples])
    assert [m.content for m in stored] == samples
    assert [m.content for m in repo.get_history(key)] == samples
    assert repo.count_sessions() == 1


def test_created_at_follows_id_order_under_concurrent_writers(
    repo: SessionRepository, key: SessionKey
) -> None:
    # Timestamps are taken under the write lock, so a writer that waited cannot stamp an
    # earlier time than the one that committed before it.
    repo.get_or_create(key)

    def worker(_: int) -> None:
        for _ in range(40):
            repo.append_message(key, Role.USER, "tick")

    run_threads(worker, 4)
    history = repo.get_history(key)
    assert len(history) == 160
    stamps = [m.created_at for m in history]
    assert stamps == sorted(stamps)
    session = repo.get(key)
    assert session is not None
    assert session.updated_at == stamps[-1]


def test_rows_written_by_plain_sql_in_other_cases_read_back(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    session = repo.get_or_create(key)
    run_sql(
        engine,
        "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, status, "
        "created_at, updated_at) VALUES ('legacy', 'irc', 'net', 'DM', 'bob', 'Idle', "
        "'2026-01-01T00:00:00.000000+00:00', '2026-01-01T00:00:00.000000+00:00')",
    )
    run_sql(
        engine,
        "INSERT INTO messages (session_id, role, content, created_at) "
        "VALUES (?, 'USER', 'hi', '2026-01-01T00:00:00.000000+00:00')",
        (session.id,),
    )
    run_sql(engine, "UPDATE sessions SET metadata = 'null' WHERE id = ?", (session.id,))
    legacy = repo.list_sessions({"agent_id": "legacy"})[0]
    assert legacy.peer_kind is PeerKind.DM
    assert legacy.status is SessionStatus.IDLE
    assert repo.get_history(key)[0].role is Role.USER
    # JSON null in metadata: merging starts from an empty object.
    assert repo.update_metadata(key, {"a": 1}).meta == {"a": 1}


def test_an_unknown_role_reads_as_its_text_and_an_unknown_session_value_is_a_store_error(
    repo: SessionRepository, key: SessionKey, engine: Engine
) -> None:
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "hi")
    # A role another program wrote is read leniently: the stored text, as a plain str.
    run_sql(engine, "UPDATE messages SET role = 'function'")
    (message,) = repo.get_history(key)
    assert (message.role, message.content) == ("function", "hi")
    assert type(message.role) is str
    # A session's columns are still read strictly.
    run_sql(engine, "UPDATE sessions SET status = 'deleted'")
    with pytest.raises(SessionStoreError, match=r"'deleted'.*not a SessionStatus"):
        repo.get(key)


def test_summary_counts_per_status_and_agent(
    repo: SessionRepository, key: SessionKey, other_key: SessionKey
) -> None:
    assert repo.summary().total == Totals()
    third = SessionKey("agent-2", "web", "site", "dm", "visitor")
    for each in (key, other_key, third):
        repo.get_or_create(each)
    repo.append_message(key, Role.USER, "one", tokens=3)
    repo.append_message(key, Role.ASSISTANT, "two", tokens=4)
    repo.append_message(third, Role.USER, "three", tokens=5)
    repo.set_status(other_key, SessionStatus.IDLE)
    summary = repo.summary()
    assert summary.total == Totals(sessions=3, messages=3, tokens=12)
    assert summary.by_status == {
        SessionStatus.ACTIVE: Totals(2, 3, 12),
        SessionStatus.IDLE: Totals(1, 0, 0),
    }
    assert summary.by_agent == {"agent-1": Totals(2, 2, 7), "agent-2": Totals(1, 1, 5)}
    assert repo.for_agent("agent-2").summary().total == Totals(1, 1, 5)
