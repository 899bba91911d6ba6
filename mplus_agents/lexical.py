"""Lexical evidence for long-term retrieval: BM25 over the words that memory blocks were made from.

Why: on the embedded 135M model the training-free latent scorer ranks the right block in its top 16 most of
the time but rarely in its top 5, and the model only answers from a short prefix (DESIGN 9: text RAG with five
turns beats full context). Exact word overlap between a question and a turn is the signal text RAG lives on,
and the `input` source has it for free: every memory token is one injected token, so each can carry the id of
the word it belongs to. The `hybrid` scorer adds BM25 over those word ids (per retrieval block, documents =
blocks) to the latent score; the model still reads the blocks' keys and values, never re-encoded text.

Words are rebuilt from tokens with a per-vocabulary table (does this token start a word, its lowercase
alphanumeric text), so "Locker" split as "L"+"ocker" and "locker" split as "lock"+"er" become the same word.
Word ids are a stable 63-bit hash of the word (never Python's salted `hash`), so they persist with the memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

WORD_START_MARKS = ("Ġ", "▁", " ", "Ċ", "\n", "\t")
"""How byte-level BPE (Ġ, Ċ) and SentencePiece (▁) tokenizers mark a token that begins after whitespace."""

BM25_K1 = 1.2
BM25_B = 0.75


def word_hash(word: str) -> int:
    """Stable positive 63-bit id of a word (0 is reserved for "no word")."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") >> 1 or 1


@dataclass(frozen=True)
class Lexicon:
    """Per-vocabulary facts needed to rebuild words from token ids."""

    starts_word: torch.Tensor
    """[vocab] bool: the token begins a new word (whitespace mark, or it is not alphanumeric)."""
    text: tuple[str, ...]
    """Lowercase alphanumeric text of each token ("" for punctuation, whitespace and special tokens)."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> Lexicon:
        """Built from token strings when the tokenizer exposes them (HF), else from decoding each id alone."""
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else vocab_size
        if vocab is None:
            raise ValueError("cannot tell the tokenizer's vocabulary size; pass vocab_size")
        has_pieces = hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "convert_tokens_to_string")
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab))) if has_pieces else [None] * vocab
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        starts, texts = [], []
        for i, piece in enumerate(pieces):
            if has_pieces:
                raw = tokenizer.convert_tokens_to_string([piece]) if piece else ""
                marked = bool(piece) and piece.startswith(WORD_START_MARKS)
            else:
                raw = tokenizer.decode([i])
                marked = raw[:1].isspace()
            alnum = "".join(c for c in raw.lower() if c.isalnum())
            if i in special or not alnum:
                texts.append("")
                starts.append(True)
                continue
            texts.append(alnum)
            # A whitespace mark starts a word; so does a token with inner punctuation ("'s", "-based").
            starts.append(marked or not raw.strip().isalnum())
        return cls(torch.tensor(starts, dtype=torch.bool), tuple(texts))

    def word_ids(self, ids: list[int]) -> torch.Tensor:
        """[len(ids)] int64: at the first token of each word its id, 0 elsewhere (so counts are word counts)."""
        out = [0] * len(ids)
        start, word = 0, ""

        def close(end: int) -> None:
            if word and start < end:
                out[start] = word_hash(word)

        for i, tid in enumerate(ids):
            text = self.text[tid] if 0 <= tid < len(self.text) else ""
            if not text:
                close(i)
                start, word = i + 1, ""
                continue
            if bool(self.starts_word[tid]) and word:
                close(i)
                start, word = i, ""
            word += text
        close(len(ids))
        return torch.tensor(out, dtype=torch.int64)


def bm25_block_scores(query_words: torch.Tensor, words: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """BM25 of every candidate token's block against the query's words; [n] float32, one value per block.

    query_words: word ids of the question (0s ignored, repeats counted once); words, blocks: [n] per candidate
    token, as `Lexicon.word_ids` makes them (a word's id on its first token only). Documents are blocks, their
    length their number of words.
    """
    n = words.numel()
    q = torch.unique(query_words[query_words != 0])
    if n == 0 or q.numel() == 0:
        return torch.zeros(n, dtype=torch.float32, device=words.device)
    ids, inverse = torch.unique(blocks, return_inverse=True)
    n_blocks = ids.numel()
    match = (words.unsqueeze(1) == q.to(words.device).unsqueeze(0)).float()  # [n, |q|]
    tf = torch.zeros(n_blocks, q.numel(), dtype=torch.float32, device=words.device).index_add_(0, inverse, match)
    length = torch.zeros(n_blocks, dtype=torch.float32, device=words.device).index_add_(
        0, inverse, (words != 0).float()
    )
    df = (tf > 0).sum(dim=0).float()
    idf = torch.log((n_blocks - df + 0.5) / (df + 0.5) + 1.0)
    norm = BM25_K1 * (1 - BM25_B + BM25_B * length / length.mean().clamp(min=1.0))
    per_block = (idf * tf * (BM25_K1 + 1) / (tf + norm.unsqueeze(1))).sum(dim=1)
    return per_block[inverse]
