"""Tool calling for a small local model: how tools are shown to it and how its replies become tool calls.

The embedded model (SmolLM2-135M) was never trained on a tool-calling format, so the format is kept as small
and literal as possible: one JSON line per tool with flat `parameter: type` pairs, and one exact call shape,
`{"name": "<tool>", "arguments": {...}}`. When a call is required the reply is prefilled with the start of
that object (`MPlus` does this), which turns "invent a format" into "continue a JSON object", something even a
135M model does reliably. Parsing never raises: anything that is not a well-formed call to an offered tool is
left as plain text.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.tools.types import BaseTool

CALL_FORMAT = '{"name": "<tool name>", "arguments": {"<parameter>": <value>}}'


@dataclass(frozen=True)
class ToolSpec:
    """What the prompt says about one tool, derived from its LlamaIndex metadata."""

    name: str
    description: str
    parameters: dict[str, str] = field(default_factory=dict)
    """Parameter name -> JSON type, in the tool's own order."""
    required: tuple[str, ...] = ()

    @classmethod
    def from_tool(cls, tool: BaseTool) -> ToolSpec:
        meta = tool.metadata
        schema = meta.get_parameters_dict()
        props = schema.get("properties", {}) or {}
        params = {name: _json_type(spec) for name, spec in props.items()}
        name = meta.get_name()
        description = meta.description.strip()
        # FunctionTool puts the Python signature on the first line; the JSON line already says it.
        first, _, rest = description.partition("\n")
        if first.startswith(f"{name}(") and rest.strip():
            description = rest
        description = " ".join(description.split())
        return cls(name=name, description=description, parameters=params, required=tuple(schema.get("required", ())))

    def render(self) -> str:
        return json.dumps(
            {"name": self.name, "description": self.description, "parameters": self.parameters}, ensure_ascii=False
        )


def _json_type(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "any"
    if isinstance(spec.get("type"), str):
        return str(spec["type"])
    for key in ("anyOf", "oneOf"):
        options = [o.get("type") for o in spec.get(key, []) if isinstance(o, dict) and o.get("type") != "null"]
        if options and isinstance(options[0], str):
            return str(options[0])
    return "any"


def render_tools(specs: Sequence[ToolSpec]) -> str:
    """The instructions placed in front of the user's message when tools are offered."""
    lines = ["You can call these tools:"]
    lines += [spec.render() for spec in specs]
    lines.append(f"To call a tool, reply with only one JSON object in exactly this format: {CALL_FORMAT}")
    lines.append("Otherwise, answer normally.")
    return "\n".join(lines)


def call_prefix(spec: ToolSpec) -> str:
    """The start of a call to `spec`, used to prefill the reply when that tool must be called.

    The first parameter's key is included so the model only has to write values; a tool with no parameters
    gets the complete call.
    """
    head = '{"name": ' + json.dumps(spec.name) + ', "arguments": {'
    if not spec.parameters:
        return head + "}}"
    first = next(iter(spec.parameters))
    return head + json.dumps(first) + ": "


NAME_PREFIX = '{"name": "'
"""Prefill used to make the model pick a tool when several are offered and one is required."""


def match_tool_name(text: str, specs: Sequence[ToolSpec]) -> ToolSpec | None:
    """The offered tool a generated name refers to: exact, then unique prefix, then the closest spelling."""
    name = text.strip().strip('"').strip()
    if not name:
        return None
    by_name = {s.name: s for s in specs}
    if name in by_name:
        return by_name[name]
    prefixed = [s for s in specs if s.name.startswith(name) or name.startswith(s.name)]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
    return by_name[close[0]] if close else None


def closest_tool(text: str, specs: Sequence[ToolSpec]) -> ToolSpec:
    """`match_tool_name`, or failing that the most similar name: for when a call is required whatever the model
    wrote."""
    found = match_tool_name(text, specs)
    if found is not None:
        return found
    name = text.strip().strip('"').strip()
    return max(specs, key=lambda s: difflib.SequenceMatcher(None, name, s.name).ratio())


class JsonObjectScanner:
    """Feeds text incrementally and reports when the first top-level JSON object has closed.

    Used to stop generation as soon as a call is complete instead of letting the model ramble on.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.in_string = False
        self.escaped = False
        self.end: int | None = None
        self._seen = 0

    def feed(self, text: str) -> bool:
        """`text` is the whole text so far; returns True once an object has closed (see `end`)."""
        if self.end is not None:
            return True
        for i in range(self._seen, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"' and self.started:
                self.in_string = True
            elif ch == "{":
                self.depth += 1
                self.started = True
            elif ch == "}" and self.started:
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
                    self._seen = len(text)
                    return True
        self._seen = len(text)
        return False


def find_json_object(text: str) -> tuple[int, int] | None:
    """(start, end) of the first balanced `{...}` in `text`, or None."""
    start = text.find("{")
    while start != -1:
        scanner = JsonObjectScanner()
        if scanner.feed(text[start:]) and scanner.end is not None:
            return start, start + scanner.end
        start = text.find("{", start + 1)
    return None


def parse_tool_calls(
    text: str, specs: Sequence[ToolSpec], tools: Sequence[BaseTool], *, allow_many: bool = True
) -> tuple[str, list[ToolCallBlock]]:
    """Split a reply into (plain text, tool calls). Anything malformed stays plain text; never raises."""
    calls: list[ToolCallBlock] = []
    by_name = {s.name: s for s in specs}
    tools_by_name = {t.metadata.name: t for t in tools}
    rest = text
    kept: list[str] = []
    while True:
        span = find_json_object(rest)
        if span is None:
            break
        start, end = span
        call = _to_call(rest[start:end], by_name, tools_by_name)
        if call is None:
            kept.append(rest[:end])
        else:
            kept.append(rest[:start])
            calls.append(call)
            if not allow_many:
                rest = ""
                break
        rest = rest[end:]
    kept.append(rest)
    plain = "".join(kept)
    if calls:
        plain = plain.replace("<tool_call>", "").replace("</tool_call>", "")
    return plain.strip(), calls


def _to_call(blob: str, by_name: dict[str, ToolSpec], tools: dict[str | None, BaseTool]) -> ToolCallBlock | None:
    try:
        obj = json.loads(blob)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    spec = by_name.get(obj["name"])
    if spec is None:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCallBlock(
        tool_call_id=f"call_{uuid.uuid4().hex[:12]}",
        tool_name=spec.name,
        tool_kwargs=coerce_arguments(tools.get(spec.name), args),
    )


def coerce_arguments(tool: BaseTool | None, args: dict[str, Any]) -> dict[str, Any]:
    """Arguments converted by the tool's own schema ("6" -> 6 for an int), or unchanged if they do not fit.

    Unchanged arguments still reach the tool, whose error then goes back to the agent as a tool result.
    """
    schema = getattr(getattr(tool, "metadata", None), "fn_schema", None)
    if schema is None or not hasattr(schema, "model_validate"):
        return args
    try:
        validated = schema.model_validate(args)
    except Exception:
        return args
    dumped = validated.model_dump()
    return {k: dumped[k] for k in args if k in dumped} | {k: v for k, v in args.items() if k not in dumped}


def render_call(name: str, kwargs: Any) -> str:
    """A past tool call written back in the same format the model is asked to produce."""
    if isinstance(kwargs, str):
        with contextlib.suppress(ValueError):
            kwargs = json.loads(kwargs)
    return json.dumps({"name": name, "arguments": kwargs}, ensure_ascii=False, default=str)
