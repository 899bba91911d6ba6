"""Splitting injected text into chunks (SPEC 3.3, DESIGN 8.7).

Chunks have at most `chunk_size` tokens and, when the text allows, at least `min_chunk`: a short tail is
merged with the chunk before it and the pair split evenly, so nothing is out of the length range M+ was
trained on. Text shorter than `min_chunk` as a whole stays one short chunk; the caller decides what to do.
"""

from __future__ import annotations


def split_chunks(ids: list[int], chunk_size: int, min_chunk: int) -> list[list[int]]:
    if chunk_size < 1 or min_chunk < 1 or min_chunk > chunk_size:
        raise ValueError(f"bad chunk sizes: chunk_size={chunk_size}, min_chunk={min_chunk}")
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    if len(chunks) >= 2 and len(chunks[-1]) < min_chunk:
        merged = chunks[-2] + chunks[-1]
        half = (len(merged) + 1) // 2
        chunks[-2:] = [merged[:half], merged[half:]]
    return chunks
