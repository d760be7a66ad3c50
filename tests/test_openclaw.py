"""Importing an OpenClaw gateway's sessions (`import_openclaw`, `aisopod-session
import-openclaw`): folders of every shape written here (OpenClaw 2026.2's layout, the
transcript format v3), every message read back equal to its source entry, the key
mapping, idempotence, a run after OpenClaw wrote more, resuming after a failure, and
damaged inputs reported by path and line; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from aisopod_session import PeerKind, Role, SessionKey, SessionRepository, SessionStatus
from aisopod_session.cli import app
from aisopod_session.openclaw import import_openclaw, map_key, rebuild_entry
from tests.dbtools import snapshot

T0 = 1_771_000_000_000  # 2026-02-13, in epoch milliseconds


def iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def entry(kind: str, ident: str, parent: str | None, ms: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "id": ident, "parentId": parent, "timestamp": iso(ms), **fields}


def chat(session_id: str, start: int = T0) -> list[dict[str, Any]]:
    """A transcript: a header, the user, an assistant's tool call, its result, the
    answer, a compaction, a model change, a label, and the next turn."""
    assistant = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "look it up", "thinkingSignature": "sig"},
            {"type": "toolCall", "id": "call-1", "name": "weather", "arguments": {"city": "Oslo"}},
        ],
        "api": "anthropic-messages",
        "provider": "anthropic",
        "model": "claude-x",
        "usage": {
            "input": 10,
            "output": 5,
            "cacheRead": 0,
            "cacheWrite": 0,
            "totalTokens": 15,
            "cost": {"input": 0.1, "output": 0.2, "cacheRead": 0, "cacheWrite": 0, "total": 0.3},
        },
        "stopReason": "toolUse",
        "timestamp": start + 2,
    }
    return [
        {"type": "session", "version": 3, "id": session_id, "timestamp": iso(start), "cwd": "/srv"},
        entry(
            "message",
            "a1",
            None,
            start + 1,
            message={"role": "user", "content": "Weather in Oslo? 🌧", "timestamp": start + 1},
        ),
        entry("message", "a2", "a1", start + 2, message=assistant),
        entry(
            "message",
            "a3",
            "a2",
            start + 3,
            message={
                "role": "toolResult",
                "toolCallId": "call-1",
                "toolName": "weather",
                "content": [{"type": "text", "text": "rain, 4 °C"}],
                "isError": False,
                "timestamp": start + 3,
            },
        ),
        entry(
            "message",
            "a4",
            "a3",
            start + 4,
            message={
                "role": "assistant",
                "content": [{"type": "text", "text": "It rains in Oslo."}],
                "stopReason": "stop",
                "timestamp": start + 4,
            },
        ),
        entry(
            "compaction",
            "a5",
            "a4",
            start + 5,
            summary="User asked about Oslo's weather.",
            firstKeptEntryId="a3",
            tokensBefore=1234,
        ),
        entry("model_change", "a6", "a5", start + 6, provider="openai", modelId="gpt-x"),
        entry("label", "a7", "a6", start + 7, targetId="a4", label="answer"),
        entry(
            "message",
            "a8",
            "a7",
            start + 8,
            message={
                "role": "user",
                "content": [
                    {"type": "text", "text": "And tomorrow?"},
                    {"type": "image", "data": "aGk=", "mimeType": "image/png"},
                ],
                "timestamp": start + 8,
            },
        ),
    ]


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def state_folder(root: Path) -> Path:
    """An OpenClaw state folder with two agents and keys of every family."""
    main = root / "agents" / "main" / "sessions"
    ops = root / "agents" / "ops" / "sessions"
    main.mkdir(parents=True)
    ops.mkdir(parents=True)
    keys = {
        "agent:main:main": "s-main",
        "agent:main:direct:alice": "s-direct",
        "agent:main:telegram:direct:123": "s-tg",
        "agent:main:telegram:bot2:direct:123": "s-tg2",
        "agent:main:slack:channel:c1:thread:1712.3456": "s-thread",
        "agent:main:telegram:group:-100:topic:42": "s-topic",
        "agent:main:discord:group:g1": "s-group",
        "agent:main:subagent:uuid-1": "s-sub",
        "agent:main:cron:job1": "s-cron",
        "agent:main:cron:job1:run:s-cron": "s-cron",
        "hook:gmail:xyz": "s-hook",
        "agent:main:dm:bob": "s-legacy",
    }
    store = {}
    for number, (key, session_id) in enumerate(keys.items()):
        store[key] = {
            "sessionId": session_id,
            "updatedAt": T0 + 10_000 + number,
            "sessionFile": f"/home/old/.openclaw/agents/main/sessions/{session_id}.jsonl",
            "label": f"label {number}",
            "displayName": "Alice",
            "model": "claude-x",
            "origin": {"provider": "telegram", "from": "123"},
            "inputTokens": 100,
            "outputTokens": 50,
            "totalTokens": 170,
            "compactionCount": 1,
            "skillsSnapshot": {"prompt": "x" * 1000},
        }
        write_jsonl(main / f"{session_id}.jsonl", chat(session_id, T0 + number * 100))
    (main / "sessions.json").write_text(json.dumps(store, indent=2))
    write_jsonl(main / "s-orphan.jsonl", chat("s-orphan"))
    write_jsonl(main / "s-old.jsonl.reset.2026-02-14T10-30-00.123Z", chat("s-old"))
    (ops / "sessions.json").write_text(
        json.dumps({"agent:ops:acp:u1": {"sessionId": "s-acp", "updatedAt": T0}})
    )
    write_jsonl(ops / "s-acp.jsonl", chat("s-acp"))
    return root


@pytest.fixture
def repo(store: Engine) -> SessionRepository:
    return SessionRepository(store)


def test_every_key_family_maps_to_a_distinct_key() -> None:
    cases = {
        "agent:main:main": ("main", "openclaw-main", "default", "dm", "main"),
        "agent:main:direct:alice": ("main", "openclaw-direct", "default", "dm", "alice"),
        "agent:main:dm:alice": ("main", "openclaw-direct", "default", "dm", "alice"),
        "agent:main:telegram:direct:123": ("main", "telegram", "default", "dm", "123"),
        "agent:main:telegram:bot2:direct:123": ("main", "telegram", "bot2", "dm", "123"),
        "agent:main:discord:group:g1": ("main", "discord", "default", "group", "g1"),
        "agent:main:slack:channel:c1": ("main", "slack", "default", "channel", "c1"),
        "agent:main:slack:channel:c1:thread:9": (
            "main",
            "slack",
            "default",
            "thread",
            "channel:c1:thread:9",
        ),
        "agent:main:telegram:group:-100:topic:42": (
            "main",
            "telegram",
            "default",
            "thread",
            "group:-100:topic:42",
        ),
        "agent:x:subagent:u1": ("x", "openclaw-subagent", "default", "thread", "u1"),
        "agent:x:cron:job:run:r1": ("x", "openclaw-cron", "default", "thread", "job:run:r1"),
        "agent:x:acp:u2": ("x", "openclaw-acp", "default", "thread", "u2"),
        "hook:gmail:1": ("folder", "openclaw-hook", "default", "thread", "gmail:1"),
        "global": ("folder", "openclaw-main", "default", "dm", "global"),
        "agent:x:weird:a:b:c:d": ("x", "openclaw-other", "default", "thread", "weird:a:b:c:d"),
    }
    mapped = {key: map_key(key, "folder").parts() for key in cases}
    assert mapped == cases
    assert len(set(mapped.values())) == len(cases) - 1  # dm and direct are one family
    long_peer = map_key("agent:a:telegram:direct:" + "9" * 400)
    assert len(long_peer.peer_id) <= 255
    assert long_peer != map_key("agent:a:telegram:direct:" + "9" * 399 + "8")


def test_a_state_folder_imports_whole_and_every_message_reads_back_equal(
    repo: SessionRepository, tmp_path: Path
) -> None:
    source = state_folder(tmp_path / "openclaw")
    result = import_openclaw(source, repo)
    assert result.problems == []
    assert result.sessions_created == 13  # main's 11 (its cron entry twice: once), ops's, an orphan
    assert result.aliases == 1
    assert result.orphans == 1
    assert result.archived_skipped == [
        str(source / "agents/main/sessions/s-old.jsonl.reset.2026-02-14T10-30-00.123Z")
    ]
    assert result.messages_imported == 13 * 8
    key = map_key("agent:main:telegram:bot2:direct:123")
    session = repo.get(key)
    assert session is not None
    assert session.meta["openclaw_key"] == "agent:main:telegram:bot2:direct:123"
    assert session.meta["openclaw_session_id"] == "s-tg2"
    kept = session.meta["openclaw"]["entry"]
    assert (kept["label"], kept["displayName"], kept["model"]) == ("label 3", "Alice", "claude-x")
    assert kept["origin"] == {"provider": "telegram", "from": "123"}
    assert "skillsSnapshot" not in kept
    assert (session.input_tokens, session.output_tokens, session.token_usage) == (100, 50, 170)
    assert session.updated_at.timestamp() * 1000 == pytest.approx(T0 + 10_003)
    assert session.compaction_count == 1
    assert session.last_compaction_summary == "User asked about Oslo's weather."
    history = repo.get_history(key)
    source_lines = chat("s-tg2", T0 + 300)[1:]
    assert [rebuild_entry(m.content, m.meta) for m in history] == source_lines
    assert [m.role for m in history] == [
        Role.USER,
        Role.ASSISTANT,
        Role.TOOL,
        Role.ASSISTANT,
        Role.SYSTEM,
        Role.SYSTEM,
        Role.SYSTEM,
        Role.USER,
    ]
    assert history[1].tool_calls == [
        {"type": "toolCall", "id": "call-1", "name": "weather", "arguments": {"city": "Oslo"}}
    ]
    assert history[0].created_at.timestamp() * 1000 == pytest.approx(T0 + 301)
    cron = repo.get(map_key("agent:main:cron:job1:run:s-cron"))
    assert cron is not None
    assert cron.meta["openclaw"]["aliases"] == ["agent:main:cron:job1"]
    assert repo.get(SessionKey("ops", "openclaw-acp", "default", "thread", "u1")) is not None
    orphan = repo.get(SessionKey("main", "openclaw-orphan", "default", PeerKind.THREAD, "s-orphan"))
    assert orphan is not None
    assert orphan.message_count == 8
    assert [hit.key for hit in repo.search_messages("tomorrow image")] == []
    assert len(repo.search_messages("tomorrow")) == 13


def test_importing_again_adds_nothing_and_new_entries_are_added_alone(
    repo: SessionRepository, store: Engine, tmp_path: Path
) -> None:
    source = state_folder(tmp_path / "openclaw")
    import_openclaw(source, repo)
    before = snapshot(store)
    again = import_openclaw(source, repo)
    assert (again.sessions_created, again.messages_imported) == (0, 0)
    assert again.messages_existing == 13 * 8
    assert snapshot(store) == before
    transcript = source / "agents/main/sessions/s-tg.jsonl"
    with transcript.open("a") as handle:
        handle.write(
            json.dumps(
                entry(
                    "message",
                    "b1",
                    "a8",
                    T0 + 500,
                    message={
                        "role": "assistant",
                        "content": [{"type": "text", "text": "Sunny."}],
                        "timestamp": T0 + 500,
                    },
                )
            )
            + "\n"
        )
    more = import_openclaw(source, repo)
    assert (more.sessions_created, more.sessions_updated, more.messages_imported) == (0, 1, 1)
    history = repo.get_history(map_key("agent:main:telegram:direct:123"))
    assert [m.meta["openclaw"]["entry_id"] for m in history][-2:] == ["a8", "b1"]
    session = repo.get(map_key("agent:main:telegram:direct:123"))
    assert session is not None
    assert session.message_count == 9
    assert session.meta["openclaw"]["head"] == "b1"


def test_the_live_branch_is_the_session_and_the_others_forks(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    folder.mkdir()
    lines = chat("s-b")
    # A branch from a4: x1 is off the live branch (the last line, y1, continues from a4).
    lines.append(
        entry("message", "x1", "a8", T0 + 20, message={"role": "assistant", "content": "old"})
    )
    lines.append(
        entry("branch_summary", "y1", "a4", T0 + 30, fromId="a8", summary="Tried tomorrow.")
    )
    write_jsonl(folder / "s-b.jsonl", lines)
    (folder / "sessions.json").write_text(
        json.dumps({"agent:main:main": {"sessionId": "s-b", "updatedAt": T0}})
    )
    planned = import_openclaw(folder, repo, dry_run=True)
    assert (planned.sessions_created, planned.forks_created) == (1, 1)
    assert planned.messages_imported == 5 + 9
    assert repo.count_sessions() == 0
    result = import_openclaw(folder, repo)
    assert result.other_branches == 5  # a5 … a8 and x1
    history = repo.get_history(map_key("agent:main:main"))
    assert [m.meta["openclaw"]["entry_id"] for m in history] == ["a1", "a2", "a3", "a4", "y1"]
    assert history[-1].content == "Tried tomorrow."
    # The other branch (a5 … x1, off a4) is a fork: the shared entries, then its own.
    assert result.forks_created == 1
    fork_key = SessionKey("main", "openclaw-main", "default", "dm", "main#branch:x1")
    fork = repo.get(fork_key)
    assert fork is not None
    assert fork.meta["openclaw_key"] == "agent:main:main#branch:x1"
    assert fork.meta["openclaw"]["fork_of"] == str(map_key("agent:main:main"))
    main = repo.get(map_key("agent:main:main"))
    assert main is not None
    assert fork.parent_id == main.id
    assert fork.forked_from_message_id == history[3].id  # a4, where the branch left
    forked = repo.get_history(fork_key)
    assert [rebuild_entry(m.content, m.meta) for m in forked] == [*lines[1:9], lines[9]]
    assert import_openclaw(folder, repo).forks_created == 0
    # OpenClaw branched again from a2: the last imported entry (y1) is not on the live
    # branch any more, so the session is reported and left as it is.
    with (folder / "s-b.jsonl").open("a") as handle:
        handle.write(
            json.dumps(
                entry("message", "z1", "a2", T0 + 40, message={"role": "user", "content": "redo"})
            )
            + "\n"
        )
    again = import_openclaw(folder, repo)
    assert [p.reason.split(" (")[0] for p in again.problems] == [
        "the live branch no longer holds entry 'y1', the last one imported"
    ]
    assert len(repo.get_history(map_key("agent:main:main"))) == 5


def test_damaged_inputs_are_reported_by_path_and_line_and_the_rest_imports(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    folder.mkdir()
    good = {
        "agent:main:telegram:direct:1": {"sessionId": "s1", "updatedAt": T0},
        "agent:main:telegram:direct:2": {"sessionId": "s2", "updatedAt": T0},
    }
    text = json.dumps(good, indent=2)
    (folder / "sessions.json").write_text(text[: text.index('"agent:main:telegram:direct:2"') + 40])
    lines = [json.dumps(line) for line in chat("s1")]
    lines.insert(3, "{not json")
    lines.insert(5, "[1, 2]")
    (folder / "s1.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(folder / "s2.jsonl", chat("s2"))
    (folder / "s3.jsonl").write_text("")
    result = import_openclaw(folder, repo)
    where = [
        (Path(p.path).name, p.line, p.reason.split(":")[0].split(" (")[0]) for p in result.problems
    ]
    # The line where the damaged entry (the second) starts.
    assert ("sessions.json", 6, "not JSON here") in where
    assert ("s1.jsonl", 4, "not JSON") in where
    assert ("s1.jsonl", 6, "not a JSON object") in where
    s1 = repo.get_history(map_key("agent:main:telegram:direct:1"))
    assert len(s1) == 8
    # s2's entry was lost with the truncation: its transcript imports as an orphan.
    assert repo.get(SessionKey("main", "openclaw-orphan", "default", "thread", "s2")) is not None
    assert result.orphans == 2  # s2, and the empty s3


def test_an_empty_sessions_json_loses_no_transcript(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    folder.mkdir()
    (folder / "sessions.json").write_text("")  # openclaw#77783
    write_jsonl(folder / "s1.jsonl", chat("s1"))
    result = import_openclaw(folder, repo)
    assert [str(p).split(": ", 1)[1] for p in result.problems] == ["empty (0 bytes): no entries"]
    session = repo.get(SessionKey("main", "openclaw-orphan", "default", "thread", "s1"))
    assert session is not None
    assert session.message_count == 8


def test_a_failed_run_resumes_without_duplicates_or_half_sessions(
    repo: SessionRepository, store: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each session is one transaction: a run stopped by a failure on the fifth session
    leaves four whole ones; the next run adds the rest, and no message twice."""
    import aisopod_session.openclaw as module
    from aisopod_session.transfer import import_records as real

    source = state_folder(tmp_path / "openclaw")
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        real(*args, **kwargs)

    monkeypatch.setattr(module, "import_records", failing)
    with pytest.raises(RuntimeError, match="killed"):
        import_openclaw(source, repo)
    sessions = repo.list_sessions(limit=1000)
    assert len(sessions) == 4
    assert all(s.message_count == 8 for s in sessions)
    monkeypatch.setattr(module, "import_records", real)
    resumed = import_openclaw(source, repo)
    assert resumed.sessions_created == 9
    assert sum(s.message_count for s in repo.list_sessions(limit=1000)) == 13 * 8


def test_dry_run_writes_nothing(repo: SessionRepository, store: Engine, tmp_path: Path) -> None:
    source = state_folder(tmp_path / "openclaw")
    before = snapshot(store)
    result = import_openclaw(source, repo, dry_run=True, agents=["ops"])
    assert (result.dry_run, result.sessions_created, result.messages_imported) == (True, 1, 8)
    assert snapshot(store) == before
    with pytest.raises(ValueError, match="agents"):
        import_openclaw(source, repo, agents=["nobody"])


def test_archived_transcripts_import_as_archived_sessions_when_asked(
    repo: SessionRepository, tmp_path: Path
) -> None:
    source = state_folder(tmp_path / "openclaw")
    result = import_openclaw(source, repo, archived=True, agents=["main"])
    assert result.archived_imported == 1
    assert result.archived_skipped == []
    (archived,) = repo.list_sessions({"channel": "openclaw-archive"})
    assert archived.status == SessionStatus.ARCHIVED
    assert archived.peer_id == "s-old:reset:2026-02-14T10-30-00.123Z"


def test_the_command_reports_and_exits_1_on_problems(tmp_path: Path) -> None:
    source = state_folder(tmp_path / "openclaw")
    db = tmp_path / "store.db"
    runner = CliRunner()
    done = runner.invoke(app, ["import-openclaw", str(source), "--db", str(db), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["sessions_created"] == 13
    again = runner.invoke(app, ["import-openclaw", str(source), "--db", str(db)])
    assert again.exit_code == 0, again.output
    assert "Imported 0 new session(s)" in again.stdout
    (source / "agents/main/sessions/s-tg.jsonl").write_text("{oops\n")
    bad = runner.invoke(app, ["import-openclaw", str(source), "--db", str(db), "--agent", "main"])
    assert bad.exit_code == 1
    assert "s-tg.jsonl:1: not JSON" in bad.stderr
    missing = runner.invoke(app, ["import-openclaw", str(tmp_path / "nope"), "--db", str(db)])
    assert missing.exit_code != 0
    assert "no folder" in missing.stderr


def test_a_large_sessions_json_is_read_entry_by_entry_across_chunks(tmp_path: Path) -> None:
    """3 MB of entries (bulky fields, numbers and strings cut by the 1 MiB reads)."""
    from aisopod_session.openclaw import OpenClawProblem, read_entries

    store = {
        f"agent:main:telegram:direct:{n}": {
            "sessionId": f"s{n}",
            "updatedAt": T0 + n,
            "totalTokens": 123456789 + n,
            "systemPromptReport": {"text": "é" * (10_000 + n)},
            "subject": "x" * (n % 97),
        }
        for n in range(300)
    }
    path = tmp_path / "sessions.json"
    path.write_text(json.dumps(store, ensure_ascii=False, indent=1))
    problems: list[OpenClawProblem] = []
    read = dict(read_entries(path, problems))
    assert problems == []
    expected = {
        key: {name: value for name, value in entry.items() if name != "systemPromptReport"}
        for key, entry in store.items()
    }
    assert read == expected


def one_session(
    folder: Path, key: str, session_id: str, lines: list[dict[str, Any]], **entry: Any
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    store = {key: {"sessionId": session_id, "updatedAt": T0, **entry}}
    (folder / "sessions.json").write_text(json.dumps(store))
    write_jsonl(folder / f"{session_id}.jsonl", lines)


def test_odd_keys_and_damaged_entries_never_stop_the_rest(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    folder.mkdir()
    store = {
        "agent:main:telegram:direct:bell\x07": {"sessionId": "s1", "updatedAt": T0},
        "agent:main:telegram:direct:ok": {
            "sessionId": "s2",
            "updatedAt": T0,
            "contextTokens": float("inf"),
            "cacheRead": 2**64,
        },
        "agent:main:telegram:direct:deep": {"sessionId": "s3", "updatedAt": T0, "x": []},
    }
    text = json.dumps(store)
    text = text.replace('"x": []', '"x": ' + "[" * 5000 + "]" * 5000)
    (folder / "sessions.json").write_text("\ufeff" + text)  # a BOM, as some editors write
    for session_id in ("s1", "s2", "s3"):
        write_jsonl(folder / f"{session_id}.jsonl", chat(session_id))
    result = import_openclaw(folder, repo)
    reasons = [p.reason for p in result.problems]
    assert any("field 'contextTokens' not kept" in r for r in reasons), reasons
    assert any("field 'cacheRead' not kept" in r for r in reasons), reasons
    assert any("nested too deeply" in r for r in reasons), reasons
    bell = repo.get(SessionKey("main", "telegram", "default", "dm", "bell%07"))
    assert bell is not None
    assert bell.meta["openclaw_key"] == "agent:main:telegram:direct:bell\x07"
    ok = repo.get(map_key("agent:main:telegram:direct:ok"))
    assert ok is not None
    assert "contextTokens" not in ok.meta["openclaw"]["entry"]
    assert ok.message_count == 8
    # The entry nested too deeply to read: its transcript still comes in, as an orphan.
    assert repo.get(SessionKey("main", "openclaw-orphan", "default", "thread", "s3")) is not None


def test_a_reset_in_openclaw_continues_the_session_with_the_new_conversation(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    key = "agent:main:telegram:direct:42"
    one_session(folder, key, "old", chat("old"))
    import_openclaw(folder, repo)
    (folder / "old.jsonl").rename(folder / "old.jsonl.reset.2026-02-14T10-30-00.123Z")
    one_session(folder, key, "new", chat("new", T0 + 10_000), updatedAt=T0 + 20_000)
    result = import_openclaw(folder, repo)
    assert result.problems == []
    assert result.messages_imported == 8
    session = repo.get(map_key(key))
    assert session is not None
    assert session.meta["openclaw_session_id"] == "new"
    assert session.meta["openclaw"]["previous_session_ids"] == ["old"]
    assert session.message_count == 16
    assert import_openclaw(folder, repo).messages_imported == 0


def test_an_entry_the_store_refuses_is_reported_on_every_run(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    lines = chat("s1")
    lines[2]["message"]["usage"]["cost"]["total"] = float("nan")
    one_session(folder, "agent:main:main", "s1", lines)
    first = import_openclaw(folder, repo)
    assert [(Path(p.path).name, p.line) for p in first.problems] == [("s1.jsonl", 3)]
    assert repo.get_history(map_key("agent:main:main"))[-1].meta["openclaw"]["entry_id"] == "a8"
    again = import_openclaw(folder, repo)
    assert [(Path(p.path).name, p.line) for p in again.problems] == [("s1.jsonl", 3)]
    assert again.messages_imported == 0
    assert len(repo.get_history(map_key("agent:main:main"))) == 7


def test_of_two_keys_for_one_session_the_newest_entry_wins(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    folder.mkdir()
    store = {
        "agent:main:Telegram:direct:Bob": {"sessionId": "legacy", "updatedAt": T0},
        "agent:main:telegram:direct:bob": {"sessionId": "current", "updatedAt": T0 + 5},
    }
    (folder / "sessions.json").write_text(json.dumps(store))
    write_jsonl(folder / "legacy.jsonl", chat("legacy"))
    write_jsonl(folder / "current.jsonl", chat("current"))
    result = import_openclaw(folder, repo)
    session = repo.get(map_key("agent:main:telegram:direct:bob"))
    assert session is not None
    assert session.meta["openclaw_session_id"] == "current"
    assert [p.reason for p in result.problems] == [
        f"session {map_key('agent:main:telegram:direct:bob')} holds "
        "'agent:main:telegram:direct:bob', not 'agent:main:Telegram:direct:Bob' (a key that "
        "maps onto the same one): skipped"
    ]


def test_transcript_oddities_are_reported_and_rebuilt_exactly(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    lines = chat("s1")
    lines.insert(4, {"type": "message", "message": {"role": "user", "content": "no id"}})
    lines.insert(6, {"type": "session", "version": 3, "id": "again"})
    lines.append({"id": "a9", "parentId": "a8", "timestamp": None, "odd": True})
    one_session(folder, "agent:main:main", "s1", lines)
    write_jsonl(folder / "s1.trajectory.jsonl", [{"x": 1}])
    result = import_openclaw(folder, repo)
    assert sorted((p.line, p.reason) for p in result.problems) == [
        (5, "an entry without an id: skipped"),
        (7, "a second header: skipped"),
    ]
    assert result.orphans == 0
    history = repo.get_history(map_key("agent:main:main"))
    kept = [
        line
        for line in lines[1:]
        if isinstance(line.get("id"), str) and line.get("type") != "session"
    ]
    assert [rebuild_entry(m.content, m.meta) for m in history] == kept


def test_a_dry_run_creates_no_store(tmp_path: Path) -> None:
    source = state_folder(tmp_path / "openclaw")
    db = tmp_path / "new.db"
    done = CliRunner().invoke(
        app, ["import-openclaw", str(source), "--db", str(db), "--dry-run", "--json"]
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["sessions_created"] == 13
    assert not db.exists()


def test_id_less_transcripts_keep_repeated_messages_on_every_run(
    repo: SessionRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "sessions"
    same = {
        "type": "message",
        "timestamp": iso(T0),
        "message": {"role": "user", "content": "hi", "timestamp": T0},
    }
    one_session(
        folder,
        "agent:main:main",
        "v1",
        [{"type": "session", "id": "v1", "timestamp": iso(T0)}, same, same],
    )
    import_openclaw(folder, repo)
    import_openclaw(folder, repo)
    assert [m.content for m in repo.get_history(map_key("agent:main:main"))] == ["hi", "hi"]
