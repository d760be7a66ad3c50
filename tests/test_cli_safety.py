"""The `aisopod-session` command keeps its operator safe: it never prints a database
password, never lets stored text drive the terminal, asks before compacting on a
terminal, never writes an export over its own store (or imports or copies the store into
itself), and answers out-of-range numbers, durations and times with a clear error.

Every test runs the command on real files (and on PostgreSQL where said), in this process
through Typer's test runner or, where a terminal is needed or a crash must not end the
tests, in a forked child running the console script's entry point."""

from __future__ import annotations

import json
import os
import pty
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from sqlalchemy.engine import make_url

from aisopod_session import NewMessage, Role, SessionKey, SessionRepository, open_database
from tests.dbtools import snapshot, store_location
from tests.test_cli import Outcome, cli, failed, forked, misused, ok

KEY = SessionKey("concierge", "telegram", "bot-1", "dm", "1001")


def make_store(path: Path) -> Path:
    """A store with one session of four messages, metadata and a tool call."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    repo.get_or_create(KEY)
    repo.append_messages(
        KEY,
        [
            NewMessage(Role.USER, "What's the weather in Oslo?"),
            NewMessage(Role.ASSISTANT, "", [{"id": "c1", "name": "weather", "arguments": {}}]),
            NewMessage(Role.TOOL, '{"temp_c": 4}'),
            NewMessage(Role.ASSISTANT, "4 °C in Oslo."),
        ],
        tokens=30,
    )
    repo.update_metadata(KEY, {"language": "en"})
    engine.dispose()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "store.db")


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (symlinks as their target's name), byte for byte: the
    proof that a refused command wrote nothing and left no -wal or -shm behind."""
    state: dict[str, bytes] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            state[name] = b"-> " + os.fsencode(os.readlink(path))
        elif path.is_file():
            state[name] = path.read_bytes()
    return state


# --- 1. passwords are never printed -------------------------------------------------------

PASSWORD = "s3cret"


def with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def assert_no_password(done: Outcome) -> None:
    assert PASSWORD not in done.stdout
    assert PASSWORD not in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/test",  # not a valid URL
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test",  # nothing listens there
        f"postgresql://postgres@127.0.0.1:1/test?password={PASSWORD}",  # in the query
    ],
)
def test_errors_about_a_url_never_print_its_password(url: str, store: Path) -> None:
    for args in (("--db", url, "status"), ("--db", str(store), "copy", "--to", url)):
        done = cli(*args)
        assert done.returncode == 1, done
        assert_no_password(done)
        if "notaport" in url:
            assert "postgres:***@" in done.stderr  # still named, its password masked


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL schema, named by a URL that carries a password (the test
    server trusts local connections, so it is ignored, but must never be printed)."""
    with store_location("postgresql", tmp_path) as url:
        yield with_password(url)


def test_no_command_prints_the_password_of_a_server_store(
    server: str, store: Path, tmp_path: Path
) -> None:
    export = tmp_path / "export.jsonl"
    ok("--db", str(store), "export", "--out", str(export))
    masked = make_url(server).render_as_string(hide_password=True)
    commands: list[tuple[str, ...]] = [
        ("init",),
        ("migrate",),
        ("migrate", "--json"),
        ("migrate", "--status"),
        ("import", str(export)),
        ("status",),
        ("status", "--json"),
        ("sessions", "list"),
        ("sessions", "show", "1"),
        ("export", "--out", str(tmp_path / "again.jsonl")),
        ("copy", "--to", str(tmp_path / "copy.db")),
        ("prune", "--older-than", "30d", "--dry-run"),
        ("mark-idle", "--idle-for", "30d"),
    ]
    for args in commands:
        done = cli("--db", server, *args)
        assert done.returncode == 0, (args, done)
        assert_no_password(done)
    assert masked in ok("--db", server, "status")
    assert json.loads(ok("--db", server, "status", "--json"))["database"] == masked
    copied = cli("--db", str(store), "copy", "--to", server, "--overwrite")
    assert copied.returncode == 0, copied
    assert_no_password(copied)
    assert masked in copied.stdout
    refused = cli("--db", str(store), "copy", "--to", server)  # it holds sessions now
    assert refused.returncode == 1
    assert_no_password(refused)
    from_env = cli("status", env={"AISOPOD_SESSION_DB": server})
    assert from_env.returncode == 0
    assert_no_password(from_env)


# --- 2. stored text cannot drive the terminal ---------------------------------------------

HOSTILE = {
    "screen clear": ("\x1b[2J", "\\x1b[2J"),
    "window title": ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    "clipboard write": ("\x1b]52;c;cm0gLXJmIH4=\x07", "\\x1b]52;c;cm0gLXJmIH4=\\x07"),
    "carriage return": ("over\rwrite", "over\\rwrite"),
    "C1 CSI": ("\x9b31m", "\\x9b31m"),
    "NEL": ("\x85", "\\x85"),
    "DEL": ("\x7f", "\\x7f"),
    "bidi override": ("\u202eevil", "\\u202eevil"),
    "bidi isolate": ("\u2066iso\u2069", "\\u2066iso\\u2069"),
}
RAW = ("\x1b", "\x07", "\r", "\x9b", "\x85", "\x7f", "\u202e", "\u2066", "\u2069")
# What --json may not carry raw either: C0 is JSON-escaped anyway; DEL, C1, bidi too.
RAW_IN_JSON = ("\x7f", "\x9b", "\x85", "\u202e", "\u2066", "\u2069")
EVERY_SEQUENCE = "".join(raw for raw, _ in HOSTILE.values())
HOSTILE_KEY = SessionKey("agent\u202eevil", "telegram", "bot-1", "dm", "peer\u2066x")


@pytest.fixture
def hostile_store(tmp_path: Path) -> Path:
    """Chat users' escape sequences in a key, messages, a tool call, metadata and a
    compaction summary; one message with a real newline and tab."""
    path = tmp_path / "hostile.db"
    engine = open_database(path)
    repo = SessionRepository(engine)
    repo.get_or_create(HOSTILE_KEY)
    repo.append_messages(
        HOSTILE_KEY,
        [
            *(NewMessage(Role.USER, f"{name}: {raw}") for name, (raw, _) in HOSTILE.items()),
            NewMessage(Role.ASSISTANT, "", [{"id": "c1", "arguments": EVERY_SEQUENCE}]),
            NewMessage(Role.USER, "old"),
            NewMessage(Role.USER, "line one\nline two\tafter a tab — 4 °C"),
        ],
    )
    repo.update_metadata(HOSTILE_KEY, {"title": EVERY_SEQUENCE, EVERY_SEQUENCE: "as a key"})
    repo.compact(HOSTILE_KEY, keep_last=len(HOSTILE) + 2, summary=f"summary {EVERY_SEQUENCE}")
    engine.dispose()
    return path


def assert_escaped(text: str) -> None:
    for raw in RAW:
        assert raw not in text, f"{raw!r} reached the terminal"
    for _, shown in HOSTILE.values():
        assert shown in text


def test_sessions_show_escapes_every_control_and_bidi_character(hostile_store: Path) -> None:
    text = ok("--db", str(hostile_store), "sessions", "show", "1")
    assert_escaped(text)
    assert "summary \\x1b[2J" in text  # the compaction's summary message
    # A newline stays a line break; a tab is not escaped (Rich expands it to spaces).
    assert re.search(r"line one\nline two +after a tab — 4 °C", text)
    assert "\\t" not in text
    assert "agent\\u202eevil" in text  # the key too


def test_sessions_list_and_status_escape_stored_keys(hostile_store: Path) -> None:
    for args in (("sessions", "list"), ("status",)):
        text = ok("--db", str(hostile_store), *args)
        for raw in RAW:
            assert raw not in text
        assert "agent\\u202eevil" in text


def test_json_output_carries_no_raw_c1_or_bidi_character_and_loses_nothing(
    hostile_store: Path,
) -> None:
    for args in (("sessions", "show", "1"), ("sessions", "list"), ("status",)):
        text = ok("--db", str(hostile_store), *args, "--json")
        for raw in (*RAW, *RAW_IN_JSON):
            assert raw not in text
        json.loads(text)
    text = ok("--db", str(hostile_store), "sessions", "show", "1", "--json")
    assert "\\u009b" in text  # C1 written as JSON escapes
    assert "— 4 °C" in text  # other non-ASCII text stays readable
    shown = json.loads(text)
    assert shown["session"]["metadata"] == {"title": EVERY_SEQUENCE, EVERY_SEQUENCE: "as a key"}
    assert shown["messages"][0]["content"] == f"summary {EVERY_SEQUENCE}"
    assert shown["messages"][-1]["content"] == "line one\nline two\tafter a tab — 4 °C"
    assert shown["session"]["agent_id"] == HOSTILE_KEY.agent_id


@pytest.fixture
def hostile_json_store(tmp_path: Path) -> Path:
    """Escape sequences in every place a JSON message holds text: text, image, tool
    result, reasoning and unknown blocks, object content (keys too), tool calls of each
    shape, message metadata; and, written by plain SQL, a role and content that is not
    JSON."""
    path = tmp_path / "hostile-json.db"
    engine = open_database(path)
    repo = SessionRepository(engine)
    repo.get_or_create(KEY)
    every = EVERY_SEQUENCE
    repo.append_messages(
        KEY,
        [
            NewMessage(
                Role.USER,
                [
                    {"type": "text", "text": f"text {every}"},
                    {"type": "image", "source": {"type": "url", "url": f"https://x/{every}"}},
                    {"type": "tool_result", "tool_use_id": every, "content": every},
                    {"type": "thinking", "thinking": every},
                    {"type": every, "x": every},
                ],
            ),
            NewMessage(Role.ASSISTANT, {every: every}, {"arguments": every}, {"note": every}),
            NewMessage(Role.ASSISTANT, every, every),
            NewMessage(Role.TOOL, [every], [every, {every: [every]}]),
        ],
    )
    engine.dispose()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO messages (session_id, role, content, created_at) "
            "VALUES (1, ?, ?, '2099-01-01T00:00:00+00:00')",
            (f"role {every}", f"not JSON {every}"),
        )
    conn.close()
    return path


def test_sessions_show_escapes_json_content_tool_calls_roles_and_metadata(
    hostile_json_store: Path,
) -> None:
    text = ok("--db", str(hostile_json_store), "sessions", "show", "1")
    assert_escaped(text)
    # Text is shown as text, escaped; JSON text too (json.dumps writes C0 as \u001b,
    # and DEL, C1 and the bidirectional characters reach the terminal escaped).
    assert "text \\x1b[2J" in text
    assert "[image: https://x/\\x1b[2J" in text
    assert '↳ meta {"note": "\\u001b[2J' in text
    assert "\\x9b31m" in text
    assert "role \\x1b[2J" in text  # the unknown role
    assert "not JSON \\x1b[2J" in text


def test_sessions_show_json_keeps_json_values_without_raw_c1_or_bidi(
    hostile_json_store: Path,
) -> None:
    text = ok("--db", str(hostile_json_store), "sessions", "show", "1", "--json")
    for raw in (*RAW, *RAW_IN_JSON):
        assert raw not in text
    messages = json.loads(text)["messages"]
    every = EVERY_SEQUENCE
    assert messages[0]["content"][0] == {"type": "text", "text": f"text {every}"}
    assert messages[1]["content"] == {every: every}
    assert messages[1]["tool_calls"] == {"arguments": every}
    assert messages[1]["metadata"] == {"note": every}
    assert (messages[2]["content"], messages[2]["tool_calls"]) == (every, every)
    assert messages[3]["tool_calls"] == [every, {every: [every]}]
    assert (messages[4]["role"], messages[4]["content"]) == (f"role {every}", f"not JSON {every}")


def test_an_export_to_stdout_carries_no_raw_c1_or_bidi_character(hostile_store: Path) -> None:
    text = ok("--db", str(hostile_store), "export")
    for raw in (*RAW, *RAW_IN_JSON):
        assert raw not in text
    lines = [json.loads(line) for line in text.splitlines()]
    first = next(line for line in lines if line["type"] == "message")
    assert first["content"] == f"summary {EVERY_SEQUENCE}"


def test_errors_escape_the_text_they_quote(store: Path, tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    ok("--db", str(store), "export", "--out", str(export))
    message = json.loads(export.read_text().splitlines()[-1])
    hostile = {**message, "id": None, "session": "a:b:c:dm:\u202eevil\u2066"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(hostile, ensure_ascii=False) + "\n")
    done = cli("--db", str(store), "import", str(bad))
    assert done.returncode == 1
    assert "line 1" in done.stderr
    for raw in RAW:
        assert raw not in done.stderr
    assert "no session a:b:c:dm:\\u202eevil\\u2066" in done.stderr


# --- 3. compact asks on a terminal --------------------------------------------------------


def on_a_terminal(*args: str, typed: str) -> Outcome:
    """Run the command's entry point in a process of its own (`forked`) with a
    pseudo-terminal as its stdin and `typed` already typed on it (stdout and stderr are
    files, as when an operator redirects the output)."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, typed.encode())
        return forked(*args, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)


def test_compact_on_a_terminal_asks_and_no_keeps_every_message(store: Path) -> None:
    before = snapshot(store)
    done = on_a_terminal("--db", str(store), "compact", "1", "--keep-last", "1", typed="n\n")
    assert done.returncode == 1  # aborted
    assert "Keep only the newest 1 of the 4 messages of #1" in done.stdout
    assert snapshot(store) == before


def test_compact_on_a_terminal_goes_ahead_on_y(store: Path) -> None:
    done = on_a_terminal("--db", str(store), "compact", "1", "--keep-last", "1", typed="y\n")
    assert done.returncode == 0, done
    assert "removed 3 message(s)" in done.stdout


def test_compact_with_yes_does_not_ask_even_on_a_terminal(store: Path) -> None:
    # The "n" typed in advance is never read: nothing asks.
    done = on_a_terminal(
        "--db", str(store), "sessions", "compact", "1", "--keep-last", "1", "-y", typed="n\n"
    )
    assert done.returncode == 0, done
    assert "removed 3 message(s)" in done.stdout
    assert "[y/N]" not in done.stdout


def test_compact_in_a_script_is_not_asked(store: Path) -> None:
    assert "removed 3 message(s)" in ok("--db", str(store), "compact", "1", "--keep-last", "1")


def test_the_question_escapes_the_stored_key(tmp_path: Path) -> None:
    path = tmp_path / "hostile.db"
    engine = open_database(path)
    repo = SessionRepository(engine)
    repo.get_or_create(HOSTILE_KEY)
    repo.append_message(HOSTILE_KEY, Role.USER, "hi")
    engine.dispose()
    done = on_a_terminal("--db", str(path), "reset", "1", typed="n\n")
    assert done.returncode == 1
    assert "agent\\u202eevil" in done.stdout
    assert "\u202e" not in done.stdout


# --- 4. an export, import or copy never lands on its own store ----------------------------


def db_forms(folder: Path) -> dict[str, str]:
    """The store `store.db` in `folder` (the working directory), named every way."""
    absolute = folder / "store.db"
    return {
        "relative": "store.db",
        "absolute": str(absolute),
        "sqlite URL, absolute": f"sqlite:///{absolute}",
        "sqlite URL, relative": "sqlite:///store.db",
        "symlink": "link.db",
    }


def out_forms(folder: Path) -> dict[str, str]:
    """The store's own files in `folder`, named every way an --out or FILE could."""
    return {
        "the same name": "store.db",
        "absolute": str(folder / "store.db"),
        "a symlink to it": "link.db",
        "a hard link to it": "hard.db",
        "./x/../": "./x/../store.db",
        "./missing/../": "./missing/../store.db",
        "its WAL": "store.db-wal",
        "its shared memory": "store.db-shm",
        "its rollback journal": "./store.db-journal",
    }


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding store.db, link.db (a symlink to it), hard.db (a hard
    link) and an empty folder x."""
    make_store(tmp_path / "store.db")
    (tmp_path / "link.db").symlink_to("store.db")
    os.link(tmp_path / "store.db", tmp_path / "hard.db")
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_refused(
    here: Path, *args: str, naming: str, real: bool | Literal["fork"] = False
) -> None:
    before = folder_state(here)
    line = failed(*args, real=real)
    assert naming in line
    assert folder_state(here) == before  # not a byte written, no -wal or -shm left


@pytest.mark.parametrize("out", out_forms(Path("/")).keys())
@pytest.mark.parametrize("db", db_forms(Path("/")).keys())
def test_export_refuses_to_write_over_its_own_store(here: Path, db: str, out: str) -> None:
    db_arg, out_arg = db_forms(here)[db], out_forms(here)[out]
    # Truncating the -shm file the export has mapped would kill the process with SIGBUS,
    # so should that ever happen again it happens in a process of its own (forked).
    real: bool | Literal["fork"] = "fork" if out == "its shared memory" else False
    assert_refused(here, "--db", db_arg, "export", "--out", out_arg, naming=out_arg, real=real)


def test_export_refuses_the_wal_named_after_a_symlink_to_the_store(here: Path) -> None:
    # SQLite names its files after the symlink's target, but an older build or another
    # VFS might not: the name given counts too.
    assert_refused(here, "--db", "link.db", "export", "--out", "link.db-wal", naming="link.db-wal")


def test_export_to_another_file_still_works(here: Path) -> None:
    done = cli("--db", "link.db", "export", "--out", "./x/../export.jsonl")
    assert done.returncode == 0, done
    assert "Exported 1 session(s) and 4 message(s)" in done.stderr
    assert len((here / "export.jsonl").read_text().splitlines()) == 1 + 1 + 4


@pytest.mark.parametrize("file", ["the same name", "a symlink to it", "./x/../", "its WAL"])
@pytest.mark.parametrize("db", ["relative", "sqlite URL, absolute", "symlink"])
def test_import_refuses_the_store_itself(here: Path, db: str, file: str) -> None:
    db_arg, file_arg = db_forms(here)[db], out_forms(here)[file]
    assert_refused(here, "--db", db_arg, "import", file_arg, naming=file_arg)


@pytest.mark.parametrize("to", ["relative", "absolute", "sqlite URL, relative", "symlink"])
def test_copy_refuses_its_own_store_as_the_target(here: Path, to: str) -> None:
    to_arg = db_forms(here)[to]
    assert_refused(here, "--db", "store.db", "copy", "--to", to_arg, "--overwrite", naming=to_arg)


def test_copy_refuses_the_same_server_schema_whatever_its_password(
    server: str, store: Path
) -> None:
    assert "Copied 1 session(s)" in ok("--db", str(store), "copy", "--to", server)
    no_password = make_url(server)._replace(password=None).render_as_string(hide_password=False)
    engine = open_database(server)
    try:
        before = snapshot(engine)
        line = failed("--db", no_password, "copy", "--to", server, "--overwrite", real=False)
        assert "same store" in line
        assert PASSWORD not in line
        assert snapshot(engine) == before
    finally:
        engine.dispose()


# --- 5. numbers, durations and times out of range -----------------------------------------

HUGE = str(2**63)  # one past the largest 64-bit integer


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("prune", "--older-than", "99999999999d"), "--older-than"),
        (("prune", "--older-than", "999999999d"), "--older-than"),
        (("sessions", "prune", "--older-than", "9" * 5000 + "s"), "--older-than"),
        (("mark-idle", "--idle-for", "99999999999d"), "--idle-for"),
        (("sessions", "mark-idle", "--idle-for", "999999999d"), "--idle-for"),
        (("sessions", "list", "--updated-before", "999999999d"), "--updated-before"),
        (("sessions", "list", "--created-after", "99999999999w"), "--created-after"),
        (("sessions", "list", "--created-before", "9999-12-31T23:59:59-01:00"), "--created-before"),
        (("sessions", "list", "--updated-after", "0001-01-01T00:00:00+01:00"), "--updated-after"),
        (("export", "--updated-after", "999999999d"), "--updated-after"),
    ],
)
def test_overflowing_durations_and_times_name_their_option(
    store: Path, args: tuple[str, ...], option: str
) -> None:
    line = misused("--db", str(store), *args)
    assert line.startswith(f"error: {option}: ")
    assert "unexpected" not in line


def test_the_longest_duration_that_fits_still_works(store: Path) -> None:
    assert "Would delete 0 session(s)" in ok(
        "--db", str(store), "prune", "--older-than", "700000d", "--dry-run"
    )
    assert ok("--db", str(store), "sessions", "list", "--updated-after", "0001-01-01T00:00:00")


# Full-width one, Arabic-Indic three, superscript three, a one then an Arabic-Indic three.
@pytest.mark.parametrize("digits", ["\uff11", "\u0663", "\u00b3", "1\u0663"])
def test_only_ascii_digits_name_a_session_id(store: Path, digits: str) -> None:
    line = misused("--db", str(store), "sessions", "show", digits)
    assert "is neither a session id nor a key" in line


@pytest.mark.parametrize("text", [HUGE, "9" * 5000])
def test_an_id_beyond_64_bits_is_no_session(store: Path, text: str) -> None:
    line = failed("--db", str(store), "sessions", "show", text, real=False)
    assert line.startswith("error: no session with id ")


def test_durations_take_only_ascii_digits(store: Path) -> None:
    assert "nor a duration" in misused(
        "--db", str(store), "prune", "--updated-before", "\uff13\uff10d"
    )
    assert "not a duration" in misused("--db", str(store), "mark-idle", "--idle-for", "\u0663d")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("sessions", "list", "--limit", HUGE), "--limit"),
        (("sessions", "list", "--offset", HUGE), "--offset"),
        (("sessions", "show", "1", "--last", HUGE), "--last"),
        (("compact", "1", "--keep-last", HUGE), "--keep-last"),
        (("sessions", "compact", "1", "--keep-last", HUGE, "--yes"), "--keep-last"),
        (("import", "-", "--batch-size", HUGE), "--batch-size"),
    ],
)
def test_integer_options_beyond_64_bits_are_usage_errors(
    store: Path, args: tuple[str, ...], option: str
) -> None:
    before = snapshot(store)
    done = cli("--db", str(store), *args)
    assert done.returncode == 2, done
    assert option in done.stderr
    assert "9223372036854775807" in done.stderr  # the largest value it takes
    assert snapshot(store) == before


def test_the_largest_64_bit_values_are_taken(store: Path) -> None:
    largest = str(2**63 - 1)
    assert "showing none" in ok(
        "--db", str(store), "sessions", "list", "--limit", largest, "--offset", largest
    )
    assert "4 °C in Oslo." in ok("--db", str(store), "sessions", "show", "1", "--last", largest)
    assert "removed 0 message(s)" in ok("--db", str(store), "compact", "1", "--keep-last", largest)
