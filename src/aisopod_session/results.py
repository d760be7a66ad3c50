"""What the repository's calls return besides sessions and messages: `CompactionResult`
from `compact`, and `StoreSummary` with its `Totals` from `summary`."""

from __future__ import annotations

from dataclasses import dataclass

from aisopod_session.enums import SessionStatus
from aisopod_session.models import Message, Session


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
