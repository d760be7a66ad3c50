"""Forking a conversation (`fork`): what is copied, the lineage recorded, the source left
alone, and every refusal made with nothing written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
    SessionStatus,
    SessionStoreError,
)
from tests.dbtools import before_io, no_statements, run_sql, snapshot

SOURCE = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice")
BRANCH = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice-branch")
THEIRS = SessionKey("agent-2", "telegram", "bot-A", "dm", "alice")
START = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def conversation(repo: SessionRepository) -> list[int]:
    """A source session with four messages of every kind, written a minute apart."""
    repo.get_or_create(SOURCE)
    repo.update_metadata(SOURCE, {"title": "Oslo trip", "tags": ["vip"]})
    written = []
    with freeze_time(START) as clock:
        for message in (
            NewMessage("system", "be brief"),
            NewMessage("user", [{"type": "text", "text": "book a table"}], meta={"n": 1}),
            NewMessage("assistant", "", tool_calls=[{"id": "c1", "name": "book"}]),
            NewMessage("tool", {"ok": True, "table": 7}),
        ):
            clock.tick(timedelta(minutes=1))
            written.append(repo.append_messages(SOURCE, [message], tokens=10)[0].id)
    return [message_id for message_id in written if message_id is not None]


def test_a_fork_copies_every_message_in_order_and_records_its_lineage(
    repo: SessionRepository,
) -> None:
    ids = conversation(repo)
    source = repo.get(SOURCE)
    assert source is not None
    before = repo.get_history(SOURCE)
    with freeze_time(START + timedelta(hours=1)):
        fork = repo.fork(SOURCE, BRANCH)
    assert fork.key == BRANCH
    assert (fork.parent_id, fork.forked_from_message_id) == (source.id, ids[-1])
    assert (fork.message_count, fork.token_usage, fork.input_tokens) == (4, 0, 0)
    assert fork.status is SessionStatus.ACTIVE
    assert fork.meta == {"title": "Oslo trip", "tags": ["vip"]}
    assert fork.created_at == fork.updated_at == START + timedelta(hours=1)
    copied = repo.get_history(BRANCH)
    assert [(m.role, m.content, m.tool_calls, m.meta, m.created_at) for m in copied] == [
        (m.role, m.content, m.tool_calls, m.meta, m.created_at) for m in before
    ]
    assert all(m.session_id == fork.id for m in copied)
    new_ids = [m.id or 0 for m in copied]
    assert new_ids == sorted(new_ids)
    assert not set(new_ids) & set(ids)
    assert repo.get(BRANCH) == fork
    # The source is untouched, and the branch goes its own way.
    assert repo.get(SOURCE) == source
    assert repo.get_history(SOURCE) == before
    repo.append_message(BRANCH, Role.USER, "only in the branch")
    assert len(repo.get_history(SOURCE)) == 4
    assert repo.get_or_create(BRANCH).message_count == 5


def test_a_fork_up_to_a_message_copies_it_and_those_before(repo: SessionRepository) -> None:
    ids = conversation(repo)
    fork = repo.fork(SOURCE, BRANCH, up_to_id=ids[1])
    assert (fork.message_count, fork.forked_from_message_id) == (2, ids[1])
    assert [m.role for m in repo.get_history(BRANCH)] == [Role.SYSTEM, Role.USER]
    # A fork of a fork: its parent is the branch.
    twig = repo.fork(BRANCH, SessionKey("agent-1", "telegram", "bot-A", "dm", "twig"))
    assert (twig.parent_id, twig.message_count) == (fork.id, 2)
    # Searching finds the copies too.
    assert {hit.key for hit in repo.search_messages("book table")} == {SOURCE, BRANCH, twig.key}


def test_a_fork_of_a_session_without_messages_is_empty(repo: SessionRepository) -> None:
    source = repo.get_or_create(SOURCE)
    fork = repo.fork(SOURCE, BRANCH)
    assert (fork.parent_id, fork.forked_from_message_id, fork.message_count) == (
        source.id,
        None,
        0,
    )
    assert repo.get_history(BRANCH) == []


def test_refusals_write_nothing(repo: SessionRepository, store: Engine) -> None:
    ids = conversation(repo)
    repo.get_or_create(BRANCH)
    other = repo.append_message(BRANCH, Role.USER, "in another session")
    state = snapshot(store)
    with pytest.raises(SessionExistsError, match="alice-branch"):
        repo.fork(SOURCE, BRANCH)
    with pytest.raises(SessionExistsError):
        repo.fork(SOURCE, SOURCE)
    assert isinstance(SessionExistsError("x"), SessionStoreError)
    fresh = SessionKey("agent-1", "telegram", "bot-A", "dm", "fresh")
    for wrong in (other.id, max(ids) + 1000, -1, 2**40):
        with pytest.raises(ValueError, match=f"up_to_id: message {wrong} is not in session"):
            repo.fork(SOURCE, fresh, up_to_id=wrong)
    with pytest.raises(SessionNotFoundError):
        repo.fork(SessionKey("agent-1", "telegram", "bot-A", "dm", "nobody"), fresh)
    assert snapshot(store) == state
    assert repo.get(fresh) is None


def test_a_confined_repository_forks_within_its_agent_only(repo: SessionRepository) -> None:
    conversation(repo)
    repo.get_or_create(THEIRS)
    mine = repo.for_agent("agent-1")
    assert mine.fork(SOURCE, BRANCH).agent_id == "agent-1"
    with pytest.raises(AccessDeniedError):
        mine.fork(SOURCE, SessionKey("agent-2", "telegram", "bot-A", "dm", "x"))
    with pytest.raises(AccessDeniedError):
        mine.fork(THEIRS, SessionKey("agent-1", "telegram", "bot-A", "dm", "x"))
    # The admin view may fork across agents.
    assert repo.fork(SOURCE, SessionKey("agent-2", "slack", "T1", "dm", "y")).parent_id


def test_lineage_outlives_a_deleted_parent(repo: SessionRepository) -> None:
    ids = conversation(repo)
    source = repo.get(SOURCE)
    assert source is not None
    repo.fork(SOURCE, BRANCH)
    assert repo.delete(SOURCE)
    fork = repo.get(BRANCH)
    assert fork is not None
    assert (fork.parent_id, fork.forked_from_message_id) == (source.id, ids[-1])
    assert len(repo.get_history(BRANCH)) == 4


def test_a_sessions_forks_are_found_by_the_parent_id_filter(repo: SessionRepository) -> None:
    """`SessionFilter(parent_id=)` keeps a session's forks, not the forks of its forks,
    in every call that takes a filter."""
    conversation(repo)
    source = repo.get(SOURCE)
    assert source is not None
    first = repo.fork(SOURCE, BRANCH)
    second = repo.fork(SOURCE, SessionKey("agent-1", "telegram", "bot-A", "dm", "alice-2"))
    repo.fork(BRANCH, SessionKey("agent-1", "telegram", "bot-A", "dm", "alice-3"))
    forks = {"parent_id": source.id}
    assert {s.id for s in repo.list_sessions(forks)} == {first.id, second.id}
    assert repo.count_sessions(forks) == 2
    assert {s.id for s in repo.page_sessions(forks).sessions} == {first.id, second.id}
    assert {hit.message.session_id for hit in repo.search_messages("table", filter=forks)} == {
        first.id,
        second.id,
    }
    assert repo.count_sessions({"parent_id": second.id}) == 0
    assert [s.id for s in repo.list_sessions({"parent_id": first.id})] != []


def test_a_source_whose_metadata_is_not_json_is_refused_naming_the_row(
    repo: SessionRepository, store: Engine
) -> None:
    source = repo.get_or_create(SOURCE)
    run_sql(store, "UPDATE sessions SET metadata = ? WHERE id = ?", ("{not json", source.id))
    with pytest.raises(SessionStoreError, match=f"sessions row {source.id}, column metadata"):
        repo.fork(SOURCE, BRANCH)
    assert repo.get(BRANCH) is None


@before_io
@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda r: r.fork(SOURCE, "not a key"), "key"),
        (lambda r: r.fork(42, BRANCH), "key"),
        (lambda r: r.fork(SOURCE, BRANCH, up_to_id="3"), "up_to_id"),
        (lambda r: r.fork(SOURCE, BRANCH, up_to_id=True), "up_to_id"),
        (lambda r: r.fork(SOURCE, BRANCH, up_to_id=2**64), "up_to_id"),
        (lambda r: r.list_sessions({"parent_id": 0}), "parent_id"),
        (lambda r: r.count_sessions({"parent_id": "7"}), "parent_id"),
        (lambda r: r.page_sessions({"parent_id": True}), "parent_id"),
        (lambda r: r.list_sessions({"parent_id": 2**63}), "parent_id"),
    ],
)
def test_bad_arguments_are_refused_naming_the_field_before_any_io(
    repo: SessionRepository, call: object, field: str
) -> None:
    with no_statements(), pytest.raises(ValueError, match=field):
        call(repo)  # type: ignore[operator]
