"""A long-running LangChain assistant whose past lives in latent memory, not in its prompt.

The chain is `RunnableWithMessageHistory(prompt | ChatMPlus(), MPlusChatMessageHistory)`: every turn is
injected into the user's latent memory and the prompt holds only the last few messages. The user states a
fact at turn 3, the script then plays filler turns (small talk generated from templates, answered by the
model), and the last turn asks for the fact. Each turn prints the prompt size (the part the model reads as
text, which stays flat) beside the memory it reads (which grows).

    python examples/langchain_assistant.py                 # 200 turns, as in the issue (~10-20 min on 2 cores)
    python examples/langchain_assistant.py --turns 12      # a quick run
    python examples/langchain_assistant.py --store sqlite:///assistant.db   # persistent memory (MemoryStore)

Needs `pip install -e integrations/langchain-mplus` (see the README).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from typing import Any

import torch
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import ConfigurableFieldSpec
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_mplus import ChatMPlus, MPlusChatMessageHistory, default_llm

# langchain-core 1.x recommends LangGraph persistence over RunnableWithMessageHistory; the history class works
# with both, and this example shows the classic chain.
warnings.filterwarnings("ignore", message="RunnableWithMessageHistory is deprecated")

FACT = "By the way, my locker code at the gym is 4812."
QUESTION = "What is my locker code at the gym?"
ANSWER = "4812"

_SUBJECTS = ["my sister", "our neighbour", "my manager", "a friend from school", "my cousin", "the baker downstairs"]
_ACTIVITIES = [
    "went hiking near the river",
    "baked a lemon cake",
    "watched an old western",
    "repaired a bicycle",
    "planted tomatoes",
    "tried a new noodle place",
    "painted the kitchen",
    "read a book about volcanoes",
]
_WHEN = ["yesterday", "last weekend", "this morning", "on Tuesday", "a few days ago"]
_ASKS = [
    "What do you think about that?",
    "Any tips for next time?",
    "Is that a good idea?",
    "Have you heard of something like that?",
    "What would you suggest?",
]


def filler(rng: random.Random) -> str:
    """Small talk that never mentions lockers, gyms or codes."""
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_ACTIVITIES)} {rng.choice(_WHEN)}. {rng.choice(_ASKS)}"


def build_chain(model: ChatMPlus, window: int, store: Any, remember: tuple[str, ...]) -> RunnableWithMessageHistory:
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{input}")])
    return RunnableWithMessageHistory(
        prompt | model,
        lambda user_id: MPlusChatMessageHistory(user_id, store=store, window=window, remember=remember),
        input_messages_key="input",
        history_messages_key="history",
        history_factory_config=[
            ConfigurableFieldSpec(id="user_id", annotation=str, name="User id", description="whose memory", default="")
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200, help="total turns, the last one asks for the fact")
    parser.add_argument("--fact-turn", type=int, default=3)
    parser.add_argument("--window", type=int, default=4, help="recent messages kept in the prompt")
    parser.add_argument("--max-tokens", type=int, default=20, help="longest reply, in tokens")
    parser.add_argument("--user", default="langchain-assistant-demo")
    parser.add_argument("--store", default=None, help="MemoryStore URL (default: memory lives in this process)")
    parser.add_argument(
        "--remember-replies", action="store_true",
        help="also inject the assistant's replies (the 135M model then parrots its own earlier replies)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.turns <= args.fact_turn:
        parser.error("--turns must be larger than --fact-turn")

    if args.threads:
        torch.set_num_threads(args.threads)
    store = None
    if args.store:
        from mplus_agents.store import MemoryStore

        store = MemoryStore(args.store)
    llm = default_llm()
    model = ChatMPlus(llm=llm, store=store, max_tokens=args.max_tokens)
    MPlusChatMessageHistory(args.user, llm=llm, store=store).clear()  # start from an empty memory
    remember = ("user", "assistant") if args.remember_replies else ("user",)
    chain = build_chain(model, args.window, store, remember)
    config: Any = {"configurable": {"user_id": args.user}}
    rng = random.Random(args.seed)

    print(f"{'turn':>4} {'prompt':>6} {'memory':>6} {'injected':>8} {'s':>5}  exchange")
    prompt_sizes: list[int] = []
    started = time.time()
    reply_text = ""
    for turn in range(1, args.turns + 1):
        if turn == args.fact_turn:
            message = FACT
        elif turn == args.turns:
            message = QUESTION
        else:
            message = filler(rng)
        t0 = time.time()
        reply = chain.invoke({"input": message}, config=config)
        memory = reply.response_metadata["latent_memory"]
        prompt_tokens = reply.usage_metadata["input_tokens"] - memory["prefix_tokens"] if reply.usage_metadata else 0
        prompt_sizes.append(prompt_tokens)
        reply_text = reply.text.strip().replace("\n", " ")
        print(
            f"{turn:>4} {prompt_tokens:>6} {memory['prefix_tokens']:>6} {memory['tokens_injected']:>8} "
            f"{time.time() - t0:>5.1f}  {message[:48]!r} -> {reply_text[:60]!r}",
            flush=True,
        )

    recalled = ANSWER in reply_text
    print()
    print(f"turns: {args.turns}, fact at turn {args.fact_turn}, window: {args.window} messages, "
          f"{time.time() - started:.0f} s")
    print(f"prompt tokens per turn: min {min(prompt_sizes)}, max {max(prompt_sizes)} (flat: the past is in memory)")
    print(f"question: {QUESTION!r}")
    print(f"answer:   {reply_text!r}")
    print(f"recalled the fact from turn {args.fact_turn}: {'YES' if recalled else 'NO'}")
    return 0 if recalled else 1


if __name__ == "__main__":
    sys.exit(main())
