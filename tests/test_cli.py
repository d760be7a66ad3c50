"""The `aisopod-session` command, through its real entry point (the installed script, in a
subprocess) and through Typer's test runner, on real files (and PostgreSQL where said)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import pytest
from typer.testing import CliRunner

from aisopod_session import (
    SCHEMA_VERSION,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStatus,
    export_jsonl,
    open_database,
)
from aisopod_session.cli import app, main, parameter_name
from tests.dbtools import SEED_SCHEMA, make_seed_file, run_sql, snapshot, stress
from tests.forking import wait

SCRIPT = Path(sys.executable).parent / "aisopod-session"


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


RUNNER = CliRunner()


def cli(
    *args: str, env: dict[str, str] | None = None, real: bool | Literal["fork"] = False
) -> Outcome:
    """Run the command: with `real`, the installed script in a subprocess (the real entry
    point, about 2 s of start-up each); with `real="fork"`, the script's entry point in a
    forked child of this process (`forked`); otherwise in this process through Typer's
    test runner. AISOPOD_SESSION_DB is unset unless `env` sets it."""
    if real == "fork":
        return forked(*args, env=env)
    if not real:
        result = RUNNER.invoke(app, list(args), env={"AISOPOD_SESSION_DB": None, **(env or {})})
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)
    environment = {k: v for k, v in os.environ.items() if k != "AISOPOD_SESSION_DB"}
    environment.update(env or {})
    done = subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def forked(*args: str, env: dict[str, str] | None = None, stdin: int | None = None) -> Outcome:
    """Run the console script's entry point (`cli.main`, as the installed script does) in
    a child forked from this process, with its own stdout and stderr (files) and `stdin`
    (a file descriptor) if given: a process of its own, so a crash (SIGBUS, say) ends the
    child and not the tests, without an interpreter's start-up."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                if stdin is not None:
                    os.dup2(stdin, 0)
                    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's own
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.environ.pop("AISOPOD_SESSION_DB", None)
                os.environ.update(env or {})
                sys.argv = ["aisopod-session", *args]
                try:
                    main()
                    code = 0
                except SystemExit as exc:
                    code = exit_status(exc.code)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(code)
        status = wait(pid, 120)
        out.seek(0)
        err.seek(0)
        return Outcome(
            os.waitstatus_to_exitcode(status),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def exit_status(code: object) -> int:
    """The exit status of `sys.exit(code)`, as the interpreter sets it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def ok(*args: str, real: bool = False) -> str:
    done = cli(*args, real=real)
    assert done.returncode == 0, done.stderr
    return done.stdout


def as_json(*args: str, real: bool = False) -> Any:
    return json.loads(ok(*args, "--json", real=real))


def failed(*args: str, real: bool | Literal["fork"] = False) -> str:
    """The one line a user error prints; the exit status is 1 and there is no traceback."""
    done = cli(*args, real=real)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def misused(*args: str) -> str:
    """The `error:` line a usage error ends with (after the command's usage); the exit
    status is 2, nothing is printed on stdout and there is no traceback."""
    done = cli(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr
    return last


TELEGRAM = SessionKey("concierge", "telegram", "bot-1", "dm", "1001")
SLACK = SessionKey("concierge", "slack", "T1", "channel", "C9")
OTHER = SessionKey("sales", "discord", "guild", "thread", "t-1")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Three sessions of two agents, one of them idle, with a tool call and metadata; the
    first one's 30 tokens reported as 20 input and 10 output."""
    db_path = tmp_path / "cli-store.db"
    engine = open_database(db_path)
    repo = SessionRepository(engine)
    for key in (TELEGRAM, SLACK, OTHER):
        repo.get_or_create(key)
    repo.append_messages(
        TELEGRAM,
        [
            NewMessage(Role.USER, "What's the weather in Oslo?"),
            NewMessage(Role.ASSISTANT, "", [{"id": "c1", "name": "weather", "arguments": {}}]),
            NewMessage(Role.TOOL, '{"temp_c": 4}'),
            NewMessage(Role.ASSISTANT, "4 °C in Oslo."),
        ],
        input_tokens=20,
        output_tokens=10,
    )
    repo.append_message(SLACK, Role.USER, "standup?", tokens=2)
    repo.append_message(OTHER, Role.USER, "price list", tokens=5)
    repo.update_metadata(TELEGRAM, {"language": "en"})
    repo.set_status(OTHER, SessionStatus.IDLE)
    engine.dispose()
    return db_path


# --- init, migrate, status ----------------------------------------------------------------


def test_init_creates_the_store_once(db_path: Path) -> None:
    assert "Created" in ok("--db", str(db_path), "init", real=True)
    with sqlite3.connect(db_path) as conn:  # a store made is a store in use: WAL mode
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "nothing to do" in ok("init", "--db", str(db_path))
    migrations = as_json("--db", str(db_path), "migrate", "--status")
    assert [(m["version"], m["status"]) for m in migrations["migrations"]] == [
        (1, "applied"),
        (2, "applied"),
        (3, "applied"),
        (4, "applied"),
        (5, "applied"),
    ]
    assert all(m["applied_at"] and m["recorded"] for m in migrations["migrations"])
    assert migrations["schema_version"] == migrations["code_version"] == SCHEMA_VERSION


def test_migrate_upgrades_an_old_store_and_status_waits_for_it(db_path: Path) -> None:
    make_seed_file(db_path)  # the seed spec's schema, made by plain SQL: no schema_version
    assert "run `aisopod-session migrate`" in failed("--db", str(db_path), "status")
    before = as_json("--db", str(db_path), "migrate", "--status")
    assert [m["status"] for m in before["migrations"]] == ["pending"] * SCHEMA_VERSION
    assert before["schema_version"] == 0
    migrated = ok("--db", str(db_path), "migrate")
    assert all(f"applied {n}" in migrated for n in range(1, SCHEMA_VERSION + 1)), migrated
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    after = as_json("--db", str(db_path), "migrate", "--status")
    assert [m["status"] for m in after["migrations"]] == ["applied"] * SCHEMA_VERSION
    assert as_json("--db", str(db_path), "status")["schema_version"] == SCHEMA_VERSION


def test_reading_commands_leave_a_store_behind_the_schema_byte_for_byte(tmp_path: Path) -> None:
    """A file another program keeps in its own journal mode (the seed's schema in
    plain SQL, and an empty file): commands that refuse it, or only report on it, write
    nothing to it, not even the switch to WAL mode that a store in use gets."""
    seed, empty = tmp_path / "seed.db", tmp_path / "empty.db"
    make_seed_file(seed)
    empty.touch()
    reading = [("status",), ("sessions", "list"), ("export",), ("search", "hi")]
    for path in (seed, empty):
        before = path.read_bytes()
        for command in reading:
            assert "run `aisopod-session migrate`" in failed("--db", str(path), *command)
        assert as_json("--db", str(path), "migrate", "--status")["schema_version"] == 0
        assert path.read_bytes() == before, path.name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "seed.db"]
    with sqlite3.connect(seed) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def make_crate_store(path: Path) -> None:
    """A store as the Rust crate makes it, in plain sqlite3: the seed's DDL, its version-2
    compaction columns and a bare one-row `schema_version` (2), with two messages whose
    content the crate stored as JSON (a string, and a list of content blocks)."""
    conn = sqlite3.connect(path)
    conn.executescript(SEED_SCHEMA.read_text())
    conn.executescript(
        """
        ALTER TABLE sessions ADD COLUMN compaction_count INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE sessions ADD COLUMN last_compacted_at TEXT;
        ALTER TABLE sessions ADD COLUMN last_compaction_summary TEXT;
        CREATE TABLE schema_version (version INTEGER PRIMARY KEY);
        INSERT INTO schema_version VALUES (2);
        INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, created_at,
            updated_at, message_count)
        VALUES ('crab', 'telegram', 'bot', 'dm', '7', '2026-01-01T00:00:00+00:00',
            '2026-01-01T00:00:01.5Z', 2);
        INSERT INTO messages (session_id, role, content, tool_calls, created_at) VALUES
            (1, 'user', '"hi crab"', NULL, '2026-01-01T00:00:00+00:00'),
            (1, 'assistant', '[{"type":"text","text":"hello from Rust"}]',
             '[{"id":"c1","name":"look"}]', '2026-01-01T00:00:01.5Z');
        """
    )
    conn.commit()
    conn.close()


def test_migrate_status_counts_a_crate_stores_unrecorded_versions_as_applied(
    db_path: Path,
) -> None:
    make_crate_store(db_path)
    before = as_json("--db", str(db_path), "migrate", "--status")
    assert (before["schema_version"], before["code_version"]) == (2, SCHEMA_VERSION)
    assert [(m["version"], m["status"], m["recorded"]) for m in before["migrations"]] == [
        (1, "applied", False),  # no row of its own: below the crate's one row, 2
        (2, "applied", True),
        (3, "pending", False),
        (4, "pending", False),
        (5, "pending", False),
    ]
    assert [m["applied_at"] for m in before["migrations"]] == [None] * 5
    text = ok("--db", str(db_path), "migrate", "--status")
    assert "not recorded" in text
    assert "schema version 2; 3 pending: run `aisopod-session migrate`" in text
    assert "run `aisopod-session migrate`" in failed("--db", str(db_path), "status")

    migrated = ok("--db", str(db_path), "migrate", real=True)
    assert "applied 3: JSON content" in migrated
    assert "applied 1" not in migrated
    assert "applied 2" not in migrated
    assert "applied 4: fork lineage" in migrated
    assert "applied 5: PostgreSQL: a session's messages indexed in id order" in migrated
    assert f"is at schema version {SCHEMA_VERSION}" in migrated

    after = as_json("--db", str(db_path), "migrate", "--status")
    assert after["schema_version"] == after["code_version"] == SCHEMA_VERSION
    assert [(m["status"], m["recorded"]) for m in after["migrations"]] == [
        ("applied", False),
        ("applied", True),
        ("applied", True),
        ("applied", True),
        ("applied", True),
    ]
    assert after["migrations"][2]["applied_at"] is not None
    text = ok("--db", str(db_path), "migrate", "--status")
    assert f"schema version {SCHEMA_VERSION}; up to date" in text
    assert "pending" not in text
    assert "nothing to do" in ok("--db", str(db_path), "init")
    # The crate's JSON content reads back as the values it wrote.
    shown = as_json("--db", str(db_path), "sessions", "show", "1")
    assert [m["content"] for m in shown["messages"]] == [
        "hi crab",
        [{"type": "text", "text": "hello from Rust"}],
    ]
    assert shown["messages"][1]["tool_calls"] == [{"id": "c1", "name": "look"}]
    text = ok("--db", str(db_path), "sessions", "show", "1")
    assert "user: hi crab\n" in text
    assert "assistant: hello from Rust\n" in text


def test_status_counts_sessions_messages_and_sizes(store: Path) -> None:
    report = as_json("--db", str(store), "status")
    assert report["schema_version"] == SCHEMA_VERSION
    assert (report["sessions"], report["messages"], report["tokens"]) == (3, 6, 37)
    assert (report["input_tokens"], report["output_tokens"]) == (20, 10)
    assert report["sessions_by_status"] == {"active": 2, "idle": 1}
    assert report["agents"] == {
        "concierge": {
            "sessions": 2,
            "messages": 5,
            "tokens": 32,
            "input_tokens": 20,
            "output_tokens": 10,
        },
        "sales": {"sessions": 1, "messages": 1, "tokens": 5, "input_tokens": 0, "output_tokens": 0},
    }
    assert report["file_bytes"] > 0
    assert report["wal_bytes"] >= 0
    text = ok("--db", str(store), "status")
    assert "sessions:       3" in text
    assert "tokens:         37 (20 input, 10 output)" in text
    assert "32 (20 input, 10 output)" in text  # concierge's row
    assert "5 (0 input, 0 output)" in text  # sales's


def test_the_store_comes_from_the_environment_when_no_db_is_given(store: Path) -> None:
    done = cli("status", "--json", env={"AISOPOD_SESSION_DB": str(store)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sessions"] == 3


# --- sessions -----------------------------------------------------------------------------


def test_sessions_list_takes_every_filter_field_and_pages(store: Path) -> None:
    runner = CliRunner()

    def keys(*args: str) -> list[str]:
        result = runner.invoke(app, ["--db", str(store), "sessions", "list", "--json", *args])
        assert result.exit_code == 0, result.output
        return [session["key"] for session in json.loads(result.stdout)]

    assert set(keys()) == {str(TELEGRAM), str(SLACK), str(OTHER)}
    assert keys("--agent-id", "sales") == [str(OTHER)]
    assert keys("--channel", "slack") == [str(SLACK)]
    assert keys("--account-id", "bot-1") == [str(TELEGRAM)]
    assert keys("--peer-kind", "thread") == [str(OTHER)]
    assert keys("--peer-id", "C9") == [str(SLACK)]
    assert keys("--status", "idle") == [str(OTHER)]
    assert len(keys("--created-after", "1d")) == 3
    assert keys("--created-before", "2000-01-01") == []
    assert len(keys("--updated-after", "2000-01-01T00:00:00+00:00")) == 3
    assert keys("--updated-before", "1d") == []
    newest_first = keys()
    assert keys("--limit", "1") == newest_first[:1]
    assert keys("--limit", "2", "--offset", "1") == newest_first[1:3]
    listed = runner.invoke(app, ["--db", str(store), "sessions", "list"])
    assert "3 session(s) match" in listed.stdout


def test_sessions_list_shows_input_and_output_tokens(store: Path) -> None:
    listed = {s["key"]: s for s in as_json("--db", str(store), "sessions", "list")}
    assert {
        key: (s["token_usage"], s["input_tokens"], s["output_tokens"]) for key, s in listed.items()
    } == {str(TELEGRAM): (30, 20, 10), str(SLACK): (2, 0, 0), str(OTHER): (5, 0, 0)}
    text = ok("--db", str(store), "sessions", "list")
    header = next(line for line in text.splitlines() if "tokens" in line)
    assert header.split("┃")[5:8] == [" tokens ", " input ", " output "]
    row = next(line for line in text.splitlines() if str(TELEGRAM) in line)
    assert [cell.strip() for cell in row.split("│")[5:8]] == ["30", "20", "10"]


def test_sessions_show_prints_the_transcript(store: Path) -> None:
    text = ok("--db", str(store), "sessions", "show", str(TELEGRAM))
    assert "4 messages, 30 tokens (20 input, 10 output)" in text
    assert "What's the weather in Oslo?" in text
    assert '"name": "weather"' in text  # the tool call, spelled out
    assert "↳ tool call" in text
    assert '      tool: {"temp_c": 4}\n' in text  # text content as text, no quotes
    by_id = as_json("--db", str(store), "sessions", "show", "1", "--last", "2")
    assert by_id["session"]["key"] == str(TELEGRAM)
    assert by_id["session"]["metadata"] == {"language": "en"}
    assert (by_id["session"]["input_tokens"], by_id["session"]["output_tokens"]) == (20, 10)
    assert [m["content"] for m in by_id["messages"]] == ['{"temp_c": 4}', "4 °C in Oslo."]
    assert [m["role"] for m in by_id["messages"]] == ["tool", "assistant"]
    assert [m["metadata"] for m in by_id["messages"]] == [{}, {}]


# Content blocks of the common chat APIs, and what a transcript shows for each.
BLOCKS: list[tuple[Any, str]] = [
    ({"type": "text", "text": "Look at this:\nthe second line"}, "Look at this:\nthe second line"),
    (
        {"type": "image", "source": {"type": "url", "url": "https://x.example/cat.png"}},
        "[image: https://x.example/cat.png]",
    ),
    (
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        "[image: image/png]",
    ),
    (
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + "A" * 5000}},
        "[image: image/jpeg data]",
    ),
    ({"type": "input_file", "filename": "report.pdf", "file_data": "JVBE"}, "[file: report.pdf]"),
    ({"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}, "[audio: wav]"),
    (
        {"type": "tool_result", "tool_use_id": "c1", "content": [{"type": "text", "text": "4 °C"}]},
        "[tool_result c1: 4 °C]",
    ),
    (
        {"type": "tool_result", "tool_use_id": "c2", "content": "no city", "is_error": True},
        "[tool_result c2, error: no city]",
    ),
    (
        {"type": "tool_use", "id": "c3", "name": "weather", "input": {"city": "Oslo"}},
        '[tool_use weather c3: {"city": "Oslo"}]',
    ),
    (
        {"type": "thinking", "thinking": "The user wants\nthe weather. " * 20, "signature": "s"},
        "[reasoning: The user wants the weather. The user wants the weather.",
    ),
    ({"type": "redacted_thinking", "data": "xyz"}, "[reasoning: redacted]"),
    (
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Looked it up."}]},
        "[reasoning: Looked it up.]",
    ),
    ({"type": "output_text", "text": "OpenAI's output text", "annotations": []}, "OpenAI's"),
    ({"type": "sticker", "id": 9}, '{"type": "sticker", "id": 9}'),
    ({"no": "type"}, '{"no": "type"}'),
    ([1, [2]], "[1, [2]]"),
    (7, "7"),
    (None, "null"),
    ("a plain string", "a plain string"),
]


@pytest.fixture
def json_store(tmp_path: Path) -> Path:
    """A session whose messages hold content and tool calls of every JSON shape, message
    metadata, and two rows plain SQL wrote: an unknown role and content that is not JSON."""
    path = tmp_path / "json.db"
    engine = open_database(path)
    repo = SessionRepository(engine)
    repo.get_or_create(TELEGRAM)
    repo.append_messages(
        TELEGRAM,
        [
            NewMessage(Role.USER, [block for block, _ in BLOCKS]),
            NewMessage(
                Role.ASSISTANT,
                "",
                {"id": "c1", "name": "weather", "arguments": {"city": "Oslo"}},
                {"model": "gpt-5", "usage": {"input_tokens": 12}},
            ),
            NewMessage(Role.ASSISTANT, "two calls", [{"id": "c2"}, {"id": "c3"}]),
            NewMessage(Role.ASSISTANT, "a scalar call", "call-me"),
            NewMessage(Role.DEVELOPER, {"temp_c": 4, "sky": ["clear"]}),
            NewMessage(Role.TOOL, 42, 0),
            NewMessage(Role.TOOL, 2.5),
            NewMessage(Role.TOOL, False),
            NewMessage(Role.TOOL, None),
            NewMessage(Role.TOOL, []),
        ],
        input_tokens=7,
        output_tokens=3,
    )
    engine.dispose()
    run_sql(
        path,
        "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
        "VALUES (1, 'Critic [bold]', 'not {JSON', NULL, '2099-01-01T00:00:00+00:00')",
    )
    return path


def test_sessions_show_spells_out_content_of_any_json_shape(json_store: Path) -> None:
    text = ok("--db", str(json_store), "sessions", "show", "1")
    lines = text.splitlines()
    # The first block follows the role; each further block has a line of its own.
    first = lines.index(next(line for line in lines if "user: Look at this:" in line))
    assert lines[first + 1] == "the second line"  # a newline in text stays a line break
    blocks = lines[first + 2 : first + len(BLOCKS) + 1]
    for line, (_, shown) in zip(blocks, BLOCKS[1:], strict=True):
        assert line.startswith(" " * 13 + shown), (line, shown)
    assert all(len(line) < 160 for line in blocks)  # labels are short: no 5 000 A's
    assert "[reasoning: The user wants the weather. The user" in text
    assert "…]" in text  # the long reasoning, cut
    # An object of tool calls is one call, shown as indented JSON, not one per key.
    assert text.count("↳ tool call") == 1 + 2 + 1 + 1
    call = text.index('↳ tool call {\n               "id": "c1",')
    assert text.index('"city": "Oslo"', call) < text.index("↳ tool call", call + 1)
    assert '↳ meta {"model": "gpt-5", "usage": {"input_tokens": 12}}' in text
    assert '↳ tool call {\n               "id": "c2"\n             }' in text
    assert '↳ tool call "call-me"' in text  # a scalar, as JSON
    assert "↳ tool call 0" in text
    assert "developer: {\n" in text
    assert '               "temp_c": 4,' in text  # an object as indented JSON
    for shown in ("tool: 42\n", "tool: 2.5\n", "tool: false\n", "tool: null\n", "tool: []\n"):
        assert shown in text
    # An unknown role is shown as it is (markup and all), uncoloured; raw text as text.
    assert "Critic [bold]: not {JSON" in text


def test_sessions_show_json_carries_json_values(json_store: Path) -> None:
    shown = as_json("--db", str(json_store), "sessions", "show", "1")
    messages = shown["messages"]
    assert messages[0]["content"] == [block for block, _ in BLOCKS]
    assert messages[1]["tool_calls"] == {
        "id": "c1",
        "name": "weather",
        "arguments": {"city": "Oslo"},
    }
    assert messages[1]["metadata"] == {"model": "gpt-5", "usage": {"input_tokens": 12}}
    assert [m["tool_calls"] for m in messages[2:4]] == [[{"id": "c2"}, {"id": "c3"}], "call-me"]
    assert [m["content"] for m in messages[4:10]] == [
        {"temp_c": 4, "sky": ["clear"]},
        42,
        2.5,
        False,
        None,
        [],
    ]
    assert messages[5]["tool_calls"] == 0
    assert [m["role"] for m in messages] == [
        "user",
        "assistant",
        "assistant",
        "assistant",
        "developer",
        *["tool"] * 5,
        "Critic [bold]",
    ]
    assert (messages[-1]["content"], messages[-1]["metadata"]) == ("not {JSON", {})
    assert (shown["session"]["input_tokens"], shown["session"]["output_tokens"]) == (7, 3)


def test_delete_compact_and_reset(store: Path) -> None:
    compacted = ok("--db", str(store), "compact", "1", "--keep-last", "1", "--summary", "Oslo")
    assert "removed 3 message(s)" in compacted
    shown = as_json("--db", str(store), "sessions", "show", str(TELEGRAM))
    assert [m["content"] for m in shown["messages"]] == ["Oslo", "4 °C in Oslo."]
    assert shown["session"]["status"] == "compacted"
    assert "Reset #2" in ok("--db", str(store), "sessions", "reset", str(SLACK))
    assert as_json("--db", str(store), "sessions", "show", "2")["messages"] == []
    assert "Deleted session #3" in ok("--db", str(store), "sessions", "delete", str(OTHER))
    assert as_json("--db", str(store), "status")["sessions"] == 2


def test_prune_and_mark_idle(store: Path) -> None:
    old = "2020-01-01T00:00:00.000000+00:00"
    run_sql(store, "UPDATE sessions SET updated_at = ? WHERE id IN (2, 3)", (old,))
    dry = as_json("--db", str(store), "prune", "--older-than", "30d", "--dry-run")
    assert (dry["dry_run"], dry["sessions"]) == (True, 2)
    assert as_json("--db", str(store), "status")["sessions"] == 3  # nothing deleted
    assert "Deleted 1 session(s)" in ok(
        "--db", str(store), "prune", "--older-than", "30d", "--status", "idle"
    )
    assert "Marked 1 session(s) idle" in ok(
        "--db", str(store), "sessions", "mark-idle", "--idle-for", "7d"
    )
    assert "Deleted 1 session(s)" in ok("--db", str(store), "prune", "--older-than", "30d")
    assert as_json("--db", str(store), "status")["sessions"] == 1


# --- user errors --------------------------------------------------------------------------


def test_user_errors_are_one_line_and_exit_1(store: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    assert "no session store at" in failed("--db", str(missing), "status", real=True)
    assert not missing.exists()  # reading never creates a store
    assert "neither a session id nor a key" in misused(
        "--db", str(store), "sessions", "show", "not-a-key"
    )
    assert "no session with id 99" in failed("--db", str(store), "sessions", "show", "99")
    assert "no session for key" in failed("--db", str(store), "sessions", "show", "a:b:c:dm:nobody")
    assert "not a duration" in misused("--db", str(store), "mark-idle", "--idle-for", "soon")
    assert "no file" in failed("--db", str(store), "import", str(tmp_path / "none.jsonl"))
    run_sql(store, "INSERT INTO schema_version (version, name) VALUES (99, 'future')")
    assert "99" in failed("--db", str(store), "status")


def test_usage_errors_exit_2_with_usage(store: Path) -> None:
    done = cli("--db", str(store), "sessions", "list", "--status", "sleeping")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "--status" in done.stderr


# --- export, import, copy -----------------------------------------------------------------


def fill(path: Path, sessions: int, per_session: int) -> None:
    """Sessions with messages (10 000 for 20 × 500), metadata, tool calls, a compaction
    and statuses."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    for n in range(sessions):
        key = SessionKey(f"agent-{n % 3}", "telegram", "bot", "dm", f"peer-{n}")
        repo.get_or_create(key)
        for start in range(0, per_session, 100):
            repo.append_messages(
                key,
                [
                    NewMessage(
                        Role.USER if i % 2 == 0 else Role.ASSISTANT,
                        f"message {i} of {key.peer_id} — ünïcode ✓",
                        [{"id": f"c{i}", "name": "lookup", "arguments": {"n": i}}]
                        if i % 7 == 0
                        else None,
                    )
                    for i in range(start, min(per_session, start + 100))
                ],
                tokens=100,
            )
        repo.update_metadata(key, {"n": n, "tags": ["a", "b"]})
    repo.compact(SessionKey("agent-0", "telegram", "bot", "dm", "peer-0"), keep_last=5, summary="s")
    repo.set_status(SessionKey("agent-1", "telegram", "bot", "dm", "peer-1"), "archived")
    engine.dispose()


def tables(path: Path) -> dict[str, Any]:
    found = snapshot(path)
    found.pop("schema_version")  # when each store was migrated
    return found


def test_export_then_import_round_trips_10000_messages_exactly(tmp_path: Path) -> None:
    source, target = tmp_path / "source.db", tmp_path / "target.db"
    fill(source, sessions=20, per_session=500)
    export = tmp_path / "export.jsonl"
    done = cli("--db", str(source), "export", "--out", str(export))
    assert done.returncode == 0, done.stderr
    messages = len(tables(source)["messages"])  # 10 000, less what compaction removed
    assert messages == 19 * 500 + 6
    assert f"Exported 20 session(s) and {messages:,} message(s)" in done.stderr
    lines = export.read_text().splitlines()
    assert json.loads(lines[0])["type"] == "aisopod-session-export"
    assert len(lines) == 1 + 20 + messages
    imported = as_json("--db", str(target), "import", str(export))
    assert (imported["sessions_created"], imported["messages_imported"]) == (20, messages)
    assert imported["errors"] == []
    assert tables(target) == tables(source)
    # Idempotent: the same file again changes nothing.
    again = as_json("--db", str(target), "import", str(export))
    assert (again["sessions_existing"], again["messages_existing"]) == (20, messages)
    assert (again["sessions_created"], again["messages_imported"]) == (0, 0)
    assert tables(target) == tables(source)
    # To stdout, filtered: one agent's sessions and only their messages.
    one_agent = [
        json.loads(line)
        for line in ok("--db", str(source), "export", "--agent-id", "agent-2").splitlines()
    ]
    sessions = [line for line in one_agent if line["type"] == "session"]
    assert {line["agent_id"] for line in sessions} == {"agent-2"}
    assert {line["session"].split(":")[0] for line in one_agent if line["type"] == "message"} == {
        "agent-2"
    }


def test_import_reports_bad_lines_and_imports_the_rest(tmp_path: Path, store: Path) -> None:
    export = tmp_path / "export.jsonl"
    ok("--db", str(store), "export", "-o", str(export))
    good = export.read_text().splitlines()
    message = json.loads(good[-1])
    bad = [
        "{not json",
        json.dumps({"type": "chat"}),
        json.dumps({**message, "role": "wizard", "id": None}),
        json.dumps({**message, "session": "x:y:z:dm:nobody", "id": None}),
        json.dumps({**json.loads(good[1]), "created_at": "2026-01-01T00:00:00"}),
        good[0],  # a header that is not the first line
    ]
    lines = [*good, *bad]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines) + "\n")
    target = tmp_path / "target.db"
    done = cli("--db", str(target), "import", str(mixed))
    assert done.returncode == 1
    reported = done.stderr.strip().splitlines()
    first_bad = len(good) + 1
    assert [line.split(":")[0] for line in reported] == [
        f"line {n}" for n in range(first_bad, first_bad + len(bad))
    ]
    assert "not JSON" in reported[0]
    assert "type" in reported[1]
    assert "role" in reported[2]
    assert "no session x:y:z:dm:nobody" in reported[3]
    assert "created_at" in reported[4]
    assert "header" in reported[5]
    assert "refused: 6 line(s)" in done.stdout
    assert tables(target) == tables(store)  # every good line, nothing else
    # A message id taken by a different message is refused too.
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({**message, "content": "something else"}) + "\n")
    refused = cli("--db", str(target), "import", str(clash))
    assert refused.returncode == 1
    assert "different message" in refused.stderr
    assert tables(target) == tables(store)


def test_copy_to_another_store(store: Path, tmp_path: Path, store_url: str) -> None:
    assert "Copied 3 session(s) and 6 message(s)" in ok(
        "--db", str(store), "copy", "--to", store_url
    )
    copied = as_json("--db", store_url, "status")
    assert (copied["sessions"], copied["messages"], copied["tokens"]) == (3, 6, 37)
    # A target that holds sessions is not overwritten unless asked.
    assert "overwrite" in failed("--db", str(store), "copy", "--to", store_url)
    assert "Copied 3 session(s)" in ok("--db", str(store), "copy", "--to", store_url, "--overwrite")


def test_import_into_either_backend_round_trips(
    store: Path, tmp_path: Path, store_url: str
) -> None:
    export = tmp_path / "export.jsonl"
    ok("--db", str(store), "export", "-o", str(export))
    assert as_json("--db", store_url, "import", str(export))["messages_imported"] == 6
    assert as_json("--db", store_url, "import", str(export))["messages_existing"] == 6
    mine = as_json("--db", str(store), "sessions", "show", "1")
    theirs = as_json("--db", store_url, "sessions", "show", "1")
    assert theirs == mine
    roundtrip = tmp_path / "again.jsonl"
    ok("--db", store_url, "export", "-o", str(roundtrip))
    assert roundtrip.read_text().splitlines()[1:] == export.read_text().splitlines()[1:]


# --- a big export in constant memory ------------------------------------------------------

EXPORT_MESSAGES = 40_000 * stress()  # `make stress`: 400 000


def fill_fast(path: Path, messages: int) -> None:
    """Plain-SQL set-up (not what is tested): 100 sessions sharing `messages` messages."""
    open_database(path).dispose()
    conn = sqlite3.connect(path)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    per = messages // 100
    with conn:
        conn.executemany(
            "INSERT INTO sessions (id, agent_id, channel, account_id, peer_kind, peer_id, "
            "created_at, updated_at, message_count) VALUES (?, 'a', 'c', 'x', 'dm', ?, ?, ?, ?)",
            [(n + 1, f"p{n}", now.isoformat(), now.isoformat(), per) for n in range(100)],
        )
        conn.executemany(
            "INSERT INTO messages (session_id, role, content, created_at) VALUES (?, 'user', ?, ?)",
            (
                (i % 100 + 1, f"message {i} " + "x" * 80, (now + timedelta(seconds=i)).isoformat())
                for i in range(per * 100)
            ),
        )
    conn.close()


def peak_rss_mib(*args: str) -> float:
    """Run the installed script; its peak resident memory, from the kernel's accounting."""
    process = subprocess.Popen(
        [str(SCRIPT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    return usage.ru_maxrss / 1024


def test_a_big_export_runs_in_flat_memory(tmp_path: Path) -> None:
    """Exporting 10× the messages takes no more memory: the export streams. (Sized by
    AISOPOD_STRESS: 40 000 messages by default, 400 000 under `make stress`; run with
    -s for the figures.)"""
    small, big = tmp_path / "small.db", tmp_path / "big.db"
    fill_fast(small, EXPORT_MESSAGES // 10)
    fill_fast(big, EXPORT_MESSAGES)
    small_peak = peak_rss_mib("--db", str(small), "export", "-o", str(tmp_path / "s.jsonl"))
    big_peak = peak_rss_mib("--db", str(big), "export", "-o", str(tmp_path / "b.jsonl"))
    with (tmp_path / "b.jsonl").open() as exported:
        lines = sum(1 for _ in exported)
    assert lines == 1 + 100 + EXPORT_MESSAGES
    print(
        f"export peak RSS: {small_peak:.1f} MiB for {EXPORT_MESSAGES // 10:,} messages, "
        f"{big_peak:.1f} MiB for {EXPORT_MESSAGES:,}"
    )
    assert big_peak < small_peak + 16


@pytest.mark.parametrize(
    "failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")]
)
def test_an_export_cut_short_leaves_no_part_and_the_file_it_was_to_replace(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """Ctrl-C, or a full disk, after two lines of the real export were written: FILE
    keeps the previous export, and no temporary file is left beside it."""
    from aisopod_session import transfer

    real = transfer.export_jsonl

    class CutShort:
        def __init__(self, stream: Any) -> None:
            self.stream, self.lines = stream, 0

        def write(self, text: str) -> int:
            self.lines += 1
            if self.lines > 2:
                raise failure
            return int(self.stream.write(text))

    def cut_short(engine: Any, stream: Any, *args: Any, **kwargs: Any) -> Any:
        return real(engine, cast(TextIO, CutShort(stream)), *args, **kwargs)

    monkeypatch.setattr(transfer, "export_jsonl", cut_short)
    folder = tmp_path / "exports"
    folder.mkdir()
    target = folder / "keep.jsonl"
    target.write_text("the previous export\n")
    arguments = ("--db", str(store), "export", "--to", str(target), "--overwrite")
    if isinstance(failure, KeyboardInterrupt):
        assert cli(*arguments).returncode != 0
    else:
        assert failed(*arguments) == "error: [Errno 28] No space left on device"
    assert target.read_text() == "the previous export\n"
    assert [p.name for p in folder.iterdir()] == ["keep.jsonl"]
    monkeypatch.undo()
    ok("--db", str(store), "export", "--to", str(target), "--overwrite")
    ok("--db", str(store), "export", "--to", str(folder / "new.jsonl"))
    lines = [len((folder / name).read_text().splitlines()) for name in ("keep.jsonl", "new.jsonl")]
    assert lines[0] == lines[1] > 2
    assert sorted(p.name for p in folder.iterdir()) == ["keep.jsonl", "new.jsonl"]


def test_an_export_is_written_in_place_where_a_replacement_would_change_more(
    store: Path, tmp_path: Path
) -> None:
    """A file with another hard link keeps its links (both names see the export), and
    `/dev/stdout` that is a pipe is written, not replaced (a temporary file cannot be
    made beside it)."""
    target, link = tmp_path / "out.jsonl", tmp_path / "link.jsonl"
    target.write_text("previous\n")
    os.link(target, link)
    ok("--db", str(store), "export", "--to", str(target), "--overwrite")
    assert link.read_text() == target.read_text() != "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == [
        "link.jsonl",
        "out.jsonl",
    ]
    piped = subprocess.run(
        [str(SCRIPT), "--db", str(store), "export", "--to", "/dev/stdout", "--overwrite"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.splitlines()) == len(target.read_text().splitlines()) > 2


def test_an_export_replacing_a_file_keeps_its_group_and_extended_attributes(
    store: Path, tmp_path: Path
) -> None:
    """A replaced file keeps its mode and group (another group than the process's own
    where the file had one); a file with extended attributes (an ACL is one) is
    written in place, keeping them."""
    grouped, tagged = tmp_path / "grouped.jsonl", tmp_path / "tagged.jsonl"
    for path in (grouped, tagged):
        path.write_text("previous\n")
    other_group = next((g for g in os.getgroups() if g != os.getegid()), None)
    if other_group is None and os.geteuid() == 0:
        other_group = os.getegid() + 1  # root may give any group
    if other_group is not None:
        os.chown(grouped, -1, other_group)
    grouped.chmod(0o640)
    try:
        os.setxattr(tagged, "user.tag", b"keep")
    except OSError:
        pytest.skip("this file system keeps no extended attributes")
    for path in (grouped, tagged):
        ok("--db", str(store), "export", "--to", str(path), "--overwrite")
        assert path.read_text() != "previous\n"
    assert stat.S_IMODE(grouped.stat().st_mode) == 0o640
    if other_group is not None:
        assert grouped.stat().st_gid == other_group
    assert os.getxattr(tagged, "user.tag") == b"keep"


def test_an_export_to_dev_stdout_open_on_a_file_writes_through_the_descriptor(
    store: Path, tmp_path: Path
) -> None:
    """`{ echo header; aisopod-session export --to /dev/stdout; } > log`: the export goes
    to the file the shell opened, which is not replaced (the shell's later writes would
    go to a file no name leads to)."""
    log = tmp_path / "log.txt"
    with log.open("w") as opened:
        inode = os.fstat(opened.fileno()).st_ino
        done = subprocess.run(
            [str(SCRIPT), "--db", str(store), "export", "--to", "/dev/stdout", "--overwrite"],
            stdout=opened,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert log.stat().st_ino == inode
    assert log.read_text().startswith('{"type": "aisopod-session-export"')


def test_an_export_replacing_a_file_in_a_folder_with_a_default_acl_writes_in_place(
    store: Path, tmp_path: Path
) -> None:
    """A folder whose default ACL gives new files an access ACL: replacing a file that
    has none would widen who may read it, so the file is written in place."""
    folder = tmp_path / "shared"
    folder.mkdir()
    target = folder / "plain.jsonl"
    target.write_text("previous\n")
    target.chmod(0o640)
    everyone = 0xFFFFFFFF
    # A POSIX ACL as Linux stores it: version 2, then (tag, permissions, id) entries;
    # user `nobody` (65534) may read and write new files.
    entries = [(1, 6, everyone), (2, 6, 65534), (4, 0, everyone), (0x10, 6, everyone)]
    entries.append((0x20, 0, everyone))
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(folder, "system.posix_acl_default", acl)
    except OSError:
        pytest.skip("this file system keeps no ACLs")
    ok("--db", str(store), "export", "--to", str(target), "--overwrite")
    assert target.read_text().startswith('{"type": "aisopod-session-export"')
    assert os.listxattr(target) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in folder.iterdir()) == ["plain.jsonl"]


def test_an_export_terminated_midway_leaves_the_file_it_was_to_replace(tmp_path: Path) -> None:
    """SIGTERM (a service manager stopping it) while the real command writes: exit
    status 143, the previous export untouched, no temporary file left."""
    store = tmp_path / "big.db"
    fill_fast(store, EXPORT_MESSAGES)
    folder = tmp_path / "exports"
    folder.mkdir()
    target = folder / "keep.jsonl"
    target.write_text("the previous export\n")
    process = subprocess.Popen(
        [str(SCRIPT), "--db", str(store), "export", "--to", str(target), "--overwrite"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not any(p.name != "keep.jsonl" and p.stat().st_size for p in folder.iterdir()):
        assert process.poll() is None, "the export ended before it was seen under way"
        assert time.monotonic() < deadline, "no export under way after 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 143, errors
    assert target.read_text() == "the previous export\n"
    assert [p.name for p in folder.iterdir()] == ["keep.jsonl"]


def test_export_takes_no_write_lock(store: Path) -> None:
    """Writers go on while an export reads its snapshot."""
    writes: list[str] = []

    class WriteWhileExporting(io.StringIO):
        def write(self, text: str) -> int:
            if not writes:
                writer = sqlite3.connect(store, timeout=0, isolation_level=None)
                writer.execute("BEGIN IMMEDIATE")  # fails at once if the export held it
                writer.execute("UPDATE sessions SET token_usage = 99 WHERE id = 1")
                writer.execute("COMMIT")
                writer.close()
                writes.append("done")
            return super().write(text)

    engine = open_database(store)
    try:
        result = export_jsonl(engine, WriteWhileExporting())
    finally:
        engine.dispose()
    assert (result.sessions, writes) == (3, ["done"])


def test_import_counts_messages_from_the_rows_it_adds(store: Path, tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    ok("--db", str(store), "export", "-o", str(export))
    sessions_only = tmp_path / "sessions-only.jsonl"
    sessions_only.write_text(
        "\n".join(line for line in export.read_text().splitlines() if '"message"' not in line)
    )
    target = tmp_path / "target.db"
    ok("--db", str(target), "import", str(sessions_only))
    listed = as_json("--db", str(target), "sessions", "list")
    assert [s["message_count"] for s in listed] == [0, 0, 0]  # no rows, so no messages


def test_bad_bytes_and_deep_nesting_are_refused_by_line(store: Path, tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    ok("--db", str(store), "export", "-o", str(export))
    good = export.read_bytes().splitlines()
    message = json.loads(good[-1])
    nested = json.dumps({**message, "id": None, "tool_calls": [[]]}).replace(
        "[[]]", "[" * 100_000 + "]" * 100_000
    )
    broken = json.dumps({**message, "id": None, "content": "X"}).encode().replace(b"X", b"\xff")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\xef\xbb\xbf" + b"\n".join([*good, nested.encode(), broken]) + b"\n")
    done = cli("--db", str(tmp_path / "t.db"), "import", str(mixed))
    assert done.returncode == 1
    reported = done.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in reported] == [
        f"line {len(good) + 1}",
        f"line {len(good) + 2}",
    ]
    assert "nested too deeply" in reported[0]
    assert "refused: 2 line(s)" in done.stdout  # the BOM-led header and the rest went in


def test_a_closed_pipe_ends_quietly(store: Path) -> None:
    process = subprocess.Popen(
        [str(SCRIPT), "--db", str(store), "migrate", "--status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # the reader goes away before the table is printed
    errors = process.stderr.read()
    process.stderr.close()
    assert process.wait() == 141
    assert errors == b""


def test_a_command_started_with_standard_output_closed_says_so_or_runs(store: Path) -> None:
    """`aisopod-session ... >&-`: Python has no `sys.stdout` then. A command whose
    output is only shown runs (the output goes nowhere); an export to standard output
    is refused in one line, not with a traceback."""

    def closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), "--db", str(store), *args],
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            preexec_fn=lambda: os.close(1),  # in the child, before it starts
        )

    status = closed_stdout("status")
    assert (status.returncode, status.stderr) == (0, "")
    export = closed_stdout("export")
    assert export.returncode == 1
    assert export.stderr == "error: standard output is closed: name a file with --to\n"


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    """`--version` prints the package metadata's version, as `__version__` holds it, and
    touches no store (none is created where it runs)."""
    from importlib.metadata import version

    import aisopod_session

    expected = version("aisopod-session")
    assert aisopod_session.__version__ == expected
    done = subprocess.run(
        [sys.executable, "-m", "aisopod_session.cli", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"aisopod-session {expected}\n"
    assert list(tmp_path.iterdir()) == []


# --- start-up: what the command imports ----------------------------------------------------

# The libraries a command that opens no store must not import: the store's (SQLAlchemy,
# SQLModel, pydantic, psycopg) and Rich, which only printing commands need. Their time is
# in `make bench`'s start-up table; here only which modules are imported is checked.
STORE_LIBRARIES = frozenset({"sqlalchemy", "sqlmodel", "pydantic", "pydantic_core", "psycopg"})


def imported_packages(*args: str, cwd: Path) -> set[str]:
    """The top-level packages `python -X importtime -m aisopod_session.cli *args` imports."""
    return {module.split(".")[0] for module in imported_modules(*args, cwd=cwd)}


def imported_modules(*args: str, cwd: Path) -> set[str]:
    """The modules `python -X importtime -m aisopod_session.cli *args` imports, read from
    the interpreter's import-time report (on stderr)."""
    environment = {k: v for k, v in os.environ.items() if k != "AISOPOD_SESSION_DB"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "aisopod_session.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[1].strip() for line in report[1:]}  # after the header
    assert {"aisopod_session", "aisopod_session.enums"} <= modules  # (cli runs as __main__)
    return modules


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_import_neither_the_store_nor_rich(option: str, tmp_path: Path) -> None:
    packages = imported_packages(option, cwd=tmp_path)
    assert "typer" in packages
    assert packages & {*STORE_LIBRARIES, "rich"} == set()
    assert list(tmp_path.iterdir()) == []


def test_status_on_a_sqlite_file_does_not_import_psycopg(store: Path) -> None:
    """psycopg is imported for a PostgreSQL URL only (the driver errors are looked up
    among the modules already imported, the PostgreSQL dialect compiled on first use)."""
    modules = imported_modules("--db", str(store), "status", cwd=store.parent)
    packages = {module.split(".")[0] for module in modules}
    assert {"sqlalchemy", "sqlmodel", "rich"} <= packages  # the report is read right
    assert "psycopg" not in packages
    # Nor SQLAlchemy's PostgreSQL dialect (~30 ms), which a `postgresql_` option in the
    # models would load to check it.
    assert "sqlalchemy.dialects.sqlite" in modules
    assert not any(module.startswith("sqlalchemy.dialects.postgresql") for module in modules)


# --- search, fork, metadata filters and cursor pages -----------------------------------------


def test_search_prints_hits_with_key_id_time_and_marked_snippet(store: Path) -> None:
    text = ok("--db", str(store), "search", "oslo")
    assert str(TELEGRAM) in text
    assert "«Oslo»" in text
    assert "2 hit(s), best first." in text
    hits = as_json("--db", str(store), "search", '"4 °C"', "--json")
    assert [(h["key"], h["role"], h["snippet"]) for h in hits] == [
        (str(TELEGRAM), "assistant", "«4 °C» in Oslo.")
    ]
    assert hits[0]["id"] == 4
    assert hits[0]["created_at"].endswith("+00:00")
    assert as_json("--db", str(store), "search", "oslo", "--role", "user", "--json")[0]["id"] == 1
    assert as_json("--db", str(store), "search", "oslo", "--meta", "language=fr", "--json") == []
    assert len(as_json("--db", str(store), "search", "oslo", "--limit", "1", "--json")) == 1
    assert "No message matches." in ok("--db", str(store), "search", 'NEAR(x) OR "')


def test_sessions_fork_copies_a_session_under_a_new_key(store: Path) -> None:
    done = ok("--db", str(store), "sessions", "fork", "1", "concierge:telegram:bot-1:dm:1002")
    assert "into #4 concierge:telegram:bot-1:dm:1002 (4 messages, up to message #4)" in done
    forked = as_json(
        "--db", str(store), "sessions", "fork", str(TELEGRAM), "concierge:web:x:dm:y",
        "--up-to", "2", "--json",
    )  # fmt: skip
    assert (forked["parent_id"], forked["forked_from_message_id"]) == (1, 2)
    assert forked["message_count"] == 2
    assert "exists already" in failed("--db", str(store), "sessions", "fork", "1", str(SLACK))
    assert "up_to_id: message 5" in failed(
        "--db", str(store), "sessions", "fork", "1", "a:b:c:dm:d", "--up-to", "5"
    )
    assert "NEW_KEY" in misused("--db", str(store), "sessions", "fork", "1", "not-a-key")
    # The forks of session 1, by every command that takes the filters.
    forks = as_json("--db", str(store), "sessions", "list", "--parent-id", "1", "--json")
    assert sorted(s["key"] for s in forks) == [
        "concierge:telegram:bot-1:dm:1002",
        "concierge:web:x:dm:y",
    ]
    found = as_json("--db", str(store), "search", "Oslo", "--parent-id", "1", "--json")
    assert {hit["key"] for hit in found} == {s["key"] for s in forks}
    exported = ok("--db", str(store), "export", "--parent-id", "4")
    assert [json.loads(line)["type"] for line in exported.splitlines()[1:]] == []
    assert "--parent-id" in misused("--db", str(store), "sessions", "list", "--parent-id", "0")


def test_sessions_list_filters_by_metadata_and_pages_by_cursor(store: Path) -> None:
    def keys(*args: str) -> list[str]:
        return [s["key"] for s in as_json("--db", str(store), "sessions", "list", *args, "--json")]

    assert keys("--meta", "language=en") == [str(TELEGRAM)]
    assert keys("--meta", 'language="en"') == [str(TELEGRAM)]
    assert keys("--meta", "language=en", "--meta", "x=1") == []
    assert keys("--meta", "language=NaN") == []  # the text "NaN", not a number refused
    assert "--meta: 'language' is not KEY=JSON" in misused(
        "--db", str(store), "sessions", "list", "--meta", "language"
    )
    everything = keys()
    seen: list[str] = []
    cursor = "first"
    while cursor:
        page = as_json("--db", str(store), "sessions", "list", "--limit", "1", "--cursor", cursor)
        seen += [s["key"] for s in page["sessions"]]
        cursor = page["next_cursor"]
    assert seen == everything
    text = ok("--db", str(store), "sessions", "list", "--limit", "2")
    assert "Next page: --cursor " in text
    assert "--cursor: not a cursor" in misused(
        "--db", str(store), "sessions", "list", "--cursor", "nope"
    )
    assert "give --cursor or --offset, not both" in misused(
        "--db", str(store), "sessions", "list", "--cursor", "first", "--offset", "1"
    )


def test_prune_and_export_take_metadata_filters(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "en.jsonl"
    ok("--db", str(store), "export", "--meta", "language=en", "--out", str(out))
    sessions = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["peer_id"] for line in sessions if line.get("type") == "session"} == {"1001"}
    report = as_json(
        "--db", str(store), "prune", "--older-than", "1s", "--meta", "language=en",
        "--dry-run", "--json",
    )  # fmt: skip
    assert report["sessions"] == 0  # just written: not old


# --- the operator's side: -h, enums in any case, errors in the command's own words -------


def test_dash_h_is_help_on_every_command() -> None:
    assert "Usage: aisopod-session [OPTIONS] COMMAND" in ok("-h")
    assert "Usage: aisopod-session sessions list [OPTIONS]" in ok("sessions", "list", "-h")
    assert "--overwrite" in ok("copy", "-h")


def test_enum_options_take_any_case_as_the_api_does(store: Path) -> None:
    listed = as_json("--db", str(store), "sessions", "list", "--peer-kind", "DM")
    assert [s["key"] for s in listed] == [str(TELEGRAM)]
    assert as_json("--db", str(store), "sessions", "list", "--status", "Idle") == as_json(
        "--db", str(store), "sessions", "list", "--status", "idle"
    )
    hits = as_json("--db", str(store), "search", "oslo", "--role", "USER")
    assert {hit["role"] for hit in hits} == {"user"}


def test_a_bad_key_is_one_line_in_the_commands_own_words(store: Path) -> None:
    said = misused("--db", str(store), "sessions", "show", "a:b:c:d:e")
    assert said.endswith("peer_kind: must be one of dm, group, channel, thread; got 'd'"), said
    for framing in ("validation error", "pydantic", "[type=", "Value error"):
        assert framing not in said


def test_copying_into_a_store_that_holds_sessions_names_the_flag(
    store: Path, tmp_path: Path
) -> None:
    target = tmp_path / "copy.db"
    ok("--db", str(store), "copy", "--to", str(target))
    said = failed("--db", str(store), "copy", "--to", str(target))
    assert "already holds 3 session(s): pass --overwrite to replace them" in said
    assert "overwrite=True" not in said
    assert "Copied 3 session(s)" in ok(
        "--db", str(store), "copy", "--to", str(target), "--overwrite"
    )


# --- usage errors in our words, one naming scheme, help, docs -----------------------------

LIBRARY_WORDS = ("Invalid value", "Value error", "pydantic", "Input should", "Error:", "[type=")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("sessions", "list", "--status", "bogus"), "--status: 'bogus' is not one of active, "),
        (("sessions", "list", "--peer-kind", "pm"), "--peer-kind: 'pm' is not one of dm, "),
        (("search", "x", "--role", "robot"), "--role: 'robot' is not one of system, "),
        (("sessions", "list", "--limit", "-1"), "--limit: must be from 0 to 9223372036854775807"),
        (("sessions", "list", "--limit", "x"), "--limit: 'x' is not a whole number"),
        (("sessions", "list", "--limit", "\uff11"), "--limit: '\uff11' is not a whole number"),
        (("sessions", "list", "--limit"), "--limit: needs a value"),
        (("sessions", "list", "--bogus"), "no option --bogus"),
        (("sessions", "show"), "missing argument KEY-OR-ID"),
        (("sessions", "show", "a:b:c:d:e"), "KEY-OR-ID: 'a:b:c:d:e' is neither"),
        (("compact", "1"), "--last: missing; give --last N"),
        (("copy",), "--to: missing; give --to PATH-OR-URL"),
        (("prune",), "--updated-before: missing; give --updated-before TIME"),
        (("prune", "--updated-before", "0s"), "--updated-before: '0s': a duration ago must be"),
        (("sessions", "list", "--created-after", "soon"), "--created-after: 'soon' is neither"),
        (("mark-idle", "--idle-for", "7"), "--idle-for: '7' is not a duration"),
        (("sessions", "list", "--meta", "x"), "--meta: 'x' is not KEY=JSON"),
        (("sessions", "list", "--cursor", "nope"), "--cursor: not a cursor"),
    ],
)
def test_usage_errors_name_the_option_in_our_words_and_exit_2(
    store: Path, args: tuple[str, ...], said: str
) -> None:
    before = snapshot(store)
    line = misused("--db", str(store), *args)
    assert line.startswith(f"error: {said}"), line
    for words in LIBRARY_WORDS:
        assert words not in line
    assert snapshot(store) == before


def test_a_usage_error_shows_the_commands_usage_first(store: Path) -> None:
    done = cli("--db", str(store), "sessions", "list", "--status", "bogus")
    assert done.stderr.splitlines()[:2] == [
        "Usage: aisopod-session sessions list [OPTIONS]",
        "Try 'aisopod-session sessions list -h' for help.",
    ]


def test_the_old_spellings_still_work_but_help_shows_the_new_ones(
    store: Path, tmp_path: Path
) -> None:
    run_sql(
        store, "UPDATE sessions SET updated_at = ? WHERE id = 3", ("2020-01-01T00:00:00+00:00",)
    )
    new = as_json("--db", str(store), "prune", "--updated-before", "30d", "--dry-run")
    old = as_json("--db", str(store), "prune", "--older-than", "30d", "--dry-run")
    assert new["sessions"] == old["sessions"] == 1
    since = as_json("--db", str(store), "prune", "--updated-before", "2021-01-01", "--dry-run")
    assert (since["sessions"], since["updated_before"]) == (1, "2021-01-01T00:00:00+00:00")
    assert "--updated-before: given twice (also as --older-than" in misused(
        "--db", str(store), "prune", "--updated-before", "30d", "--older-than", "30d"
    )
    assert "removed 2 message(s)" in ok("--db", str(store), "compact", "1", "--keep-last", "2")
    assert "removed 1 message(s)" in ok("--db", str(store), "compact", "1", "--last", "1")
    for name in ("--out", "-o", "--to"):
        target = tmp_path / f"export{name}.jsonl"
        ok("--db", str(store), "export", name, str(target))
        assert len(target.read_text().splitlines()) == 1 + 3 + 3  # header, sessions, messages
    helps = {
        "prune": ("--updated-before TIME", "--older-than"),
        "compact": ("--last N", "--keep-last"),
        "export": ("--to FILE", "--out"),
    }
    for command, (shown, hidden) in helps.items():
        text = ok(command, "-h")
        assert shown in text
        assert hidden not in text
    assert "-o," not in ok("export", "-h")


def every_command() -> list[tuple[list[str], Any]]:
    """Every command of the app, by its path (`["sessions", "list"]`), with its click
    command (as Typer builds it)."""
    import typer

    found: list[tuple[list[str], Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            found.append((path, command))
            return
        for name, sub in subcommands.items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_help_uses_our_placeholders_and_describes_every_argument() -> None:
    paths: list[list[str]] = [[], ["sessions"], *(path for path, _ in every_command())]
    for path in paths:
        text = ok(*path, "-h")
        assert not re.findall(r"<[^>\n]*>|\{[^}\n]*\}", text), (path, text)
        assert "int range" not in text
    for path, command in every_command():
        for param in command.params:
            if param.param_type_name == "argument":
                assert param.help, (path, param.metavar)


def test_docs_cli_md_documents_every_command_and_option_as_help_shows_them() -> None:
    """Like sqlite-utils' docs test: every command has a row in docs/cli.md's table, every
    option its --help shows is named in its row or in its section, and every option named
    in a row or in a section's option list is one the command takes."""
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    rows = {
        match.group(1): match.group(0)
        for match in re.finditer(r"^\| `((?:sessions )?[a-z-]+)[^`]*` \|.*$", text, re.M)
    }
    sections = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^### ([a-z -]+)\n(.*?)(?=^##|\Z)", text, re.M | re.S)
    }
    paragraph = re.search(r"^`\[filters\]` are .*?\n\n", text, re.M | re.S)
    assert paragraph is not None
    filters = paragraph.group()
    shared = {"compact", "reset", "prune", "mark-idle"}  # also under `sessions`
    commands = every_command()
    names = {" ".join(path) for path, _ in commands}
    assert set(rows) <= names, set(rows) - names
    assert set(sections) <= names, set(sections) - names
    for path, command in commands:
        name = " ".join(path)
        if path[0] == "sessions" and path[-1] in shared:
            name = path[-1]
        assert name in rows, f"{name}: no row in docs/cli.md's command table"
        documented = rows[name] + sections.get(name, "")
        if "[filters]" in rows[name]:  # the paragraph that names the filters, once for all
            documented += filters
        # Each option the help shows, by its long name (`-y` is `--yes`, said once for all).
        shown = {
            parameter_name(param)
            for param in command.params
            if param.param_type_name == "option" and not param.hidden
        } - {"--db", "--help"}
        taken = {opt for param in command.params for opt in getattr(param, "opts", ())}
        for option in shown:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", documented), (
                f"docs/cli.md does not document {option} of {name}"
            )
        # What a row or a section's option list names must exist (the old names included).
        listed = re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rows[name].split("|")[1])
        listed += re.findall(r"^- `(--?[a-z][a-z-]*)", sections.get(name, ""), re.M)
        listed += re.findall(
            r"^- `--?[a-z-]+[^`]*`, `(--?[a-z][a-z-]*)", sections.get(name, ""), re.M
        )
        for option in listed:
            assert option in taken, f"docs/cli.md names {option} for {name}, which has none"


# --- vacuum, 80 columns, files, progress ---------------------------------------------------


def test_vacuum_gives_back_the_space_a_prune_freed(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    fill(path, sessions=50, per_session=20)
    run_sql(path, "UPDATE sessions SET updated_at = ?", ("2020-01-01T00:00:00+00:00",))
    ok("--db", str(path), "prune", "--updated-before", "30d", "--yes")
    pruned = as_json("--db", str(path), "status")
    assert pruned["sessions"] == 0
    report = as_json("--db", str(path), "vacuum")
    assert report["bytes_before"] == pruned["file_bytes"] + pruned["wal_bytes"]
    after = as_json("--db", str(path), "status")
    assert report["bytes_after"] == after["file_bytes"] + after["wal_bytes"]
    assert after["wal_bytes"] == 0
    assert after["file_bytes"] < pruned["file_bytes"] / 2  # the pages went back
    assert "given back" in ok("--db", str(path), "vacuum")


def test_vacuum_runs_on_either_backend(store: Path, store_url: str) -> None:
    ok("--db", str(store), "copy", "--to", store_url)
    report = as_json("--db", store_url, "vacuum")
    assert report["bytes_before"] > 0
    assert report["bytes_after"] > 0
    assert as_json("--db", store_url, "status")["sessions"] == 3  # nothing else changed


@pytest.fixture
def terminal_80(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout as an 80-column terminal would size it (Rich's console, in this process)."""
    from aisopod_session import cli as module

    console = module._LazyConsole(
        highlight=False, soft_wrap=True, markup=False, emoji=False, width=80
    )
    monkeypatch.setattr(module, "out", console)


LONG = SessionKey("concierge", "telegram", "bot-main-eu", "thread", "t-90210")  # 45 characters


@pytest.mark.usefixtures("terminal_80")
def test_sessions_list_and_show_fit_80_columns_with_every_key_whole(store: Path) -> None:
    engine = open_database(store)
    repo = SessionRepository(engine)
    repo.get_or_create(LONG)
    repo.append_message(LONG, Role.USER, "hi", tokens=123456)
    engine.dispose()
    listed = ok("--db", str(store), "sessions", "list")
    lines = listed.splitlines()
    assert max(len(line) for line in lines) <= 80, listed
    for key in (TELEGRAM, SLACK, OTHER, LONG):
        assert any(str(key) in line for line in lines), (key, listed)
    times = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", listed)
    assert len(times) == 4  # none wrapped
    assert "123,456" not in listed  # the token columns left out...
    wide = ok("--db", str(store), "sessions", "list", "--wide")
    assert "123,456" in wide  # ... and shown with --wide
    assert max(len(line) for line in wide.splitlines()) > 80
    shown = ok("--db", str(store), "sessions", "show", "1")
    header = shown.splitlines()[:3]
    assert header[0] == f"Session #1 {TELEGRAM} (active)"
    assert max(len(line) for line in header) <= 80


@pytest.mark.usefixtures("terminal_80")
def test_a_key_wider_than_the_terminal_is_folded_whole(store: Path) -> None:
    huge = SessionKey("agent-" + "a" * 40, "telegram", "bot-" + "b" * 30, "dm", "peer-9")
    engine = open_database(store)
    SessionRepository(engine).get_or_create(huge)
    engine.dispose()
    listed = ok("--db", str(store), "sessions", "list")
    assert max(len(line) for line in listed.splitlines()) <= 80
    # The key column's cells, line after line: the folded key is there whole, in order.
    keys = "".join(
        line.split("│")[2].strip() for line in listed.splitlines() if line.startswith("│")
    )
    assert str(huge) in keys


def test_export_does_not_replace_a_file_unasked(store: Path, tmp_path: Path) -> None:
    target = tmp_path / "backup.jsonl"
    target.write_text("keep me\n")
    said = failed("--db", str(store), "export", "--to", str(target))
    assert said == f"error: --to {target}: the file exists; pass --overwrite to replace it"
    assert target.read_text() == "keep me\n"
    for flag in ("--overwrite", "--force"):
        target.write_text("keep me\n")
        ok("--db", str(store), "export", "--to", str(target), flag)
        assert target.read_text().startswith('{"type": "aisopod-session-export"')
    assert "is a folder" in failed("--db", str(store), "export", "--to", str(tmp_path))


def test_import_refuses_a_folder_and_a_file_that_is_no_export(tmp_path: Path) -> None:
    missing = tmp_path / "new.db"
    said = failed("--db", str(missing), "import", str(tmp_path))
    assert said == f"error: {tmp_path} is a folder: name an export file (FILE.jsonl)"
    notes = tmp_path / "notes.txt"
    notes.write_text("\nshopping: milk, eggs\n")
    said = failed("--db", str(missing), "import", str(notes))
    assert said.startswith(f"error: {notes} is not an export (line 2: ")
    assert not missing.exists()  # no empty store made by mistake


def test_import_from_standard_input_checks_its_first_line_before_creating_a_store(
    store: Path, tmp_path: Path
) -> None:
    """`import -`: text that is no export makes no store; an export piped in is imported
    whole, its first lines (read to check them) included."""
    missing = tmp_path / "new.db"
    env = {"AISOPOD_SESSION_DB": None}
    refused = RUNNER.invoke(
        app, ["--db", str(missing), "import", "-"], input="\nshopping: milk\n", env=env
    )
    assert refused.exit_code == 1, refused.stderr
    assert refused.stderr.startswith("error: standard input is not an export (line 2: ")
    assert not missing.exists()
    export = ok("--db", str(store), "export")
    imported = RUNNER.invoke(
        app, ["--db", str(missing), "import", "-", "--json"], input=export, env=env
    )
    assert imported.exit_code == 0, imported.stderr
    counts = json.loads(imported.stdout)
    assert (counts["sessions_created"], counts["messages_imported"], counts["errors"]) == (
        3,
        6,
        [],
    )


def test_a_first_line_of_megabytes_is_checked_whole_from_a_file_and_from_stdin(
    store: Path, tmp_path: Path
) -> None:
    """The first line is checked whole, however long: a JSON array of 2 MiB on one line
    is refused before a store is made, and an export without its header whose first
    line holds 2 MiB of metadata imports from standard input as from the file (it was
    read in two pieces from stdin, each refused)."""
    missing = tmp_path / "new.db"
    array = tmp_path / "array.json"
    array.write_text(json.dumps(["x" * 1024] * 2048))
    said = failed("--db", str(missing), "import", str(array))
    assert said == f"error: {array} is not an export (line 1: not a JSON object but list); " + (
        "nothing imported"
    )
    assert not missing.exists()
    lines = [json.loads(line) for line in ok("--db", str(store), "export").splitlines()[1:]]
    lines[0]["metadata"] = {"notes": "n" * (2 << 20)}
    headless = tmp_path / "headless.jsonl"
    headless.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {"AISOPOD_SESSION_DB": None}
    counts = []
    for name, source in (("file.db", str(headless)), ("stdin.db", "-")):
        done = RUNNER.invoke(
            app,
            ["--db", str(tmp_path / name), "import", source, "--json"],
            input=headless.read_text() if source == "-" else None,
            env=env,
        )
        assert done.exit_code == 0, done.stderr
        counts.append(json.loads(done.stdout))
    assert counts[0] == counts[1]
    assert (counts[0]["sessions_created"], counts[0]["messages_imported"]) == (3, 6)


def test_the_first_line_check_refuses_a_line_one_character_over_the_limit(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import's line limit (lowered here to 2 000 characters) counts a line without
    its line break, in the first line's check as in the import."""
    from aisopod_session import transfer

    monkeypatch.setattr(transfer, "MAX_LINE_LENGTH", 2_000)
    header = ok("--db", str(store), "export").splitlines()[0]
    for extra, ending, refused in ((1, "\n", True), (0, "\r\n", False), (0, "\n", False)):
        first = tmp_path / "first.jsonl"
        first.write_text(header + " " * (2_000 + extra - len(header)) + ending, newline="")
        target = tmp_path / "target.db"
        done = cli("--db", str(target), "import", str(first))
        assert ("longer than 2,000 characters" in done.stderr) == refused, (extra, ending)
        assert target.exists() != refused
        target.unlink(missing_ok=True)


def test_progress_bars_count_to_their_totals_on_a_terminal(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from aisopod_session import cli as module

    seen = io.StringIO()
    terminal = Console(file=seen, force_terminal=True, width=120)
    monkeypatch.setattr(module, "err", terminal)
    export = tmp_path / "all.jsonl"
    ok("--db", str(store), "export", "--to", str(export))
    assert "exporting" in seen.getvalue()
    assert "0/9" in seen.getvalue()  # 3 sessions and 6 messages to write
    seen.truncate(0)
    ok("--db", str(tmp_path / "copy.db"), "import", str(export))
    assert "importing" in seen.getvalue()
    assert "/10" in seen.getvalue()  # the file's 10 lines: a header, 3 sessions, 6 messages
    seen.truncate(0)
    ok("--db", str(store), "copy", "--to", str(tmp_path / "copied.db"))
    assert "copying" in seen.getvalue()
    assert "/9" in seen.getvalue()  # 3 sessions and 6 messages
    seen.truncate(0)
    run_sql(store, "UPDATE sessions SET updated_at = ?", ("2020-01-01T00:00:00+00:00",))
    ok("--db", str(store), "prune", "--updated-before", "30d", "--yes")
    assert "pruning" in seen.getvalue()
    assert "/3" in seen.getvalue()
    seen.truncate(0)
    as_json("--db", str(tmp_path / "copied.db"), "prune", "--updated-before", "1s", "--yes")
    assert "pruning" not in seen.getvalue()  # never with --json
    ok("--db", str(tmp_path / "new.db"), "init")
    assert "migrating" in seen.getvalue()
    assert f"/{SCHEMA_VERSION}" in seen.getvalue()  # every migration of a new store
