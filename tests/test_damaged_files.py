"""Files the store cannot use: each is refused with a `SessionStoreError` that says what
is wrong, and the file (and its folder) is left exactly as it was."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aisopod_session import Role, SessionKey, SessionRepository, SessionStoreError, open_database
from tests.dbtools import raw_connect

NOBODY = 65534


def folder_listing(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` with its bytes: proof that nothing was created or changed."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refusal(target: Path | str) -> str:
    """The message of the `SessionStoreError` that opening `target` raises."""
    with pytest.raises(SessionStoreError) as caught:
        open_database(target)
    return str(caught.value)


def refusal_without_privileges(action: Callable[[], object]) -> str:
    """Run `action` in a child process as an ordinary user (root may write anything, so a
    read-only file only means something to another user) and return the message of the
    `SessionStoreError` it raised; fail if it raised anything else or nothing."""
    if os.geteuid() != 0:
        with pytest.raises(SessionStoreError) as caught:
            action()
        return str(caught.value)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        outcome: tuple[str, str] = ("nothing raised", "")
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
        except BaseException as exc:
            outcome = (type(exc).__name__, str(exc))
            if isinstance(exc, SessionStoreError):
                outcome = ("SessionStoreError", str(exc))
        os.write(write_end, pickle.dumps(outcome))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        kind, message = pickle.loads(reader.read())
    assert isinstance(message, str)
    os.waitpid(pid, 0)
    assert kind == "SessionStoreError", f"expected SessionStoreError, got {kind}: {message}"
    return message


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder an unprivileged child can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="aisopod-damaged-"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o777)
    shutil.rmtree(folder)


@pytest.fixture
def good_file(shared_dir: Path) -> Path:
    """A store with one session and 300 messages, checkpointed into the main file."""
    path = shared_dir / "good.db"
    engine = open_database(path)
    repo = SessionRepository(engine)
    key = SessionKey("agent-1", "telegram", "bot", "dm", "peer")
    repo.get_or_create(key)
    for index in range(300):
        repo.append_message(key, Role.USER, f"message {index} " + "x" * 400)
    engine.dispose()
    conn = raw_connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    path.chmod(0o666)
    return path


NOT_DATABASES = {
    "text": b"this is not a database, just some text\n" * 200,
    "binary noise": bytes(range(256)) * 64,
    "sqlite header then noise": b"SQLite format 3\x00" + b"\xff" * 8176,
    "short": b"SQLite",
}


@pytest.mark.parametrize("content", list(NOT_DATABASES))
def test_a_file_that_is_not_a_database_is_refused_untouched(shared_dir: Path, content: str) -> None:
    path = shared_dir / "notes.db"
    path.write_bytes(NOT_DATABASES[content])
    before = folder_listing(shared_dir)
    message = refusal(path)
    assert str(path) in message
    assert "not a SQLite database" in message or "damaged" in message
    assert folder_listing(shared_dir) == before


def test_a_truncated_database_is_refused_untouched(good_file: Path) -> None:
    size = good_file.stat().st_size
    for cut in (100, 4096, size // 2, size - 4096):
        path = good_file.with_name(f"cut-{cut}.db")
        path.write_bytes(good_file.read_bytes()[:cut])
        before = folder_listing(good_file.parent)
        message = refusal(path)
        assert str(path) in message
        assert "damaged" in message
        assert folder_listing(good_file.parent) == before


def test_a_read_only_database_is_refused_untouched(good_file: Path) -> None:
    good_file.chmod(0o444)
    before = folder_listing(good_file.parent)
    message = refusal_without_privileges(lambda: open_database(good_file))
    assert str(good_file) in message
    assert "read-only" in message
    assert folder_listing(good_file.parent) == before


def test_a_database_in_a_read_only_folder_is_refused_untouched(good_file: Path) -> None:
    folder = good_file.parent
    before = folder_listing(folder)
    folder.chmod(0o555)
    message = refusal_without_privileges(lambda: open_database(good_file))
    assert "read-only" in message
    assert "-wal" in message
    assert folder_listing(folder) == before


def test_a_path_in_a_missing_folder_under_a_read_only_one_is_refused(shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    target = locked / "missing" / "sessions.db"
    message = refusal_without_privileges(lambda: open_database(target))
    assert str(target) in message
    assert "cannot be created" in message
    assert list(locked.iterdir()) == []


def test_a_folder_is_not_a_database(shared_dir: Path) -> None:
    assert "is a folder" in refusal(shared_dir)


def test_damage_found_after_opening_is_reported_as_such(good_file: Path) -> None:
    """Pages overwritten in the middle of the file pass the open; the read that meets
    them raises SessionStoreError saying the file is damaged, not a bare driver error."""
    engine = open_database(good_file)
    probe = sqlite3.connect(good_file)
    (page_size,) = probe.execute("PRAGMA page_size").fetchone()
    probe.close()
    with good_file.open("r+b") as handle:
        handle.seek(page_size * 3)
        handle.write(b"\xa5" * page_size * 20)
    repo = SessionRepository(engine)
    with pytest.raises(SessionStoreError, match="damaged"):
        repo.get_history(SessionKey("agent-1", "telegram", "bot", "dm", "peer"))
    engine.dispose()
