"""Tool rendering and parsing (no model): malformed or unknown calls stay plain text, arguments are coerced."""

from __future__ import annotations

import pytest
from llama_index.core.llms import ChatMessage, ChatResponse
from llama_index.core.tools import FunctionTool
from llama_index.llms.mplus import MPlus
from llama_index.llms.mplus.tools import (
    JsonObjectScanner,
    ToolSpec,
    call_prefix,
    closest_tool,
    parse_tool_calls,
    render_tools,
)


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny in {city}"


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(get_weather)]
SPECS = [ToolSpec.from_tool(t) for t in TOOLS]


def test_specs_and_rendering() -> None:
    assert SPECS[0] == ToolSpec(
        name="multiply",
        description="Multiply two integers and return the product.",
        parameters={"a": "integer", "b": "integer"},
        required=("a", "b"),
    )
    text = render_tools(SPECS)
    assert '"name": "get_weather"' in text and '{"name": "<tool name>", "arguments":' in text
    assert call_prefix(SPECS[0]) == '{"name": "multiply", "arguments": {"a": '


def test_well_formed_call_is_parsed_and_coerced() -> None:
    text, calls = parse_tool_calls('Sure. {"name": "multiply", "arguments": {"a": "6", "b": 7}}', SPECS, TOOLS)
    assert text == "Sure."
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("multiply", {"a": 6, "b": 7})]
    assert calls[0].tool_call_id


@pytest.mark.parametrize(
    "reply",
    [
        '{"name": "multiply", "arguments": {"a": 6',  # cut off
        '{"name": "divide", "arguments": {"a": 6, "b": 7}}',  # not an offered tool
        '{"name": "multiply", "arguments": [6, 7]}',  # arguments not an object
        "{'name': 'multiply'}",  # not JSON
        "The answer is 42.",
        "{{{{",
    ],
)
def test_malformed_calls_stay_plain_text(reply: str) -> None:
    text, calls = parse_tool_calls(reply, SPECS, TOOLS)
    assert calls == []
    assert text == reply.strip()


def test_only_one_call_unless_parallel_allowed() -> None:
    two = '{"name": "multiply", "arguments": {"a": 1, "b": 2}} {"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert len(parse_tool_calls(two, SPECS, TOOLS, allow_many=False)[1]) == 1
    assert len(parse_tool_calls(two, SPECS, TOOLS, allow_many=True)[1]) == 2


def test_scanner_stops_at_the_end_of_the_first_object() -> None:
    scanner = JsonObjectScanner()
    text = '{"name": "x", "arguments": {"s": "a } in a string"}}\n\nQuestion: more'
    assert scanner.feed(text[:20]) is False
    assert scanner.feed(text) is True
    assert text[: scanner.end].endswith('string"}}')


def test_required_name_always_maps_to_an_offered_tool() -> None:
    assert closest_tool("multiply", SPECS).name == "multiply"
    assert closest_tool("get_wea", SPECS).name == "get_weather"
    assert closest_tool("France", SPECS).name in {"multiply", "get_weather"}


def test_get_tool_calls_from_a_text_reply() -> None:
    llm = MPlus.model_construct()  # no model needed to read a response
    reply = ChatResponse(message=ChatMessage(role="assistant", content="Just text."))
    assert llm.get_tool_calls_from_response(reply, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(reply)
