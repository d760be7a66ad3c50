"""`copy_database`: a SQLite store copied into a store on either backend, row for row."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from aisopod_session import (
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStoreError,
    copy_database,
    open_database,
)
from tests.dbtools import count_rows, snapshot, store_location

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


# --- atomicity: a failed copy leaves the target as it was ---------------------------------


def store_with_a_nul_message(path: Path, good: int) -> tuple[Engine, int]:
    """A SQLite store of 5 sessions holding `good` messages between them, then one
    message with a NUL character (SQLite keeps it; PostgreSQL's text cannot); the engine
    and the NUL message's id."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    keys = [SessionKey("agent-1", "telegram", "bot", "dm", f"nul-{i}") for i in range(5)]
    for key in keys:
        repo.get_or_create(key)
    for number in range(good):
        repo.append_message(keys[number % 5], Role.USER, f"good {number}")
    bad = repo.append_message(keys[0], Role.USER, "before \x00 after")
    assert bad.content == "before \x00 after"
    assert bad.id is not None
    return engine, bad.id


def test_a_message_postgresql_cannot_hold_fails_the_copy_naming_table_row_and_column(
    tmp_path: Path, pg_store: Engine
) -> None:
    """One NUL in one message's content: `SessionStoreError` naming the table
    `messages`, the message's id and the column `content`; the PostgreSQL target is left
    as it was, empty (it used to keep the sessions, without their messages)."""
    source, bad_id = store_with_a_nul_message(tmp_path / "nul.db", good=3)
    try:
        before = snapshot(pg_store)
        with pytest.raises(SessionStoreError) as raised:
            copy_database(source, pg_store)
        message = str(raised.value)
        assert "messages" in message
        assert re.search(rf"\b{bad_id}\b", message), message
        assert "content" in message
        assert snapshot(pg_store) == before
        assert count_rows(pg_store, "sessions") == 0
    finally:
        source.dispose()


def test_a_copy_failing_in_a_later_batch_leaves_the_target_unchanged(
    tmp_path: Path, pg_store: Engine
) -> None:
    """With batch_size=10, the NUL message comes after 50 good ones: five batches of
    messages were written before the failure, and none of them stays."""
    source, _ = store_with_a_nul_message(tmp_path / "nul.db", good=50)
    try:
        before = snapshot(pg_store)
        with pytest.raises(SessionStoreError):
            copy_database(source, pg_store, batch_size=10)
        assert snapshot(pg_store) == before
    finally:
        source.dispose()


def test_a_failed_copy_with_overwrite_keeps_what_the_target_held(
    tmp_path: Path, pg_store: Engine
) -> None:
    """`overwrite=True` deletes the target's contents only as part of a copy that
    succeeds: when the copy fails, the old contents are all still there."""
    old = SessionKey("old", "slack", "T", "dm", "kept")
    SessionRepository(pg_store).get_or_create(old)
    SessionRepository(pg_store).append_message(old, Role.USER, "still here")
    source, _ = store_with_a_nul_message(tmp_path / "nul.db", good=50)
    try:
        before = snapshot(pg_store)
        with pytest.raises(SessionStoreError):
            copy_database(source, pg_store, batch_size=10, overwrite=True)
        assert snapshot(pg_store) == before
    finally:
        source.dispose()


def test_a_copy_interrupted_by_its_progress_callback_leaves_the_target_unchanged(
    source: Engine, store: Engine
) -> None:
    """Any failure, not only the database's: a progress callback that raises half-way
    (an interrupted operator's tool, say) aborts the copy, and the target on either
    backend holds what it held before (here: an old session, with overwrite=True)."""
    SessionRepository(store).get_or_create(SessionKey("old", "c", "a", "dm", "p"))
    before = snapshot(store)
    calls: list[tuple[str, int, int]] = []

    def progress(table: str, done: int, total: int) -> None:
        calls.append((table, done, total))
        if table == "messages" and len(calls) > 8:
            raise RuntimeError("interrupted")

    # The callback's own error is expected to come through as it is; a store that wraps
    # it in a SessionStoreError would also have stopped the copy, which is what counts.
    with pytest.raises((RuntimeError, SessionStoreError)):
        copy_database(source, store, batch_size=7, overwrite=True, progress=progress)
    assert snapshot(store) == before


# --- the same store as source and target ---------------------------------------------------


def test_copying_a_store_onto_its_own_engine_is_refused_and_changes_nothing(
    store: Engine,
) -> None:
    """`copy_database(x, x, overwrite=True)`: the target is the source, so overwriting it
    would empty both (it used to: "Copied 0 session(s)"). Refused, store unchanged."""
    repo = SessionRepository(store)
    key = SessionKey("agent-1", "telegram", "bot", "dm", "self")
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "not to be lost")
    before = snapshot(store)
    with pytest.raises(SessionStoreError, match=r"(?i)same"):
        copy_database(store, store, overwrite=True)
    assert snapshot(store) == before


def _by_path(path: Path) -> Engine:
    return open_database(path)


def _by_url(path: Path) -> Engine:
    return open_database(f"sqlite:///{path}")


def _through_a_symlink(path: Path) -> Engine:
    link = path.with_name("link-to-" + path.name)
    link.symlink_to(path)
    return open_database(link)


@pytest.mark.parametrize(
    "second", [_by_path, _by_url, _through_a_symlink], ids=["path", "url", "symlink"]
)
def test_copying_a_sqlite_file_onto_itself_through_another_engine_is_refused(
    tmp_path: Path, second: Callable[[Path], Engine]
) -> None:
    """Two engines on one file (opened by path, by `sqlite:///` URL, or through a
    symlink) are one store: refused, the file unchanged."""
    path = tmp_path / "one.db"
    first = open_database(path)
    key = SessionKey("agent-1", "telegram", "bot", "dm", "self")
    SessionRepository(first).get_or_create(key)
    SessionRepository(first).append_message(key, Role.USER, "not to be lost")
    other = second(path)
    try:
        before = snapshot(path)
        with pytest.raises(SessionStoreError, match=r"(?i)same"):
            copy_database(first, other, overwrite=True)
        assert snapshot(path) == before
    finally:
        first.dispose()
        other.dispose()


def test_copying_a_postgresql_schema_onto_itself_through_another_engine_is_refused(
    tmp_path: Path,
) -> None:
    """Two engines on one PostgreSQL database and schema are one store: refused,
    unchanged."""
    with store_location("postgresql", tmp_path) as url:
        first, other = open_database(url), open_database(url)
        try:
            key = SessionKey("agent-1", "telegram", "bot", "dm", "self")
            SessionRepository(first).get_or_create(key)
            SessionRepository(first).append_message(key, Role.USER, "not to be lost")
            before = snapshot(first)
            with pytest.raises(SessionStoreError, match=r"(?i)same"):
                copy_database(first, other, overwrite=True)
            assert snapshot(first) == before
        finally:
            first.dispose()
            other.dispose()


def test_two_schemas_of_one_postgresql_database_are_different_stores(
    source: Engine, tmp_path: Path
) -> None:
    """The same-store check is not too broad: one schema copies into another of the same
    database (copied from SQLite first, then PostgreSQL to PostgreSQL)."""
    with (
        store_location("postgresql", tmp_path) as first_url,
        store_location("postgresql", tmp_path) as second_url,
    ):
        first, second = open_database(first_url), open_database(second_url)
        try:
            copy_database(source, first)
            result = copy_database(first, second)
            assert (result.sessions, result.messages) == (30, 30 * 10 - 8 + 1)
            assert rows(second) == rows(source)
        finally:
            first.dispose()
            second.dispose()


def test_a_postgresql_database_reached_through_its_unix_socket_is_the_same_store(
    pg_url: str,
) -> None:
    """The same server and schema, once over TCP and once over the server's Unix socket
    (no port, another address): still the same store."""
    socket_folder = "/var/run/postgresql"
    if not Path(socket_folder).is_dir():
        pytest.fail(f"the local PostgreSQL's socket folder {socket_folder} is missing")
    url = make_url(pg_url)
    by_socket = url.set(host=None, port=None).update_query_dict({"host": socket_folder})
    first = open_database(pg_url)
    second = open_database(by_socket)
    try:
        SessionRepository(first).get_or_create("agent-1:telegram:bot:dm:u1")
        with pytest.raises(SessionStoreError, match="same store"):
            copy_database(first, second, overwrite=True)
        assert count_rows(first, "sessions") == 1
    finally:
        first.dispose()
        second.dispose()


def test_a_counter_postgresql_cannot_hold_fails_the_copy_naming_table_row_and_column(
    tmp_path: Path, pg_store: Engine
) -> None:
    """SQLite's message_count takes 64 bits, PostgreSQL's INTEGER 32: a copy of a session
    with 3 000 000 000 messages counted is refused naming it, before anything is copied
    (it used to fail with a bare "integer out of range")."""
    source = open_database(tmp_path / "big-count.db")
    try:
        repo = SessionRepository(source)
        session = repo.get_or_create("agent-1:telegram:bot:dm:u1")
        with source.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE sessions SET message_count = 3000000000 WHERE id = ?", (session.id,)
            )
        with pytest.raises(
            SessionStoreError, match=rf"sessions row {session.id}, column message_count"
        ):
            copy_database(source, pg_store)
        assert count_rows(pg_store, "sessions") == 0
    finally:
        source.dispose()
