"""Document QA two ways on the same model: latent memory (`MPlusQueryEngine`) versus `VectorStoreIndex`.

A few thousand tokens of synthetic staff profiles (generated here from a fixed seed; nothing is downloaded)
are injected once into a latent memory, and indexed for vector retrieval. Then the same questions go to both
query engines, which use the same `MPlus` LLM (the embedded SmolLM2-135M-Instruct):

- latent: the prompt holds only the question; the documents reach the model as a key/value memory prefix
  (short-term pool plus long-term blocks retrieved per question).
- vector: LlamaIndex's standard pipeline (SentenceSplitter, top-k similarity, compact synthesis) pastes the
  best chunks into the prompt. No embedding model can be downloaded here, so it uses a small deterministic
  hashing bag-of-words embedding defined below: lexical retrieval, which suits questions that name the
  person, as these do.

Printed side by side: each answer and whether it holds the expected fact (the expected string appears
anywhere in the answer, so a rambling answer that happens to contain it counts), latency, prompt size, build
time and memory held. Latencies on a shared CPU vary with load; compare the two columns of one run.
Run: `python3 examples/llamaindex_documents.py [--docs 24] [--questions 12]`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.bridge.pydantic import Field
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.core.node_parser import SentenceSplitter
from llama_index.llms.mplus import MPlus, MPlusQueryEngine

FIRST = [
    "Anika",
    "Bruno",
    "Celeste",
    "Dmitri",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kiri",
    "Lorenzo",
    "Maren",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Soren",
    "Tamsin",
    "Ugo",
    "Vera",
    "Wilhelm",
    "Yara",
]
LAST = [
    "Abara",
    "Brandt",
    "Castell",
    "Dufresne",
    "Eklund",
    "Ferreira",
    "Gallo",
    "Halvorsen",
    "Iwasaki",
    "Jovanovic",
    "Kowal",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Okafor",
    "Pereira",
    "Quist",
    "Rinaldi",
    "Sato",
    "Tanaka",
    "Urquhart",
    "Varga",
    "Weller",
    "Zubiri",
]
JOBS = [
    "glassblower",
    "cartographer",
    "beekeeper",
    "locksmith",
    "violin maker",
    "ferry pilot",
    "archivist",
    "baker",
    "surveyor",
    "clockmaker",
    "botanist",
    "bookbinder",
]
SITES = ["Harbor", "Northgate", "Willow Creek", "Redcliff", "Lakeside", "Old Mill"]
PETS = ["a parrot", "a tortoise", "two cats", "a greyhound", "a rabbit", "goldfish"]
FILLER = [
    "The team meets every Monday to plan the week and review open requests.",
    "Most of the year is spent on routine work, with a busy season in late spring.",
    "Visitors are welcome on the first Saturday of each month.",
    "The workshop keeps a shared calendar on the wall next to the kettle.",
    "Training for new colleagues usually takes about three weeks.",
    "Tools are checked and cleaned at the end of every shift.",
    "The canteen serves soup on Tuesdays and fish on Fridays.",
    "Safety notices are updated each quarter and posted at both entrances.",
    "Annual reviews happen in November, before the winter break.",
    "The site newsletter goes out by email on the last day of the month.",
    "Parking is limited, so most people arrive by bicycle or on the early bus.",
    "Spare aprons and gloves are kept in the grey cupboard by the stairs.",
    "Holiday requests should be made at least two weeks in advance.",
    "A first-aid kit hangs beside the main door and is restocked monthly.",
]


@dataclass(frozen=True)
class Question:
    text: str
    expected: str


def make_corpus(n_docs: int, seed: int = 7) -> tuple[list[Document], list[Question]]:
    """Staff profiles, one per document, each with a few unique facts wrapped in generic filler."""
    rng = random.Random(seed)
    people = list(zip(rng.sample(FIRST, n_docs), rng.sample(LAST, n_docs), strict=True))
    docs: list[Document] = []
    questions: list[Question] = []
    for first, last in people:
        name = f"{first} {last}"
        job, site, pet = rng.choice(JOBS), rng.choice(SITES), rng.choice(PETS)
        badge = str(rng.randint(1000, 9999))
        f = rng.sample(FILLER, 6)
        text = (
            f"Staff profile: {name}. {f[0]} {name} works as a {job} at the {site} site. {f[1]} {f[2]} "
            f"{first}'s badge number is {badge}. {f[3]} At home, {first} keeps {pet}. {f[4]} {f[5]}"
        )
        docs.append(Document(text=text, metadata={"profile": name}))
        questions += [
            Question(f"What is {name}'s badge number?", badge),
            Question(f"What does {name} work as?", job),
            Question(f"At which site does {name} work?", site),
        ]
    rng.shuffle(questions)
    return docs, questions


class HashingEmbedding(BaseEmbedding):
    """Deterministic bag-of-words embedding: hashed unigrams and bigrams, signed, sublinear tf, unit length.

    A stand-in for a real embedding model (none can be downloaded here); it retrieves by shared words.
    """

    dim: int = 1024

    @classmethod
    def class_name(cls) -> str:
        return "HashingEmbedding"

    def _embed(self, text: str) -> list[float]:
        words = [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in _STOP]
        vec = [0.0] * self.dim
        for feature in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            vec[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        vec = [math.copysign(math.log1p(abs(v)), v) for v in vec]
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed(text)


_STOP = {"a", "an", "the", "of", "at", "to", "in", "on", "and", "or", "is", "are", "as", "does", "do", "what", "which"}


class UsageRecorder(BaseEventHandler):
    """Keeps the usage MPlus reports on its last chat (prompt tokens, memory prefix) via instrumentation."""

    last: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "UsageRecorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None and isinstance(event.response.raw, dict):
            self.last = dict(event.response.raw)


@dataclass
class Answer:
    text: str
    correct: bool
    seconds: float
    prompt_tokens: int
    memory_tokens: int


def ask(engine: Any, question: Question, recorder: UsageRecorder) -> Answer:
    recorder.last = {}
    start = time.perf_counter()
    response = engine.query(question.text)
    seconds = time.perf_counter() - start
    text = " ".join(str(response).split())
    usage = recorder.last
    return Answer(
        text=text,
        correct=question.expected.lower() in text.lower(),
        seconds=seconds,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        memory_tokens=int(usage.get("memory_prefix_tokens", 0)),
    )


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=24, help="staff profiles to generate (at most 24)")
    parser.add_argument("--questions", type=int, default=12, help="questions to ask both engines")
    parser.add_argument("--top-k", type=int, default=2, help="chunks the vector engine pastes into the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    docs, questions = make_corpus(min(args.docs, len(FIRST)))
    questions = questions[: args.questions]
    llm = MPlus(max_new_tokens=args.max_new_tokens)
    recorder = UsageRecorder()
    get_dispatcher().add_event_handler(recorder)
    doc_tokens = sum(len(llm.mplus_llm.encode(d.text)) for d in docs)
    print(
        f"model: {llm.metadata.model_name} | {len(docs)} documents, {doc_tokens:,} tokens | {len(questions)} questions"
    )
    print("vector baseline embedding: offline hashing bag-of-words (no embedding model can be downloaded here)")

    # Latent memory: inject once.
    start = time.perf_counter()
    latent = MPlusQueryEngine.from_documents(docs, llm=llm, memory_id="example-staff-profiles", show_progress=True)
    latent_build = time.perf_counter() - start
    stats = latent.latent_memory.stats()

    # Vector index over the same documents, same LLM.
    Settings.llm = llm
    embed = HashingEmbedding()
    Settings.embed_model = embed
    splitter = SentenceSplitter(chunk_size=128, chunk_overlap=16, tokenizer=llm.mplus_llm.encode)
    start = time.perf_counter()
    index = VectorStoreIndex.from_documents(docs, embed_model=embed, transformations=[splitter])
    vector_build = time.perf_counter() - start
    vector = index.as_query_engine(llm=llm, similarity_top_k=args.top_k)
    nodes = list(index.docstore.docs.values())
    index_bytes = len(nodes) * embed.dim * 4 + sum(len(n.get_content().encode()) for n in nodes)

    rows: list[tuple[Question, Answer, Answer]] = []
    for i, q in enumerate(questions, 1):
        a = ask(latent, q, recorder)
        b = ask(vector, q, recorder)
        rows.append((q, a, b))
        print(f"[{i}/{len(questions)}] {q.text}  (expected: {q.expected})", file=sys.stderr)

    width = 44
    print()
    print(
        f"{'question':<44} {'expected':<13} | {'latent memory answer':<{width}} ok    s | "
        f"{'vector index answer':<{width}} ok    s"
    )
    print("-" * (44 + 13 + 2 * (width + 12) + 6))
    for q, a, b in rows:
        print(
            f"{clip(q.text, 44):<44} {clip(q.expected, 13):<13} | "
            f"{clip(a.text, width):<{width}} {'yes' if a.correct else 'no ':<3} {a.seconds:5.1f} | "
            f"{clip(b.text, width):<{width}} {'yes' if b.correct else 'no ':<3} {b.seconds:5.1f}"
        )

    def summary(pick: int) -> tuple[int, float, float, float]:
        answers = [r[pick] for r in rows]
        hits = sum(x.correct for x in answers)
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        return (
            hits,
            mean([x.seconds for x in answers]),
            mean([x.prompt_tokens for x in answers]),
            mean([x.memory_tokens for x in answers]),
        )

    la, va = summary(1), summary(2)
    n = len(rows)
    print()
    print(f"{'':<34} {'latent memory':>18} {'vector index':>18}")
    print(f"{'correct answers':<34} {f'{la[0]}/{n}':>18} {f'{va[0]}/{n}':>18}")
    print(f"{'mean latency per query (s)':<34} {la[1]:>18.2f} {va[1]:>18.2f}")
    print(f"{'mean prompt tokens per query':<34} {la[2]:>18.0f} {va[2]:>18.0f}")
    print(f"{'mean memory prefix tokens read':<34} {la[3]:>18.0f} {'0':>18}")
    print(f"{'build time (s)':<34} {latent_build:>18.1f} {vector_build:>18.2f}")
    print(f"{'held in memory':<34} {stats.bytes / 2**20:>15.1f} MB {index_bytes / 2**10:>15.1f} KB")
    print()
    print(
        f"latent memory: {stats.tokens_injected:,} tokens injected, {stats.pool_tokens:,} in the short-term pool, "
        f"{stats.long_term_tokens:,} long-term (per layer; keys and values for all 30 layers)"
    )
    print(
        f"vector index: {len(nodes)} chunks of <=128 tokens, top-{args.top_k} pasted into the prompt "
        f"(size = float32 embeddings of dim {embed.dim} + chunk text)"
    )


if __name__ == "__main__":
    main()
