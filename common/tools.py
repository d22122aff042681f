"""Tool calls: parsing them out of a model's text.

Qwen2.5's format (its chat template, `common.models.QWEN25_CHAT_TEMPLATE`):
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolCallParseError(ValueError):
    """The text has a <tool_call> block that is not a JSON object with a string "name"."""


def parse_tool_calls(text: str) -> list[dict]:
    """Every `<tool_call>` block of `text` as {"name": str, "arguments": dict}, in order.

    Raises ToolCallParseError on a block that is not valid JSON or lacks a name; text without any
    block gives [].
    """
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as error:
            raise ToolCallParseError(f"tool call is not valid JSON: {error}: {block[:200]!r}") from error
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ToolCallParseError(f"tool call has no string \"name\": {block[:200]!r}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models emit the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise ToolCallParseError(f"tool call arguments are not JSON: {arguments[:200]!r}") from error
        if not isinstance(arguments, dict):
            raise ToolCallParseError(f"tool call arguments are not an object: {block[:200]!r}")
        calls.append({"name": call["name"], "arguments": arguments})
    return calls
