"""Function calling with real LlamaIndex agents and tools on the embedded model."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.llms import MessageRole
from llama_index.core.tools import FunctionTool
from llama_index.llms.mplus import MPlus
from llama_index.memory.mplus import MPlusMemory

pytestmark = [
    pytest.mark.slow,
    # llama-index-workflows inspects agents with inspect.getmembers, which trips pydantic's deprecation shims.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect"),
]


@pytest.fixture(scope="module")
def llm() -> MPlus:
    return MPlus(max_new_tokens=24)


def test_function_agent_calls_the_tool_and_answers_with_its_result(llm: MPlus) -> None:
    calls: list[tuple[int, int]] = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        calls.append((a, b))
        return a * b

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(multiply)], llm=llm)
    memory = MPlusMemory.from_defaults(session_id=f"li-agent-{uuid.uuid4().hex}", llm=llm)

    async def run() -> tuple[str, list[str]]:
        handler = agent.run("What is 6 times 7?", memory=memory)
        tool_events = [ev.tool_name async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
        return str(await handler), tool_events

    answer, tool_events = asyncio.run(run())
    assert calls == [(6, 7)]
    assert tool_events == ["multiply"]
    assert "42" in answer
    # The whole turn (question, call, result, answer) went through the memory into latent memory.
    roles = [m.role for m in memory.get_all()]
    assert roles[0] == MessageRole.USER and MessageRole.TOOL in roles and roles[-1] == MessageRole.ASSISTANT
    assert memory.latent_memory.stats().tokens_injected > 0


def test_predict_and_call_with_a_single_tool(llm: MPlus) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    result = llm.predict_and_call([FunctionTool.from_defaults(add)], "What is 20 plus 22?")
    assert [s.tool_name for s in result.sources] == ["add"]
    assert result.sources[0].raw_input == {"args": (), "kwargs": {"a": 20, "b": 22}}
    assert result.response == "42"


def test_required_call_among_several_tools_names_an_offered_tool(llm: MPlus) -> None:
    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        return a * b

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    tools = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(get_weather)]
    reply = llm.chat_with_tools(tools, user_msg="What is the weather in Paris?", tool_required=True)
    calls = llm.get_tool_calls_from_response(reply)
    assert len(calls) == 1
    assert calls[0].tool_name in {"multiply", "get_weather"}
    assert isinstance(calls[0].tool_kwargs, dict)
