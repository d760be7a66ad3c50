"""Scenario 10 of `make bench`: the store through an agent framework's own session
interface, against that framework's own SQL store on SQLite, side by side (the calls
take turns, `measure_together`).

- OpenAI Agents SDK: `AisopodSession` (over an `AsyncSessionRepository`) against the
  SDK's `SQLiteSession`, both through the SDK's `Session` protocol: `add_items` of one
  item to a session, and `get_items(limit=50)` of a session of 10 000 items.
- Google ADK: not measured (its adapter is not built yet).

Sizes scale with `AISOPOD_BENCH_SCALE` like every scenario (never below 1 000 items).
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


def item(number: int) -> dict[str, Any]:
    """An item as the SDK's Runner stores a user turn."""
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
        self.results["figures"]["Google ADK"] = "not measured: its adapter is not built yet"
        return self.results
