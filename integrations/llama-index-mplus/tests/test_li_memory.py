"""`MPlusMemory`: short window in the prompt, every turn in latent memory; recall through SimpleChatEngine."""

from __future__ import annotations

import uuid

import pytest
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import ChatMessage, MockLLM
from llama_index.llms.mplus import SESSION_KEY, MPlus
from llama_index.memory.mplus import MPlusMemory

from mplus_agents import InvalidInputError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> MPlus:
    return MPlus(max_new_tokens=24)


def session() -> str:
    return f"li-mem-{uuid.uuid4().hex}"


def msg(role: str, text: str) -> ChatMessage:
    return ChatMessage(role=role, content=text)


def test_window_stamps_and_turn_writes(llm: MPlus) -> None:
    memory = MPlusMemory.from_defaults(session_id=session(), llm=llm, window=2)
    latent = memory.latent_memory
    assert latent is llm.latent_memory(memory.session_id)  # the LLM reads the very memory we write

    memory.put(msg("user", "I keep my bike in the red shed."))
    assert latent.stats().tokens_injected == 0  # a question is written with its answer, not before it
    memory.put(msg("assistant", "Noted: the red shed."))
    written = latent.stats().tokens_injected
    assert written > 0

    memory.put(msg("user", "What's for dinner?"))
    window = memory.get()
    assert [m.content for m in window] == ["Noted: the red shed.", "What's for dinner?"]
    assert all(m.additional_kwargs[SESSION_KEY] == memory.session_id for m in window)
    assert all(SESSION_KEY not in m.additional_kwargs for m in memory.get_all())  # stamps are on copies
    assert len(memory.get_all()) == 3

    memory.flush()  # an unanswered question is written on demand
    assert latent.stats().tokens_injected > written

    memory.reset()  # a new conversation: the window goes, long-term memory stays
    assert memory.get() == [] and latent.stats().tokens_injected > written
    memory.reset(latent=True)
    assert latent.stats().tokens_injected == 0


def test_set_writes_only_what_is_new(llm: MPlus) -> None:
    memory = MPlusMemory.from_defaults(session_id=session(), llm=llm)
    history = [msg("user", "My cat is called Miso."), msg("assistant", "Miso is a lovely name.")]
    memory.set(history)
    after_first = memory.latent_memory.stats().tokens_injected
    assert after_first > 0
    memory.set(history)  # same history again: nothing new to write
    assert memory.latent_memory.stats().tokens_injected == after_first
    memory.set([*history, msg("user", "I also have a dog."), msg("assistant", "Two pets!")])
    assert memory.latent_memory.stats().tokens_injected > after_first


def test_memory_needs_the_mplus_llm() -> None:
    with pytest.raises(InvalidInputError, match="MPlus"):
        MPlusMemory.from_defaults(session_id=session(), llm=MockLLM())
    with pytest.raises(InvalidInputError, match="unexpected"):
        MPlusMemory.from_defaults(session_id=session(), colour="blue")


def test_chat_engine_builds_it_as_memory_cls(llm: MPlus) -> None:
    engine = SimpleChatEngine.from_defaults(llm=llm, memory_cls=MPlusMemory)
    assert isinstance(engine._memory, MPlusMemory)


def test_chat_engine_recalls_a_fact_from_many_turns_ago(llm: MPlus) -> None:
    memory = MPlusMemory.from_defaults(session_id=session(), llm=llm, window=4)
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)
    engine.chat("My locker code is 4812. Please remember it.")
    small_talk = [
        ("I had pasta for lunch today.", "Sounds tasty!"),
        ("The weather is rainy here.", "Stay dry!"),
        ("I am reading a novel about sailors.", "Enjoy the book!"),
        ("My sister visits next week.", "That will be nice."),
        ("I started learning the guitar.", "Great hobby!"),
        ("Work was busy this morning.", "Take a break soon."),
        ("We might repaint the kitchen.", "Fun project."),
        ("The train was late again.", "How annoying."),
    ]
    for said, answered in small_talk:  # earlier conversation, as the engine would have stored it
        memory.put(msg("user", said))
        memory.put(msg("assistant", answered))
    assert all("4812" not in (m.content or "") for m in memory.get())  # not in the prompt window

    answer = str(engine.chat("What is my locker code?"))
    assert "4812" in answer
