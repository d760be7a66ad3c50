"""`copy_database`: a SQLite store copied into a store on either backend, row for row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStoreError,
    copy_database,
    open_database,
)
from tests.dbtools import snapshot

KEYS = [SessionKey(f"agent-{i % 3}", "telegram", "bot", "dm", f"peer-{i}") for i in range(30)]


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite store of 30 sessions with metadata and statuses, 10 messages each (tool
    calls included), where the newest session and message were deleted: its id sequences
    are past its highest rows."""
    engine = open_database(tmp_path / "source.db")
    repo = SessionRepository(engine)
    for number, key in enumerate(KEYS):
        repo.get_or_create(key)
        repo.update_metadata(key, {"n": number, "lang": "pt"})
        repo.append_messages(
            key,
            [
                message
                for i in range(5)
                for message in (
                    NewMessage(Role.USER, f"hello {number}/{i} ✓"),
                    NewMessage(Role.ASSISTANT, "", [{"id": f"c{i}", "args": {"x": i}}]),
                )
            ],
            tokens=number,
        )
    repo.set_status(KEYS[3], "archived")
    repo.compact(KEYS[4], keep_last=2, summary="older turns, briefly")
    doomed = SessionKey("agent-9", "slack", "T", "dm", "gone")
    repo.get_or_create(doomed)
    repo.append_message(doomed, Role.USER, "deleted")
    repo.delete(doomed)
    yield engine
    engine.dispose()


def rows(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    """The two tables' rows, as Python values, in id order."""
    repo = SessionRepository(engine)
    sessions = repo.list_sessions(limit=1000)
    return {
        "sessions": sorted(tuple(s.model_dump().values()) for s in sessions),
        "messages": sorted(
            tuple(m.model_dump().values()) for s in sessions for m in repo.get_history(s.key)
        ),
    }


def test_everything_is_copied_exactly_in_batches_with_progress(
    source: Engine, store: Engine
) -> None:
    reports: list[tuple[str, int, int]] = []
    result = copy_database(source, store, batch_size=7, progress=lambda *r: reports.append(r))
    assert (result.sessions, result.messages) == (30, 30 * 10 - 8 + 1)
    assert rows(store) == rows(source)
    assert reports[-1] == ("messages", result.messages, result.messages)
    assert [r for r in reports if r[0] == "sessions"][-1] == ("sessions", 30, 30)
    assert len(reports) == -(-30 // 7) + -(-result.messages // 7)


def test_new_rows_in_the_target_get_ids_the_source_never_gave(
    source: Engine, store: Engine
) -> None:
    copy_database(source, store)
    source_repo, target_repo = SessionRepository(source), SessionRepository(store)
    fresh = SessionKey("agent-1", "slack", "T", "dm", "new")
    theirs = source_repo.get_or_create(fresh)  # the source's next ids, for comparison
    ours = target_repo.get_or_create(fresh)
    assert ours.id == theirs.id  # past the deleted session's id on both
    message = target_repo.append_message(fresh, Role.USER, "first in the target")
    assert message.id == source_repo.append_message(fresh, Role.USER, "x").id


def test_a_non_empty_target_is_refused_unless_overwritten(source: Engine, store: Engine) -> None:
    SessionRepository(store).get_or_create(SessionKey("other", "c", "a", "dm", "p"))
    before = snapshot(store)
    with pytest.raises(SessionStoreError, match="already holds 1 session"):
        copy_database(source, store)
    assert snapshot(store) == before
    copy_database(source, store, overwrite=True)
    assert rows(store) == rows(source)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_a_bad_batch_size_is_refused(source: Engine, store: Engine, batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        copy_database(source, store, batch_size=batch_size)  # type: ignore[arg-type]
