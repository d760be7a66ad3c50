"""Removing the newest message (`pop_message`): what is returned, the counters kept true,
concurrent pops never returning one message twice, and every refusal with nothing
written."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from aisopod_session import (
    AccessDeniedError,
    NewMessage,
    Role,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    SessionStatus,
)
from tests.dbtools import before_io, no_statements, run_sql, snapshot

KEY = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice")
OTHER = SessionKey("agent-1", "telegram", "bot-A", "dm", "bob")
START = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def test_pop_removes_and_returns_the_newest_message_and_lowers_the_count(
    repo: SessionRepository,
) -> None:
    with freeze_time(START) as clock:
        repo.get_or_create(KEY)
        repo.update_metadata(KEY, {"title": "kept"})
        written = repo.append_messages(
            KEY,
            [
                NewMessage("user", "first"),
                NewMessage("assistant", [{"type": "text", "text": "second"}], meta={"n": 2}),
                NewMessage("assistant", None, tool_calls=[{"id": "c1"}], meta={"t": "call"}),
            ],
            input_tokens=5,
            output_tokens=7,
        )
        repo.set_status(KEY, SessionStatus.IDLE)
        clock.tick(timedelta(minutes=5))
        popped = repo.pop_message(KEY)
    assert popped == written[2]
    assert (popped.content, popped.tool_calls, popped.meta) == (None, [{"id": "c1"}], {"t": "call"})
    assert repo.get_history(KEY) == written[:2]
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 2
    assert session.updated_at == START + timedelta(minutes=5)
    # What the conversation cost, its status and its metadata stay.
    assert (session.token_usage, session.input_tokens, session.output_tokens) == (12, 5, 7)
    assert session.status == SessionStatus.IDLE
    assert session.meta == {"title": "kept"}
    assert repo.pop_message(KEY) == written[1]
    assert repo.pop_message(KEY) == written[0]
    assert repo.pop_message(KEY) is None
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 0


def test_pop_of_an_empty_session_writes_nothing(repo: SessionRepository, store: Engine) -> None:
    repo.get_or_create(KEY)
    before = snapshot(store)
    assert repo.pop_message(KEY) is None
    assert snapshot(store) == before


def test_pop_touches_only_its_own_session(repo: SessionRepository) -> None:
    repo.get_or_create(KEY)
    repo.get_or_create(OTHER)
    mine = repo.append_message(KEY, "user", "mine")
    theirs = repo.append_message(OTHER, "user", "theirs")
    # The other session holds the store's newest message.
    assert (theirs.id or 0) > (mine.id or 0)
    assert repo.pop_message(KEY) == mine
    assert repo.get_history(OTHER) == [theirs]


def test_a_popped_message_is_no_longer_found_by_search(repo: SessionRepository) -> None:
    repo.get_or_create(KEY)
    repo.append_message(KEY, "user", "zanzibar ferry times")
    assert [hit.message.content for hit in repo.search_messages("zanzibar")] == [
        "zanzibar ferry times"
    ]
    repo.pop_message(KEY)
    assert repo.search_messages("zanzibar") == []


def test_a_count_left_at_zero_by_another_program_stays_at_zero(
    repo: SessionRepository, store: Engine
) -> None:
    repo.get_or_create(KEY)
    message = repo.append_message(KEY, "user", "hello")
    run_sql(store, "UPDATE sessions SET message_count = 0")
    assert repo.pop_message(KEY) == message
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 0


def test_a_message_written_by_another_program_is_popped_as_history_reads_it(
    repo: SessionRepository, store: Engine
) -> None:
    repo.get_or_create(KEY)
    repo.append_message(KEY, "user", "hello")
    run_sql(store, "UPDATE messages SET role = 'wizard', content = 'not json', created_at = 'x'")
    [stored] = repo.get_history(KEY)
    assert (stored.role, stored.content) == ("wizard", "not json")
    assert repo.pop_message(KEY) == stored
    assert repo.get_history(KEY) == []


def test_concurrent_pops_never_return_one_message_twice(repo: SessionRepository) -> None:
    repo.get_or_create(KEY)
    written = repo.append_messages(KEY, [NewMessage(Role.USER, f"m{i}") for i in range(40)])
    popped: list[int | None] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def pop_all() -> None:
        try:
            while (message := repo.pop_message(KEY)) is not None:
                with lock:
                    popped.append(message.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pop_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(i for i in popped if i is not None) == [m.id for m in written]
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 0


def test_pop_of_a_missing_session_raises(repo: SessionRepository, store: Engine) -> None:
    before = snapshot(store)
    with pytest.raises(SessionNotFoundError):
        repo.pop_message(OTHER)
    assert snapshot(store) == before


@before_io
def test_pop_refuses_another_agent_and_a_bad_key_before_any_io(
    repo: SessionRepository, store: Engine
) -> None:
    repo.get_or_create(KEY)
    repo.append_message(KEY, "user", "hello")
    before = snapshot(store)
    with pytest.raises(AccessDeniedError), no_statements():
        repo.for_agent("agent-2").pop_message(KEY)
    with pytest.raises(ValueError, match="peer_id"), no_statements():
        repo.pop_message("agent-1:telegram:bot-A:dm:")
    assert snapshot(store) == before
