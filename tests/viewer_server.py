"""The viewer's tests' machinery: a store filled through the repository, the viewer served
by uvicorn in a thread on a free port, and plain HTTP requests to it (urllib), shared by
tests/test_viewer.py, tests/test_viewer_browser.py and tests/viewer_screenshots.py."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message as Headers

import uvicorn
from fastapi import FastAPI

from aisopod_session import NewMessage, SessionKey, SessionRepository

HOSTILE_TEXT = "<script>window.pwned = 1; alert(1)</script> \x1b[31mred\x1b[0m \u202eevil"
"""A message a hostile peer could send: markup that would run, a terminal escape
sequence, a bidirectional override."""

TOOL_ARGUMENTS = {"city": "Oslo", "units": "metric"}
TOOL_RESULT = "Oslo: 4 °C, light rain"


@dataclass(frozen=True)
class Seeded:
    """What `seed` wrote: the conversation with a tool call, its fork, the hostile one,
    the compacted one, and how many sessions there are in all."""

    weather: SessionKey
    weather_id: int
    fork_id: int
    hostile_id: int
    compacted_id: int
    bulk_agent: str
    bulk: int
    sessions: int


def seed(repo: SessionRepository, *, bulk: int = 12) -> Seeded:
    """Fill a store: a concierge conversation with a tool call (OpenAI style, in
    `tool_calls`) and its result (a `tool` message and a `tool_result` block), a fork of
    it, a session holding `HOSTILE_TEXT` (in its text, its key, its metadata and a tool
    call), a compacted session, and `bulk` more sessions of agent `pager` for paging."""
    weather = SessionKey("concierge", "telegram", "bot-main", "dm", "1001")
    repo.get_or_create(weather)
    repo.update_metadata(weather, {"language": "en"})
    first = repo.append_messages(
        weather,
        [
            NewMessage("user", "What's the weather in Oslo?"),
            NewMessage(
                "assistant",
                "Let me look that up.",
                [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
                meta={"model": "echo-1", "usage": {"input_tokens": 9, "output_tokens": 5}},
            ),
            NewMessage("tool", TOOL_RESULT, meta={"tool_call_id": "call_1"}),
            NewMessage(
                "assistant",
                [
                    {"type": "text", "text": "Checking the forecast too."},
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "get_forecast",
                        "input": TOOL_ARGUMENTS,
                    },
                ],
            ),
            NewMessage(
                "user",
                [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "Sunny tomorrow"}],
            ),
            NewMessage("assistant", "It is 4 °C with light rain; sunny tomorrow."),
        ],
        input_tokens=20,
        output_tokens=12,
    )
    fork = repo.fork(
        weather,
        SessionKey("concierge", "telegram", "bot-main", "dm", "1001-fork"),
        up_to_id=first[2].id,
    )
    hostile_key = SessionKey("concierge", "telegram", "bot-main", "dm", "<b>mallory</b>")
    repo.get_or_create(hostile_key)
    repo.update_metadata(hostile_key, {"note": "<img src=x onerror=alert(2)>"})
    repo.append_messages(
        hostile_key,
        [
            NewMessage("user", HOSTILE_TEXT),
            NewMessage(
                "assistant",
                "I will not run that.",
                [{"id": "call_x", "name": "<script>alert(3)</script>", "arguments": {}}],
            ),
        ],
    )
    compacted = SessionKey("concierge", "slack", "T024", "channel", "C0123")
    repo.get_or_create(compacted)
    repo.append_messages(compacted, [NewMessage("user", f"standup note {n}") for n in range(6)])
    repo.compact(compacted, keep_last=2, summary="Earlier: four standup notes about the release.")
    for n in range(bulk):
        key = SessionKey("pager", "discord", "guild-42", "thread", f"thread-{n:02d}")
        repo.get_or_create(key)
        repo.append_messages(key, [NewMessage("user", f"page test message number {n}")])
    ids = {
        name: session.id
        for name, session in zip(
            ("weather", "hostile", "compacted"),
            repo.get_many([weather, hostile_key, compacted]),
            strict=True,
        )
        if session is not None and session.id is not None
    }
    assert fork.id is not None
    return Seeded(
        weather=weather,
        weather_id=ids["weather"],
        fork_id=fork.id,
        hostile_id=ids["hostile"],
        compacted_id=ids["compacted"],
        bulk_agent="pager",
        bulk=bulk,
        sessions=4 + bulk,
    )


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free port for the block; yields its base
    URL (`http://127.0.0.1:PORT`)."""
    # As `aisopod-session serve` does: the viewer has no websocket route.
    config = uvicorn.Config(app, host=host, port=0, log_level="warning", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # Started is set once the socket listens; the thread's end means it failed to.
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the viewer's server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    body: str


def fetch(url: str, headers: dict[str, str] | None = None) -> Reply:
    """GET `url`: its status, headers and body as text, whatever the status."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, response.headers, response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read().decode("utf-8"))
