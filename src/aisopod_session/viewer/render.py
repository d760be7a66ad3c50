"""How stored values become HTML in the viewer: chat text is hostile, so every stored
string reaches the page escaped (Jinja2's autoescape, and `visible` for text shown as
it is), and the characters a terminal or a text layout would act on are shown as
escapes instead of being passed on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from markupsafe import Markup, escape

from aisopod_session.blocks import (
    MEDIA_LABELS,
    TEXT_BLOCKS,
    TOOL_RESULT,
    TOOL_USE,
    tool_call_list,
)
from aisopod_session.enums import Role
from aisopod_session.models import Message
from aisopod_session.results import SNIPPET_MARKS

# The characters `aisopod-session sessions show` escapes for a terminal (cli.terminal_safe):
# every control character but newline and tab, and the bidirectional overrides and
# isolates, which would reorder the text around them on the page too.
# Beyond them, the characters a page would not show at all (zero-width spaces and joiners,
# direction marks, line and paragraph separators, the byte order mark, and the tag
# characters, which can hide instructions in chat text) are shown as escapes too.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069"
    "\ufeff\U000e0000-\U000e007f]"
)

SHOWN_CHARACTERS = 100_000
"""The most of one text or JSON value a page shows; the rest is left to the download."""

PRETTY_LIMIT = 64 * 1024
"""JSON longer than this (compact), or nested deeper than `PRETTY_DEPTH`, is shown
compact: indenting it would make the page many times the value's size."""
PRETTY_DEPTH = 20


def escape_code(char: str) -> str:
    """How one unsafe character is written: `\\x1b`, `\\r`, `\\u202e`, `\\U000e0041`."""
    code = ord(char)
    if code == 0x0D:
        return "\\r"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def capped(text: str) -> str:
    """`text`, or its first `SHOWN_CHARACTERS` and a note of how much more there is."""
    if len(text) <= SHOWN_CHARACTERS:
        return text
    rest = len(text) - SHOWN_CHARACTERS
    return f"{text[:SHOWN_CHARACTERS]}\n… {rest:,} more characters (download the session)"


def visible(value: Any) -> Markup:
    """`value` (as text) HTML-escaped, with every character `_UNSAFE` matches shown as
    its escape in a `ctl` span: safe to put anywhere in an element's content."""
    text = value if isinstance(value, str) else str(value)
    pieces: list[str] = []
    start = 0
    for match in _UNSAFE.finditer(text):
        pieces.append(escape(text[start : match.start()]))
        pieces.append(
            Markup('<span class="ctl" title="control character">{}</span>').format(
                escape_code(match.group())
            )
        )
        start = match.end()
    pieces.append(escape(text[start:]))
    return Markup("").join(pieces)


def pretty_json(value: Any) -> str:
    """`value` as JSON, non-ASCII text readable: indented unless it is big or deeply
    nested (`PRETTY_LIMIT`, `PRETTY_DEPTH`), cut at `SHOWN_CHARACTERS`; a value nested too
    deeply for Python to write is named as such."""
    try:
        compact = json.dumps(value, ensure_ascii=False)
        if len(compact) <= PRETTY_LIMIT and _depth_at_most(value, PRETTY_DEPTH):
            return json.dumps(value, ensure_ascii=False, indent=2)
    except RecursionError:
        return "(JSON nested too deeply to show here: download the session)"
    return capped(compact)


def _depth_at_most(value: Any, limit: int) -> bool:
    """Whether `value`'s lists and objects nest at most `limit` deep (walked without
    recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def when(value: datetime | None) -> str:
    """A time as the viewer shows it (UTC, to the second), `-` for none."""
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}Z"


def size_text(size: int) -> str:
    """A size in bytes as `812 B`, `4.0 KiB`, `21.9 MiB`."""
    if size < 1024:
        return f"{size:,} B"
    scaled = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if scaled < 1024:
            return f"{scaled:,.1f} {unit}"
        scaled /= 1024
    return f"{scaled:,.1f} TiB"


@dataclass(frozen=True)
class Part:
    """One piece of a message as the transcript shows it. `kind` is `text`, `tool_call`,
    `tool_result`, `block` (an image, file, audio, reasoning or refusal block, with
    `label`) or `json` (any other value); `name` and `call_id` name a tool call's tool
    and id; `body` is the text shown (JSON indented)."""

    kind: str
    body: str
    label: str = ""
    name: str = ""
    call_id: str = ""
    error: bool = False


@dataclass(frozen=True)
class ShownMessage:
    """A message ready for the transcript template: its parts (content blocks, then its
    tool calls), its role and the CSS class that colours it, its metadata as JSON."""

    id: int
    role: str
    role_class: str
    created_at: str
    parts: list[Part]
    meta: str | None
    tool_call_id: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


def shown_message(message: Message) -> ShownMessage:
    """`message` as the transcript shows it."""
    role = message.role.value if isinstance(message.role, Role) else str(message.role)
    role_class = f"role-{role}" if isinstance(message.role, Role) else "role-other"
    parts = content_parts(message.content)
    parts += [tool_call_part(call) for call in tool_call_list(message.tool_calls)]
    meta = message.meta or {}
    call_id = meta.get("tool_call_id")
    usage = meta.get("usage")
    return ShownMessage(
        id=message.id or 0,
        role=role,
        role_class=role_class,
        created_at=when(message.created_at),
        parts=parts,
        meta=pretty_json(meta) if meta else None,
        tool_call_id=call_id if isinstance(call_id, str) else "",
        usage=usage if isinstance(usage, dict) else {},
    )


def content_parts(content: Any) -> list[Part]:
    """A message's content as parts: text as it is, a list of content blocks block by
    block, any other JSON value as indented JSON."""
    if isinstance(content, str):
        return [Part("text", capped(content))]
    if isinstance(content, list) and content:
        return [block_part(block) for block in content]
    return [Part("json", pretty_json(content))]


def block_part(block: Any) -> Part:
    """One content block as a part: text blocks as text, tool use and tool result blocks
    as tool calls and results, the media, reasoning and refusal blocks labelled, the rest
    as JSON."""
    if isinstance(block, str):
        return Part("text", capped(block))
    if not isinstance(block, dict):
        return Part("json", pretty_json(block))
    kind = block.get("type")
    if kind in TEXT_BLOCKS and isinstance(block.get("text"), str):
        return Part("text", capped(block["text"]))
    if kind in TOOL_USE:
        return tool_call_part(block)
    if kind in TOOL_RESULT:
        inner = block.get("content", block.get("output"))
        return Part(
            "tool_result",
            _text_or_json(inner),
            call_id=_first_text(block, "tool_use_id", "call_id", "id"),
            error=block.get("is_error") is True,
        )
    label = MEDIA_LABELS.get(kind) if isinstance(kind, str) else None
    if label is not None:
        return Part("block", pretty_json(block), label=label)
    return Part("json", pretty_json(block))


def tool_call_part(call: Any) -> Part:
    """One tool call (`{"name", "arguments"}`, OpenAI's `{"function": {...}}`, a
    `tool_use` block's `{"name", "input"}`) as a part showing its tool, id and
    arguments; a call of another shape as JSON."""
    if not isinstance(call, dict):
        return Part("tool_call", _text_or_json(call))
    function = call.get("function")
    source = function if isinstance(function, dict) else call
    arguments = source.get("arguments", source.get("input"))
    return Part(
        "tool_call",
        _text_or_json(arguments) if arguments is not None else pretty_json(call),
        name=_first_text(source, "name"),
        call_id=_first_text(call, "id", "call_id"),
    )


def _text_or_json(value: Any) -> str:
    """Text as it is (JSON text indented), a list of text blocks as their text, any
    other value as indented JSON."""
    if isinstance(value, str):
        if len(value) > PRETTY_LIMIT:
            return capped(value)  # not re-indented: shown as written
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return capped(value)
        return pretty_json(parsed) if isinstance(parsed, dict | list) else value
    if isinstance(value, list) and all(
        isinstance(item, dict) and item.get("type") in TEXT_BLOCKS for item in value
    ):
        return capped("\n".join(str(item.get("text", "")) for item in value))
    return pretty_json(value)


def _first_text(block: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = block.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


SNIPPET_CHARACTERS = 2_000
"""A search hit's snippet is cut here (one long word is never cut by the search itself)."""


def key_text(session: Any) -> str:
    """A session's key as text; for a row whose key parts this version would refuse
    (written by another program), the parts as stored, joined."""
    try:
        return str(session.key)
    except ValueError:
        parts = (session.agent_id, session.channel, session.account_id)
        kind = session.peer_kind
        return ":".join([*map(str, parts), str(getattr(kind, "value", kind)), str(session.peer_id)])


def snippet_parts(snippet: str) -> list[tuple[str, bool]]:
    """A search snippet as (text, matched) pieces, split at `SNIPPET_MARKS`, so that a
    template marks the matched words without trusting the snippet's text."""
    opening, closing = SNIPPET_MARKS
    pieces: list[tuple[str, bool]] = []
    rest = snippet if len(snippet) <= SNIPPET_CHARACTERS else snippet[:SNIPPET_CHARACTERS] + "…"
    while rest:
        start = rest.find(opening)
        end = rest.find(closing, start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            pieces.append((rest, False))
            break
        if start:
            pieces.append((rest[:start], False))
        pieces.append((rest[start + 1 : end], True))
        rest = rest[end + 1 :]
    return pieces
