"""ChatMPlus on the embedded model: per-user memory through config, streaming/async, callbacks, tool calls,
structured output and bad input. Replies are short (`max_tokens`) to keep the file fast on a shared CPU."""

from __future__ import annotations

import asyncio
from typing import Any, Literal
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, RemoveMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_mplus import ChatMPlus, ToolRenderError

pytestmark = pytest.mark.slow

FACT = "My locker code is 4812."
QUESTION = "What is my locker code?"


class Tokens(BaseCallbackHandler):
    """Records what reaches LangChain's callback machinery."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.errors: list[BaseException] = []
        self.ends = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.errors.append(error)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends += 1


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny."


@tool
def tag_items(tags: list[str]) -> str:
    """Attach a list of tags."""
    return ",".join(tags)


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="the person's name")
    age: int = Field(description="age in years")


class Narration(BaseMessage):
    """A message type ChatMPlus has never heard of."""

    type: Literal["narration"] = "narration"


def user(uid: str) -> dict[str, Any]:
    return {"configurable": {"user_id": uid}}


@pytest.fixture(scope="module")
def memories(llm: Any) -> tuple[str, str]:
    """alice has told us her locker code; bob has told us something else. Unique ids per run."""
    alice, bob = "lc-test-alice", "lc-test-bob"
    llm.memory(alice).reset()
    llm.memory(bob).reset()
    llm.memory(alice).inject(FACT, role="user")
    llm.memory(bob).inject("I like green tea.", role="user")
    return alice, bob


def test_default_model_is_loaded_once_and_shared(llm: Any) -> None:
    assert ChatMPlus().resolved_llm() is llm
    assert ChatMPlus(max_tokens=3).resolved_llm() is ChatMPlus().resolved_llm()


def test_each_user_reads_only_their_own_memory(memories: tuple[str, str]) -> None:
    alice, bob = memories
    model = ChatMPlus(max_tokens=16)
    for_alice = model.invoke(QUESTION, config=user(alice))
    for_bob = model.invoke(QUESTION, config=user(bob))
    anonymous = model.invoke(QUESTION)
    assert "4812" in for_alice.text
    assert "4812" not in for_bob.text
    assert "4812" not in anonymous.text
    # The routing itself, independent of what the model says: who was read, and how much memory.
    assert for_alice.response_metadata["latent_memory"]["user_id"] == alice
    assert for_bob.response_metadata["latent_memory"]["user_id"] == bob
    assert anonymous.response_metadata["latent_memory"]["user_id"] is None
    assert for_alice.usage_metadata is not None and anonymous.usage_metadata is not None
    assert for_alice.usage_metadata["input_token_details"]["latent_memory_pool"] > 0  # type: ignore[typeddict-item]
    assert anonymous.usage_metadata["input_token_details"]["latent_memory_pool"] == 0  # type: ignore[typeddict-item]


def test_user_reaches_the_model_inside_a_chain_and_per_call(memories: tuple[str, str]) -> None:
    alice, bob = memories
    model = ChatMPlus(max_tokens=16)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model
    via_chain = chain.invoke({"q": QUESTION}, config=user(alice))  # the run-config context variable
    assert via_chain.response_metadata["latent_memory"]["user_id"] == alice
    assert "4812" in via_chain.text
    via_kwarg = model.invoke(QUESTION, user_id=bob)  # an explicit call argument
    assert via_kwarg.response_metadata["latent_memory"]["user_id"] == bob
    batched = ChatMPlus(max_tokens=2).batch(["Hi", "Hi"], config=[user(alice), user(bob)])
    assert [m.response_metadata["latent_memory"]["user_id"] for m in batched] == [alice, bob]
    keyed = ChatMPlus(max_tokens=4, user_id_key="tenant").invoke("Hi", config={"configurable": {"tenant": bob}})
    assert keyed.response_metadata["latent_memory"]["user_id"] == bob


def test_usage_metadata_counts_memory_read() -> None:
    reply = ChatMPlus(max_tokens=8).invoke("Say hello.")
    usage = reply.usage_metadata
    assert usage is not None
    memory = reply.response_metadata["latent_memory"]
    details = usage["input_token_details"]
    assert sum(details.values()) == memory["prefix_tokens"] > 0  # type: ignore[arg-type]
    assert usage["input_tokens"] > memory["prefix_tokens"]
    assert 0 < usage["output_tokens"] <= 8
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_streaming_pieces_reach_callbacks_and_match_invoke() -> None:
    model = ChatMPlus(max_tokens=20)
    prompt = "Name three colours."
    handler = Tokens()
    whole = model.invoke(prompt, config={"callbacks": [handler]})
    assert len(handler.tokens) > 2 and "".join(handler.tokens) == whole.text
    chunks = list(model.stream(prompt))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata is not None


async def test_async_matches_sync_and_leaves_the_event_loop_free() -> None:
    model = ChatMPlus(max_tokens=12)
    prompt = "Name three colours."
    ticks = 0
    ticks_at_first_chunk: int | None = None

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        chunks = []
        async for chunk in model.astream(prompt):
            if ticks_at_first_chunk is None:
                ticks_at_first_chunk = ticks
            chunks.append(chunk)
    finally:
        task.cancel()
    # The model's prefill and first decode step ran in a worker thread while the loop kept ticking.
    assert ticks_at_first_chunk is not None and ticks_at_first_chunk > 1
    whole = await model.ainvoke(prompt)
    assert "".join(c.text for c in chunks) == whole.text == model.invoke(prompt).text


async def test_abandoning_an_async_stream_stops_cleanly() -> None:
    model = ChatMPlus(max_tokens=40)
    async for _chunk in model.astream("Tell me a long story about a dragon."):
        break
    assert (await model.ainvoke("Hi", max_tokens=3)).text  # the model is still usable


def test_forced_tool_calls_parse_with_ids() -> None:
    model = ChatMPlus(max_tokens=24)
    by_name = model.bind_tools([get_weather, tag_items], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    assert [c["name"] for c in by_name.tool_calls] == ["get_weather"]
    assert by_name.tool_calls[0]["args"] == {"location": "Paris"}
    assert by_name.tool_calls[0]["id"] and by_name.response_metadata["finish_reason"] == "tool_calls"
    chosen = model.bind_tools([get_weather, tag_items], tool_choice="any").invoke("What is the weather in Rome?")
    assert len(chosen.tool_calls) == 1 and chosen.tool_calls[0]["name"] in {"get_weather", "tag_items"}
    streamed = None
    for chunk in model.bind_tools([get_weather], tool_choice="any").stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["args"] == {"location": "Paris"}


def test_auto_tool_choice_may_answer_in_plain_text() -> None:
    reply = ChatMPlus(max_tokens=16).bind_tools([get_weather]).invoke("Say hello to me.")
    assert isinstance(reply, AIMessage) and reply.text and "<tool_call>" not in reply.text


def test_tool_results_in_the_message_list_are_answered_from() -> None:
    messages = [
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"location": "Paris"}, "id": "c1"}]),
        ToolMessage("It is snowing in Paris.", tool_call_id="c1", name="get_weather"),
    ]
    reply = ChatMPlus(max_tokens=16).bind_tools([get_weather]).invoke(messages)
    assert "snow" in reply.text.lower()


def test_a_call_the_model_cannot_finish_is_invalid_not_a_crash() -> None:
    handler = Tokens()
    model = ChatMPlus(max_tokens=2).bind_tools([tag_items], tool_choice="tag_items")
    reply = model.invoke("Tag this post about cats and dogs.", config={"callbacks": [handler]})
    assert reply.tool_calls == []
    assert len(reply.invalid_tool_calls) == 1
    invalid = reply.invalid_tool_calls[0]
    assert invalid["name"] == "tag_items" and "max_tokens" in (invalid["error"] or "")
    assert reply.response_metadata["finish_reason"] == "length"
    assert handler.errors == [] and handler.ends == 1
    chunks = list(model.stream("Tag this post about cats and dogs."))
    assert chunks[-1].chunk_position == "last"


def test_free_mode_reads_whatever_the_model_writes() -> None:
    model = ChatMPlus(max_tokens=24, tool_call_mode="free").bind_tools([get_weather], tool_choice="get_weather")
    reply = model.invoke("What is the weather in Paris?")
    calls = reply.tool_calls + reply.invalid_tool_calls  # type: ignore[operator]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"


def test_structured_output_three_ways() -> None:
    model = ChatMPlus(max_tokens=24)
    text = "Alice is 30 years old."
    for method in ("function_calling", "json_schema", "json_mode"):
        person = model.with_structured_output(Person, method=method).invoke(text)  # type: ignore[arg-type]
        assert isinstance(person, Person), method
        assert person.name == "Alice" and person.age == 30, (method, person)
    as_dict = model.with_structured_output(Person.model_json_schema(), method="json_schema").invoke(text)
    assert as_dict == {"name": "Alice", "age": 30}
    free_json = model.with_structured_output(None, method="json_mode").invoke(text)
    assert isinstance(free_json, dict)


def test_structured_output_parse_failure_is_reported_not_raised_with_include_raw() -> None:
    structured = ChatMPlus(max_tokens=1).with_structured_output(Person, method="json_schema", include_raw=True)
    out = structured.invoke("Alice is 30 years old.")
    assert isinstance(out, dict) and out["parsed"] is None and out["parsing_error"] is not None
    assert isinstance(out["raw"], AIMessage) and out["raw"].response_metadata["finish_reason"] == "length"


def test_bad_input_gives_clear_errors_through_the_callbacks() -> None:
    model = ChatMPlus(max_tokens=4)
    handler = Tokens()
    for bad, message in [
        ([], "at least one message"),
        ([HumanMessage("")], "empty"),
        ([HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])], "text only"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.invoke(bad, config={"callbacks": [handler]})
    assert len(handler.errors) == 3 and all(isinstance(e, ValueError) for e in handler.errors)
    with pytest.raises(ValueError, match="cannot read a Narration"):
        model.invoke([Narration("once upon a time")])
    # With a callback handler attached, langchain-core's tracing refuses unknown types first: still a ValueError.
    for unknown in (Narration("once upon a time"), RemoveMessage(id="x")):
        with pytest.raises(ValueError, match=r"unsupported message type|cannot read"):
            model.invoke([unknown], config={"callbacks": [Tokens()]})
    with pytest.raises(ValueError, match="unsupported call arguments"):
        model.invoke("hi", frequency_penalty=1.0)
    with pytest.raises(ValueError, match="cannot switch"):
        model.invoke("hi", model="gpt-4o")
    with pytest.raises(ValueError, match="user_id"):
        model.invoke("hi", config=user(""))
    with pytest.raises(ToolRenderError, match="cannot render tool"):
        model.bind_tools([42])
    with pytest.raises(ValueError, match="not a bound tool"):
        model.bind_tools([get_weather], tool_choice="teleport")


def test_stop_strings_cut_plain_replies() -> None:
    model = ChatMPlus(max_tokens=24)
    full = model.invoke("Count from 1 to 10, separated by commas.").text
    assert "5" in full
    cut = model.invoke("Count from 1 to 10, separated by commas.", stop=["5"]).text
    assert "5" not in cut and full.startswith(cut)
    assert (ChatMPlus(max_tokens=24) | StrOutputParser()).invoke("Hi")  # composes like any chat model
