"""`aisopod-session import-openclaw` killed with SIGKILL mid-import: the store holds whole
sessions only, and the next run completes the import without a duplicate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aisopod_session import SessionRepository, open_database
from tests.test_openclaw import chat, write_jsonl

SESSIONS = 300


def test_a_killed_import_leaves_whole_sessions_and_the_next_run_finishes(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "openclaw" / "agents" / "main" / "sessions"
    folder.mkdir(parents=True)
    store = {}
    for number in range(SESSIONS):
        session_id = f"s{number:04d}"
        store[f"agent:main:telegram:direct:{number}"] = {"sessionId": session_id, "updatedAt": 1}
        lines = chat(session_id)
        # Longer transcripts: the chat's eight entries, then 40 more user turns.
        parent = "a8"
        for turn in range(40):
            ident = f"t{turn}"
            lines.append(
                {
                    "type": "message",
                    "id": ident,
                    "parentId": parent,
                    "timestamp": "2026-02-13T16:26:41Z",
                    "message": {
                        "role": "user",
                        "content": f"turn {turn}",
                        "timestamp": 1_771_000_000_000 + turn,
                    },
                }
            )
            parent = ident
        write_jsonl(folder / f"{session_id}.jsonl", lines)
    (folder / "sessions.json").write_text(json.dumps(store))
    db = tmp_path / "store.db"
    command = [
        sys.executable,
        "-m",
        "aisopod_session.cli",
        "import-openclaw",
        str(tmp_path / "openclaw"),
        "--db",
        str(db),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        seen = 0
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
            if not db.exists():
                continue
            engine = open_database(db)
            try:
                seen = SessionRepository(engine).count_sessions()
            except Exception:  # the child is migrating the new file
                seen = 0
            finally:
                engine.dispose()
            if seen >= 20:
                break
        assert child.poll() is None, "the import ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    engine = open_database(db)
    try:
        repo = SessionRepository(engine)
        partial = repo.list_sessions(limit=1000)
        assert 20 <= len(partial) < SESSIONS
        assert {s.message_count for s in partial} == {48}
        assert all(len(repo.get_history(s.key)) == 48 for s in partial)
    finally:
        engine.dispose()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    engine = open_database(db)
    try:
        repo = SessionRepository(engine)
        finished = repo.list_sessions(limit=1000)
        assert len(finished) == SESSIONS
        assert {s.message_count for s in finished} == {48}
        total = sum(len(repo.get_history(s.key)) for s in finished)
        assert total == SESSIONS * 48
    finally:
        engine.dispose()
