"""Shared fixtures: tiny random models built from a config, and the embedded SmolLM2 (session-scoped)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from mplus_agents import MPlusLLM


class CharTokenizer:
    """A tiny byte-level tokenizer so random models need no files; no chat template (plain frame)."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + (b % 60) for b in text.encode()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i > 2)


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smol() -> MPlusLLM:
    return MPlusLLM.from_default()


@pytest.fixture(scope="session")
def smol_tokenizer(smol: MPlusLLM) -> AutoTokenizer:
    return smol.tokenizer
