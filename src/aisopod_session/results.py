"""What the repository's calls return besides sessions and messages: `AppliedChanges`
from `apply_changes`, `CompactionResult` from `compact`, `StoreSummary` with its `Totals`
from `summary`, `SessionPage` from `page_sessions` and `SearchHit` from
`search_messages`."""

from __future__ import annotations

from dataclasses import dataclass

from aisopod_session.enums import SessionStatus
from aisopod_session.keys import SessionKey
from aisopod_session.models import Message, Session


@dataclass(frozen=True)
class AppliedChanges:
    """What `apply_changes` wrote: the session as it is now, the messages it appended
    (with their ids, in order) and the related sessions as they are now, by key."""

    session: Session
    messages: list[Message]
    related: dict[SessionKey, Session]


@dataclass(frozen=True)
class CompactionResult:
    """What `compact` did: how many messages it removed, the summary message it
    inserted (or None), and the session as it is now (with its recounted
    `message_count` and new `compaction_count`)."""

    removed: int
    summary: Message | None
    session: Session

    @property
    def message_count(self) -> int:
        """The session's messages after compaction (the summary included)."""
        return self.session.message_count

    @property
    def compaction_count(self) -> int:
        """How many compactions the session has had."""
        return self.session.compaction_count


@dataclass(frozen=True)
class Totals:
    """Sessions, and the messages and tokens their counters hold (`tokens` is the sum
    of `token_usage`, the total; `input_tokens` and `output_tokens` the part of it that
    callers reported split)."""

    sessions: int = 0
    messages: int = 0
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.sessions + other.sessions,
            self.messages + other.messages,
            self.tokens + other.tokens,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
        )


@dataclass(frozen=True)
class StoreSummary:
    """What `summary` counted: totals over the repository's sessions, per status and per
    agent (both in name order). `damaged` counts the sessions whose stored status is not
    a `SessionStatus` or whose counters are not integers (written by plain SQL or other
    programs); they are in `total` and `by_agent` but in no `by_status` entry."""

    total: Totals
    by_status: dict[SessionStatus, Totals]
    by_agent: dict[str, Totals]
    damaged: Totals = Totals()


@dataclass(frozen=True)
class SessionPage:
    """One page of `page_sessions`: its sessions in list order (newest `updated_at`
    first, ties by higher id), and `next_cursor`, the opaque string that asks for the
    next page with the same filter, or None on the last page."""

    sessions: list[Session]
    next_cursor: str | None


@dataclass(frozen=True)
class SearchHit:
    """One message `search_messages` found: the message, its session's key, a snippet of
    its search text with each matched word between `SNIPPET_MARKS` (and `…` where text
    was cut), and `rank`, its relevance (higher is better; compare ranks of one search
    only, as each database scores in its own way)."""

    message: Message
    key: SessionKey
    snippet: str
    rank: float


SNIPPET_MARKS = ("«", "»")
"""What a `SearchHit.snippet` puts before and after each matched word."""
