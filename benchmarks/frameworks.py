"""Scenario 10 of `make bench`: the store through an agent framework's own session
interface, against that framework's own SQL store on SQLite, side by side (the calls
take turns, `measure_together`).

- OpenAI Agents SDK: `AisopodSession` (over an `AsyncSessionRepository`) against the
  SDK's `SQLiteSession`, both through the SDK's `Session` protocol: `add_items` of one
  item to a session, and `get_items(limit=50)` of a session of 10 000 items.
- Google ADK: `AisopodSessionService` (over an `AsyncSessionRepository`) against ADK's
  `DatabaseSessionService` (SQLAlchemy, aiosqlite) and `SqliteSessionService` (aiosqlite),
  through `BaseSessionService`: `append_event` of one event, `get_session` with the latest
  50 of 3 000 events, and `list_sessions` of one user (10 sessions) among 10 000.

Sizes scale with `AISOPOD_BENCH_SCALE` like every scenario (never below 1 000 items or
sessions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from aisopod_session import AsyncSessionRepository, open_async_database_sync
from benchmarks.bench import LIMIT, Stats, measure_together

BATCH = 500
OURS = "ours (AisopodSession)"
OURS_ADK = "ours (AisopodSessionService)"
ADK_APP = "bench"
SESSIONS_PER_USER = 10


def item(number: int) -> dict[str, Any]:
    """A user turn as an application hands it to the SDK (the Runner's own copy of a
    turn has the same two fields, content first)."""
    return {"role": "user", "content": f"message {number}: what is the weather like today?"}


def add_one(session: Any, number: int) -> Any:
    return session.add_items([item(number)])


def latest(session: Any, _: int) -> Any:
    return session.get_items(limit=LIMIT)


class Frameworks:
    """Scenario 10's measurements (see the module's docstring)."""

    def __init__(self, folder: Path, size: Callable[[int], int], count: Callable[..., int]):
        self.folder = folder
        self.size = size
        self.count = count
        self.results: dict[str, Any] = {"stats": {}, "figures": {}}

    def run(self) -> dict[str, Any]:
        try:
            from agents import SQLiteSession
        except ImportError:  # the `bench` group is not installed
            self.results["figures"]["OpenAI Agents SDK"] = "not measured: openai-agents missing"
            return self.results
        from aisopod_session.integrations.openai_agents import AisopodSession

        history = self.size(10_000)
        engine = open_async_database_sync(self.folder / "s10-ours.db")
        repository = AsyncSessionRepository(engine)
        theirs_path = self.folder / "s10-theirs.db"

        def ours(name: str) -> Any:
            return AisopodSession(name, repository)

        def theirs(name: str) -> Any:
            return SQLiteSession(name, db_path=theirs_path)

        makers: dict[str, Callable[[str], Any]] = {
            OURS: ours,
            "openai-agents SQLiteSession": theirs,
        }
        appending = {who: make("append") for who, make in makers.items()}
        reading = {who: make("read") for who, make in makers.items()}
        with asyncio.Runner() as runner:
            for session in reading.values():
                for start in range(0, history, BATCH):
                    batch = [item(n) for n in range(start, min(history, start + BATCH))]
                    runner.run(session.add_items(batch))
            add = measure_together(
                {
                    f"OpenAI add_items, one item, {who}": partial(add_one, session)
                    for who, session in appending.items()
                },
                self.count(2000),
                runner,
            )
            read = measure_together(
                {
                    f"OpenAI get_items(limit={LIMIT}) of {history:,} items, {who}": partial(
                        latest, session
                    )
                    for who, session in reading.items()
                },
                self.count(2000),
                runner,
            )
            checked = runner.run(reading[OURS].get_items(limit=LIMIT))
            assert checked == [item(n) for n in range(history - LIMIT, history)], "wrong items"
        for session in [*appending.values(), *reading.values()]:
            if hasattr(session, "close"):
                session.close()
        engine.sync_engine.dispose(close=False)
        stats: dict[str, Stats] = {**add, **read}
        self.results["stats"] = stats
        self.adk()
        return self.results

    def adk(self) -> None:
        """The ADK half (see the module's docstring); skipped without google-adk."""
        try:
            from google.adk.sessions import DatabaseSessionService
            from google.adk.sessions.sqlite_session_service import SqliteSessionService
        except ImportError:  # the `bench` group is not installed
            self.results["figures"]["Google ADK"] = "not measured: google-adk missing"
            return
        from aisopod_session.integrations.adk import AisopodSessionService

        events = self.size(3_000)
        sessions = self.size(10_000)
        users = max(1, sessions // SESSIONS_PER_USER)
        engine = open_async_database_sync(self.folder / "s10-adk-ours.db")
        theirs_db = self.folder / "s10-adk-database.db"
        services: dict[str, Any] = {
            OURS_ADK: AisopodSessionService(AsyncSessionRepository(engine)),
            "ADK DatabaseSessionService": DatabaseSessionService(
                f"sqlite+aiosqlite:///{theirs_db}"
            ),
            "ADK SqliteSessionService": SqliteSessionService(
                str(self.folder / "s10-adk-sqlite.db")
            ),
        }
        with asyncio.Runner() as runner:
            appending = {}
            for who, service in services.items():
                runner.run(_fill_adk(service, events, users))
                appending[who] = runner.run(
                    service.create_session(app_name=ADK_APP, user_id="writer", session_id="a")
                )
            append = measure_together(
                {
                    f"ADK append_event, one event, {who}": partial(
                        _append_event, services[who], session
                    )
                    for who, session in appending.items()
                },
                self.count(2000),
                runner,
            )
            get = measure_together(
                {
                    f"ADK get_session, latest {LIMIT} of {events:,} events, {who}": partial(
                        _get_latest, service
                    )
                    for who, service in services.items()
                },
                self.count(1000),
                runner,
            )
            listed = measure_together(
                {
                    f"ADK list_sessions, one user among {users * SESSIONS_PER_USER:,} "
                    f"sessions, {who}": partial(_list_user, service, users)
                    for who, service in services.items()
                },
                self.count(1000),
                runner,
            )
            mine = runner.run(_get_latest(services[OURS_ADK], 0))
            theirs = runner.run(_get_latest(services["ADK DatabaseSessionService"], 0))
            assert [e.content for e in mine.events] == [e.content for e in theirs.events]
            for service in services.values():
                if hasattr(service, "close") and service is not services[OURS_ADK]:
                    runner.run(service.close())
        engine.sync_engine.dispose(close=False)
        self.results["stats"].update({**append, **get, **listed})


async def _fill_adk(service: Any, events: int, users: int) -> None:
    """One session of `events` events, and `users` users of `SESSIONS_PER_USER` sessions."""
    from google.adk.events.event import Event
    from google.genai import types

    session = await service.create_session(app_name=ADK_APP, user_id="reader", session_id="r")
    for number in range(events):
        text = types.Part(text=f"message {number}: what is the weather like today?")
        content = types.Content(role="user" if number % 2 == 0 else "model", parts=[text])
        await service.append_event(
            session,
            Event(
                author="user" if number % 2 == 0 else "agent", invocation_id="i", content=content
            ),
        )
    for user in range(users):
        for number in range(SESSIONS_PER_USER):
            await service.create_session(
                app_name=ADK_APP,
                user_id=f"user-{user}",
                session_id=f"s{number}",
                state={"n": number},
            )


async def _append_event(service: Any, session: Any, number: int) -> None:
    from google.adk.events.event import Event
    from google.genai import types

    text = types.Part(text=f"message {number}: what is the weather like today?")
    event = Event(
        author="user", invocation_id="i", content=types.Content(role="user", parts=[text])
    )
    await service.append_event(session, event)


async def _get_latest(service: Any, _: int) -> Any:
    from google.adk.sessions.base_session_service import GetSessionConfig

    return await service.get_session(
        app_name=ADK_APP,
        user_id="reader",
        session_id="r",
        config=GetSessionConfig(num_recent_events=LIMIT),
    )


async def _list_user(service: Any, users: int, number: int) -> Any:
    found = await service.list_sessions(app_name=ADK_APP, user_id=f"user-{number % users}")
    assert len(found.sessions) == SESSIONS_PER_USER
    return found
