"""Tool rendering, tool-call parsing and message reshaping: pure text work, no model."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_mplus.chat_models import _normalise_choice, _partial_suffix, _response_schema
from langchain_mplus.guided import _string_end, closest
from langchain_mplus.messages import to_prompt_plan
from langchain_mplus.tools import (
    ToolRenderError,
    parse_tool_calls,
    render_call,
    render_tools_instruction,
    to_tool_spec,
)


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "sunny"


class Article(BaseModel):
    """An article to file."""

    title: str = Field(description="the headline")
    words: int


class Point(TypedDict):
    """A point."""

    x: int
    y: int


def adder(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.mark.parametrize("source", [get_weather, Article, Point, adder])
def test_every_langchain_tool_form_renders(source: Any) -> None:
    spec = to_tool_spec(source)
    assert spec.parameters["type"] == "object"
    rendered = json.loads(spec.render())
    assert rendered["name"] == spec.name
    assert set(rendered["parameters"]["properties"]) == set(spec.parameters["properties"])


def test_rendering_drops_schema_titles_but_keeps_a_property_named_title() -> None:
    rendered = json.loads(to_tool_spec(Article).render())
    assert "title" in rendered["parameters"]["properties"]  # the property
    assert "title" not in rendered["parameters"]["properties"]["words"]  # pydantic's "Words" title
    instruction = render_tools_instruction([to_tool_spec(get_weather), to_tool_spec(Article)])
    assert '"name": "get_weather"' in instruction and '"name": "Article"' in instruction
    assert '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>' in instruction


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (5, "cannot render tool"),
        ({"type": "web_search"}, "only calls function tools"),
        ({"name": "has space", "description": "d", "parameters": {"type": "object", "properties": {}}}, "tool name"),
        ({"name": "listy", "description": "d", "parameters": {"type": "array"}}, "must be a JSON object schema"),
        (
            {
                "name": "odd",
                "description": "d",
                "parameters": {"type": "object", "properties": {"a": {"default": {1, 2}}}},
            },
            "not JSON-serialisable",
        ),
    ],
)
def test_unrenderable_tools_raise_a_clear_error(bad: Any, message: str) -> None:
    with pytest.raises(ToolRenderError, match=message):
        to_tool_spec(bad)


def test_parse_a_call_and_the_text_around_it() -> None:
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>'
    parsed = parse_tool_calls(text, ["get_weather"])
    assert parsed.content == "Let me check."
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("get_weather", {"location": "Paris"})]
    assert parsed.tool_calls[0]["id"] and not parsed.invalid_tool_calls


def test_parse_list_form_and_string_arguments() -> None:
    text = (
        '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{\\"y\\": 2}"}]</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("a", {"x": 1}), ("b", {"y": 2})]
    assert len({c["id"] for c in parsed.tool_calls}) == 2


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>{"name": "get_weather", "arguments": {"location": "Par', "cut off"),
        ('<tool_call>{"name": "get_weather", "arguments": {location: Paris}}</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "teleport", "arguments": {}}</tool_call>', "unknown tool"),
        ('<tool_call>{"arguments": {}}</tool_call>', "no 'name'"),
        ('<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "get_weather", "arguments": "{oops"}</tool_call>', "string that is not JSON"),
        ("<tool_call>42</tool_call>", "must be a JSON object"),
    ],
)
def test_malformed_calls_become_invalid_calls(text: str, error: str) -> None:
    parsed = parse_tool_calls(text, ["get_weather"])
    assert parsed.tool_calls == []
    assert len(parsed.invalid_tool_calls) == 1
    invalid = parsed.invalid_tool_calls[0]
    assert error in (invalid["error"] or "")
    assert invalid["id"]


def test_parse_never_raises_on_garbage() -> None:
    for text in ["", "<tool_call>", "</tool_call><tool_call>", "<tool_call>[", '<tool_call>"x"</tool_call>', "{}"]:
        parsed = parse_tool_calls(text)
        assert isinstance(parsed.content, str)


def test_render_call_round_trips_through_the_parser() -> None:
    parsed = parse_tool_calls(render_call("unicode", {"name": "你好啊集团"}))
    assert parsed.tool_calls[0]["args"] == {"name": "你好啊集团"}


def test_prompt_plan_quotes_tool_results_ahead_of_the_question() -> None:
    messages: list[BaseMessage] = [
        SystemMessage("Be brief."),
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"location": "Paris"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1", name="get_weather"),
    ]
    plan = to_prompt_plan(messages, instructions="TOOLS")
    roles = [m["role"] for m in plan.messages]
    assert roles == ["system", "system", "assistant", "user", "user"]
    assert plan.messages[0]["content"] == "TOOLS"
    assert plan.messages[2]["content"].startswith('<tool_call>{"name": "get_weather"')
    assert plan.messages[3]["content"] == "Result of get_weather: sunny"
    assert plan.messages[-1]["content"] == "What is the weather in Paris?"
    assert plan.prefill == ""


def test_prompt_plan_prefills_a_trailing_ai_message_and_skips_empty_ones() -> None:
    plan = to_prompt_plan([HumanMessage("hi"), AIMessage(""), HumanMessage("Count to 3"), AIMessage("1, 2,")])
    assert [m["content"] for m in plan.messages] == ["hi", "Count to 3"]
    assert plan.prefill == "1, 2,"


def test_tool_error_status_and_list_content_are_read() -> None:
    plan = to_prompt_plan(
        [
            HumanMessage([{"type": "text", "text": "What is "}, "1 + 2"]),
            AIMessage(
                [{"type": "text", "text": "adding"}, {"type": "tool_use", "id": "x", "name": "add", "input": {}}],
                tool_calls=[{"name": "add", "args": {"a": 1}, "id": "x"}],
            ),
            ToolMessage("missing b", tool_call_id="x", name="add", status="error"),
        ]
    )
    assert plan.messages[-1]["content"] == "What is 1 + 2"
    assert plan.messages[0]["content"].startswith("adding <tool_call>")
    assert plan.messages[1]["content"] == "Result of add (error): missing b"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "at least one message"),
        ([SystemMessage("only rules")], "needs a human message"),
        ([HumanMessage("   ")], "empty"),
        ([HumanMessage([{"type": "image", "url": "https://x/y.png"}])], "text only"),
        ([RemoveMessage(id="1")], "cannot read a RemoveMessage"),
        ([ChatMessage("hi", role="narrator")], "role 'narrator'"),
    ],
)
def test_bad_message_lists_raise_a_clear_error(messages: list[BaseMessage], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        to_prompt_plan(messages)


def test_tool_choice_forms() -> None:
    names = ["a", "b"]
    assert _normalise_choice(None, names) == "auto"
    assert _normalise_choice("required", names) == "any"
    assert _normalise_choice(True, names) == "any"
    assert _normalise_choice("none", names) == "none"
    assert _normalise_choice("b", names) == "b"
    assert _normalise_choice({"type": "function", "function": {"name": "a"}}, names) == "a"
    assert _normalise_choice({"type": "tool", "name": "b"}, names) == "b"
    with pytest.raises(ValueError, match="not a bound tool"):
        _normalise_choice("c", names)
    with pytest.raises(ValueError, match="tool_choice must be"):
        _normalise_choice(3, names)


def test_response_format_forms() -> None:
    assert _response_schema(None) == (None, False)
    assert _response_schema({"type": "json_object"}) == (None, True)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert _response_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == (schema, True)
    with pytest.raises(ValueError, match=r"json_schema\.schema"):
        _response_schema({"type": "json_schema"})
    with pytest.raises(ValueError, match="must be text, json_object or json_schema"):
        _response_schema({"type": "yaml"})


def test_string_end_and_marker_holdback() -> None:
    assert _string_end('abc" rest') == 3
    assert _string_end('a\\"b"') == 4  # an escaped quote does not end the string
    assert _string_end("no end") is None
    assert _string_end("line\nnext") == 4
    assert _partial_suffix("hello <tool", "<tool_call>") == 5
    assert _partial_suffix("hello", "<tool_call>") == 0
    assert closest("get weather", ["magic_function", "get_weather"]) == "get_weather"
    assert closest("MAGIC_FUNCTION", ["magic_function", "get_weather"]) == "magic_function"
