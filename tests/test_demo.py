"""`make run`'s demo: the main job through the public API, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aisopod_session import SessionKey, SessionRepository, open_database
from aisopod_session.demo import CONVERSATION, main


def test_demo_records_the_conversation_and_prints_it(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(db_path)]) == 0
    out = capsys.readouterr().out
    assert f"in {db_path}: 3 session(s), 10 message(s) in all." in out

    engine = open_database(db_path)
    repo = SessionRepository(engine)
    telegram = SessionKey("concierge", "telegram", "bot-main", "dm", "1001")
    history = repo.get_history(telegram)
    told = [inbound.text for inbound in CONVERSATION if inbound.channel == "telegram"]
    assert [m.content for m in history if m.role == "user"] == told
    session = repo.get(telegram)
    assert session is not None
    assert session.message_count == len(history) == 2 * len(told)
    engine.dispose()


def test_demo_runs_as_a_module_and_keeps_history_across_runs(db_path: Path) -> None:
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "aisopod_session.demo", str(db_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    engine = open_database(db_path)
    repo = SessionRepository(engine)
    assert repo.count_sessions() == 3
    assert sum(s.message_count for s in repo.list_sessions()) == 2 * 2 * len(CONVERSATION)
    engine.dispose()
