"""Hooks attached to an unmodified Hugging Face model, always removed on exit (DESIGN 4, STYLE: kvpress).

Two kinds: capturing the pre-RoPE keys and values a forward pass computes (the `input` source's new memory),
and a per-layer pre-hook that sees each decoder layer's input before the layer runs (retrieval in that
layer, and the `output` source's re-inserted memory rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from mplus_agents.hf.arch import Arch

LayerPreHook = Callable[[int, torch.Tensor], torch.Tensor | None]
"""(layer index, input hidden states [1, T, d]) -> replacement hidden states or None to keep them."""
LayerPostHook = Callable[[int, torch.Tensor], None]
"""(layer index, output hidden states [1, T, d]) -> None."""


@contextmanager
def capture_kv(arch: Arch) -> Iterator[tuple[list[torch.Tensor | None], list[torch.Tensor | None]]]:
    """Yield per-layer lists that a forward pass fills with pre-RoPE keys and values [T, kv_heads, head_dim]."""
    shapes = arch.shapes
    keys: list[torch.Tensor | None] = [None] * shapes.layers
    values: list[torch.Tensor | None] = [None] * shapes.layers
    handles: list[RemovableHandle] = []

    def store(target: list[torch.Tensor | None], layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            target[layer] = output[0].reshape(-1, shapes.kv_heads, shapes.head_dim)

        return hook

    try:
        for layer in range(shapes.layers):
            handles.append(arch.key_module(layer).register_forward_hook(store(keys, layer)))
            handles.append(arch.value_module(layer).register_forward_hook(store(values, layer)))
        yield keys, values
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def layer_hooks(
    arch: Arch, pre: LayerPreHook | None = None, post: LayerPostHook | None = None
) -> Iterator[None]:
    """Run `pre` before and `post` after every decoder layer of one forward pass."""
    handles: list[RemovableHandle] = []

    def make_pre(layer: int) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            assert pre is not None
            replaced = pre(layer, hidden)
            if replaced is None:
                return None
            if args:
                return (replaced, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replaced}

        return hook

    def make_post(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            assert post is not None
            post(layer, output[0] if isinstance(output, tuple) else output)

        return hook

    try:
        for layer, module in enumerate(arch.layers):
            if pre is not None:
                handles.append(module.register_forward_pre_hook(make_pre(layer), with_kwargs=True))
            if post is not None:
                handles.append(module.register_forward_hook(make_post(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
