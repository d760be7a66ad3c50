"""Rows written by plain SQL or other programs that this code cannot read: one such row
never stops listing, export or the summary for everything else, and every refusal names
the table, the row's id and the column (`DamagedRowError`, a `SessionStoreError`)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    AsyncSessionRepository,
    DamagedRowError,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStoreError,
    export_jsonl,
    import_jsonl,
    open_async_database,
    open_database,
)
from aisopod_session.connections import lease
from aisopod_session.repository import HistoryRows
from tests.dbtools import run_sql, snapshot

GOOD = SessionKey("agent-1", "telegram", "bot", "dm", "good")
BAD = SessionKey("agent-1", "telegram", "bot", "dm", "bad")

# (column, stored value) pairs a hand-written UPDATE may leave in a session row
SESSION_DAMAGE = [
    ("metadata", "{not json"),
    ("created_at", "yesterday"),
    ("updated_at", "2026-13-45T99:00:00"),
    ("peer_kind", "carrier-pigeon"),
]


def two_sessions(store: Engine) -> tuple[SessionRepository, int]:
    """`GOOD` and `BAD` with a message each: the repository and `BAD`'s id."""
    repo = SessionRepository(store)
    for key in (GOOD, BAD):
        repo.get_or_create(key)
        repo.append_message(key, Role.USER, f"hello from {key.peer_id}")
    bad = repo.get(BAD)
    assert bad is not None
    assert bad.id is not None
    return repo, bad.id


def damaged_store(store: Engine, column: str, value: object) -> tuple[SessionRepository, int]:
    """Two sessions with a message each; then plain SQL damages one column of `BAD`."""
    repo, bad_id = two_sessions(store)
    run_sql(store, f"UPDATE sessions SET {column} = ? WHERE id = ?", (value, bad_id))
    return repo, bad_id


@pytest.mark.parametrize(("column", "value"), SESSION_DAMAGE)
def test_a_damaged_session_is_named_and_everything_else_keeps_working(
    store: Engine, column: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    repo, bad_id = damaged_store(store, column, value)
    before = snapshot(store)

    # A single read of it is refused precisely.
    with pytest.raises(DamagedRowError) as refused:
        repo.get_by_id(bad_id)
    assert (refused.value.table, refused.value.row_id, refused.value.column) == (
        "sessions",
        bad_id,
        column,
    )
    assert f"sessions row {bad_id}, column {column}" in str(refused.value)
    assert isinstance(refused.value, SessionStoreError)

    # Listing goes on past it and logs it.
    with caplog.at_level(logging.WARNING, logger="aisopod_session"):
        listed = repo.list_sessions()
    assert [s.key for s in listed] == [GOOD]
    assert f"sessions row {bad_id}, column {column}" in caplog.text

    # The export goes on past it, reports it, and leaves its messages out with it.
    out = io.StringIO()
    result = export_jsonl(store, out)
    assert (result.sessions, result.messages, result.skipped_messages) == (1, 1, 1)
    assert [(d.table, d.row_id, d.column) for d in result.damaged] == [("sessions", bad_id, column)]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("key") or line.get("session") for line in lines[1:]] == [str(GOOD)] * 2

    # That export imports cleanly elsewhere.
    target = open_database(":memory:")
    try:
        imported = import_jsonl(target, io.StringIO(out.getvalue()))
        assert imported.errors == []
        assert (imported.sessions_created, imported.messages_imported) == (1, 1)
    finally:
        target.dispose()

    # The summary counts every session.
    summary = repo.summary()
    assert summary.total.sessions == 2
    assert summary.by_agent["agent-1"].sessions == 2
    assert snapshot(store) == before  # nothing of this changed the store


def test_a_status_outside_the_vocabulary_is_counted_as_damaged(store: Engine) -> None:
    repo, bad_id = damaged_store(store, "status", "deleted-ish")
    summary = repo.summary()
    assert summary.total.sessions == 2
    assert summary.damaged.sessions == 1
    assert summary.damaged.messages == 1
    assert [status.value for status in summary.by_status] == ["active"]
    with pytest.raises(DamagedRowError, match=f"sessions row {bad_id}, column status"):
        repo.get(BAD)
    assert [s.key for s in repo.list_sessions()] == [GOOD]


def test_a_damaged_message_is_named_and_left_out_of_an_export(
    store: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    repo = SessionRepository(store)
    repo.get_or_create(GOOD)
    kept = repo.append_message(GOOD, Role.USER, "kept")
    broken = repo.append_message(GOOD, Role.USER, "broken")
    run_sql(store, "UPDATE messages SET created_at = 'last tuesday' WHERE id = ?", (broken.id,))
    before = snapshot(store)
    # History reads it leniently: the unreadable time as the epoch, logged, naming the row.
    with caplog.at_level(logging.WARNING, logger="aisopod_session"):
        history = repo.get_history(GOOD)
    assert [(m.id, m.content, m.created_at) for m in history] == [
        (kept.id, "kept", kept.created_at),
        (broken.id, "broken", datetime(1970, 1, 1, tzinfo=UTC)),
    ]
    assert f"messages row {broken.id}, column created_at" in caplog.text
    assert snapshot(store) == before  # reading repaired nothing
    out = io.StringIO()
    result = export_jsonl(store, out)
    assert (result.sessions, result.messages) == (1, 1)
    assert [(d.table, d.row_id, d.column) for d in result.damaged] == [
        ("messages", broken.id, "created_at")
    ]
    messages = [json.loads(x) for x in out.getvalue().splitlines() if '"message"' in x]
    assert [m["id"] for m in messages] == [kept.id]


def test_merging_into_metadata_that_is_not_json_names_the_row_and_replacing_repairs_it(
    store: Engine,
) -> None:
    repo, bad_id = damaged_store(store, "metadata", "{not json")
    before = snapshot(store)
    with pytest.raises(DamagedRowError, match=f"sessions row {bad_id}, column metadata"):
        repo.update_metadata(BAD, {"lang": "pt"})
    assert snapshot(store) == before
    repaired = repo.update_metadata(BAD, {"lang": "pt"}, replace=True)
    assert repaired.meta == {"lang": "pt"}
    assert repo.get(BAD) == repaired


def test_merging_into_metadata_stored_as_bytes_names_the_row(db_path: Path) -> None:
    """SQLite keeps a blob that plain SQL binds as bytes: every call that merges into
    the stored metadata refuses it as a damaged row, writing nothing."""
    engine = open_database(db_path)
    try:
        repo, bad_id = damaged_store(engine, "metadata", b'{"lang": "en"}')
        before = snapshot(engine)
        calls: dict[str, Callable[[], object]] = {
            "update_metadata": lambda: repo.update_metadata(BAD, {"lang": "pt"}),
            "fork": lambda: repo.fork(BAD, SessionKey("agent-1", "telegram", "bot", "dm", "fork")),
            "apply_changes": lambda: repo.apply_changes(BAD, meta={"lang": "pt"}),
            "related_meta": lambda: repo.apply_changes(GOOD, related_meta={BAD: {"x": 1}}),
        }
        for name, call in calls.items():
            with pytest.raises(DamagedRowError) as refused:
                call()
            assert (refused.value.table, refused.value.row_id, refused.value.column) == (
                "sessions",
                bad_id,
                "metadata",
            ), name
            assert "not text but bytes" in str(refused.value), name
            assert snapshot(engine) == before, name
        assert repo.update_metadata(BAD, {"lang": "pt"}, replace=True).meta == {"lang": "pt"}
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("column", "value"),
    [("token_usage", 2.0**63), ("message_count", "three"), ("message_count", b"\x01")],
)
def test_a_counter_that_is_not_an_integer_is_read_as_damaged(
    db_path: Path, column: str, value: object
) -> None:
    """SQLite keeps what plain SQL stores, and an older version let token_usage overflow
    into a float: such a row is named, listed by no one, counted as damaged."""
    engine = open_database(db_path)
    try:
        repo, bad_id = damaged_store(engine, column, value)
        with pytest.raises(DamagedRowError, match=rf"column {column}: .*not an integer"):
            repo.get(BAD)
        summary = repo.summary()
        assert (summary.total.sessions, summary.damaged.sessions) == (2, 1)
        assert sum(t.sessions for t in summary.by_status.values()) == 1
        assert [s.id for s in repo.list_sessions()] != [bad_id]
        result = export_jsonl(engine, io.StringIO())
        assert [(d.table, d.row_id, d.column) for d in result.damaged] == [
            ("sessions", bad_id, column)
        ]
        # Retention still deletes every old session, the damaged one among them.
        assert repo.prune(updated_before=datetime(2999, 1, 1, tzinfo=UTC)) == 2
        assert repo.summary().total.sessions == 0
    finally:
        engine.dispose()


# --- the command ----------------------------------------------------------------------------


def test_the_command_names_damaged_rows_and_keeps_working(db_path: Path, tmp_path: Path) -> None:
    from tests.test_cli import cli

    engine = open_database(db_path)
    try:
        _, bad_id = damaged_store(engine, "metadata", "{not json")
        run_sql(engine, "UPDATE sessions SET status = 'lost' WHERE id = ?", (bad_id,))
    finally:
        engine.dispose()
    db = str(db_path)

    listed = cli("--db", db, "sessions", "list")
    assert listed.returncode == 0
    assert str(GOOD) in listed.stdout
    assert f"warning: skipped a damaged row: sessions row {bad_id}, column" in listed.stderr

    status = cli("--db", db, "status", "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert (report["sessions"], report["damaged_sessions"]) == (2, 1)
    assert "damaged:        1 session(s)" in cli("--db", db, "status").stdout

    exported = cli("--db", db, "export", "--out", str(tmp_path / "out.jsonl"))
    assert exported.returncode == 1  # not a whole backup: scripts must notice
    assert f"sessions row {bad_id}, column" in exported.stderr
    assert "Left out 1 damaged row(s) and the 1 message(s)" in exported.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the header, the good session and its message


@pytest.mark.parametrize(
    ("stored", "reads_as"),
    [("null", {}), ("[1, 2]", None), ('{"a": 1e999}', None), ('{"a": NaN}', None)],
)
def test_metadata_that_is_no_json_object_is_read_leniently_or_refused(
    store: Engine, stored: str, reads_as: dict[str, object] | None
) -> None:
    """JSON null reads as no metadata; a list, or numbers no JSON writer could read back
    (an overflow to infinity, NaN), make the row damaged rather than come back as values
    the store could not write or export again. Merging starts afresh from any JSON that
    is not an object."""
    repo, bad_id = damaged_store(store, "metadata", stored)
    if reads_as is not None:
        found = repo.get(BAD)
        assert found is not None
        assert found.meta == reads_as
    else:
        with pytest.raises(DamagedRowError, match=f"sessions row {bad_id}, column metadata"):
            repo.get(BAD)
    if stored in ("null", "[1, 2]"):
        assert repo.update_metadata(BAD, {"lang": "pt"}).meta == {"lang": "pt"}


def raw_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the store's tables, text as the bytes stored."""
    conn = sqlite3.connect(path)
    conn.text_factory = bytes
    try:
        return {
            table: conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
            for table in ("sessions", "messages", "schema_version")
        }
    finally:
        conn.close()


def test_the_size_of_a_history_page_counts_whatever_other_programs_stored() -> None:
    """The async API decodes a page of history off the event loop when its text is
    large (`HistoryRows.text_size`): cells another program stored as numbers, blobs or
    NULL count by their length when they have one, and never make it fail."""
    plain = (1, 7, 1, "user", '"abc"', None, "2026-01-01T00:00:00Z", "{}")
    odd = (1, 8, 1, "user", 42, b"xyz", "2026-01-01T00:00:00Z", None)
    assert HistoryRows([plain], True).text_size() == 5 + 2
    assert HistoryRows([plain, odd], True).text_size() == 5 + 2 + 3
    assert HistoryRows([], False).text_size() == 0


def test_text_that_is_not_utf8_is_read_with_replacement_characters(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not UTF-8, stored as text by another program (SQLite refuses the
    whole result naming only the column), are read with U+FFFD in their place by every
    read-only call, sync and async, logged; the export counts them; nothing changes in
    the file, and the calls that write go on refusing."""
    engine = open_database(db_path)
    repo, bad_id = two_sessions(engine)
    run_sql(
        db_path,
        "UPDATE messages SET content = CAST(x'2268c3a96cff6c6f22' AS TEXT) WHERE session_id = ?",
        (bad_id,),
    )
    run_sql(
        db_path,
        "UPDATE sessions SET last_compaction_summary = CAST(x'6f6bfe' AS TEXT) WHERE id = ?",
        (bad_id,),
    )
    before = raw_rows(db_path)

    with caplog.at_level(logging.WARNING, logger="aisopod_session"):
        [message] = repo.get_history(BAD)
    assert message.content == "hél\ufffdlo"
    assert "get_history read text that is not UTF-8 (column content)" in caplog.text
    [(_, content_text, _)] = repo.get_history_text(BAD)
    assert content_text == '"hél\ufffdlo"'
    found = repo.get(BAD)
    assert found is not None
    assert found.last_compaction_summary == "ok\ufffd"
    assert {s.key for s in repo.list_sessions()} == {GOOD, BAD}
    assert {s.key for s in repo.page_sessions().sessions} == {GOOD, BAD}
    [good_message] = repo.get_history(GOOD)
    assert [hit.message.id for hit in repo.search_messages("hello")] == [good_message.id]
    assert repo.summary().total.sessions == 2

    async def read_async() -> tuple[Any, Any]:
        async_engine = await open_async_database(db_path)
        try:
            async_repo = AsyncSessionRepository(async_engine)
            history = await async_repo.get_history(BAD)
            return [m.content for m in history], await async_repo.get_by_id(bad_id)
        finally:
            await async_engine.dispose()

    contents, by_id = asyncio.run(read_async())
    assert contents == ["hél\ufffdlo"]
    assert by_id.last_compaction_summary == "ok\ufffd"

    out = io.StringIO()
    result = export_jsonl(engine, out)
    assert (result.sessions, result.messages, result.replaced_text) == (2, 2, 2)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "hél\ufffdlo" in [line.get("content") for line in lines]

    # A write would store the replaced text back: it is refused, nothing written.
    with pytest.raises(SessionStoreError, match="UTF-8"):
        repo.update_metadata(BAD, {"seen": True})
    # The connection the lenient reads ran on reads text strictly again after them.
    assert lease(engine).text_factory is str
    engine.dispose()
    assert raw_rows(db_path) == before


def test_messages_read_with_replacement_characters_can_be_replaced(db_path: Path) -> None:
    """`replace_messages(replacing=...)` compares the newest messages as `get_history`
    read them, text that is not UTF-8 included (read the same way), and deletes them:
    it stores nothing it read, so the rewrite of a damaged history goes through."""
    engine = open_database(db_path)
    repo, bad_id = two_sessions(engine)
    run_sql(
        db_path,
        "UPDATE messages SET content = CAST(x'2268c3a96cff6c6f22' AS TEXT) WHERE session_id = ?",
        (bad_id,),
    )
    read = repo.get_history(BAD)
    assert [m.content for m in read] == ["hél\ufffdlo"]
    [new] = repo.replace_messages(BAD, [NewMessage(Role.USER, "hello again")], replacing=read)
    assert repo.get_history(BAD) == [new]
    engine.dispose()


@pytest.mark.parametrize("where", ["file", "memory"])
def test_a_call_failing_inside_a_check_leaves_the_call_atomic(db_path: Path, where: str) -> None:
    """A `check` callback's own calls on the same thread (a read of text that is not
    UTF-8, read again leniently; a write, refused inside the write in progress) do not
    end the transaction they run inside, on a file or in memory (one shared connection):
    the call's writes are committed together, or rolled back together when the check
    refuses."""
    engine = open_database(db_path if where == "file" else ":memory:")
    repo = SessionRepository(engine)
    for key in (GOOD, BAD):
        repo.get_or_create(key)
    repo.append_message(GOOD, Role.USER, "hello")
    with engine.connect() as conn:
        conn.exec_driver_sql(
            "UPDATE sessions SET last_compaction_summary = CAST(x'6f6bfe' AS TEXT) "
            "WHERE peer_id = 'bad'"
        )
        conn.commit()
    seen: list[object] = []

    def check(meta: object) -> None:
        found = repo.get(BAD)
        assert found is not None
        seen.append(found.last_compaction_summary)
        try:
            repo.update_metadata(BAD, {"nested": True})
        except SessionStoreError as exc:
            seen.append(type(exc))

    repo.apply_changes(
        GOOD, meta={"v": 2}, messages=[{"role": "user", "content": "a"}], check=check
    )
    assert seen == ["ok\ufffd", SessionStoreError]
    good = repo.get(GOOD)
    assert good is not None
    assert (good.meta, good.message_count) == ({"v": 2}, 2)

    def refuse(meta: object) -> None:
        check(meta)
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        repo.apply_changes(
            GOOD, meta={"v": 3}, messages=[{"role": "user", "content": "b"}], check=refuse
        )
    good = repo.get(GOOD)
    assert good is not None
    assert (good.meta, good.message_count) == ({"v": 2}, 2)
    assert [m.content for m in repo.get_history(GOOD)] == ["hello", "a"]
    bad = repo.get(BAD)
    assert bad is not None
    assert bad.meta == {}
    engine.dispose()
