"""The store's settings that travel with its engine: `busy_timeout` and the clock.

They are kept as engine execution options, which every connection of the engine, every
`engine.execution_options(...)` copy (`write_engine`) and an `AsyncEngine`'s
`sync_engine` see, so each part of the store reads them from the engine it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a writer waits for another writer's lock before `DatabaseBusyError`."""

BUSY_TIMEOUT_OPTION = "aisopod_busy_timeout"
CLOCK_OPTION = "aisopod_clock"

Clock = Callable[[], datetime]
"""A clock for `open_database(clock=...)`: called with no arguments, returns an aware
`datetime`."""


def set_store_options(engine: Engine, *, busy_timeout: float, clock: Clock | None) -> None:
    """Record the store's settings on its engine."""
    options: dict[str, Any] = {BUSY_TIMEOUT_OPTION: busy_timeout}
    if clock is not None:
        options[CLOCK_OPTION] = clock
    engine.update_execution_options(**options)


def busy_timeout_of(engine: Engine) -> float:
    """The store's `busy_timeout` in seconds (the default for an engine made elsewhere)."""
    return float(engine.get_execution_options().get(BUSY_TIMEOUT_OPTION, DEFAULT_BUSY_TIMEOUT))


def clock_of(engine: Engine) -> Clock | None:
    """The clock `open_database` was given for this store, or None (the store's own)."""
    clock: Clock | None = engine.get_execution_options().get(CLOCK_OPTION)
    return clock


def lock_timeout_ms(engine: Engine) -> int:
    """PostgreSQL's `lock_timeout` for the store's writes: `busy_timeout` in milliseconds
    (at least 1: 0 would mean no limit at all)."""
    return max(1, round(busy_timeout_of(engine) * 1000))
