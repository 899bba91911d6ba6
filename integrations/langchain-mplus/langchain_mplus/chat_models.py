"""`ChatMPlus`: a LangChain chat model over `MPlusLLM` that reads each user's latent memory.

The memory a call reads is chosen per call, from `config={"configurable": {"user_id": ...}}` (or a
`user_id=` call argument), never at construction, so one model object serves every user of a chain. In
langchain-core 1.7 a direct `model.invoke(x, config=...)` does not put `config` in the run-config context
variable (`ensure_config()` inside `_generate` sees an empty one); only runnables that wrap a child
(sequences, bindings, `RunnableWithMessageHistory`) set it. So the public entry points (`invoke`, `ainvoke`,
`stream`, `astream`) read the user id from their `config` and pass it down as a call argument, and
`_generate` falls back to the context variable for any other route. Without a user id the call reads an
empty memory.

Tool calls and JSON output are written by schema-guided staged prefill (guided.py) by default: the 135M
embedded model cannot be trusted to write a call that parses, but it writes good values when the structure
is written for it. `tool_call_mode="free"` lets a stronger model write whole calls, parsed by tools.py.
Model work never runs on the event loop: the async methods drive the same blocking generator in a worker
thread and hand chunks over through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import closing
from operator import itemgetter
from typing import Any, Literal, TypeVar

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, InvalidToolCall, ToolCall
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.pydantic import is_basemodel_subclass
from mplus_agents import LatentMemory, MPlusLLM
from mplus_agents.generation import SamplingConfig
from mplus_agents.model import Prompt
from pydantic import Field

from langchain_mplus._shared import default_llm, user_memory
from langchain_mplus.guided import GuidedError, guided_choice, guided_json
from langchain_mplus.messages import PromptPlan, to_prompt_plan
from langchain_mplus.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolRenderError,
    ToolSpec,
    new_call_id,
    parse_tool_calls,
    render_tools_instruction,
    to_tool_spec,
)

T = TypeVar("T")
ToolMode = Literal["guided", "free"]
_CALL_KWARGS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "user_id",
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stream",
        "ls_structured_output_format",
        "structured_output_format",
    }
)


class ChatMPlus(BaseChatModel):
    """A chat model with per-user latent long-term memory (M+), running locally.

    ```python
    from langchain_mplus import ChatMPlus

    model = ChatMPlus()  # the embedded SmolLM2-135M-Instruct, shared per process
    model.invoke("What is my locker code?", config={"configurable": {"user_id": "alice"}})
    ```
    """

    llm: MPlusLLM | None = Field(default=None, exclude=True)
    """The model. None: the embedded default, loaded once per process on first use and shared."""
    store: Any = Field(default=None, exclude=True)
    """A persistent `MemoryStore` the users' memories are opened from; None keeps them in this process."""
    user_id_key: str = "user_id"
    """The `config["configurable"]` key that names the user whose latent memory a call reads."""
    max_tokens: int = Field(default=256, gt=0)
    """Most tokens the model writes per call (all passes of a guided tool call together)."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 decodes greedily (reproducible); above 0 samples."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass when sampling."""
    stop: list[str] | None = None
    """Default stop strings for plain-text replies; the reply is cut before the first one."""
    seed: int | None = None
    """Seed of the sampler, for reproducible sampled replies."""
    tool_call_mode: ToolMode = "guided"
    """`guided`: we write the call's structure and the model only its values (always parses; made for
    small models). `free`: the model writes whole calls, parsed afterwards (one pass; for strong models)."""
    streaming: bool = False
    """Kept for LangChain compatibility; tokens reach callbacks whether or not this is set."""

    # ------------------------------------------------------------------ identity

    @property
    def _llm_type(self) -> str:
        return "mplus"

    def resolved_llm(self) -> MPlusLLM:
        """The model this object runs: `llm`, or the shared embedded default."""
        return self.llm if self.llm is not None else default_llm()

    @property
    def model_name(self) -> str:
        return self.resolved_llm().name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "tool_call_mode": self.tool_call_mode,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="mplus",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        ls_stop = stop or self.stop
        if ls_stop:
            params["ls_stop"] = list(ls_stop)
        return params

    # ------------------------------------------------------------------ user routing

    def _route(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "user_id" in kwargs:
            return kwargs
        user = ensure_config(config).get("configurable", {}).get(self.user_id_key)
        return {**kwargs, "user_id": user} if user is not None else kwargs

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return super().invoke(input, config, stop=stop, **self._route(config, kwargs))

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **self._route(config, kwargs))

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, stop=stop, **self._route(config, kwargs))

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        async for chunk in super().astream(input, config, stop=stop, **self._route(config, kwargs)):
            yield chunk

    # ------------------------------------------------------------------ LangChain hooks

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._prepare(messages, stop, kwargs)
        with closing(call.chunks()) as chunks:
            for chunk in chunks:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return ChatResult(generations=[ChatGeneration(message=call.message())])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, kwargs)
        with closing(call.chunks()) as chunks:
            for chunk in chunks:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = await _in_thread(lambda: self._prepare(messages, stop, kwargs))
        async for chunk in _drain_in_thread(call.chunks()):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return ChatResult(generations=[ChatGeneration(message=call.message())])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = await _in_thread(lambda: self._prepare(messages, stop, kwargs))
        async for chunk in _drain_in_thread(call.chunks()):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ tools and structured output

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Render `tools` into the prompt and parse calls into `AIMessage.tool_calls`.

        `tool_choice`: None/"auto" (the model decides; the 135M default model rarely calls unprompted),
        "none", "any"/"required"/True (a call is forced; the model picks the tool), or a tool name (that tool
        is forced by prefilling its call). A reply holds at most one call.
        """
        specs = _tool_specs(tools)
        choice = _normalise_choice(tool_choice, [s.name for s in specs])
        formatted = [
            {"type": "function", "function": {"name": s.name, "description": s.description, "parameters": s.parameters}}
            for s in specs
        ]
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Structured output by a forced tool call (`function_calling`) or by guided JSON content
        (`json_schema`; `json_mode` too, guided by `schema` when one is given). `strict` is accepted for
        compatibility: guided decoding always follows the schema's structure."""
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        llm: Runnable[LanguageModelInput, Any]
        parser: Runnable[Any, Any]
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            spec = to_tool_spec(schema)
            llm = self.bind_tools([schema], tool_choice=spec.name, ls_structured_output_format=ls_format)
            if is_pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=spec.name, first_tool_only=True)
        elif method in ("json_mode", "json_schema"):
            if schema is None and method == "json_schema":
                raise ValueError("method='json_schema' needs a schema")
            if schema is None:
                response_format: dict[str, Any] = {"type": "json_object"}
            else:
                spec = to_tool_spec(schema)
                response_format = {"type": "json_schema", "json_schema": {"name": spec.name, "schema": spec.parameters}}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"method must be function_calling, json_mode or json_schema, got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    # ------------------------------------------------------------------ one call

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Call:
        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise ValueError(
                f"ChatMPlus got unsupported call arguments {sorted(unknown)}; accepted: {sorted(_CALL_KWARGS)}"
            )
        llm = self.resolved_llm()
        model = kwargs.get("model")
        if model is not None and model != llm.name:
            raise ValueError(f"ChatMPlus runs {llm.name!r}; it cannot switch to model={model!r} per call")
        specs = _tool_specs(kwargs.get("tools") or [])
        choice = _normalise_choice(kwargs.get("tool_choice"), [s.name for s in specs]) if specs else "none"
        if choice == "none":
            specs = []
        response_format = kwargs.get("response_format")
        schema, json_mode = _response_schema(response_format)
        if json_mode and specs:
            raise ValueError("response_format and tools cannot be used in the same call")
        instructions: str | None
        if json_mode:
            instructions = (
                "Reply with one JSON object that follows this JSON schema: "
                + json.dumps(schema, ensure_ascii=False)
                if schema
                else "Reply with one JSON object and nothing else."
            )
        else:
            instructions = render_tools_instruction(specs) if specs else None
        plan = to_prompt_plan(messages, instructions)
        user_id = kwargs.get("user_id")
        if user_id is None:
            user_id = ensure_config().get("configurable", {}).get(self.user_id_key)
        memory = user_memory(llm, user_id, self.store) if user_id is not None else None
        sampling = SamplingConfig(
            max_new_tokens=int(kwargs.get("max_tokens", self.max_tokens)),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            stop=tuple(stop if stop is not None else (self.stop or ())),
            seed=kwargs.get("seed", self.seed),
        )
        return _Call(
            llm=llm,
            memory=memory,
            user_id=user_id,
            plan=plan,
            sampling=sampling,
            specs=specs,
            choice=choice,
            schema=schema,
            json_mode=json_mode,
            mode=self.tool_call_mode,
        )


class _Call:
    """One reply: possibly several model passes (guided values), one message. Implements `guided.Runner`."""

    def __init__(
        self,
        *,
        llm: MPlusLLM,
        memory: LatentMemory | None,
        user_id: str | None,
        plan: PromptPlan,
        sampling: SamplingConfig,
        specs: list[ToolSpec],
        choice: str,
        schema: dict[str, Any] | None,
        json_mode: bool,
        mode: ToolMode,
    ) -> None:
        self.llm = llm
        self.memory = memory
        self.user_id = user_id
        self.plan = plan
        self.sampling = sampling
        self.specs = {s.name: s for s in specs}
        self.choice = choice
        self.schema = schema
        self.json_mode = json_mode
        self.mode = mode
        self.base = llm.chat_prompt(plan.messages, list(memory.pending) if memory is not None else [])
        self.content = ""
        self.tool_calls: list[ToolCall] = []
        self.invalid_tool_calls: list[InvalidToolCall] = []
        self.output_tokens = 0
        self.input_tokens = 0
        self.passes = 0
        self.read = {"prefix_tokens": 0, "sink_tokens": 0, "pool_tokens": 0, "retrieved_tokens": 0}
        self.truncated = False
        self._final: AIMessageChunk | None = None

    # ------------------------------------------------------------------ guided.Runner

    @property
    def remaining(self) -> int:
        return max(0, self.sampling.max_new_tokens - self.output_tokens)

    def run(self, prefill: str, max_new_tokens: int, stop: Sequence[str] = ()) -> Generator[str, None, None]:
        budget = min(max_new_tokens, self.remaining)
        if budget <= 0:
            self.truncated = True
            return
        text = self.plan.prefill + prefill
        ids = self.base.ids
        if text:
            ids = torch.cat([ids, torch.tensor(self.llm.encode(text), dtype=torch.long)])
        sampling = SamplingConfig(
            max_new_tokens=budget,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            stop=tuple(stop),
            seed=self.sampling.seed,
        )
        gen = self.llm.start(Prompt(ids=ids, query_index=self.base.query_index), self.memory, sampling)
        self.passes += 1
        self.input_tokens += gen.prompt_tokens + gen.read.prefix_tokens
        for key in self.read:
            self.read[key] += int(getattr(gen.read, key))
        try:
            yield from gen.pieces
            if gen.result.finish_reason == "length":
                self.truncated = True
        finally:
            self.output_tokens += len(gen.result.token_ids)

    # ------------------------------------------------------------------ the reply

    def chunks(self) -> Generator[ChatGenerationChunk, None, None]:
        if self.json_mode:
            yield from self._json_content()
        elif self.specs and self.choice != "auto":
            self._call("", None if self.choice == "any" else self.choice)
        else:
            yield from self._text(watch_calls=bool(self.specs))
        yield ChatGenerationChunk(message=self._final_chunk())

    def _text(self, watch_calls: bool) -> Iterator[ChatGenerationChunk]:
        acc = ""
        emitted = 0
        found = -1
        with closing(self.run("", self.remaining, self.sampling.stop)) as pieces:
            for piece in pieces:
                acc += piece
                safe = len(acc)
                if watch_calls:
                    found = acc.find(TOOL_CALL_OPEN)
                    if found != -1:
                        safe = found
                    else:
                        safe -= _partial_suffix(acc, TOOL_CALL_OPEN)
                if safe > emitted:
                    yield _text_chunk(acc[emitted:safe])
                    emitted = safe
                if found != -1:
                    break
        if found == -1:
            if len(acc) > emitted:
                yield _text_chunk(acc[emitted:])
            self.content = acc
            return
        self.content = acc[:found]
        self._call(acc[:found], None)

    def _call(self, prefix: str, forced: str | None) -> None:
        names = list(self.specs)
        if self.mode == "free":
            self._free_call(prefix, forced, names)
            return
        head = prefix + TOOL_CALL_OPEN + '{"name": '
        name = forced
        try:
            if name is None:
                name = guided_choice(self, head, names)
            head += json.dumps(name, ensure_ascii=False) + ', "arguments": '
            args_text = "".join(guided_json(self, head, self.specs[name].parameters))
            self.tool_calls.append(tool_call(name=name, args=json.loads(args_text), id=new_call_id()))
        except GuidedError as exc:
            self.invalid_tool_calls.append(
                invalid_tool_call(name=name, args=exc.partial, id=new_call_id(), error=str(exc))
            )

    def _free_call(self, prefix: str, forced: str | None, names: list[str]) -> None:
        opening = TOOL_CALL_OPEN
        if forced is not None:
            opening += '{"name": ' + json.dumps(forced, ensure_ascii=False) + ', "arguments": '
        written = ""
        with closing(self.run(prefix + opening, self.remaining)) as pieces:
            for piece in pieces:
                written += piece
                end = written.find(TOOL_CALL_CLOSE)
                if end != -1:
                    written = written[: end + len(TOOL_CALL_CLOSE)]
                    break
        parsed = parse_tool_calls(opening + written, names)
        if parsed.tool_calls:
            self.tool_calls.append(parsed.tool_calls[0])  # one call per reply, as in guided mode
        elif parsed.invalid_tool_calls:
            self.invalid_tool_calls.append(parsed.invalid_tool_calls[0])
        else:
            self.invalid_tool_calls.append(
                invalid_tool_call(name=forced, args=written, id=new_call_id(), error="no call was written")
            )

    def _json_content(self) -> Iterator[ChatGenerationChunk]:
        schema = self.schema or {"type": "object"}
        try:
            for fragment in guided_json(self, "", schema):
                self.content += fragment
                yield _text_chunk(fragment)
        except GuidedError as exc:
            rest = exc.partial[len(self.content) :]
            self.content += rest
            self.truncated = True
            if rest:
                yield _text_chunk(rest)

    # ------------------------------------------------------------------ results

    def usage(self) -> UsageMetadata:
        return UsageMetadata(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
            input_token_details={  # type: ignore[typeddict-unknown-key]
                "latent_memory_sink": self.read["sink_tokens"],
                "latent_memory_pool": self.read["pool_tokens"],
                "latent_memory_retrieved": self.read["retrieved_tokens"],
            },
        )

    def response_metadata(self) -> dict[str, Any]:
        if self.truncated:
            finish = "length"
        elif self.tool_calls:
            finish = "tool_calls"
        else:
            finish = "stop"
        memory: dict[str, Any] = {"user_id": self.user_id, "passes": self.passes, **self.read}
        if self.memory is not None:
            stats = self.memory.stats()
            memory["tokens_injected"] = stats.tokens_injected
            memory["long_term_tokens"] = stats.long_term_tokens
        else:
            memory["tokens_injected"] = 0
            memory["long_term_tokens"] = 0
        return {"model_name": self.llm.name, "finish_reason": finish, "latent_memory": memory}

    def _final_chunk(self) -> AIMessageChunk:
        chunks = [
            tool_call_chunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i)
            for i, c in enumerate(self.tool_calls)
        ]
        chunks += [
            tool_call_chunk(name=c.get("name"), args=c.get("args"), id=c.get("id"), index=len(chunks) + i)
            for i, c in enumerate(self.invalid_tool_calls)
        ]
        self._final = AIMessageChunk(
            content="",
            tool_call_chunks=chunks,
            usage_metadata=self.usage(),
            response_metadata=self.response_metadata(),
            chunk_position="last",
        )
        return self._final

    def message(self) -> AIMessage:
        """The whole reply; strict about tool calls (a cut-off call stays invalid, unlike chunk merging)."""
        final = self._final if self._final is not None else self._final_chunk()
        return AIMessage(
            content=self.content,
            tool_calls=list(self.tool_calls),
            invalid_tool_calls=list(self.invalid_tool_calls),
            usage_metadata=final.usage_metadata,
            response_metadata=dict(final.response_metadata),
        )


# ---------------------------------------------------------------------- helpers


def _text_chunk(text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could still grow into `marker` (held back while streaming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _tool_specs(tools: Sequence[Any]) -> list[ToolSpec]:
    """Specs in order; the same tool given twice (e.g. a pydantic class and its JSON schema) counts once."""
    specs: dict[str, ToolSpec] = {}
    for tool in tools:
        spec = to_tool_spec(tool)
        seen = specs.get(spec.name)
        if seen is None:
            specs[spec.name] = spec
        elif seen.render() != spec.render():
            raise ToolRenderError(f"two different tools are named {spec.name!r}; tool names must be unique")
    return list(specs.values())


def _normalise_choice(choice: Any, names: list[str]) -> str:
    """'auto', 'none', 'any' or a bound tool's name."""
    if choice is None or choice == "auto":
        return "auto"
    if choice is True or choice in ("any", "required"):
        return "any"
    if choice is False or choice == "none":
        return "none"
    name = None
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if not isinstance(name, str):
        raise ValueError(f"tool_choice must be 'auto', 'none', 'any', a tool name or a dict naming one; got {choice!r}")
    if name not in names:
        raise ValueError(f"tool_choice names {name!r}, which is not a bound tool ({', '.join(names) or 'none bound'})")
    return name


def _response_schema(response_format: Any) -> tuple[dict[str, Any] | None, bool]:
    """(JSON schema or None, whether the reply is JSON) from an OpenAI-style `response_format`."""
    if response_format is None:
        return None, False
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError("response_format type json_schema needs json_schema.schema")
        return dict(schema), True
    if kind == "text":
        return None, False
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


async def _in_thread(func: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(None, ctx.run, func)


_DONE = object()


async def _drain_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Run a blocking iterator in a worker thread; items reach the event loop through an asyncio queue.

    If the consumer stops early (break, cancellation), the worker is told to stop and closes the iterator at
    its next item, which ends the model's decode loop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, Any]] = asyncio.Queue()
    cancel = threading.Event()
    ctx = contextvars.copy_context()

    def post(kind: object, item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop closed under us: nobody is listening any more
            cancel.set()

    def worker() -> None:
        try:
            with closing(iterator):  # type: ignore[type-var]
                for item in iterator:
                    if cancel.is_set():
                        return
                    post(None, item)
        except BaseException as exc:
            post(exc, None)
        else:
            post(_DONE, None)

    future = loop.run_in_executor(None, ctx.run, worker)
    finished = False
    try:
        while True:
            kind, item = await queue.get()
            if kind is _DONE:
                finished = True
                break
            if isinstance(kind, BaseException):
                finished = True
                raise kind
            yield item
    finally:
        cancel.set()
        if finished:
            await future
