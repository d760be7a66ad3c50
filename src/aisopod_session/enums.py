"""The closed vocabularies of the store. Values are what the database holds (lower case)."""

from __future__ import annotations

from enum import StrEnum


class PeerKind(StrEnum):
    """Who the agent talks to on the channel."""

    DM = "dm"
    GROUP = "group"
    CHANNEL = "channel"
    THREAD = "thread"


class Role(StrEnum):
    """Who wrote a message."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    """Instructions from the application's developer (OpenAI's APIs' name for them)."""
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class SessionStatus(StrEnum):
    """Where a session is in its life; appending a message makes it `active` again."""

    ACTIVE = "active"
    IDLE = "idle"
    COMPACTED = "compacted"
    ARCHIVED = "archived"
