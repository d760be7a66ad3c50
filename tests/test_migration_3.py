"""Migration 3 on stores this library's earlier versions wrote: every content cell, which
held plain text, becomes the JSON string of that text, so every message reads back
exactly as before, text that looks like JSON included. (Stores of the Rust crate and of
plain SQL: tests/test_crate_interchange.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from aisopod_session import SessionKey, SessionRepository, open_database
from aisopod_session.migrations import MIGRATIONS, applied_migrations, run_migrations
from tests.dbtools import store_location

KEY = SessionKey("agent", "telegram", "bot", "dm", "peer")
AT = "2026-11-30T10:00:00.000000+00:00"

TEXTS = [
    "plain",
    "123",
    "null",
    "true",
    '{"a": 1}',
    "[1, 2]",
    '"already quoted"',
    "",
    "   ",
    "line\nbreak\ttab\r\x01\x1f\x7f",
    "é 🦀 \u2028 \ufeff",
    'back\\slash "quote"',
]


def version_2_store(url: str, texts: list[str]) -> None:
    """A store as version 2 of this library left it: migrations 1 and 2 recorded with
    their checksums, content stored as plain text."""
    engine = create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        run_migrations(engine, MIGRATIONS[:2])
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
                f"created_at, updated_at, message_count) VALUES ('agent', 'telegram', 'bot', "
                f"'dm', 'peer', '{AT}', '{AT}', {len(texts)})"
            )
            for text in texts:
                conn.exec_driver_sql(
                    "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
                    + (
                        "VALUES (1, 'user', %(content)s, '[{\"id\": 1}]', %(at)s)"
                        if conn.dialect.name == "postgresql"
                        else "VALUES (1, 'user', :content, '[{\"id\": 1}]', :at)"
                    ),
                    {"content": text, "at": AT},
                )
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_message_of_a_version_2_store_reads_back_as_the_same_text(
    backend: str, tmp_path: Path
) -> None:
    """Content cells become JSON strings of their old text (raw cell parsed as JSON is the
    old text), tool calls (JSON already) are kept, and the history reads back as before:
    the same strings, in the same order, with the same ids."""
    texts = TEXTS + (["nul \x00 inside"] if backend == "sqlite" else [])
    with store_location(backend, tmp_path) as url:
        version_2_store(url, texts)
        engine = open_database(url)
        try:
            assert [m.version for m in applied_migrations(engine)] == [1, 2, 3, 4, 5]
            history = SessionRepository(engine).get_history(KEY)
            assert [m.content for m in history] == texts
            assert all(isinstance(m.content, str) for m in history)
            assert [m.tool_calls for m in history] == [[{"id": 1}]] * len(texts)
            assert [m.meta for m in history] == [{}] * len(texts)
            with engine.connect() as conn:
                cells = [
                    row[0]
                    for row in conn.exec_driver_sql("SELECT content FROM messages ORDER BY id")
                ]
            assert [json.loads(cell) for cell in cells] == texts
            session = SessionRepository(engine).get(KEY)
            assert session is not None
            assert (session.input_tokens, session.output_tokens) == (0, 0)
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_opening_the_upgraded_store_again_changes_nothing(backend: str, tmp_path: Path) -> None:
    """Migration 3 runs once: a second open finds the store up to date and leaves every
    cell as the first left it (quoting twice would turn "x" into "\\"x\\"")."""
    with store_location(backend, tmp_path) as url:
        version_2_store(url, TEXTS)
        cells: list[list[Any]] = []
        for _ in range(2):
            engine = open_database(url)
            try:
                with engine.connect() as conn:
                    cells.append(
                        [
                            row[0]
                            for row in conn.exec_driver_sql(
                                "SELECT content FROM messages ORDER BY id"
                            )
                        ]
                    )
            finally:
                engine.dispose()
        assert cells[0] == cells[1]
        assert [json.loads(cell) for cell in cells[1]] == TEXTS
