"""The main job, shown: a gateway service records a short multi-channel conversation
through an injected `SessionRepository`. `make run` then shows the store with the
`aisopod-session` command (status, the sessions, one transcript).

Run with `make run` or `python -m aisopod_session.demo [DATABASE]`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from aisopod_session.database import open_database
from aisopod_session.enums import PeerKind, Role
from aisopod_session.keys import SessionKey
from aisopod_session.models import Message, NewMessage
from aisopod_session.repository import SessionRepository

DEFAULT_DATABASE = "aisopod-sessions.db"


@dataclass(frozen=True)
class Inbound:
    """A chat message as a channel adapter hands it to the gateway."""

    channel: str
    account_id: str
    peer_kind: PeerKind
    peer_id: str
    text: str


class ChatService:
    """A stand-in for the gateway's chat handler: it only knows the repository."""

    def __init__(self, repository: SessionRepository, agent_id: str) -> None:
        self.repository = repository
        self.agent_id = agent_id

    def handle(self, inbound: Inbound) -> Message:
        """Record the user's turn and the agent's reply; return the reply."""
        key = SessionKey(
            self.agent_id, inbound.channel, inbound.account_id, inbound.peer_kind, inbound.peer_id
        )
        self.repository.get_or_create(key)
        context = self.repository.get_history(key, limit=20)
        reply = self._reply(inbound.text, turns=len(context))
        tool_calls = None
        if "weather" in inbound.text.lower():
            tool_calls = [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo"}}]
        stored = self.repository.append_messages(
            key,
            [
                NewMessage(Role.USER, inbound.text),
                NewMessage(Role.ASSISTANT, reply, tool_calls, meta={"model": "echo-1"}),
            ],
            # Words stand in for tokens: what the model read and what it wrote.
            input_tokens=len(inbound.text.split()),
            output_tokens=len(reply.split()),
        )
        return stored[-1]

    @staticmethod
    def _reply(text: str, *, turns: int) -> str:
        if turns == 0:
            return f"Hello! You said: {text!r}. How can I help?"
        return f"(turn {turns // 2 + 1}) Noted: {text!r}."


CONVERSATION: Sequence[Inbound] = (
    Inbound("telegram", "bot-main", PeerKind.DM, "1001", "Hi, I am Ada."),
    Inbound("slack", "T024BE7LD", PeerKind.CHANNEL, "C0123456", "Standup in 5 minutes?"),
    Inbound("telegram", "bot-main", PeerKind.DM, "1001", "What's the weather in Oslo?"),
    Inbound("discord", "guild-42", PeerKind.THREAD, "thread-9", "Can you summarise this thread?"),
    Inbound("telegram", "bot-main", PeerKind.DM, "1001", "Thanks, remember I prefer metric."),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Record the demo conversation in the database named by argv[0]; say how much the
    store holds."""
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else DEFAULT_DATABASE
    engine = open_database(target)
    try:
        repository = SessionRepository(engine)
        service = ChatService(repository, agent_id="concierge")
        for inbound in CONVERSATION:
            service.handle(inbound)

        total = repository.summary().total
        print(
            f"Recorded {len(CONVERSATION)} chat messages and the agent's replies in {target}: "
            f"{total.sessions} session(s), {total.messages} message(s) in all."
        )
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
