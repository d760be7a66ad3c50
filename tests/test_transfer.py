"""`import_jsonl` into either backend, PostgreSQL above all: lines with and without ids
mixed in one batch, and a message PostgreSQL cannot hold (a NUL character), refused by
line while every other line is imported."""

from __future__ import annotations

import io
import json
import os
import resource
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    Role,
    SessionKey,
    SessionRepository,
    export_jsonl,
    import_jsonl,
    open_database,
)
from tests.dbtools import count_rows

AT = "2026-11-26T03:59:48.123456+00:00"


def key_of(peer: str) -> SessionKey:
    return SessionKey("agent-1", "telegram", "bot", "dm", peer)


def session_line(peer: str, id: int | None) -> dict[str, Any]:
    """A session line as an export writes it, with or without its id."""
    line: dict[str, Any] = {
        "type": "session",
        "key": str(key_of(peer)),
        "agent_id": "agent-1",
        "channel": "telegram",
        "account_id": "bot",
        "peer_kind": "dm",
        "peer_id": peer,
        "created_at": AT,
        "updated_at": AT,
    }
    if id is not None:
        line["id"] = id
    return line


def message_line(peer: str, content: str, id: int | None) -> dict[str, Any]:
    """A message line naming its session by key, with or without its id."""
    line: dict[str, Any] = {
        "type": "message",
        "session": str(key_of(peer)),
        "role": "user",
        "content": content,
        "created_at": AT,
    }
    if id is not None:
        line["id"] = id
    return line


# Sessions and messages with ids and without, interleaved: a line without an id must get
# an id that no line of the same batch gives explicitly, before or after it.
MIXED: list[dict[str, Any]] = [
    session_line("s1", 1),
    session_line("s2", None),
    session_line("s3", 3),
    session_line("s4", None),
    message_line("s1", "s1 #1", 1),
    message_line("s1", "s1 no id a", None),
    message_line("s1", "s1 #2", 2),
    message_line("s2", "s2 no id a", None),
    message_line("s2", "s2 no id b", None),
    message_line("s2", "s2 #3", 3),
    session_line("s5", 10),
    message_line("s3", "s3 no id", None),
    message_line("s4", "s4 #7", 7),
    message_line("s4", "s4 no id", None),
    message_line("s5", "s5 #20", 20),
    message_line("s5", "s5 no id", None),
]


def test_lines_with_and_without_ids_mixed_in_a_batch_are_all_imported(store: Engine) -> None:
    """All in one batch, every line is imported (PostgreSQL's id sequences used to move
    only at the end of a batch, so a line without an id took an id given to another
    line: duplicate key), given ids are kept, and each new id is past every id given
    before it. (Across batches an id given later may already have been taken by a line
    without one, and is then refused as documented: one batch is the case that must
    work.)"""
    lines = [json.dumps(line) for line in MIXED]
    result = import_jsonl(store, lines)
    assert result.errors == []
    assert (result.sessions_created, result.messages_imported) == (5, 11)
    repo = SessionRepository(store)
    sessions = {s.peer_id: s.id for s in repo.list_sessions()}
    messages = {m.content: m.id for peer in sessions for m in repo.get_history(key_of(peer))}
    assert len(sessions) == 5
    assert len(set(sessions.values())) == 5
    assert len(messages) == 11
    assert len(set(messages.values())) == 11
    given: dict[str, list[int]] = {"session": [], "message": []}
    for line in MIXED:
        kind = line["type"]
        stored = sessions[line["peer_id"]] if kind == "session" else messages[line["content"]]
        if "id" in line:
            assert stored == line["id"], line
            given[kind].append(line["id"])
        else:
            assert stored is not None
            assert stored > max(given[kind], default=0), line
    # The sequences are past everything imported: new rows take fresh ids.
    fresh = repo.get_or_create(key_of("fresh"))
    assert fresh.id is not None
    assert fresh.id > max(i for i in sessions.values() if i is not None)
    message = repo.append_message(key_of("fresh"), Role.USER, "after the import")
    assert message.id is not None
    assert message.id > max(i for i in messages.values() if i is not None)


def test_an_import_into_postgresql_refuses_the_line_with_a_nul_and_imports_the_rest(
    tmp_path: Path, pg_store: Engine
) -> None:
    """SQLite keeps a NUL in a message; PostgreSQL's text cannot. Importing the SQLite
    store's export into PostgreSQL refuses that one line, by number, saying why, and
    imports every other line (it used to fail the whole batch with a store error)."""
    source = open_database(tmp_path / "source.db")
    try:
        repo = SessionRepository(source)
        for peer in ("a", "b"):
            repo.get_or_create(key_of(peer))
            repo.append_message(key_of(peer), Role.USER, f"{peer} before")
        repo.append_message(key_of("a"), Role.USER, "nul \x00 inside")
        repo.append_message(key_of("b"), Role.USER, "b after")
        out = io.StringIO()
        export_jsonl(source, out)
    finally:
        source.dispose()
    lines = out.getvalue().splitlines()
    nul_line = next(n for n, text in enumerate(lines, start=1) if "\\u0000" in text)

    result = import_jsonl(pg_store, lines)

    assert [error.line for error in result.errors] == [nul_line]
    assert "NUL" in result.errors[0].reason
    assert (result.sessions_created, result.messages_imported) == (2, 3)
    target = SessionRepository(pg_store)
    assert [m.content for m in target.get_history(key_of("a"))] == ["a before"]
    assert [m.content for m in target.get_history(key_of("b"))] == ["b before", "b after"]
    # message_count is counted from the rows imported, not taken from the file.
    a = target.get(key_of("a"))
    assert a is not None
    assert a.message_count == 1
    assert count_rows(pg_store, "messages") == 3


# --- memory: a huge line or a batch of big lines ------------------------------------------


def _peak_growth_of_import(path: Path, db: Path, **options: Any) -> tuple[int, str]:
    """Import `path` into `db` in a forked child; the growth of the child's peak resident
    memory during the import, in MiB, and what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        try:
            engine = open_database(db)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            with path.open(encoding="utf-8") as stream:
                result = import_jsonl(engine, stream, **options)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            engine.dispose()
            report = json.dumps(
                {
                    "growth": (after - before) // 1024,
                    "imported": result.messages_imported,
                    "errors": [(e.line, e.reason) for e in result.errors],
                }
            )
        except BaseException as exc:
            report = json.dumps({"growth": -1, "error": repr(exc)})
        os.write(write_end, report.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report = reader.read().decode()
    os.waitpid(pid, 0)
    return json.loads(report)["growth"], report


def test_a_200_mb_line_is_refused_by_number_without_being_read_into_memory(
    tmp_path: Path,
) -> None:
    """One 200 MB line used to take the import's process to a 1 GiB peak."""
    path = tmp_path / "huge.jsonl"
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps(session_line("p1", None)) + "\n")
        out.write(json.dumps(message_line("p1", "before", None)) + "\n")
        out.write('{"type": "message", "session": "agent-1:telegram:bot:dm:p1", "content": "')
        chunk = "x" * (1 << 20)
        for _ in range(200):
            out.write(chunk)
        out.write('", "role": "user", "created_at": "' + AT + '"}\n')
        out.write(json.dumps(message_line("p1", "after", None)) + "\n")
    growth, report = _peak_growth_of_import(path, tmp_path / "s.db")
    assert json.loads(report)["errors"] == [[3, "longer than 67,108,864 characters; not read"]]
    assert json.loads(report)["imported"] == 2
    # The longest line read is 64 Mi characters: a bounded peak, not one growing with it.
    assert 0 <= growth < 300, report


def test_a_batch_of_big_lines_is_cut_short_by_its_size(tmp_path: Path) -> None:
    """100 lines of 1 MB each in one batch of 1 000 used to be held all at once: the peak
    grew by 217 MiB without the cut by size, 85 MiB with it (measured on this machine)."""
    path = tmp_path / "big.jsonl"
    content = "y" * (1 << 20)
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps(session_line("p1", None)) + "\n")
        for i in range(100):
            out.write(json.dumps(message_line("p1", f"{i}{content}", None)) + "\n")
    growth, report = _peak_growth_of_import(path, tmp_path / "s.db")
    assert json.loads(report)["imported"] == 100, report
    assert 0 <= growth < 150, report


def test_a_line_over_a_smaller_limit_from_a_list_is_refused_too(store: Engine) -> None:
    lines = [
        json.dumps(session_line("p1", None)),
        json.dumps(message_line("p1", "z" * 600, None)),
        json.dumps(message_line("p1", "short", None)),
    ]
    result = import_jsonl(store, lines, max_line_length=400)
    assert [(e.line, e.reason) for e in result.errors] == [
        (2, "longer than 400 characters; not read")
    ]
    assert result.messages_imported == 1
    with pytest.raises(ValueError, match="max_line_length"):
        import_jsonl(store, lines, max_line_length=0)


# --- format 2: JSON content, message metadata, input/output tokens ------------------------

VALUES: list[Any] = [
    "plain text",
    "123",
    "null",
    '{"a": 1}',
    [{"type": "text", "text": "hi"}, {"type": "image", "url": "https://x/y.png"}],
    {"type": "reasoning", "summary": ["é", "🦀"]},
    0,
    -7,
    2.5,
    True,
    False,
    None,
]


def test_json_content_metadata_and_token_split_survive_export_and_import(
    store: Engine, tmp_path: Path
) -> None:
    """Every kind of content (a string stays a string), tool calls of any shape, message
    metadata and the input/output token counters come back exactly from an export
    imported into an empty store; the raw cells are the same JSON text; importing again
    changes nothing (content `1` and `true` are different messages)."""
    repo = SessionRepository(store)
    key = key_of("json")
    repo.get_or_create(key)
    for index, value in enumerate(VALUES):
        repo.append_message(
            key,
            Role.ASSISTANT if index % 2 else Role.DEVELOPER,
            value,
            tool_calls={"tool": "t", "args": {"n": index}} if index % 3 == 0 else None,
            meta={"model": "m", "index": index} if index % 2 else None,
            input_tokens=index,
            output_tokens=2 * index,
            tokens=1,
        )
    repo.append_message(key, Role.USER, 1)
    repo.append_message(key, Role.USER, True)
    out = io.StringIO()
    result = export_jsonl(store, out)
    assert (result.sessions, result.messages) == (1, len(VALUES) + 2)
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0])["format"] == 2
    target = open_database(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        imported = import_jsonl(target, lines)
        assert imported.errors == []
        assert imported.messages_imported == len(VALUES) + 2
        theirs = SessionRepository(target)
        assert theirs.get_history(key) == repo.get_history(key)
        ours, copied = repo.get(key), theirs.get(key)
        assert ours is not None
        assert copied is not None
        assert (copied.input_tokens, copied.output_tokens, copied.token_usage) == (
            ours.input_tokens,
            ours.output_tokens,
            ours.token_usage,
        )
        assert copied.input_tokens == sum(range(len(VALUES)))
        again = import_jsonl(target, lines)
        assert again.errors == []
        assert (again.messages_imported, again.messages_existing) == (0, len(VALUES) + 2)
        without_ids = [
            json.dumps({k: v for k, v in json.loads(line).items() if k != "id"})
            for line in lines[2:]
        ]
        by_content = import_jsonl(target, without_ids)
        assert by_content.errors == []
        assert (by_content.messages_imported, by_content.messages_existing) == (
            0,
            len(VALUES) + 2,
        )
    finally:
        target.dispose()


def test_a_format_1_export_still_imports_as_the_same_text_messages(store: Engine) -> None:
    """A file written before format 2 (content always text, no metadata or token split)
    imports into this version: every content comes back as the same string, even text
    that looks like JSON."""
    header = {
        "type": "aisopod-session-export",
        "format": 1,
        "schema_version": 2,
        "exported_at": AT,
    }
    texts = ["hello", "123", "null", '{"a": 1}', "[1, 2]", "true"]
    lines = [
        json.dumps(header),
        json.dumps({**session_line("v1", 1), "message_count": 6, "token_usage": 9}),
        *(json.dumps(message_line("v1", text, index + 1)) for index, text in enumerate(texts)),
    ]
    result = import_jsonl(store, lines)
    assert result.errors == []
    repo = SessionRepository(store)
    history = repo.get_history(key_of("v1"))
    assert [m.content for m in history] == texts
    assert all(m.meta == {} and m.tool_calls is None for m in history)
    session = repo.get(key_of("v1"))
    assert session is not None
    assert (session.token_usage, session.input_tokens, session.output_tokens) == (9, 0, 0)


def test_an_import_refuses_a_future_format_and_bad_json_values_by_line(store: Engine) -> None:
    """A header of an unknown format, and messages whose content, tool calls or metadata
    this store cannot keep, are refused by line number naming the field."""
    lines = [
        json.dumps({"type": "aisopod-session-export", "format": 3, "schema_version": 9}),
        json.dumps(session_line("bad", None)),
        json.dumps({**message_line("bad", "x", None), "metadata": [1, 2]}),
        json.dumps({**message_line("bad", "x", None), "content": 2**64}),
        json.dumps({**message_line("bad", "ok", None), "tool_calls": {"deep": 1}}),
    ]
    result = import_jsonl(store, lines)
    reasons = {error.line: error.reason for error in result.errors}
    assert set(reasons) == {1, 3, 4}
    assert "format" in reasons[1]
    assert reasons[3].startswith("metadata")
    assert reasons[4].startswith("content")
    assert result.messages_imported == 1
    (message,) = SessionRepository(store).get_history(key_of("bad"))
    assert message.tool_calls == {"deep": 1}
