"""The main job, shown: a gateway service records a short multi-channel conversation
through an injected `SessionRepository`, then prints the sessions and one transcript.

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
            [NewMessage(Role.USER, inbound.text), NewMessage(Role.ASSISTANT, reply, tool_calls)],
            tokens=len(inbound.text.split()) + len(reply.split()),
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
    """Record the demo conversation in the database named by argv[0] and print it."""
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else DEFAULT_DATABASE
    engine = open_database(target)
    try:
        repository = SessionRepository(engine)
        service = ChatService(repository, agent_id="concierge")
        for inbound in CONVERSATION:
            service.handle(inbound)

        sessions = repository.list_sessions({"agent_id": "concierge"})
        print(f"{repository.count_sessions()} session(s) in {target}:")
        for session in sessions:
            print(
                f"  #{session.id:<4} {session.key!s:<48} {session.status:<9} "
                f"{session.message_count:>4} msgs {session.token_usage:>5} tokens  "
                f"updated {session.updated_at:%Y-%m-%d %H:%M:%S}Z"
            )
        first = CONVERSATION[0]
        key = SessionKey(
            "concierge", first.channel, first.account_id, first.peer_kind, first.peer_id
        )
        print(f"\nTranscript of {key} (newest 6 messages):")
        for message in repository.get_history(key, limit=6):
            tools = f"  tool_calls={message.tool_calls}" if message.tool_calls else ""
            print(f"  [{message.id}] {message.role:>9}: {message.content}{tools}")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
