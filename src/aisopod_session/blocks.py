"""Message content as the common chat APIs write it (Anthropic's, OpenAI's Chat
Completions and Responses): the content block types that hold text, media, reasoning,
tool use and tool results, and a message's tool calls one by one. The command's
transcript (cli.py) and the viewer's (viewer/render.py) each show them their own way."""

from __future__ import annotations

from typing import Any

TEXT_BLOCKS = frozenset({"text", "input_text", "output_text", "summary_text", "reasoning_text"})
"""Block types whose `text` is the block's text."""

TOOL_USE = frozenset({"tool_use", "function_call", "server_tool_use"})
"""Block types that are a tool call."""

TOOL_RESULT = frozenset({"tool_result", "function_call_output", "tool_call_output"})
"""Block types that are a tool's result."""

MEDIA_LABELS = {
    "image": "image",
    "image_url": "image",
    "input_image": "image",
    "file": "file",
    "input_file": "file",
    "document": "file",
    "audio": "audio",
    "input_audio": "audio",
    "reasoning": "reasoning",
    "thinking": "reasoning",
    "redacted_thinking": "reasoning",
    "refusal": "refusal",
}
"""The label of each media, reasoning and refusal block type."""


def tool_call_list(calls: Any) -> list[Any]:
    """A message's tool calls one by one: the items of a list; one object (or any other
    value but null) is one call."""
    if calls is None:
        return []
    return calls if isinstance(calls, list) else [calls]
