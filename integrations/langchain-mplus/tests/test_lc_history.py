"""MPlusChatMessageHistory: turns go into latent memory, the prompt keeps a short window, and a
RunnableWithMessageHistory chain answers from memory what its window no longer holds."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import ConfigurableFieldSpec
from langchain_core.runnables.history import RunnableWithMessageHistory

from langchain_mplus import ChatMPlus, MPlusChatMessageHistory

pytestmark = pytest.mark.slow


def fresh(user_id: str, **kwargs: Any) -> MPlusChatMessageHistory:
    history = MPlusChatMessageHistory(user_id, **kwargs)
    history.clear()
    return history


def test_turns_are_injected_and_only_a_window_is_kept(llm: Any) -> None:
    history = fresh("lc-hist-window")
    before = history.memory.stats().tokens_injected
    history.add_messages([HumanMessage("My cat is called Miso."), AIMessage("Nice name!")])
    history.add_messages([HumanMessage("I live in Porto."), AIMessage("Porto is lovely.")])
    history.add_messages([HumanMessage("I play the cello."), AIMessage("Great.")])
    assert history.memory.stats().tokens_injected > before
    assert [m.text for m in history.messages] == ["I live in Porto.", "Porto is lovely.", "I play the cello.", "Great."]
    # Another history object for the same user (RunnableWithMessageHistory makes one per turn) sees the same.
    assert MPlusChatMessageHistory("lc-hist-window").messages == history.messages
    assert history.memory is llm.memory("lc-hist-window")


def test_system_and_empty_messages_are_not_remembered() -> None:
    history = fresh("lc-hist-skip", window=10)
    history.add_messages([SystemMessage("You are terse."), HumanMessage("Hello"), AIMessage("")])
    assert [m.type for m in history.messages] == ["human"]
    injected = history.memory.stats().tokens_injected
    history.add_messages([SystemMessage("You are terse.")])
    assert history.memory.stats().tokens_injected == injected


def test_tool_turns_are_remembered_as_text() -> None:
    history = fresh("lc-hist-tools", window=2)
    call = AIMessage("", tool_calls=[{"name": "get_weather", "args": {"location": "Oslo"}, "id": "c9"}])
    history.add_messages([HumanMessage("Weather in Oslo?"), call, ToolMessage("rain", tool_call_id="c9", name="w")])
    window = history.messages
    assert [m.type for m in window] == ["ai", "chat"]
    assert window[0].text.startswith("<tool_call>") and window[1].text == "Result of w: rain"
    assert history.memory.stats().tokens_injected > 0


def test_remember_only_what_the_user_said() -> None:
    history = fresh("lc-hist-user-only", remember=("user",))
    history.add_messages([HumanMessage("My cat is called Miso."), AIMessage("A good idea!")])
    assert [m.text for m in history.messages] == ["My cat is called Miso."]
    assert [t.role for t in history.memory.history()] == ["user"]
    with pytest.raises(ValueError, match="remember"):
        MPlusChatMessageHistory("lc-hist-user-only", remember=("narrator",))


def test_clear_forgets_window_and_memory() -> None:
    history = fresh("lc-hist-clear")
    history.add_messages([HumanMessage("Remember the number 77.")])
    history.clear()
    assert history.messages == [] and history.memory.stats().tokens_injected == 0


def test_bad_user_ids_and_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="user_id"):
        MPlusChatMessageHistory("")
    with pytest.raises(ValueError, match="window"):
        MPlusChatMessageHistory("lc-hist-bad", window=-1)


@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_round_trip_with_runnable_with_message_history() -> None:
    user_id = "lc-hist-chain"
    fresh(user_id)
    prompt = ChatPromptTemplate.from_messages(
        [MessagesPlaceholder("history"), ("human", "{input}")]
    )
    chain = RunnableWithMessageHistory(
        prompt | ChatMPlus(max_tokens=12),
        lambda user_id: MPlusChatMessageHistory(user_id),
        input_messages_key="input",
        history_messages_key="history",
        history_factory_config=[
            ConfigurableFieldSpec(id="user_id", annotation=str, name="User id", description="whose memory", default="")
        ],
    )
    config = {"configurable": {"user_id": user_id}}
    chain.invoke({"input": "My locker code is 4812."}, config=config)
    for filler in ("I had pasta for lunch.", "The weather is mild today.", "I am reading a novel."):
        chain.invoke({"input": filler}, config=config)
    window = MPlusChatMessageHistory(user_id).messages
    assert len(window) == 4 and all("4812" not in m.text for m in window)  # the fact left the prompt...
    answer = chain.invoke({"input": "What is my locker code?"}, config=config)
    assert answer.response_metadata["latent_memory"]["user_id"] == user_id
    assert "4812" in answer.text  # ...and came back from latent memory
