"""With a persistent MemoryStore: the history saves each turn, and a later process (a new store object,
new history and model objects) reads the same window and the same latent memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from langchain_mplus import ChatMPlus, MPlusChatMessageHistory

pytestmark = pytest.mark.slow
pytest.importorskip("sqlalchemy")


def test_history_and_model_share_a_persistent_memory(tmp_path: Path, llm: Any) -> None:
    from mplus_agents.store import MemoryStore

    url = tmp_path / "memories.sqlite3"
    with MemoryStore(url) as store:
        history = MPlusChatMessageHistory("dana", llm=llm, store=store)
        history.add_messages([HumanMessage("My locker code is 4812."), AIMessage("Noted.")])
        history.add_messages([HumanMessage("I had soup for lunch."), AIMessage("Nice.")])
        assert store.history("dana")  # saved, not only held in this object

    with MemoryStore(url) as reopened:  # as a restarted process would
        window = MPlusChatMessageHistory("dana", llm=llm, store=reopened, window=2).messages
        assert [m.text for m in window] == ["I had soup for lunch.", "Nice."]
        reply = ChatMPlus(llm=llm, store=reopened, max_tokens=16).invoke(
            "What is my locker code?", config={"configurable": {"user_id": "dana"}}
        )
        memory = reply.response_metadata["latent_memory"]
        assert memory["user_id"] == "dana" and memory["tokens_injected"] > 0 and memory["pool_tokens"] > 0
        assert "4812" in reply.text
        MPlusChatMessageHistory("dana", llm=llm, store=reopened).clear()
        assert reopened.history("dana") == []
