"""Training text for the retriever (`mplus train`), generated here, disjoint from the recall benchmark's facts.

Each document is one synthetic chat in `mplus_agents.training.data`'s format: user turns, one per line; a
personal fact turn is followed by a `Q: ` line asking about it. The relations, question wordings and slot
values are this file's own: none of `conversation.py`'s 21 fact templates (locker code, job, sister's city,
dog, ...) or value pools is used, and `check_disjoint` verifies that no answer of the recall benchmark's
facts (any seed used there) appears anywhere in the generated text. Filler turns come from
`conversation.filler_turns` with seeds the recall benchmark does not use (1000+), so the retriever learns
to find a fact among chat like the benchmark's without ever seeing the benchmark's facts.

    python benchmarks/train_data.py --out /tmp/retriever_data --docs 24 --seed 1000
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conversation import Conversation, filler_turns  # noqa: E402

SUBJECTS = ["geology", "Latin", "statistics", "pottery", "astronomy", "economics", "carpentry", "ethics"]
COLOURS = ["teal", "mustard yellow", "burgundy", "lavender", "olive green", "coral", "indigo", "charcoal"]
FLOWERS = ["peonies", "dahlias", "snowdrops", "foxgloves", "irises", "marigolds", "camellias", "hollyhocks"]
STONES = ["opal", "garnet", "amethyst", "topaz", "onyx", "jasper", "malachite", "peridot"]
STREETS = ["Alder Lane", "Foundry Street", "Quarry Road", "Heron Close", "Mill Walk", "Orchard Row",
           "Beacon Hill", "Tanner Street"]
SURNAMES = ["Okafor", "Brennan", "Sorensen", "Albright", "Kowalczyk", "Marchetti", "Yamada", "Fitzgerald",
            "Ramires", "Halvorsen", "Dubois", "Ashworth"]
FIRST = ["Wilhelmina", "Bartholomew", "Philippa", "Cornelius", "Henrietta", "Ignatius", "Seraphina", "Augustin",
         "Rosamund", "Florian", "Gwendolyn", "Percival"]
FRUITS = ["persimmons", "gooseberries", "quinces", "lychees", "damsons", "kumquats", "pomegranates", "figs"]
BIRDS = ["kingfisher", "woodpecker", "goldfinch", "heron", "wren", "nightjar", "kestrel", "skylark"]
COMPOSERS = ["Sibelius", "Dvořák", "Satie", "Mahler", "Vivaldi", "Rachmaninoff", "Debussy", "Janáček"]
PAINTERS = ["Vermeer", "Hokusai", "Turner", "Klimt", "Magritte", "Kahlo", "Hopper", "Cézanne"]
GAMES = ["backgammon", "mahjong", "Scrabble", "bridge", "dominoes", "cribbage", "Go", "canasta"]
BOATS = ["Sea Sparrow", "Little Auk", "Driftwood", "Blue Jay", "Morning Star", "Kittiwake"]
ISLANDS = ["Madeira", "Gotland", "Skye", "Crete", "Corsica", "Zanzibar", "Hokkaido", "Tasmania"]
RIVERS = ["Danube", "Loire", "Shannon", "Douro", "Vltava", "Tagus", "Elbe", "Severn"]
MAGAZINES = ["Birdwatch Monthly", "The Clay Journal", "Orbit Weekly", "Garden Notes", "Rail Review"]
TREES = ["a walnut tree", "a silver birch", "a cherry tree", "an old oak", "a magnolia", "a rowan"]
PLANTS = ["a fiddle-leaf fig", "a cactus", "a bonsai", "an orchid", "a lemon tree", "a monstera"]
TOOLS = ["a lathe", "a soldering iron", "a sewing machine", "a telescope", "a loom", "a kiln"]
CARS2 = ["Renault", "Skoda", "Peugeot", "Mazda", "Toyota", "Kia"]
DRINKS = ["chai", "rooibos", "matcha", "espresso", "hot chocolate", "ginger beer"]


def _code(rng: random.Random, digits: int = 4) -> str:
    while True:
        c = "".join(rng.choice("0123456789") for _ in range(digits))
        if c[0] != "0" and not c.startswith(("19", "20")) and len(set(c)) > 2:
            return c


def make_facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """(statement, question, answer) for every relation, values drawn by `rng`."""
    c = rng.choice
    items = [
        (f"My bike lock combination is {(v := _code(rng))}.", "What is the combination for my bike lock?", v),
        (f"I teach {(v := c(SUBJECTS))} at the evening college twice a week.", "Which subject do I teach?", v),
        (f"The front door of our house is painted {(v := c(COLOURS))}.", "What colour is our front door?", v),
        (f"My grandmother grows {(v := c(FLOWERS))} in her front garden.", "What does my gran plant by her house?", v),
        (f"My engagement ring has a small {(v := c(STONES))} in it.", "Which gem is in my engagement ring?", v),
        (f"We live at number {rng.randint(3, 97)} {(v := c(STREETS))}.", "What street is our house on?", v),
        (f"My dentist is Dr. {(v := c(SURNAMES))}, she is very gentle.", "Who is my dentist?", v),
        (f"My best friend from university is called {(v := c(FIRST))}.", "What's the name of my old uni friend?", v),
        (f"I can't stand {(v := c(FRUITS))}, they taste like soap to me.", "Which fruit do I dislike?", v),
        (f"Last spring a {(v := c(BIRDS))} built a nest on our balcony.", "What bird nested at our place?", v),
        (f"My favourite composer is {(v := c(COMPOSERS))}.", "Whose music do I love most?", v),
        (f"There is a print by {(v := c(PAINTERS))} above our fireplace.", "Which artist's print hangs at home?", v),
        (f"Every Sunday we play {(v := c(GAMES))} with the neighbours.", "What game do we play on Sundays?", v),
        (f"My father's sailing boat is called the {(v := c(BOATS))}.", "What is the name of Dad's boat?", v),
        (f"We spent our honeymoon on {(v := c(ISLANDS))}.", "Where did we go on honeymoon?", v),
        (f"I grew up in a town on the {(v := c(RIVERS))}.", "Which river is my childhood town on?", v),
        (f"I subscribe to {(v := c(MAGAZINES))}.", "Which magazine do I get every month?", v),
        (f"The pin for my bank card is {(v := _code(rng))}, don't tell anyone.", "What is my card PIN?", v),
        (f"My landlord's name is {(v := c(FIRST))} {c(SURNAMES)}.", "Who do I rent my flat from?", v),
        (f"In our back yard there is {(v := c(TREES))} that my grandfather planted.", "What tree is in the yard?",
         v.split(" ", 1)[1]),
        (f"On my desk at work I keep {(v := c(PLANTS))}.", "Which plant sits on my office desk?", v.split(" ", 1)[1]),
        (f"For my birthday I got {(v := c(TOOLS))} from my partner.", "What was my birthday present?",
         v.split(" ", 1)[1]),
        (f"My first car was a rusty {(v := c(CARS2))}.", "What make was my very first car?", v),
        (f"Every afternoon I drink a cup of {(v := c(DRINKS))}.", "What do I have every afternoon?", v),
        (f"My employee number is {(v := _code(rng, 5))}.", "What is my staff ID?", v),
        (f"My nephew is turning {(v := str(rng.randint(5, 17)))} next month.", "How old will my nephew be?", v),
    ]
    return items


def recall_answers(seeds: range = range(0, 20)) -> set[str]:
    """Every answer string of the recall benchmark's facts for the seeds it may run with."""
    return {a.lower() for s in seeds for f in Conversation(seed=s, n_facts=20).facts for a in f.answers}


RECALL_ANSWERS = frozenset(a for a in recall_answers() if len(a) > 3)


def make_document(seed: int, n_facts: int, filler: int) -> list[str]:
    """One chat: a few filler turns, facts (each followed by its question) spread among filler."""
    rng = random.Random(f"train-doc-{seed}")
    facts = rng.sample(make_facts(rng), n_facts)
    forbidden = [a for _, _, a in facts] + sorted(RECALL_ANSWERS)
    turns = filler_turns(1000 + seed, forbidden)
    lines: list[str] = []
    slots = sorted(rng.sample(range(filler), n_facts))
    j = 0
    for i in range(filler):
        while j < len(slots) and slots[j] == i:
            statement, question, _ = facts[j]
            lines += [statement, f"Q: {question}"]
            j += 1
        lines.append(next(turns))
    return lines


def check_disjoint(text: str) -> None:
    low = text.lower()
    clash = sorted(a for a in RECALL_ANSWERS if a in low)
    if clash:
        raise AssertionError(f"training text contains recall-benchmark answers: {clash[:10]}")


def write_corpus(out: Path, docs: int, seed: int, n_facts: int = 8, filler: int = 60) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join("\n".join(make_document(seed + i, n_facts, filler)) for i in range(docs)) + "\n"
    check_disjoint(text)
    path = out / f"chat_{seed}_{docs}.txt"
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--seed", type=int, default=1000, help="first document seed (recall uses seeds < 20)")
    p.add_argument("--facts", type=int, default=8, help="facts per document")
    p.add_argument("--filler", type=int, default=60, help="filler turns per document")
    a = p.parse_args()
    path = write_corpus(a.out, a.docs, a.seed, a.facts, a.filler)
    print(path)


if __name__ == "__main__":
    main()
