"""Creating a session that must be new (`create`): its metadata, the refusal of a key
that exists, concurrent creators, and every refusal with nothing written."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from aisopod_session import (
    AccessDeniedError,
    SessionExistsError,
    SessionKey,
    SessionRepository,
    SessionStatus,
)
from tests.dbtools import before_io, no_statements, snapshot

KEY = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice")
START = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def test_create_makes_a_new_session_with_its_metadata(repo: SessionRepository) -> None:
    with freeze_time(START):
        created = repo.create(KEY, meta={"title": "Oslo trip", "tags": ["vip"], "n": None})
    assert created.key == KEY
    assert (created.status, created.message_count) == (SessionStatus.ACTIVE, 0)
    assert created.meta == {"title": "Oslo trip", "tags": ["vip"], "n": None}
    assert created.created_at == created.updated_at == START
    assert repo.get(KEY) == created
    plain = repo.create(KEY.model_copy(update={"peer_id": "bob"}))
    assert plain.meta == {}


def test_create_of_a_key_that_exists_is_refused_with_nothing_written(
    repo: SessionRepository, store: Engine
) -> None:
    repo.get_or_create(KEY)
    repo.update_metadata(KEY, {"kept": True})
    before = snapshot(store)
    with pytest.raises(SessionExistsError, match="alice"):
        repo.create(KEY, meta={"kept": False})
    assert snapshot(store) == before


def test_of_concurrent_creators_exactly_one_creates(repo: SessionRepository) -> None:
    outcomes: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def create(number: int) -> None:
        try:
            repo.create(KEY, meta={"by": number})
            outcome = f"created {number}"
        except SessionExistsError:
            outcome = "exists"
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    created = [o for o in outcomes if o.startswith("created")]
    assert len(created) == 1
    assert outcomes.count("exists") == 5
    session = repo.get(KEY)
    assert session is not None
    assert created == [f"created {session.meta['by']}"]


@before_io
def test_bad_metadata_another_agent_and_a_bad_key_are_refused_before_any_io(
    repo: SessionRepository, store: Engine
) -> None:
    before = snapshot(store)
    for bad, field in (
        (["a", 1], "meta"),
        ({"x": float("nan")}, "meta"),
        ({1: "a"}, "meta"),
    ):
        with pytest.raises(ValueError, match=field), no_statements():
            repo.create(KEY, meta=bad)  # type: ignore[arg-type]
    with pytest.raises(AccessDeniedError), no_statements():
        repo.for_agent("agent-2").create(KEY)
    with pytest.raises(ValueError, match="peer_id"), no_statements():
        repo.create("agent-1:telegram:bot-A:dm:")
    assert snapshot(store) == before
