"""Training text for `mplus train`: documents, segments and the questions asked about them (SPEC 5.4, scaled down).

A training file is plain UTF-8 text. Blank lines separate documents; every other line is one segment (a
chat turn, or a paragraph of prose) injected into memory on its own. A line that starts with `Q: ` is not
injected: it is a question about the segment just before it, asked later, after other text has pushed that
segment out of the short-term pool, so the retriever learns what chat needs (find the turn a question is
about). Every other segment also serves as a "next sentence" query whose related context is the segments
before it in the same document, as in M+ training (SPEC 5.2, 5.4).

Documents are interleaved (seeded): each segment's related context then sits among distractors from other
documents instead of being simply the newest memory, which a retriever could learn from recency alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mplus_agents.errors import InvalidInputError

QUESTION_PREFIX = "Q: "


@dataclass
class Segment:
    text: str
    questions: list[str] = field(default_factory=list)
    """Questions about this segment (the `Q: ` lines that follow it)."""


@dataclass
class Document:
    segments: list[Segment]


@dataclass(frozen=True)
class StreamItem:
    doc: int
    index: int
    """Position of the segment within its document."""
    segment: Segment


def parse_text(text: str) -> list[Document]:
    """Documents of a training file (see the module docstring for the format)."""
    docs: list[Document] = []
    current: list[Segment] = []
    for raw in [*text.splitlines(), ""]:
        line = raw.strip()
        if not line:
            if current:
                docs.append(Document(current))
                current = []
            continue
        if line.startswith(QUESTION_PREFIX) or line == QUESTION_PREFIX.strip():
            question = line[len(QUESTION_PREFIX) :].strip()
            if current and question:
                current[-1].questions.append(question)
            continue
        current.append(Segment(line))
    return docs


def read_files(paths: Sequence[str | Path]) -> list[Document]:
    """All documents of `paths`, with a clear error for missing, unreadable or empty files."""
    if not paths:
        raise InvalidInputError("no training files given")
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise InvalidInputError(f"no such training file: {path}")
        if path.is_dir():
            raise InvalidInputError(f"{path} is a directory; pass the text files in it")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        found = parse_text(text)
        if not found:
            raise InvalidInputError(f"{path} is empty or holds only whitespace")
        docs.extend(found)
    return docs


def interleave(docs: Sequence[Document], seed: int, open_docs: int = 4) -> Iterator[StreamItem]:
    """Segments of all documents, each document in order, up to `open_docs` documents mixed at a time."""
    rng = random.Random(f"interleave-{seed}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    waiting = iter(order)
    active: list[list[int]] = []  # [doc, next index]

    def refill() -> None:
        while len(active) < open_docs:
            nxt = next(waiting, None)
            if nxt is None:
                return
            active.append([nxt, 0])

    refill()
    while active:
        slot = active[rng.randrange(len(active))]
        doc, idx = slot
        yield StreamItem(doc, idx, docs[doc].segments[idx])
        slot[1] += 1
        if slot[1] >= len(docs[doc].segments):
            active.remove(slot)
            refill()
