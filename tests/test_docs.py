"""The README's usage examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aisopod_session import SessionRepository, open_database

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    engine = open_database(tmp_path / "aisopod-sessions.db")
    history = SessionRepository(engine).get_history("support:telegram:bot-1:dm:12345")
    assert [(m.role, m.content) for m in history] == [
        ("user", "Hi!"),
        ("assistant", "(0 earlier messages) you said: Hi!"),
    ]
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
