"""Named LoRA adapters on a stock Hugging Face model, switched per thread (SPEC 2.1, 7.1; DESIGN 8.8).

M+ carries two adapters on the same linears: `default` (the update adapter, active while a chunk is
injected) and `decoder_adapter` (the generation adapter, active for reading memory and decoding). We do not
depend on peft and do not replace any module: each target linear gets a forward hook that adds
`scale * B_a(A_a(x))` for the active adapter `a`, so module names, the attention backend and every other
hook stay stock.

The active adapter is per thread: an injection switches to the update adapter for its own pass while a
decode step of another user, running concurrently without the model's hook lock, keeps the generation
adapter. Outside any `use(...)` block the generation adapter is active, because every plain forward of the
model (reads, decode steps) is a generation forward.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

UPDATE = "default"
"""PEFT's name for M+'s update adapter (used while injecting)."""
GENERATE = "decoder_adapter"
"""PEFT's name for M+'s generation adapter (used while reading memory and decoding)."""


def _key(target: str) -> str:
    """Parameter names cannot contain dots; module paths do."""
    return target.replace(".", "/")


class LoRA(nn.Module):
    """Low-rank adapters, several per target linear, one active at a time (per thread).

    `lora_A[adapter][target]` is [r, in_features] and `lora_B[adapter][target]` is [out_features, r], as PEFT
    stores them; the adapter adds `scale * x @ A.T @ B.T`, scale = alpha / r (alpha / sqrt(r) with rsLoRA).
    Dropout is never applied: this module serves inference.
    """

    def __init__(self, r: int, alpha: float, *, rslora: bool = False, generate: str = GENERATE) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r = r
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.generate = generate
        """Adapter active outside `use(...)`: the generation adapter, or the only adapter there is."""
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.targets: list[str] = []
        self._local = threading.local()
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ contents

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    @classmethod
    def create(
        cls,
        model: nn.Module,
        r: int = 16,
        alpha: float = 32.0,
        *,
        targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
        adapters: tuple[str, ...] = (UPDATE, GENERATE),
        seed: int = 0,
    ) -> LoRA:
        """Fresh trainable adapters on every linear whose name ends in one of `targets` (M+'s set by
        default), initialised as PEFT does (A Kaiming-uniform, B zero: the model starts unchanged), attached."""
        lora = cls(r, alpha, generate=GENERATE if GENERATE in adapters else adapters[0])
        gen = torch.Generator().manual_seed(seed)
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets:
                w = module.weight
                bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                for adapter in adapters:
                    a = (torch.rand(r, module.in_features, generator=gen) * 2 - 1) * bound
                    b = torch.zeros(module.out_features, r)
                    lora.add(adapter, path, a.to(w.device, w.dtype), b.to(w.device, w.dtype), trainable=True)
        if not lora.targets:
            raise ValueError(f"no Linear named {targets} in {type(model).__name__}")
        lora.attach(model)
        return lora

    def add(self, adapter: str, target: str, a: torch.Tensor, b: torch.Tensor, *, trainable: bool = False) -> None:
        """Register one adapter's A [r, in] and B [out, r] for the linear at module path `target`."""
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.r or b.shape[1] != self.r:
            raise ValueError(
                f"LoRA {adapter!r} on {target}: A {tuple(a.shape)} and B {tuple(b.shape)} do not have rank {self.r}"
            )
        for table, value in ((self.lora_A, a), (self.lora_B, b)):
            if adapter not in table:
                table[adapter] = nn.ParameterDict()
            params: Any = table[adapter]
            params[_key(target)] = nn.Parameter(value, requires_grad=trainable)
        if target not in self.targets:
            self.targets.append(target)

    def weights(self, adapter: str, target: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of `adapter` on `target`, or None when that adapter does not touch it."""
        if adapter not in self.lora_A:
            return None
        a_table: Any = self.lora_A[adapter]
        if _key(target) not in a_table:
            return None
        b_table: Any = self.lora_B[adapter]
        return a_table[_key(target)], b_table[_key(target)]

    def delta(self, adapter: str, target: str) -> torch.Tensor | None:
        """scale * B @ A [out, in]: what merging `adapter` into the target's weight adds."""
        ab = self.weights(adapter, target)
        return None if ab is None else self.scale * (ab[1] @ ab[0])

    # ------------------------------------------------------------------ switching

    @property
    def active(self) -> str | None:
        """The adapter this thread's forwards use (None: the bare base model)."""
        return getattr(self._local, "name", self.generate)  # type: ignore[no-any-return]

    @contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Make `adapter` (or no adapter) active for this thread inside the block."""
        if adapter is not None and adapter not in self.lora_A:
            raise KeyError(f"no LoRA adapter {adapter!r}; this model has {self.adapters}")
        before = self.active
        self._local.name = adapter
        try:
            yield
        finally:
            self._local.name = before

    # ------------------------------------------------------------------ hooks

    def attach(self, model: nn.Module) -> None:
        """Hook every target linear of `model`. Call once, after the adapters are added."""
        if self._handles:
            raise RuntimeError("this LoRA is already attached to a model")
        for target in self.targets:
            module = model.get_submodule(target)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoRA target {target} is a {type(module).__name__}, not a Linear")
            self._handles.append(module.register_forward_hook(self._hook(target)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, target: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            adapter = self.active
            ab = None if adapter is None else self.weights(adapter, target)
            if ab is None:
                return None
            x = args[0]
            return output + self.scale * F.linear(F.linear(x.to(ab[0].dtype), ab[0]), ab[1]).to(output.dtype)

        return hook
