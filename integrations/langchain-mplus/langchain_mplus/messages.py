"""LangChain messages -> the message list `MPlusLLM.chat_prompt` frames (framing.py, model.py).

`chat_prompt` quotes every earlier message as one `role: text` line inside the memory's user turn and puts
the last user message in the question frame (MEASURED.md: this model uses earlier turns only when they are
quoted that way). So the LangChain list is reshaped, never extended: the last human message is the question;
tool calls and results that follow it are quoted ahead of it like every other earlier message (the model
then answers the human with the results in front of it); a trailing AI message becomes a prefill that the
reply continues. Only text is read; image, audio and file blocks are refused with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_mplus.tools import render_call

_SKIPPED_BLOCKS = frozenset(
    {"tool_use", "tool_call", "tool_call_chunk", "invalid_tool_call", "reasoning", "thinking", "server_tool_call"}
)
"""Content blocks that carry no text for the prompt (tool calls are read from `AIMessage.tool_calls`)."""
_CHAT_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
}


@dataclass(frozen=True)
class PromptPlan:
    messages: list[dict[str, str]]
    """For `MPlusLLM.chat_prompt`: roles system/user/assistant, ending with the user's question."""
    prefill: str
    """Text the assistant's reply starts with (a trailing AIMessage); the reply continues it."""


def message_text(message: BaseMessage) -> str:
    content: Any = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            kind = block.get("type")
            if kind == "text":
                parts.append(str(block.get("text", "")))
            elif kind in _SKIPPED_BLOCKS:
                continue
            else:
                raise ValueError(
                    f"ChatMPlus reads text only: a {message.type} message holds a {kind!r} content block"
                )
        else:
            raise ValueError(f"unsupported content block {type(block).__name__} in a {message.type} message")
    return "".join(parts)


def role_and_text(message: BaseMessage) -> tuple[str, str]:
    if isinstance(message, SystemMessage):
        return "system", message_text(message)
    if isinstance(message, HumanMessage):
        return "user", message_text(message)
    if isinstance(message, AIMessage):
        text = message_text(message)
        calls = [render_call(c["name"], c["args"]) for c in message.tool_calls]
        calls += [render_call(c.get("name") or "unknown", c.get("args") or "{}") for c in message.invalid_tool_calls]
        return "assistant", " ".join(p for p in [text.strip(), *calls] if p)
    if isinstance(message, ToolMessage):
        failed = " (error)" if message.status == "error" else ""
        return "tool", f"Result of {message.name or 'the tool'}{failed}: {_tool_content(message)}"
    if isinstance(message, FunctionMessage):
        return "tool", f"Result of {message.name}: {message_text(message)}"
    if isinstance(message, ChatMessage):
        role = _CHAT_ROLES.get(message.role.lower())
        if role is None:
            raise ValueError(f"ChatMessage role {message.role!r} is not one of {sorted(_CHAT_ROLES)}")
        return role, message_text(message)
    raise ValueError(
        f"ChatMPlus cannot read a {type(message).__name__} (type {message.type!r}); "
        "use System/Human/AI/Tool/Function/ChatMessage"
    )


def _tool_content(message: ToolMessage) -> str:
    try:
        return message_text(message)
    except ValueError:
        # Tool results with non-text blocks (images...) are summarised rather than refused: the call happened.
        return json.dumps(message.content, ensure_ascii=False, default=str)[:2000]


def to_prompt_plan(messages: Sequence[BaseMessage], instructions: str | None = None) -> PromptPlan:
    """Reshape a LangChain message list for `chat_prompt`; raises ValueError with the reason when it cannot."""
    if not messages:
        raise ValueError("ChatMPlus needs at least one message")
    entries = [role_and_text(m) for m in messages]
    last_user = max((i for i, (role, _) in enumerate(entries) if role == "user"), default=-1)
    if last_user == -1:
        raise ValueError("ChatMPlus needs a human message to answer; the messages hold none")
    question = entries[last_user][1]
    if not question.strip():
        raise ValueError("the last human message is empty")
    tail = entries[last_user + 1 :]
    prefill = ""
    if tail and tail[-1][0] == "assistant" and "<tool_call>" not in tail[-1][1]:
        prefill = tail[-1][1]
        tail = tail[:-1]
    before: list[dict[str, str]] = []
    if instructions:
        before.append({"role": "system", "content": instructions})
    # Calls and results after the question are quoted ahead of it, like any other excerpt: measured on
    # SmolLM2, "excerpts, then the question" answers from the result where a question with the result
    # appended drifts (e.g. into writing code for an adder tool).
    for role, text in [*entries[:last_user], *tail]:
        if not text.strip():
            continue
        before.append({"role": "user" if role == "tool" else role, "content": text})
    return PromptPlan(messages=[*before, {"role": "user", "content": question}], prefill=prefill)
