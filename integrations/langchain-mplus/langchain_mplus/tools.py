"""Tool rendering and tool-call parsing for `ChatMPlus` (pure text work: no model calls here).

The embedded SmolLM2 chat template has no `tools=` support, so tools are rendered by us: one instruction that
lists each tool's JSON schema and the exact call format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(the format SmolLM2's larger siblings were tuned on, minus the list brackets). Everything a tool schema could
break (an unsupported object, a non-object parameter schema, a name that cannot be written inside the call)
is refused at `bind_tools` time with a `ToolRenderError`, never later inside a callback.

`parse_tool_calls` reads calls out of free text (the `free` tool mode, and any text a stronger model writes);
it never raises: what it cannot read becomes an invalid call with the reason.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_openai_tool

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SCHEMA_NOISE = ("title",)
"""Schema keys dropped from the rendered prompt: pydantic's titles repeat the property names and cost tokens."""


class ToolRenderError(ValueError):
    """A tool (or a structured-output schema) that ChatMPlus cannot describe to the model."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments; always an object schema."""

    def render(self) -> str:
        body = {"name": self.name, "description": self.description, "parameters": _strip(self.parameters)}
        return json.dumps(body, ensure_ascii=False)


def to_tool_spec(tool: Any) -> ToolSpec:
    """Any LangChain tool form (BaseTool, function, pydantic class, TypedDict, JSON schema, OpenAI dict)."""
    if isinstance(tool, ToolSpec):
        return tool
    try:
        converted = convert_to_openai_tool(tool)
    except Exception as exc:  # langchain raises ValueError/TypeError/KeyError depending on the input
        raise ToolRenderError(f"cannot render tool {_describe(tool)} for ChatMPlus: {exc}") from exc
    function = converted.get("function") if converted.get("type") == "function" else None
    if not isinstance(function, Mapping):
        raise ToolRenderError(
            f"ChatMPlus only calls function tools (name + JSON-schema parameters); got {_describe(tool)}"
        )
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolRenderError(
            f"tool name {name!r} cannot be written in a call: use 1-64 letters, digits, '_', '-' or '.'"
        )
    params = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, Mapping) or params.get("type", "object") != "object":
        raise ToolRenderError(f"tool {name!r}: parameters must be a JSON object schema, got {params!r}")
    properties = params.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(k, str) for k in properties):
        raise ToolRenderError(f"tool {name!r}: 'properties' must map argument names to schemas")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise ToolRenderError(f"tool {name!r}: description must be a str")
    try:
        params = json.loads(json.dumps(dict(params), ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise ToolRenderError(f"tool {name!r}: parameters are not JSON-serialisable ({exc})") from exc
    return ToolSpec(name=name, description=description, parameters=params)


def render_tools_instruction(specs: Sequence[ToolSpec]) -> str:
    """The instruction placed before the conversation: tools as JSON, then the exact call format."""
    lines = ["You can call these tools (JSON schemas):"]
    lines += [spec.render() for spec in specs]
    lines.append(
        "To call a tool, reply with exactly "
        + TOOL_CALL_OPEN
        + '{"name": "<tool name>", "arguments": {<arguments as JSON>}}'
        + TOOL_CALL_CLOSE
        + " and nothing else. Otherwise answer normally."
    )
    return "\n".join(lines)


def render_call(name: str, args: Mapping[str, Any] | str) -> str:
    """A call as the model is asked to write it (used to show earlier calls in the prompt)."""
    arguments = args if isinstance(args, str) else json.dumps(dict(args), ensure_ascii=False)
    quoted = json.dumps(name, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}{{"name": {quoted}, "arguments": {arguments}}}{TOOL_CALL_CLOSE}'


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCalls:
    content: str
    """The text outside any call."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def parse_tool_calls(text: str, tool_names: Sequence[str] | None = None) -> ParsedCalls:
    """Read `<tool_call>` blocks out of model text. Never raises.

    A block may hold one call object or a list of them; `arguments` may be an object or a JSON string of one
    (both occur in the wild). A block left open at the end of the text (the model ran out of tokens) is read
    up to the end. `tool_names`, when given, turns calls to unknown tools into invalid calls.
    """
    content_parts: list[str] = []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start == -1:
            content_parts.append(text[pos:])
            break
        content_parts.append(text[pos:start])
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        body = text[body_start:] if end == -1 else text[body_start:end]
        closed = end != -1
        pos = len(text) if end == -1 else end + len(TOOL_CALL_CLOSE)
        good, bad = _parse_block(body, closed, tool_names)
        calls += good
        invalid += bad
        if end == -1:
            break
    return ParsedCalls(content="".join(content_parts).strip(), tool_calls=calls, invalid_tool_calls=invalid)


def _parse_block(
    body: str, closed: bool, tool_names: Sequence[str] | None
) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    raw = body.strip()
    try:
        value, _ = json.JSONDecoder().raw_decode(raw)
    except ValueError as exc:
        reason = "the call was cut off before it was complete" if not closed else f"not valid JSON ({exc})"
        return [], [invalid_tool_call(name=_guess_name(raw), args=raw, id=new_call_id(), error=reason)]
    items = value if isinstance(value, list) else [value]
    good: list[ToolCall] = []
    bad: list[InvalidToolCall] = []
    for item in items:
        call, error = _read_call(item, tool_names)
        if call is not None:
            good.append(call)
        else:
            text = json.dumps(item, ensure_ascii=False) if not isinstance(item, str) else item
            name = item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else None
            bad.append(invalid_tool_call(name=name, args=text, id=new_call_id(), error=error))
    return good, bad


def _read_call(item: Any, tool_names: Sequence[str] | None) -> tuple[ToolCall | None, str]:
    if not isinstance(item, dict):
        return None, f"a call must be a JSON object, got {type(item).__name__}"
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return None, "the call has no 'name'"
    if tool_names is not None and name not in tool_names:
        return None, f"unknown tool {name!r}; bound tools: {', '.join(tool_names)}"
    args: Any = {}
    for key in ("arguments", "args", "parameters"):
        if key in item:
            args = item[key]
            break
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            return None, f"'arguments' is a string that is not JSON ({exc})"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"'arguments' must be a JSON object, got {type(args).__name__}"
    return tool_call(name=name, args=args, id=new_call_id()), ""


def _guess_name(raw: str) -> str | None:
    match = re.search(r'"name"\s*:\s*"([^"]+)"', raw)
    return match.group(1) if match else None


def _strip(schema: Any) -> Any:
    if isinstance(schema, dict):
        # A schema keyword `title` holds a str; a property *named* "title" holds a dict and is kept.
        return {k: _strip(v) for k, v in schema.items() if not (k in _SCHEMA_NOISE and isinstance(v, str))}
    if isinstance(schema, list):
        return [_strip(v) for v in schema]
    return schema


def _describe(tool: Any) -> str:
    text = repr(tool)
    return text if len(text) <= 80 else text[:77] + "..."
