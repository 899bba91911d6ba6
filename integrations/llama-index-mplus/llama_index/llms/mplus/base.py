"""`MPlus`: a LlamaIndex function-calling LLM whose replies read a user's latent memory (mplus_agents).

The prompt holds only what LlamaIndex passes (usually a short recent window, see `MPlusMemory`); everything
older reaches the model through the user's `LatentMemory`, read as a key/value prefix during the first forward
pass. Which memory is read is decided per call, in this order: a `memory=` (a `LatentMemory`) or `user_id=`
keyword, the session id that `MPlusMemory.get()` stamps on the messages it returns, the `user_id` field, and
otherwise none (an empty memory). The LLM itself never writes memory: writing is `MPlusMemory.put`'s job (or
`LatentMemory.inject`), so a call can be retried or discarded without side effects.

Blocking work (memory read, decoding) runs in a worker thread for the async methods; streamed pieces cross to
the event loop through an `asyncio.Queue`, so the loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools.types import BaseTool
from llama_index.llms.mplus._loader import default_mplus_llm
from llama_index.llms.mplus.tools import (
    NAME_PREFIX,
    JsonObjectScanner,
    ToolSpec,
    call_prefix,
    closest_tool,
    match_tool_name,
    parse_tool_calls,
    render_call,
    render_tools,
)

from mplus_agents import InvalidInputError, LatentMemory, MPlusLLM
from mplus_agents.generation import SamplingConfig
from mplus_agents.model import Prompt

SESSION_KEY = "mplus_user_id"
"""`ChatMessage.additional_kwargs` key through which `MPlusMemory` tells `MPlus` whose memory to read."""

DEFAULT_CONTEXT_WINDOW = 8192
"""SmolLM2-135M's positions; memory prefix, prompt and reply share them."""

_ROLE_MAP = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}

T = TypeVar("T")


@dataclass
class _Plan:
    """Everything one call needs, decided before any model work starts (so bad input fails early)."""

    messages: list[dict[str, str]]
    memory: LatentMemory | None
    user_id: str | None
    sampling: SamplingConfig
    specs: list[ToolSpec] = field(default_factory=list)
    tools: list[BaseTool] = field(default_factory=list)
    forced: ToolSpec | None = None
    choose: bool = False
    allow_many: bool = False
    query_skip: int = 0
    """Leading tokens of the question (the tool list) that must not score long-term memory blocks."""


@dataclass
class _Outcome:
    """Filled in while a generation runs; complete once its piece iterator is exhausted."""

    text: str = ""
    calls: list[ToolCallBlock] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    memory_prefix_tokens: int = 0
    memory_retrieved_tokens: int = 0
    user_id: str | None = None

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def raw(self) -> dict[str, Any]:
        return {
            **self.usage(),
            "finish_reason": self.finish_reason,
            "memory_prefix_tokens": self.memory_prefix_tokens,
            "memory_retrieved_tokens": self.memory_retrieved_tokens,
            "user_id": self.user_id,
        }

    def message(self) -> ChatMessage:
        blocks: list[Any] = [TextBlock(text=self.text)] if self.text or not self.calls else []
        blocks.extend(self.calls)
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


class MPlus(FunctionCallingLLM):
    """LlamaIndex LLM over an `mplus_agents.MPlusLLM`; `MPlus()` uses the embedded SmolLM2-135M-Instruct.

    Every `MPlus()` built without `mplus_llm=` shares one process-wide model, so constructing many is cheap.
    """

    model_name: str = Field(default="", description="Reported in `metadata`; defaults to the model's name.")
    context_window: int = Field(
        default=DEFAULT_CONTEXT_WINDOW, gt=0, description="Positions shared by memory prefix, prompt and reply."
    )
    max_new_tokens: int = Field(default=256, ge=1, description="Reply length limit (`metadata.num_output`).")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k filtering.")
    seed: int | None = Field(default=None, description="Seeds sampling when temperature > 0.")
    stop: list[str] = Field(default_factory=list, description="Stop strings, cut from the reply.")
    user_id: str | None = Field(
        default=None,
        description="Whose latent memory is read when a call names none (keyword or MPlusMemory session).",
    )
    store: Any = Field(
        default=None,
        exclude=True,
        description="A mplus_agents MemoryStore: user memories are opened from and saved to it; None keeps "
        "them in this process.",
    )
    force_single_tool: bool = Field(
        default=True,
        description="With exactly one tool offered, prefill a call to it instead of letting the model decide "
        "(a 135M model almost never starts a call on its own).",
    )
    max_tool_rounds: int = Field(
        default=1,
        ge=0,
        description="Tool-call rounds per user message; after that many the tools are withheld and the model "
        "answers from the results (keeps a small model from calling tools forever).",
    )
    tool_call_max_tokens: int = Field(default=64, ge=4, description="Token budget of one generated tool call.")

    _llm: MPlusLLM = PrivateAttr()
    _memories: dict[str, tuple[Any, LatentMemory]] = PrivateAttr(default_factory=dict)
    _memories_lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, mplus_llm: MPlusLLM | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._llm = mplus_llm if mplus_llm is not None else default_mplus_llm()
        if not self.model_name:
            self.model_name = self._llm.name

    @classmethod
    def class_name(cls) -> str:
        return "MPlus"

    @property
    def mplus_llm(self) -> MPlusLLM:
        """The wrapped model (shared by every user; memories are per user)."""
        return self._llm

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            model_name=self.model_name,
            is_chat_model=True,
            is_function_calling_model=True,
        )

    # ------------------------------------------------------------------ memories

    def latent_memory(self, user_id: str, store: Any = None) -> LatentMemory:
        """`user_id`'s latent memory, opened once and then shared by every call and `MPlusMemory` of this LLM.

        `store` defaults to the `store` field; passing another store reopens the memory from it.
        """
        store = store if store is not None else self.store
        with self._memories_lock:
            cached = self._memories.get(user_id)
            if cached is not None and cached[0] is store:
                return cached[1]
            memory = self._llm.memory(user_id, store)
            self._memories[user_id] = (store, memory)
            return memory

    def _resolve_memory(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[LatentMemory | None, str | None]:
        memory = kwargs.pop("memory", None)
        user_id = kwargs.pop("user_id", None)
        if memory is not None:
            if not isinstance(memory, LatentMemory):
                raise InvalidInputError(f"memory= must be a mplus_agents LatentMemory, got {type(memory).__name__}")
            if memory.llm is not self._llm:
                raise InvalidInputError("memory= belongs to another MPlusLLM than this MPlus wraps")
            return memory, memory.user_id
        if user_id is None:
            for message in reversed(messages):
                tagged = message.additional_kwargs.get(SESSION_KEY)
                if isinstance(tagged, str):
                    user_id = tagged
                    break
        if user_id is None:
            user_id = self.user_id
        if user_id is None:
            return None, None
        return self.latent_memory(user_id), user_id

    # ------------------------------------------------------------------ prompt building

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingConfig:
        n = kwargs.pop("max_new_tokens", None) or kwargs.pop("max_tokens", None) or self.max_new_tokens
        stop = [*self.stop, *(kwargs.pop("stop", None) or [])]
        return SamplingConfig(
            max_new_tokens=int(n),
            temperature=float(kwargs.pop("temperature", self.temperature)),
            top_p=float(kwargs.pop("top_p", self.top_p)),
            top_k=int(kwargs.pop("top_k", self.top_k)),
            stop=tuple(stop),
            seed=kwargs.pop("seed", self.seed),
        )

    def _plan(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Plan:
        kwargs = dict(kwargs)
        if not messages:
            raise InvalidInputError("MPlus.chat() needs at least one message")
        messages = list(messages)
        if self.system_prompt and not any(m.role == MessageRole.SYSTEM for m in messages):
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        memory, user_id = self._resolve_memory(messages, kwargs)

        last_user = max((i for i, m in enumerate(messages) if m.role == MessageRole.USER), default=None)
        if last_user is None:
            raise InvalidInputError(
                "MPlus needs a user message to answer; got roles " + str([m.role.value for m in messages])
            )
        call_names = _tool_call_names(messages)
        converted = [_to_mplus(m, call_names) for m in messages[:last_user]]
        history = [m for m in converted if m is not None]
        question = _text(messages[last_user])
        if not question.strip():
            raise InvalidInputError("the user message is empty")
        tail = messages[last_user + 1 :]
        rounds = sum(1 for m in tail if m.role == MessageRole.ASSISTANT and _calls(m))
        results = [_result_line(m, call_names) for m in tail]
        results = [r for r in results if r]

        tools: list[BaseTool] = list(kwargs.pop("tools", None) or [])
        tool_required = bool(kwargs.pop("tool_required", False))
        tool_choice = kwargs.pop("tool_choice", None)
        allow_many = bool(kwargs.pop("allow_parallel_tool_calls", False))
        named: str | None = None
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            named = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        elif tool_choice in ("required", "any"):
            tool_required = True
        elif tool_choice == "none":
            tools = []
        elif isinstance(tool_choice, str) and tool_choice != "auto":
            named = tool_choice
        if rounds >= self.max_tool_rounds and not tool_required and named is None:
            tools = []  # answer from the results now

        specs = [ToolSpec.from_tool(t) for t in tools]
        forced: ToolSpec | None = None
        if specs:
            if named is not None:
                forced = match_tool_name(named, specs)
            elif len(specs) == 1 and (tool_required or self.force_single_tool):
                forced = specs[0]
        content = question
        if results:
            content += "\n\nTool results:\n" + "\n".join(results) + "\nUse these results to answer."
        query_skip = 0
        if specs:
            preamble = render_tools(specs) + "\n\n"
            content = preamble + content
            query_skip = len(self._llm.encode(preamble))
        plan = _Plan(
            messages=[*history, {"role": "user", "content": content}],
            memory=memory,
            user_id=user_id,
            sampling=self._sampling(kwargs),
            specs=specs,
            tools=tools,
            forced=forced,
            choose=bool(specs) and forced is None and (tool_required or named is not None),
            allow_many=allow_many,
            query_skip=query_skip,
        )
        return plan

    def _prompt(self, plan: _Plan, prefill: str = "") -> Prompt:
        pending = plan.memory.pending if plan.memory is not None else []
        prompt = self._llm.chat_prompt(plan.messages, pending, reply_prefix=prefill)
        if 0 < plan.query_skip < len(prompt.query_index):
            # Retrieval is driven by the user's words only, not by the tool list in front of them.
            prompt = Prompt(prompt.ids, prompt.query_index[plan.query_skip :])
        return prompt

    # ------------------------------------------------------------------ generation

    def _pieces(self, plan: _Plan, out: _Outcome) -> Iterator[str]:
        """Yield reply text as it is decoded; tool calls are collected whole into `out` instead."""
        out.user_id = plan.user_id
        if plan.choose:
            plan.forced = self._pick_tool(plan)
        if plan.forced is not None:
            self._forced_call(plan, plan.forced, out)
            return
        gen = self._llm.start(self._prompt(plan), plan.memory, plan.sampling)
        _usage(out, gen)
        text = ""
        if plan.specs:
            scanner: JsonObjectScanner | None = None
            for piece in gen.pieces:
                text += piece
                head = text.lstrip()
                if scanner is None and head.startswith(("{", "<tool_call>")):
                    scanner = JsonObjectScanner()
                if scanner is not None and scanner.feed(text):
                    break
            out.completion_tokens = len(gen.result.token_ids)
            out.text, out.calls = parse_tool_calls(text, plan.specs, plan.tools, allow_many=plan.allow_many)
            out.finish_reason = "tool_calls" if out.calls else gen.result.finish_reason
            return
        for piece in gen.pieces:
            text += piece
            yield piece
        out.text = text
        out.completion_tokens = len(gen.result.token_ids)
        out.finish_reason = gen.result.finish_reason

    def _pick_tool(self, plan: _Plan) -> ToolSpec:
        """Several tools, a call required: the model writes just the name after a prefilled `{"name": "`; a name
        that matches no tool maps to the most similar one, since a call is required."""
        sampling = SamplingConfig(max_new_tokens=16, stop=('"',))
        gen = self._llm.start(self._prompt(plan, NAME_PREFIX), plan.memory, sampling)
        name = "".join(gen.pieces)
        return closest_tool(name, plan.specs)

    def _forced_call(self, plan: _Plan, spec: ToolSpec, out: _Outcome) -> None:
        prefix = call_prefix(spec)
        text = prefix
        scanner = JsonObjectScanner()
        if not scanner.feed(text):
            sampling = SamplingConfig(
                max_new_tokens=self.tool_call_max_tokens,
                temperature=plan.sampling.temperature,
                top_p=plan.sampling.top_p,
                top_k=plan.sampling.top_k,
                seed=plan.sampling.seed,
            )
            gen = self._llm.start(self._prompt(plan, prefix), plan.memory, sampling)
            _usage(out, gen)
            for piece in gen.pieces:
                text += piece
                if scanner.feed(text):
                    break
            out.completion_tokens = len(gen.result.token_ids)
        blob = text[: scanner.end] if scanner.end is not None else text
        out.text, out.calls = parse_tool_calls(blob, plan.specs, plan.tools, allow_many=False)
        if out.calls:
            out.text = ""
            out.finish_reason = "tool_calls"
        else:
            out.text = text  # malformed: hand back what the model wrote, as plain text
            out.finish_reason = "length" if scanner.end is None else "stop"

    def _chat_responses(self, plan: _Plan) -> Generator[ChatResponse, None, None]:
        """Stream of chat chunks; the last one always carries the full message, tool calls and usage."""
        out = _Outcome()
        text = ""
        held: str | None = None
        for piece in self._pieces(plan, out):
            if held is not None:
                text += held
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=held)
            held = piece
        yield ChatResponse(message=out.message(), delta=held or "", raw=out.raw(), additional_kwargs=out.usage())

    def _completion_responses(self, plan: _Plan) -> Generator[CompletionResponse, None, None]:
        for chunk in self._chat_responses(plan):
            yield CompletionResponse(
                text=chunk.message.content or "",
                delta=chunk.delta,
                raw=chunk.raw,
                additional_kwargs=chunk.additional_kwargs,
            )

    def _chat_once(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        *_, last = self._chat_responses(self._plan(messages, kwargs))  # the final chunk holds the whole reply
        last.delta = None
        return last

    def _complete_once(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        chat = self._chat_once([_prompt_message(prompt)], kwargs)
        return CompletionResponse(
            text=chat.message.content or "", raw=chat.raw, additional_kwargs=chat.additional_kwargs
        )

    # ------------------------------------------------------------------ LlamaIndex LLM API (sync)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat_once(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_responses(self._plan(messages, kwargs))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete_once(prompt, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_responses(self._plan([_prompt_message(prompt)], kwargs))

    # ------------------------------------------------------------------ async: model work in a worker thread

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat_once, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _stream_in_thread(lambda: self._chat_responses(self._plan(messages, kwargs)))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete_once, prompt, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return _stream_in_thread(lambda: self._completion_responses(self._plan([_prompt_message(prompt)], kwargs)))

    # ------------------------------------------------------------------ function calling

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(_prompt_message(user_msg) if isinstance(user_msg, str) else user_msg)
        return {
            "messages": messages,
            "tools": list(tools),
            "tool_required": tool_required,
            "tool_choice": tool_choice,
            "allow_parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = _calls(response.message)
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, got the text reply {response.message.content!r}")
        selections = []
        for call in calls:
            args = call.tool_kwargs if isinstance(call.tool_kwargs, dict) else {}
            selections.append(
                ToolSelection(tool_id=call.tool_call_id or "", tool_name=call.tool_name, tool_kwargs=args)
            )
        return selections


# ---------------------------------------------------------------------- helpers


def _prompt_message(prompt: str) -> ChatMessage:
    if not isinstance(prompt, str):
        raise InvalidInputError(f"the prompt must be a str, got {type(prompt).__name__}")
    return ChatMessage(role=MessageRole.USER, content=prompt)


def _text(message: ChatMessage) -> str:
    return "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock))


def _calls(message: ChatMessage) -> list[ToolCallBlock]:
    return [b for b in message.blocks if isinstance(b, ToolCallBlock)]


def _tool_call_names(messages: Sequence[ChatMessage]) -> dict[str, str]:
    return {c.tool_call_id: c.tool_name for m in messages for c in _calls(m) if c.tool_call_id}


def _tool_name(message: ChatMessage, call_names: dict[str, str]) -> str:
    call_id = message.additional_kwargs.get("tool_call_id")
    name = message.additional_kwargs.get("name") or (call_names.get(call_id) if isinstance(call_id, str) else None)
    return str(name or "tool")


def _to_mplus(message: ChatMessage, call_names: dict[str, str]) -> dict[str, str] | None:
    """One earlier message as mplus_agents sees it; a tool call is written in the format the model is asked for."""
    text = _text(message)
    if message.role == MessageRole.TOOL or message.role == MessageRole.FUNCTION:
        return {"role": "tool", "content": f"{_tool_name(message, call_names)} returned: {text}"}
    calls = _calls(message)
    if calls:
        text = "\n".join([text, *(render_call(c.tool_name, c.tool_kwargs) for c in calls)]).strip()
    if not text.strip():
        return None
    return {"role": _ROLE_MAP.get(message.role, "user"), "content": text}


def _result_line(message: ChatMessage, call_names: dict[str, str]) -> str:
    """A message after the question (tool calls and results of this turn) as one line for the question."""
    text = _text(message).strip()
    if message.role in (MessageRole.TOOL, MessageRole.FUNCTION):
        return f"{_tool_name(message, call_names)} returned: {text}"
    if message.role == MessageRole.ASSISTANT and _calls(message):
        return ""  # the result line names the tool already
    return f"{message.role.value}: {text}" if text else ""


def _usage(out: _Outcome, gen: Any) -> None:
    out.prompt_tokens = int(gen.prompt_tokens)
    out.memory_prefix_tokens = int(gen.read.prefix_tokens)
    out.memory_retrieved_tokens = int(gen.read.retrieved_tokens)


_DONE = object()


def _stream_in_thread(make: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
    """Run a blocking iterator in a worker thread and hand its items to the event loop as they come.

    The iterator is created inside the thread (building it reads memory). Closing the async iterator early
    tells the worker to stop after its current item.
    """

    async def gen() -> AsyncGenerator[T, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any, error: BaseException | None = None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (item, error))
            except RuntimeError:  # the loop is gone: nobody is listening any more
                stop.set()

        def produce() -> None:
            try:
                for item in make():
                    if stop.is_set():
                        return
                    put(item)
            except BaseException as exc:
                put(_DONE, exc)
                return
            put(_DONE)

        worker = loop.run_in_executor(None, produce)
        try:
            while True:
                item, error = await queue.get()
                if item is _DONE:
                    if error is not None:
                        raise error
                    break
                yield item
            await worker
        finally:
            stop.set()

    return gen()
