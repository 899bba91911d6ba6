"""Synthetic personal-assistant chat for the recall and cost benchmarks (DESIGN 9): no downloads, seeded.

A user states a handful of personal facts once, early, in natural first-person turns, and then talks about
everything else for as long as the benchmark wants. Each fact comes with a question and gold answer strings
scored by case-insensitive substring match.

Why it is built this way:
- Slot values (codes, names, cities, jobs...) are drawn from pools by the seed, so a model cannot have
  memorised the answers and `no_memory` stays a floor.
- Some questions share no content word with their statement ("What is my job?" vs "I work as a
  glassblower"); MEASURED.md shows that is exactly where lexical RAG misses, so `Fact.lexical_overlap` marks
  them and the benchmarks report them separately.
- Filler is drawn from many templates and a large vocabulary, and it deliberately reuses the questions'
  words in unrelated sentences ("the gym was packed", "my sister sent me a video", "I reset my email
  password"), so BM25 has to rank and cannot just match any turn with the word "gym". A filler turn that
  happens to contain any gold answer string is rejected, so a hit can only come from the fact's own turn.
- The stream is one infinite, deterministic sequence of turns: the history of N tokens is a prefix of the
  history of M > N tokens, which lets the latent system inject once and be asked at every length.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

_STOPWORD_TEXT = """a about all also am an and any are as at be been but by can did do does for from get go had has
have how i in is it its just me my of on or our so some that the their them there this to up was we were what
when where which who why will with would you your every most one"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens, the BM25 baseline's tokenizer (no stemming: "grew" never matches "grow")."""
    return re.findall(r"\w+", text.lower())


def content_words(text: str) -> set[str]:
    """Word tokens minus stopwords: what a lexical retriever can usefully match on."""
    return {w for w in word_tokens(text) if w not in STOPWORDS and len(w) > 1}


@dataclass(frozen=True)
class Fact:
    key: str
    statement: str
    """The user's turn that states the fact (said once)."""
    question: str
    answers: tuple[str, ...]
    """Gold strings; a reply containing any of them (case-insensitive) is a hit."""

    @property
    def lexical_overlap(self) -> bool:
        """False when the question shares no content word with the statement (BM25's blind spot)."""
        return bool(content_words(self.statement) & content_words(self.question))

    def is_hit(self, reply: str) -> bool:
        low = reply.lower()
        return any(a.lower() in low for a in self.answers)


@dataclass(frozen=True)
class Turn:
    text: str
    """What the user said (one user turn)."""
    fact: str | None = None
    """Key of the fact this turn states, None for filler."""


# ---------------------------------------------------------------------------------------------- facts

CODES_AVOID = re.compile(r"^(19|20)\d\d$|(\d)\2\2")  # no year-like codes, no triple digits (guessable)

JOBS = ["glassblower", "luthier", "taxidermist", "bookbinder", "cartographer", "farrier", "stonemason",
        "clockmaker", "milliner", "puppeteer", "saddler"]
CITIES = [("Tromsø", "Tromso"), ("Reykjavík", "Reykjavik"), ("Kraków", "Krakow"), ("Ljubljana",),
          ("Tallinn",), ("Hobart",), ("Windhoek",), ("Valparaíso", "Valparaiso"), ("Trondheim",), ("Tbilisi",),
          ("Ushuaia",), ("Nagasaki",), ("Bratislava",), ("Gdańsk", "Gdansk"), ("Antofagasta",), ("Dunedin",)]
DOGS = ["Biscuit", "Pickles", "Waffles", "Nugget", "Pretzel", "Noodle", "Marzipan", "Crumpet", "Tofu", "Gizmo"]
ALLERGENS = ["hazelnuts", "sesame", "shellfish", "kiwi", "lupin", "buckwheat"]
BANDS = ["the Velvet Marmots", "Glass Orchard", "the Paper Comets", "Neon Heron", "the Quiet Lanterns",
         "Copper Tides"]
CARS = [("Saab 900", "Saab"), ("Volvo 240", "Volvo"), ("Citroën 2CV", "Citroen", "2CV"), ("Lada Niva", "Niva"),
        ("Fiat Panda", "Panda"), ("Subaru Forester", "Forester")]
PARTNERS = ["Ottilie", "Leopold", "Rosalind", "Thaddeus", "Marisol", "Casimir", "Evangeline", "Barnaby"]
INSTRUMENTS = ["bassoon", "oboe", "harp", "accordion", "theremin", "mandolin", "euphonium", "ukulele"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
COUNTRIES = ["Mongolia", "Madagascar", "Bhutan", "Namibia", "Uzbekistan", "Svalbard", "Greenland", "Kyrgyzstan"]
PASSWORD_WORDS = ["marmalade", "pinecone", "lighthouse", "tangerine", "walrus", "saffron", "quokka", "zeppelin"]
DISHES = ["shakshuka", "bibimbap", "moussaka", "pierogi", "ceviche", "goulash", "laksa", "khachapuri"]
SPORTS = ["badminton", "curling", "fencing", "water polo", "handball", "table tennis", "lacrosse"]
FLOORS = [("7th", "seventh"), ("9th", "ninth"), ("11th", "eleventh"), ("14th", "fourteenth"),
          ("16th", "sixteenth"), ("18th", "eighteenth")]
DOCTORS = ["Okonkwo", "Lindqvist", "Abernathy", "Villanueva", "Przybylski", "Haverkamp", "Nakashima"]
LANGUAGES = ["Icelandic", "Swahili", "Basque", "Welsh", "Tagalog", "Georgian", "Hungarian", "Finnish"]
TEACHERS = ["Pemberton", "Whitlock", "Castellanos", "Delacroix", "Fairweather", "Ruddock"]
CATS = ["Mochi", "Paprika", "Juniper", "Clementine", "Basil", "Pistachio"]


def make_facts(seed: int = 0, count: int = 18) -> list[Fact]:
    """`count` facts (at most 20) with seeded slot values; the same seed always gives the same facts."""
    rng = random.Random(f"facts-{seed}")
    cities = rng.sample(CITIES, 3)
    code = ""
    while not code or CODES_AVOID.search(code):
        code = str(rng.randint(1000, 9999))
    month, day = rng.choice(MONTHS), rng.randint(4, 20)
    car, floor = rng.choice(CARS), rng.choice(FLOORS)
    pw = f"{rng.choice(PASSWORD_WORDS)}{rng.randint(20, 98)}"
    job, dog, allergen, band = rng.choice(JOBS), rng.choice(DOGS), rng.choice(ALLERGENS), rng.choice(BANDS)
    partner, instrument, country = rng.choice(PARTNERS), rng.choice(INSTRUMENTS), rng.choice(COUNTRIES)
    dish, sport, doctor, lang = rng.choice(DISHES), rng.choice(SPORTS), rng.choice(DOCTORS), rng.choice(LANGUAGES)
    teacher, cat = rng.choice(TEACHERS), rng.choice(CATS)
    band_core = band.removeprefix("the ")
    facts = [
        Fact("locker", f"By the way, my locker code at the gym is {code}.", "What is my locker code at the gym?",
             (code,)),
        Fact("job", f"I work as a {job} in a small studio near the harbour.", "What is my job?", (job,)),
        Fact("sister_city", f"My sister Ingrid lives in {cities[0][0]} now.", "Where does my sister live?",
             cities[0]),
        Fact("dog", f"Our beagle is called {dog}, he is four years old.", "What is my dog's name?", (dog,)),
        Fact("allergy", f"I'm allergic to {allergen}, so I always check the labels.", "What am I allergic to?",
             (allergen,)),
        Fact("band", f"My favourite band is {band}, I've seen them live three times.",
             "Which music group do I like most?", (band_core,)),
        Fact("car", f"I drive an old {car[0]} that I bought from my uncle.", "What car do I drive?", car),
        Fact("partner", f"My partner {partner} works night shifts at the hospital.",
             "What is my partner's name?", (partner,)),
        Fact("birthplace", f"I was born in {cities[1][0]}, but we moved away when I was six.",
             "What is my hometown?", cities[1]),
        Fact("instrument", f"My daughter has started learning the {instrument} at school.",
             "Which instrument is my daughter learning?", (instrument,)),
        Fact("anniversary", f"Our wedding anniversary is on {month} {day}.", "When is our wedding anniversary?",
             (f"{month} {day}", f"{day} {month}", f"{day}th of {month}", f"{day}th {month}")),
        Fact("trip", f"I'm saving up for a trip to {country} next spring.", "Where am I planning to travel?",
             (country,)),
        Fact("wifi", f"The Wi-Fi password at home is {pw}.", "What is my home Wi-Fi password?", (pw,)),
        Fact("dish", f"My favourite dish in the world is {dish}.", "What food do I love the most?", (dish,)),
        Fact("sport", f"I play {sport} every Thursday evening with some friends.",
             "Which sport do I play on Thursdays?", (sport,)),
        Fact("floor", f"Our apartment is on the {floor[0]} floor, so the view is great.",
             "Which floor do I live on?", (*floor, f"floor {floor[0].rstrip('thsndr')}")),
        Fact("doctor", f"My family doctor is Dr. {doctor}.", "What is the name of my doctor?", (doctor,)),
        Fact("language", f"I'm learning {lang} on my phone every morning.", "What language am I studying?",
             (lang,)),
        Fact("teacher", f"My son's teacher this year is Mrs. {teacher}.", "Who is my son's teacher?", (teacher,)),
        Fact("mother", f"My mother grew up on a farm near {cities[2][0]}.", "Where did my mom grow up?", cities[2]),
        Fact("cat", f"We also adopted a grey cat and named her {cat}.", "What is my cat called?", (cat,)),
    ]
    if not 1 <= count <= len(facts):
        raise ValueError(f"count must be 1..{len(facts)}, got {count}")
    return facts[:count]


# ---------------------------------------------------------------------------------------------- filler

FOODS = ["lentil soup", "banana bread", "mushroom risotto", "chickpea curry", "lemon tart", "vegetable lasagne",
         "potato gratin", "apple crumble", "pea and mint soup", "carrot cake", "fish tacos", "tomato salad",
         "roast chicken", "sweet potato fries", "black bean chili", "oat cookies", "pumpkin pie", "fried rice",
         "minestrone", "cheese scones", "spinach pie", "pancakes", "focaccia", "ratatouille", "egg fried noodles",
         "beef stew", "stuffed peppers", "granola", "rhubarb jam", "cauliflower cheese", "leek quiche",
         "plum cake", "mac and cheese", "falafel wraps", "chocolate mousse", "sourdough toast"]
INGREDIENTS = ["cumin", "smoked paprika", "fresh basil", "lemon zest", "ginger", "garlic", "thyme", "coriander",
               "chili flakes", "nutmeg", "brown butter", "maple syrup", "capers", "feta", "rosemary", "dill",
               "soy sauce", "honey", "a splash of vinegar", "toasted seeds", "parmesan", "cinnamon", "oregano",
               "spring onions", "coconut milk", "a pinch of salt"]
GROCERIES = ["milk", "eggs", "bread", "coffee beans", "bananas", "rice", "olive oil", "onions", "tomatoes",
             "yoghurt", "butter", "dish soap", "toilet paper", "apples", "pasta", "tea bags", "lemons", "flour",
             "batteries", "cereal", "frozen peas", "oat milk", "cheese", "carrots"]
WEATHER = ["drizzly", "windy", "foggy", "humid", "freezing", "sunny", "overcast", "muggy", "crisp", "stormy",
           "grey", "mild", "chilly", "blustery", "bright but cold", "damp"]
PLACES = ["the library", "the farmers market", "the hardware store", "the park by the river", "the bakery on the "
          "corner", "the post office", "the museum", "the train station", "the community garden", "the cinema",
          "the garden centre", "the bike shop", "the bank", "the town hall", "the swimming pool", "the pharmacy",
          "the flea market", "the botanical garden", "the old bookshop", "the car wash"]
PEOPLE = ["my neighbour", "a coworker", "my cousin", "my sister", "an old friend from school", "my brother-in-law",
          "my landlord", "my manager", "my uncle", "the kids", "my aunt", "a friend from the choir",
          "the guy downstairs", "my best friend"]
ACTIVITIES = ["repaint the hallway", "fix the bike", "sort out the taxes", "clean the gutters",
              "organise the bookshelf", "plant some tulip bulbs", "assemble a new wardrobe", "clear out the attic",
              "wash the windows", "hang some shelves", "reply to all my emails", "bake something for the school "
              "fair", "walk along the coast", "move the sofa", "tidy the garage", "plan the summer holidays",
              "write some postcards", "iron a pile of shirts", "defrost the freezer", "fix the garden fence"]
SHOWS = ["a documentary about octopuses", "a podcast about ancient Rome", "a novel about lighthouse keepers",
         "a series about a cooking competition", "an old black-and-white film", "a detective show set in Wales",
         "a nature programme about penguins", "a comedy special", "a biography of a famous architect",
         "a quiz show", "a thriller about a bank heist", "a travel vlog about the Alps", "a history podcast",
         "a science fiction audiobook", "a documentary about deep sea volcanoes"]
ADJECTIVES = ["exhausting", "relaxing", "surprisingly fun", "a bit chaotic", "really lovely", "boring",
              "strangely satisfying", "more work than I expected", "pretty good", "a disaster", "wonderful",
              "quite stressful", "peaceful", "hilarious", "a nice change"]
WHEN = ["on Monday", "on Tuesday", "on Wednesday", "on Friday", "on Saturday", "on Sunday", "this weekend",
        "tomorrow morning", "next week", "tonight", "after work", "before lunch"]
TIMES = ["at seven", "around noon", "after lunch", "in the evening", "first thing in the morning", "at half past "
         "four", "before sunset", "late at night"]
THINGS = ["the dishwasher", "the laptop charger", "the kitchen tap", "the printer", "the bike chain", "the heater",
          "the fridge", "the vacuum cleaner", "the washing machine", "the doorbell", "the router",
          "the oven", "the shower head", "my headphones", "the garage door"]
HOBBIES = ["sketching", "baking sourdough", "bird watching", "jigsaw puzzles", "crossword puzzles", "hiking",
           "gardening", "photography", "origami", "knitting", "chess", "watercolour painting", "geocaching",
           "running", "woodworking", "calligraphy", "model trains", "foraging", "stargazing", "yoga"]
TOPICS = ["the news", "the election", "house prices", "the new tram line", "the price of coffee",
          "the heatwave last year", "the local football team", "the roadworks on the high street",
          "the neighbourhood festival", "the school holidays", "the new supermarket", "electric scooters"]
TEMPLATES = [
    "The weather is {weather} again today, so I think I'll stay in and {activity}.",
    "It was so {weather} this morning that I nearly turned back.",
    "Do you have any tips for making {food}? I want to try it {when}.",
    "I added {ingredient} to the {food} last night and it was {adj}.",
    "{person_cap} asked me to help {activity} {when}.",
    "I watched {show} yesterday, it was {adj}.",
    "I need to remember to buy {grocery} and {grocery2} on the way home.",
    "My plan for {when_plain} is to go to {place} {time}.",
    "Why does {thing} keep making that weird noise?",
    "{thing_cap} broke again, I should call someone about it.",
    "I've been getting into {hobby} lately and it's {adj}.",
    "Is it normal to spend a whole afternoon on {hobby}?",
    "{person_cap} and I talked about {topic} for ages.",
    "What do you think about {topic}?",
    "I went to {place} {time} and it was {adj}.",
    "Could you suggest something quick for dinner? I have {grocery} and {ingredient}.",
    "I'm trying to cut down on coffee, but {when_plain} is going to be long.",
    "We finally managed to {activity}, which was {adj}.",
    "The queue at {place} was ridiculous today.",
    "I keep forgetting to {activity}.",
    "How long does {food} keep in the fridge?",
    "I'm thinking of making {food} for {person} {when}.",
    "Remind me to check on {thing} {when}.",
    "The forecast says it will be {weather} {when}, so maybe not the best day for {hobby}.",
    "I read that {hobby} is good for stress, is that true?",
    "Honestly, {topic} is all anyone talks about at work.",
    "I found a great recipe for {food} with {ingredient}.",
    "I spent {time_plain} trying to get {thing} working again.",
]
DISTRACTORS = [
    "The gym was packed this morning, so I went for a walk instead.",
    "I had to reset my email password again, I can never remember them.",
    "My sister sent me a video of a cat playing the piano.",
    "The dog next door barked all night.",
    "I need to get the car washed before the weekend.",
    "The doctor's surgery called to move my appointment.",
    "The lift to our floor was broken again today.",
    "A band was playing in the square when I walked past.",
    "My son's school is closed on Friday for a training day.",
    "I spent the morning reading some code for a spreadsheet macro.",
    "My daughter wants to join the school choir.",
    "The gym is raising its prices next month, which is annoying.",
    "I should plan a short trip somewhere warm, I could use a break.",
    "I keep meaning to learn a new language but never start.",
    "Our anniversary dinner last year was at a tiny Italian place.",
    "My mother called to ask about the holidays.",
    "The cat from across the street keeps sitting on our car.",
    "My partner thinks I watch too much television.",
    "I tried a new café near work, the food was decent.",
    "My favourite time of year is when the leaves start to turn.",
    "The Wi-Fi has been really slow all week.",
    "Our teacher friends are coming over for board games.",
    "I used to play the recorder as a kid, badly.",
    "I started a new jigsaw with a picture of a harbour.",
    "Which is healthier, walking or cycling to work?",
    "My uncle keeps sending me articles about vintage cars.",
]
SMALL_TALK = [
    "Good morning! I slept really badly last night.",
    "Thanks, that was helpful.",
    "Haha, fair enough.",
    "Okay, let me think about it.",
    "That makes sense, I'll try that.",
    "Anyway, enough about that.",
    "I'm having one of those days where nothing goes right.",
    "Sorry, I got distracted for a minute.",
    "What a week it has been.",
    "I can't believe it's already the middle of the month.",
]


def _fill(template: str, rng: random.Random) -> str:
    person, thing = rng.choice(PEOPLE), rng.choice(THINGS)
    when = rng.choice(WHEN)
    grocery, grocery2 = rng.sample(GROCERIES, 2)
    values = dict(
        weather=rng.choice(WEATHER), activity=rng.choice(ACTIVITIES), food=rng.choice(FOODS), when=when,
        when_plain=when.removeprefix("on "), ingredient=rng.choice(INGREDIENTS), adj=rng.choice(ADJECTIVES),
        person=person, person_cap=person[0].upper() + person[1:], show=rng.choice(SHOWS), grocery=grocery,
        grocery2=grocery2, place=rng.choice(PLACES), time=rng.choice(TIMES),
        time_plain=rng.choice(["an hour", "half the evening", "all morning", "twenty minutes", "ages"]),
        thing=thing, thing_cap=thing[0].upper() + thing[1:], hobby=rng.choice(HOBBIES), topic=rng.choice(TOPICS),
    )
    return template.format(**values)


def filler_sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.1:
        return rng.choice(DISTRACTORS)
    if r < 0.16:
        return rng.choice(SMALL_TALK)
    return _fill(rng.choice(TEMPLATES), rng)


def filler_turns(seed: int, forbidden: Sequence[str]) -> Iterator[str]:
    """Endless filler user turns of 1-3 sentences; none contains a `forbidden` string (case-insensitive)."""
    rng = random.Random(f"filler-{seed}")
    banned = [f.lower() for f in forbidden]
    while True:
        text = " ".join(filler_sentence(rng) for _ in range(rng.choice((1, 1, 2, 2, 2, 3))))
        low = text.lower()
        if not any(b in low for b in banned):
            yield text


# ---------------------------------------------------------------------------------------------- stream


@dataclass(frozen=True)
class Conversation:
    """One seeded chat: `facts`, and `stream()` of turns (lead-in filler, facts among filler, then filler)."""

    seed: int = 0
    n_facts: int = 18
    lead_in: int = 3

    @property
    def facts(self) -> list[Fact]:
        return make_facts(self.seed, self.n_facts)

    def forbidden(self) -> list[str]:
        return [a for f in self.facts for a in f.answers]

    def stream(self) -> Iterator[Turn]:
        rng = random.Random(f"layout-{self.seed}")
        filler = filler_turns(self.seed, self.forbidden())
        for _ in range(self.lead_in):
            yield Turn(next(filler))
        for fact in self.facts:
            yield Turn(fact.statement, fact.key)
            for _ in range(rng.choice((0, 1, 1))):
                yield Turn(next(filler))
        while True:
            yield Turn(next(filler))

    def history(self, n_tokens: int, count_tokens: Callable[[str], int]) -> list[Turn]:
        """The longest prefix of the stream whose turns total at most `n_tokens` (as `count_tokens` counts).

        Raises if the facts do not fit: every history states every fact.
        """
        turns: list[Turn] = []
        total = 0
        for turn in self.stream():
            t = count_tokens(turn.text)
            if total + t > n_tokens:
                break
            turns.append(turn)
            total += t
        stated = {t.fact for t in turns if t.fact is not None}
        if len(stated) < self.n_facts:
            raise ValueError(f"{n_tokens} tokens is too short to state all {self.n_facts} facts")
        return turns


def facts_end_tokens(conv: Conversation, count_tokens: Callable[[str], int]) -> int:
    """Tokens up to and including the last fact turn (the shortest history a benchmark may ask for)."""
    total = 0
    remaining = conv.n_facts
    for turn in conv.stream():
        total += count_tokens(turn.text)
        if turn.fact is not None:
            remaining -= 1
            if remaining == 0:
                return total
    raise AssertionError("unreachable: the stream is endless")
