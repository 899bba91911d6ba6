"""`MPlus` as a LlamaIndex LLM: metadata, complete/chat, streaming, async off the event loop, memory choice."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage
from llama_index.llms.mplus import MPlus

from mplus_agents import InvalidInputError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> MPlus:
    return MPlus(max_new_tokens=16)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def test_metadata_and_one_model_per_process(llm: MPlus) -> None:
    md = llm.metadata
    assert md.context_window == 8192
    assert md.num_output == 16
    assert md.is_chat_model and md.is_function_calling_model
    assert md.model_name == "SmolLM2-135M-Instruct"
    assert MPlus().mplus_llm is llm.mplus_llm


def test_complete(llm: MPlus) -> None:
    reply = llm.complete("What is the capital of France? Answer in one word.")
    assert "paris" in reply.text.lower()
    assert reply.raw["completion_tokens"] > 0


def test_chat_reads_the_chosen_users_memory(llm: MPlus) -> None:
    alice, bob = f"li-alice-{uuid.uuid4().hex}", f"li-bob-{uuid.uuid4().hex}"
    llm.latent_memory(alice).inject("My locker code is 4812.", role="user")
    question = [user("What is my locker code?")]

    by_field = MPlus(user_id=alice, max_new_tokens=16).chat(question)  # the user_id field
    by_kwarg = llm.chat(question, user_id=bob)  # a per-call user_id overrides the field

    assert "4812" in (by_field.message.content or "")
    assert "4812" not in (by_kwarg.message.content or "")
    assert by_field.raw["user_id"] == alice and by_kwarg.raw["user_id"] == bob
    assert by_field.raw["memory_prefix_tokens"] > by_kwarg.raw["memory_prefix_tokens"]


def test_stream_complete_and_stream_chat(llm: MPlus) -> None:
    chunks = list(llm.stream_complete("Count from one to ten."))
    assert len(chunks) > 2
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text
    assert chunks[-1].raw["completion_tokens"] > 0

    chat_chunks = list(llm.stream_chat([user("Name three colours.")]))
    assert len(chat_chunks) > 2
    assert "".join(c.delta or "" for c in chat_chunks) == chat_chunks[-1].message.content


def test_async_methods_run_off_the_event_loop(llm: MPlus) -> None:
    async def main() -> tuple[int, str, list[str], str, list[str]]:
        ticks = 0
        running = True

        async def ticker() -> None:
            nonlocal ticks
            while running:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        reply = await llm.achat([user("Say hello.")], max_new_tokens=8)
        during_achat = ticks - before  # stays 0 if achat blocked the loop while decoding
        pieces = [c.delta or "" async for c in await llm.astream_chat([user("Name a fruit.")], max_new_tokens=8)]
        completion = await llm.acomplete("Name a planet.", max_new_tokens=8)
        stream = [c.delta or "" async for c in await llm.astream_complete("Name a river.", max_new_tokens=8)]
        running = False
        await task
        return during_achat, reply.message.content or "", pieces, completion.text, stream

    during_achat, text, pieces, completion, stream = asyncio.run(main())
    assert during_achat > 0
    assert text.strip() and completion.strip()
    assert len(pieces) > 1 and "".join(pieces).strip()
    assert len(stream) > 1 and "".join(stream).strip()


def test_earlier_tool_traffic_is_quoted_in_the_prompt(llm: MPlus) -> None:
    call = ToolCallBlock(tool_call_id="c1", tool_name="multiply", tool_kwargs={"a": 6, "b": 7})
    history = [
        user("What is 6 times 7?"),
        ChatMessage(role="assistant", blocks=[call]),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(role="assistant", content="6 times 7 is 42."),
        user("Thanks! And what was the result again?"),
    ]
    reply = llm.chat(history, max_new_tokens=12)
    assert reply.message.content and reply.raw["prompt_tokens"] > 40  # the earlier turn is in the prompt


def test_bad_input_is_a_clear_error(llm: MPlus) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        llm.chat([user("   ")])
    with pytest.raises(InvalidInputError, match="user message"):
        llm.chat([ChatMessage(role="system", content="Be brief.")])
    with pytest.raises(InvalidInputError):
        llm.chat([])
    with pytest.raises(InvalidInputError, match="LatentMemory"):
        llm.chat([user("hi")], memory="alice")
    with pytest.raises(InvalidInputError):
        llm.chat([user("hi")], user_id="")
