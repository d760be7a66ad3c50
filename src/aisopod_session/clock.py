"""One clock per store: where every timestamp the store writes comes from.

- **PostgreSQL**: the database server's clock (`clock_timestamp()`), read inside the
  write's transaction after the session's row is locked, so every host writing to the
  store agrees whatever its own clock says, and within a session `created_at` follows id
  order.
- **SQLite**: this host's clock, but never earlier than the newest message's
  `created_at` (the message with the highest id: one seek), read under the write lock;
  so messages' `created_at` never goes backwards in id order when the clock is set back
  (by up to `MAX_HOLD`), and a write never stamps a session earlier than the last message
  stored. A newest stamp further ahead than that is taken for a mistake (a moment of a
  wrong clock, a row written by another program) and not followed: otherwise one glitch
  to the year 2030 would stamp every later write 2030, and make live sessions look years
  old to a prune. Every writer of a SQLite file is on one host.
- `open_database(..., clock=...)` replaces the host's or the server's clock with any
  callable returning an aware `datetime` (tests under freezegun pass
  `lambda: datetime.now(UTC)`); on SQLite the never-backwards rule still holds.

See docs/reliability.md ("Clocks").
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from aisopod_session.models import parse_utc_text, utc_text
from aisopod_session.settings import Clock, clock_of

SERVER_NOW = (
    "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
)
"""PostgreSQL's time now, as the store's fixed-width ISO-8601 UTC text."""

_SELECT_SERVER_NOW = f"SELECT {SERVER_NOW}"
MAX_HOLD = timedelta(days=1)
"""How far ahead of this host's clock the newest stored stamp may be and still hold the
clock back (SQLite)."""

SELECT_LATEST = "SELECT created_at FROM messages ORDER BY id DESC LIMIT 1"
"""SQLite: the newest message's `created_at`, which no new stamp may precede."""


class StoreClock:
    """The clock of one store (engine). `stamp` is called inside a write transaction."""

    __slots__ = ("_clock", "_guarded", "_server")

    def __init__(self, engine: Engine) -> None:
        self._clock: Clock | None = clock_of(engine)
        self._server = engine.dialect.name == "postgresql" and self._clock is None
        self._guarded = engine.dialect.name == "sqlite"

    @property
    def from_server(self) -> bool:
        """Whether times come from the PostgreSQL server (statements that lock a row
        then return the server's time after the lock)."""
        return self._server

    def stamp(self, conn: Any, server_text: str | None = None) -> tuple[datetime, str]:
        """Now, as an aware UTC datetime and its stored text. `server_text` is the
        server's time if the caller's row-locking statement returned it (PostgreSQL);
        otherwise it is read here."""
        if self._server:
            if server_text is None:
                (server_text,) = conn.execute(_SELECT_SERVER_NOW).fetchone()
            assert server_text is not None
            return parse_utc_text(server_text), server_text
        now = self._now()
        text = utc_text(now)
        if self._guarded:
            found = conn.execute(SELECT_LATEST).fetchone()
            latest = None if found is None else found[0]
            if isinstance(latest, str) and latest > text:
                try:
                    later = parse_utc_text(latest)
                except ValueError:
                    later = None
                if later is not None and now < later <= now + MAX_HOLD:
                    return later, utc_text(later)
        return now, text

    def _now(self) -> datetime:
        if self._clock is None:
            return datetime.now(UTC)
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise TypeError(f"the store's clock must return an aware datetime, got {now!r}")
        return now.astimezone(UTC)
