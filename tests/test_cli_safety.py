"""The `aisopod-session` command keeps its operator safe: it never prints a database
password, never lets stored text drive the terminal, asks before compacting on a
terminal, never writes an export over its own store (or imports or copies the store into
itself), and answers out-of-range numbers, durations and times with a clear error.

Every test runs the command on real files (and on PostgreSQL where said), in this process
through Typer's test runner or, where a terminal is needed, the installed script in a
subprocess with a pseudo-terminal as its stdin."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from aisopod_session import NewMessage, Role, SessionKey, SessionRepository, open_database
from tests.dbtools import store_location
from tests.test_cli import Outcome, cli, ok

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
