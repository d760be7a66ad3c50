"""The README's usage examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import Engine

from aisopod_session import SessionRepository, open_database

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    engine = open_database(tmp_path / "aisopod-sessions.db")
    repo = SessionRepository(engine)
    history = repo.get_history("support:telegram:bot-1:dm:12345")
    assert [(m.role, m.content, m.meta) for m in history] == [
        ("user", "Hi!", {}),
        (
            "assistant",
            [{"type": "text", "text": "(0 earlier messages) you said: Hi!"}],
            {"model": "echo-1"},
        ),
    ]
    session = repo.get("support:telegram:bot-1:dm:12345")
    assert session is not None
    assert (session.input_tokens, session.output_tokens, session.token_usage) == (9, 3, 12)
    engine.dispose()


def test_readme_asyncio_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    asyncio_blocks = [block for block in blocks if "open_async_database" in block]
    assert asyncio_blocks, "README.md shows no asyncio example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(asyncio_blocks[0], str(README), "exec"), namespace)
    engine = open_database(tmp_path / "aisopod-sessions.db")
    history = SessionRepository(engine).get_history("support:telegram:bot-1:dm:67890")
    assert [(m.role, m.content) for m in history] == [("user", "Hello from asyncio")]
    engine.dispose()


def test_api_md_read_then_write_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/api.md's example of the application's own ORM work on the store's engine."""
    api = README.with_name("docs") / "api.md"
    blocks = re.findall(r"```python\n(.*?)```", api.read_text(), flags=re.DOTALL)
    (example,) = [block for block in blocks if "write_engine" in block]
    monkeypatch.chdir(tmp_path)
    for _ in range(3):
        exec(compile(example, str(api), "exec"), {"__name__": "api_example"})
    engine = open_database(tmp_path / "aisopod-sessions.db")
    session = SessionRepository(engine).get("support:telegram:bot-1:dm:12345")
    engine.dispose()
    assert session is not None
    assert session.meta == {"visits": 3}


def test_schema_md_plain_sql_reads_content_as_documented(store: Engine) -> None:
    """docs/schema.md's plain-SQL reading of JSON content, on the backend at hand: a
    string's text, the text blocks of block content, a metadata field, the text test."""
    doc = (README.with_name("docs") / "schema.md").read_text()
    backend = 0 if store.dialect.name == "sqlite" else 1
    rows = {
        line.split("|")[1].strip(): re.findall(r"`([^`]*)`", line.split("|")[2 + backend])
        for line in doc.splitlines()
        if line.startswith("| ") and line.count("`") >= 4
    }
    repo = SessionRepository(store)
    key = "agent:telegram:bot:dm:sql"
    repo.get_or_create(key)
    repo.append_message(key, "user", "héllo 🦀", meta={"model": "m-1"})
    repo.append_message(
        key,
        "assistant",
        [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
    )
    repo.append_message(key, "assistant", 42)
    with store.connect() as conn:

        def run(sql: str) -> list[object]:
            return [row[0] for row in conn.exec_driver_sql(sql)]

        for as_text in rows["content as text (a string's text; other values as JSON text)"]:
            texts = run(f"SELECT {as_text} FROM messages ORDER BY id")
            assert texts[0] == "héllo 🦀"
            assert str(texts[2]) == "42"
        (blocks,) = rows["the text of every text block"]
        assert run(blocks + " ORDER BY 1") == ["a", "b"]
        (field,) = rows["a metadata field"]
        assert run(f"SELECT {field} FROM messages ORDER BY id") == ["m-1", None, None]
        (is_text,) = rows["is it text?"]
        kinds = run(f"SELECT {is_text} FROM messages ORDER BY id")
        assert [bool(kind) for kind in kinds] == [True, False, False]


def test_integrations_md_openai_agents_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/integrations.md's OpenAI Agents SDK example, and the key it names."""
    integrations = README.with_name("docs") / "integrations.md"
    blocks = re.findall(r"```python\n(.*?)```", integrations.read_text(), flags=re.DOTALL)
    (example,) = [block for block in blocks if "integrations.openai_agents import" in block]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, str(integrations), "exec"), {"__name__": "integrations_example"})
    assert capsys.readouterr().out == "You said: Hi!\n"
    engine = open_database(tmp_path / "agents.db")
    key = "openai-agents:agents-sdk:default:thread:chat-42"
    assert key in integrations.read_text()
    history = SessionRepository(engine).get_history(key)
    assert [(m.role, m.meta["item_type"]) for m in history] == [
        ("user", "message"),
        ("assistant", "message"),
        ("user", "message"),
        ("assistant", "message"),
    ]
    engine.dispose()


def test_integrations_md_adk_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/integrations.md's Google ADK example, and the key it names."""
    integrations = README.with_name("docs") / "integrations.md"
    blocks = re.findall(r"```python\n(.*?)```", integrations.read_text(), flags=re.DOTALL)
    (example,) = [block for block in blocks if "integrations.adk import" in block]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, str(integrations), "exec"), {"__name__": "integrations_example"})
    assert capsys.readouterr().out == "You said: Hi!\nYou said: Hi! 2\n"
    engine = open_database(tmp_path / "adk.db")
    key = "google-adk:adk:helpdesk%3Aalice:thread:chat-7"
    assert key in integrations.read_text()
    history = SessionRepository(engine).get_history(key)
    assert [(m.role, m.content) for m in history] == [
        ("user", [{"text": "Hi!"}]),
        ("assistant", [{"text": "You said: Hi!"}]),
    ]
    engine.dispose()
