"""The built-in pretraining corpus: English-like text generated from a seed, so the whole pipeline
runs with no download and no large committed file. It mixes short stories (fluent everyday
language) with facts stated in plain text (capitals, arithmetic, spelling, comparisons), so that
pretraining gives the model knowledge that SFT later only has to turn into answers. The fact table
and the small generators here are reused by the instruction "task world" (`world.py`); the mix of
documents, world quizzes included, is `builtin.py`'s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources

@dataclass(frozen=True)
class Fact:
    """One row of facts.tsv."""

    country: str
    capital: str
    continent: str
    language: str
    currency: str


FACT_FIELDS = tuple(f.name for f in fields(Fact))


@lru_cache(maxsize=1)
def _read_facts() -> tuple[Fact, ...]:
    text = resources.files("chatfoundry.data").joinpath("facts.tsv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or tuple(lines[0].split("\t")) != FACT_FIELDS:
        raise ValueError(f"facts.tsv: header must be {' '.join(FACT_FIELDS)!r} separated by tabs")
    facts = []
    for lineno, line in enumerate(lines[1:], start=2):
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) != len(FACT_FIELDS) or not all(cells):
            raise ValueError(f"facts.tsv line {lineno}: expected {len(FACT_FIELDS)} non-empty fields")
        facts.append(Fact(*cells))
    return tuple(facts)


def load_facts() -> list[Fact]:
    """The fact table shipped with the package (country, capital, continent, language, currency)."""
    return list(_read_facts())


# ---------------------------------------------------------------------------------------------
# Word lists. Plain ASCII on purpose: a small character set keeps the tokenizer and model small.

FEMALE_NAMES = ("Mia", "Lily", "Anna", "Emma", "Sara", "Lucy", "Nora", "Ella", "Zoe", "Ruby",
                "Grace", "Alice", "Maya", "Rosa", "Ivy", "Hannah", "Clara", "Julia")
MALE_NAMES = ("Tom", "Ben", "Leo", "Sam", "Jack", "Oliver", "Noah", "Finn", "Adam", "Omar",
              "Hugo", "Theo", "Eli", "Luke", "Ryan", "Oscar", "Daniel", "Felix")
PET_NAMES = ("Max", "Bella", "Coco", "Rex", "Luna", "Pip", "Daisy", "Milo", "Sunny", "Buddy",
             "Rosie", "Biscuit", "Pepper", "Shadow")
PETS = ("dog", "cat", "rabbit", "parrot", "goat", "duck", "pony", "hamster", "puppy", "kitten")
HOMES = ("in a small village near the sea", "in a big city full of tall buildings", "in a quiet town in the hills",
         "in a little house at the edge of the forest", "on a farm next to a wide river",
         "in a cottage by a blue lake", "on a busy street in an old town", "on a tiny island with white sand",
         "in a wooden house on a hill", "in a village high in the mountains", "in a green valley with many trees")
TOWN_PLACES = ("market", "park", "river", "school", "bakery", "library", "beach", "forest", "garden",
               "harbor", "farm", "old bridge")
RELATIVES = ("grandmother", "grandfather", "mother", "father", "aunt", "uncle", "older sister",
             "big brother")
PERSON_ADJECTIVES = ("kind", "curious", "brave", "shy", "clever", "cheerful", "quiet", "little",
                     "gentle", "funny", "busy", "young")
ITEMS = ("a shiny key", "an old map", "a red ball", "a small wooden box", "a golden coin", "a lost kite",
         "a wooden flute", "a blue feather", "a letter with no name on it", "a tiny silver bell",
         "a strange green stone", "an empty bottle with a note inside", "a broken umbrella",
         "a basket of apples")
FOUND_WHERE = ("under a big tree", "near the river", "in the garden", "behind the old barn",
               "on the beach", "in an old drawer", "next to the road", "on the way home",
               "in the tall grass", "at the bottom of the stairs")
CREATURES = ("a little fox", "a lost kitten", "an old owl", "a baby bird", "a small turtle", "a green frog",
             "a young deer", "a little hedgehog", "a squirrel", "a white goose")
SNACKS = ("bread crumbs", "seeds", "fresh water", "apple slices", "berries")
COLORS = ("red", "blue", "green", "yellow", "white", "orange")
GOOD_FEELINGS = ("happy", "proud", "glad", "excited", "calm", "thankful", "cheerful", "hopeful")
BAD_FEELINGS = ("sad", "worried", "scared", "nervous", "upset", "afraid")
FOODS = ("warm bread", "apple pie", "tomato soup", "chocolate cake", "fresh cookies", "rice with beans",
         "bread and cheese", "fish and potatoes", "pancakes with honey", "vegetable stew")
ACTIVITIES = ("played by the river", "built a sandcastle", "flew a kite", "painted pictures",
              "sang songs", "read a book under a tree", "baked bread", "planted flowers",
              "climbed a small hill", "went fishing", "fed the ducks", "rode a bike around the pond")
HOBBIES = ("read stories", "draw animals", "sing songs", "watch the birds", "help in the garden",
           "ride a bike", "build things from wood", "collect shells", "play the drum", "look at the stars")
TOGETHER = ("looked everywhere", "followed the tracks in the mud", "made a plan", "walked to the river",
            "asked the neighbors", "climbed up the hill to look around", "built a small shelter",
            "searched until it got dark", "drew a map of the village")
LOST_THINGS = ("hat", "left shoe", "favorite book", "red scarf", "little toy boat", "green bag", "kite")
GIFTS = ("a basket of berries", "a new book", "a jar of honey", "a box of colored pencils",
         "a warm blanket", "a small plant", "a bag of seeds")
HIDING_SPOTS = ("bed", "table", "sofa", "big chair", "old boxes", "stairs", "desk", "flower pots")
LESSONS = ("it is good to ask for help", "being kind is always worth it", "every problem has a solution",
           "friends make hard things easier", "patience is important", "it is fine to make mistakes",
           "sharing makes everyone happier", "small steps can lead to big things")

# Nouns whose spelling facts we state; also a handy vocabulary for string tasks later.
SPELLING_WORDS = tuple(sorted({
    "apple", "banana", "cat", "dog", "house", "river", "tree", "book", "water", "sun", "moon", "star",
    "bread", "table", "chair", "window", "garden", "flower", "bird", "fish", "horse", "mouse", "cake",
    "green", "blue", "yellow", "orange", "purple", "happy", "music", "school", "friend", "letter",
    "paper", "pencil", "rabbit", "turtle", "kitten", "forest", "island", "summer", "winter", "rain",
    "cloud", "stone", "bridge", "market", "honey", "coffee", "lemon", "tiger", "zebra", "monkey",
    "planet", "rocket", "candle", "hello", "world", "yes", "night", "morning", "city", "village",
}))

# Orderings we are sure of. Items in the same class are never compared with each other.
SIZE_CLASSES = (("ant", "bee", "fly"), ("mouse", "frog", "sparrow"), ("rabbit", "cat", "duck"),
                ("dog", "goat", "sheep"), ("horse", "cow", "bear"), ("elephant", "giraffe", "hippo"),
                ("blue whale",))
SPEED_CLASSES = (("snail",), ("turtle",), ("chicken",), ("horse",), ("cheetah",))
VEHICLE_SPEED_CLASSES = (("bicycle",), ("car",), ("plane",), ("rocket",))
OBJECT_SIZE_CLASSES = (("coin",), ("apple",), ("chair",), ("car",), ("house",), ("mountain",))
WEIGHT_CLASSES = (("feather", "leaf"), ("apple", "book"), ("brick",), ("car",), ("truck",))


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


# ---------------------------------------------------------------------------------------------
# 1. Facts about countries.

# Grouped by topic, so one document never says the same thing twice.
COUNTRY_TEMPLATES = (
    ("The capital of {country} is {capital}.", "{capital} is the capital of {country}.",
     "{capital} is a city in {country}.", "If you visit {capital}, you are in {country}."),
    ("{country} is a country in {continent}.", "{capital} is in {continent}.",
     "{country} is a country in {continent}. Its capital is {capital} and people there speak {language}."),
    ("People in {country} speak {language}.", "The main language of {country} is {language}."),
    ("In {country}, people pay with the {currency}.", "The currency of {country} is the {currency}.",
     "{country} uses the {currency} as its money."),
)
TRAVEL_TEMPLATES = (
    "{name} traveled to {capital}, the capital of {country}.",
    "There {he} heard people speak {language}.",
    "{He} paid for lunch with the {currency}.",
    "{He} sent a postcard home that said: \"Greetings from {country}, a country in {continent}!\"",
)


def person(rng: random.Random, avoid: str = "") -> dict[str, str]:
    """A child of the stories (not named `avoid`): name and pronouns, for the templates' fields."""
    female = rng.random() < 0.5
    names = FEMALE_NAMES if female else MALE_NAMES
    name = rng.choice(names)
    while name == avoid:
        name = rng.choice(names)
    he, him, his, kid = ("she", "her", "her", "girl") if female else ("he", "him", "his", "boy")
    return {"name": name, "he": he, "He": he.capitalize(), "him": him, "his": his,
            "His": his.capitalize(), "kid": kid}


def fact_document(rng: random.Random, facts: list[Fact]) -> str:
    """A paragraph about one country, a few countries, or a trip to a capital."""
    roll = rng.random()
    if roll < 0.55:
        fact = rng.choice(facts)
        groups = rng.sample(COUNTRY_TEMPLATES, rng.randint(1, len(COUNTRY_TEMPLATES)))
        return " ".join(rng.choice(group).format(**vars(fact)) for group in groups)
    if roll < 0.85:
        # Several countries, each with one statement; sometimes two that share a continent.
        sentences = [rng.choice(rng.choice(COUNTRY_TEMPLATES)).format(**vars(f))
                     for f in rng.sample(facts, rng.randint(2, 4))]
        first = rng.choice(facts)
        same = [f for f in facts if f.continent == first.continent and f.country != first.country]
        if same and rng.random() < 0.5:
            sentences.append(f"{first.country} and {rng.choice(same).country} are both in {first.continent}.")
        return " ".join(sentences)
    fact = rng.choice(facts)
    who = person(rng)
    count = rng.randint(2, len(TRAVEL_TEMPLATES))
    return " ".join(t.format(**vars(fact), **who) for t in TRAVEL_TEMPLATES[:count])


# ---------------------------------------------------------------------------------------------
# 2. Arithmetic. Every statement is computed, never hand-written, so it is always correct.

ADD_TEMPLATES = ("{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "{a} + {b} = {c}.",
                 "If you add {a} and {b}, you get {c}.", "The sum of {a} and {b} is {c}.")
SUB_TEMPLATES = ("{a} minus {b} is {c}.", "{a} minus {b} equals {c}.", "{a} - {b} = {c}.",
                 "If you take {b} away from {a}, you get {c}.", "The difference between {a} and {b} is {c}.")
MUL_TEMPLATES = ("{a} times {b} is {c}.", "{a} times {b} equals {c}.", "{a} * {b} = {c}.",
                 "The product of {a} and {b} is {c}.")
OPERATIONS = {"+": (ADD_TEMPLATES, lambda a, b: a + b), "-": (SUB_TEMPLATES, lambda a, b: a - b),
              "*": (MUL_TEMPLATES, lambda a, b: a * b)}
OBJECT_PLURALS = ("apples", "marbles", "stickers", "cookies", "shells", "coins", "pencils", "books",
                  "stones", "flowers")


ARITHMETIC_MAX = 12  # operands 0..12: the whole table is stated often enough for a tiny model to learn it


def sample_arithmetic(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, op, b, result): operands in 0..ARITHMETIC_MAX, op "+", "-" or "*"; differences are never negative."""
    op = rng.choice("+-*")
    a, b = rng.randint(0, ARITHMETIC_MAX), rng.randint(0, ARITHMETIC_MAX)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b, OPERATIONS[op][1](a, b)


def _word_problem(rng: random.Random) -> str:
    who = person(rng)
    things = rng.choice(OBJECT_PLURALS)
    a = rng.randint(3, 15)
    if rng.random() < 0.5:
        b = rng.randint(1, 10)
        return f"{who['name']} had {a} {things} and found {b} more, so {who['he']} had {a + b} {things}."
    b = rng.randint(1, a - 2)  # leave at least 2, so "things" stays plural
    return f"{who['name']} had {a} {things} and gave {b} away, so {who['he']} had {a - b} {things} left."


def arithmetic_document(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:  # a times table, the way children learn it
        a = rng.randint(2, 10)
        return " ".join(f"{a} times {b} is {a * b}." for b in range(1, rng.randint(5, 10) + 1))
    sentences = []
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.15:
            sentences.append(_word_problem(rng))
            continue
        a, op, b, c = sample_arithmetic(rng)
        sentences.append(rng.choice(OPERATIONS[op][0]).format(a=a, b=b, c=c))
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# 3. Short stories: a hero, a habit, one event with follow-ups that fit it, and an ending.

INTRO_TEMPLATES = (
    "Once upon a time, {name} lived {home}.",
    "There was once a {adj} {kid} named {name} who lived {home}.",
    "Long ago, {home}, there lived a {adj} {kid} called {name}.",
    "{name} was a {adj} {kid} who lived {home}.",
    "{name} lived with {his} {relative} {home}.",
    "{home}, there was a {adj} {kid} named {name}.",
)
ROUTINE_TEMPLATES = (
    "Every morning, {he} walked to the {place} with {his} {pet} {pet_name}.",
    "{He} had a {pet} named {pet_name} who followed {him} everywhere.",
    "Every day after school, {he} {activity}.",
    "{He} loved to {hobby}.",
    "On sunny days, {he} and {his} friend {friend} {activity}.",
    "{His} favorite food was {food}.",
    "{His} {relative} often told {him} stories about the old days.",
)
# Each event comes with follow-up sentences that make sense after it (kept in this order).
EVENTS = (
    ("One day, {he} found {item} {where}.",
     ("{He} picked it up and looked at it carefully.", "{He} wondered who it belonged to.",
      "{He} showed it to {friend}, and they tried to guess where it came from.",
      "{He} carried it home carefully to show {his} {relative}.")),
    ("One morning, {he} saw {creature} {where}.",
     ("It looked hungry, so {he} gave it some {snack}.", "{He} sat very still so that it would not be scared.",
      "{He} and {friend} watched it for a long time.", "It had a hurt leg, so {he} called {his} {relative} to help.")),
    ("One day, a big storm came and the wind blew very hard.",
     ("{He} was {bad}, and {he} stayed close to {his} {relative}.",
      "The rain hit the windows, and the trees bent in the wind.",
      "{He} and {his} {relative} lit a candle and told stories.",
      "When the storm was over, {he} went outside to help the neighbors.")),
    ("One afternoon, {his} {pet} {pet_name} ran away into the forest.",
     ("{He} was {bad} and called {pet_name} again and again.",
      "{He} asked {friend} for help, and together they {together}.",
      "At last, they heard a small sound behind a bush.", "{pet_name} was there, tired but safe.")),
    ("One day, {friend} came to visit and brought {gift}.",
     ("{He} was so {good} that {he} laughed out loud.", "They sat in the garden and talked for hours.",
      "Together they {activity}.", "{His} {relative} made tea for them both.")),
    ("One evening, {he} could not find {his} {lost}.",
     ("{He} looked behind the {spot1}, under the {spot2}, and near the {spot3}.",
      "{He} felt {bad}, but {he} did not give up.", "Then {he} remembered where {he} had been that morning.",
      "At last, {he} found it near the {place}.")),
    ("One day, {his} {relative} asked {him} to bring {food} from the market.",
     ("On the way, {he} met {friend}, who walked with {him}.", "The market was busy and full of noise.",
      "{He} counted {his} coins carefully before {he} paid.",
      "{He} carried the bag home without dropping anything.")),
    ("One winter morning, everything outside was covered in snow.",
     ("{He} put on {his} warm coat and ran outside.", "{He} and {friend} built a big snowman with a carrot nose.",
      "The air was cold, and {his} cheeks turned red.", "They made a path through the snow to the {place}.")),
    ("One summer day, {he} decided to walk to the {place} alone for the first time.",
     ("At first, {he} felt {bad}.", "{He} took a deep breath and kept walking.",
      "The sun was warm, and the birds were singing.", "When {he} arrived, {he} felt very {good}.")),
    ("One day, {his} teacher said there would be a singing contest at school.",
     ("{He} practiced every evening after dinner.", "On the day of the contest, {he} was very nervous.",
      "When it was {his} turn, {he} sang as well as {he} could.",
      "Everyone clapped, and {his} {relative} cheered the loudest.")),
    ("One day, {he} wanted to bake a cake for {his} {relative}.",
     ("{He} mixed flour, eggs, milk, and sugar in a big bowl.", "{friend} came over to help.",
      "The kitchen smelled sweet and warm.", "The cake was a little burnt, but it tasted great.")),
    ("One spring morning, {he} planted seeds in the garden.",
     ("Every day, {he} gave them water.", "{He} waited and waited, but nothing grew.",
      "After many days, small green leaves came out of the ground.", "Soon the garden was full of flowers.")),
    ("One day, {he} and {friend} found an old boat by the lake.",
     ("They cleaned it and painted it {color}.", "{friend} found two old oars in the grass.",
      "They rowed slowly across the water and laughed.", "When the sun went down, they rowed back home.")),
)
ENDING_TEMPLATES = (
    "In the end, {he} felt {good} and went home for dinner.",
    "From that day on, {name} and {friend} were best friends.",
    "That night, {name} slept with a big smile on {his} face.",
    "When {he} got home, {his} {relative} made {food} for everyone.",
    "It was the best day of {his} life.",
    "{name} learned that {lesson}.",
    "Everyone was {good}, and {name} was {good} too.",
    "{name} never forgot that day.",
)


def story_document(rng: random.Random) -> str:
    """4-6 sentences: intro, maybe a habit, an event with its follow-ups in order, an ending."""
    hero = person(rng)
    friend = person(rng, avoid=hero["name"])["name"]
    spots = rng.sample(HIDING_SPOTS, 3)
    slots = dict(hero, friend=friend, home=rng.choice(HOMES), adj=rng.choice(PERSON_ADJECTIVES),
                 relative=rng.choice(RELATIVES), place=rng.choice(TOWN_PLACES), pet=rng.choice(PETS),
                 pet_name=rng.choice(PET_NAMES), activity=rng.choice(ACTIVITIES), hobby=rng.choice(HOBBIES),
                 food=rng.choice(FOODS), item=rng.choice(ITEMS), where=rng.choice(FOUND_WHERE),
                 creature=rng.choice(CREATURES), gift=rng.choice(GIFTS), lost=rng.choice(LOST_THINGS),
                 bad=rng.choice(BAD_FEELINGS), good=rng.choice(GOOD_FEELINGS), together=rng.choice(TOGETHER),
                 spot1=spots[0], spot2=spots[1], spot3=spots[2], lesson=rng.choice(LESSONS),
                 snack=rng.choice(SNACKS), color=rng.choice(COLORS))
    event, follow_ups = rng.choice(EVENTS)
    num_follow = rng.randint(1, 3)
    templates = [rng.choice(INTRO_TEMPLATES)]
    templates += rng.sample(ROUTINE_TEMPLATES, rng.randint(0, min(1, 3 - num_follow)))
    templates.append(event)
    templates += [follow_ups[i] for i in sorted(rng.sample(range(len(follow_ups)), num_follow))]
    # Only end on the friend if the story has already met them.
    endings = [t for t in ENDING_TEMPLATES if "{friend}" not in t or any("{friend}" in u for u in templates)]
    templates.append(rng.choice(endings))
    return " ".join(_capitalize(t.format(**slots)) for t in templates)


# ---------------------------------------------------------------------------------------------
# 4. Facts about strings: lengths, reversals, capitals, letters.

def string_statements(word: str, rng: random.Random) -> list[str]:
    """All the statements we know how to make about one word, in random order."""
    letter = rng.choice(word)
    statements = [
        f"The word \"{word}\" has {len(word)} letters.",
        f"The word \"{word}\" backwards is \"{word[::-1]}\".",
        f"\"{word}\" in capital letters is \"{word.upper()}\".",
        f"The first letter of \"{word}\" is \"{word[0]}\".",
        f"The last letter of \"{word}\" is \"{word[-1]}\".",
        f"The word \"{word}\" is spelled {'-'.join(word)}.",
        f"In the word \"{word}\", the letter \"{letter}\" appears {word.count(letter)} "
        f"{'time' if word.count(letter) == 1 else 'times'}.",
    ]
    rng.shuffle(statements)
    return statements


def string_document(rng: random.Random) -> str:
    if rng.random() < 0.3:  # alphabetical order of two words
        first, second = sorted(rng.sample(SPELLING_WORDS, 2))
        return f"\"{first}\" comes before \"{second}\" in alphabetical order. " + " ".join(
            string_statements(rng.choice((first, second)), rng)[: rng.randint(1, 3)])
    sentences = []
    for word in rng.sample(SPELLING_WORDS, rng.randint(1, 2)):
        sentences += string_statements(word, rng)[: rng.randint(2, 4)]
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# 5. Comparisons of numbers and of things whose order we wrote down above.

COMPARE_TABLES = ((SIZE_CLASSES, "bigger", "smaller"), (SPEED_CLASSES, "faster", "slower"),
                  (VEHICLE_SPEED_CLASSES, "faster", "slower"), (OBJECT_SIZE_CLASSES, "bigger", "smaller"),
                  (WEIGHT_CLASSES, "heavier", "lighter"))


def sample_ordered_pair(rng: random.Random, classes: tuple[tuple[str, ...], ...]) -> tuple[str, str]:
    """(larger, smaller): two things from different classes of an ordering table."""
    low, high = sorted(rng.sample(range(len(classes)), 2))
    return rng.choice(classes[high]), rng.choice(classes[low])


def _number_comparison(rng: random.Random) -> str:
    a, b = rng.randint(0, 100), rng.randint(0, 100)
    if a == b:
        return f"{a} is equal to {b}."
    big, small = max(a, b), min(a, b)
    return rng.choice((f"{big} is greater than {small}.", f"{small} is less than {big}.",
                       f"{big} is bigger than {small}.", f"{small} is smaller than {big}.",
                       f"The larger of {a} and {b} is {big}.", f"The smaller of {a} and {b} is {small}."))


def _thing_comparison(rng: random.Random) -> str:
    classes, more, less = rng.choice(COMPARE_TABLES)
    big, small = sample_ordered_pair(rng, classes)
    return rng.choice((f"The {big} is {more} than the {small}.", f"The {small} is {less} than the {big}.",
                       f"{_capitalize(article(big))} is {more} than {article(small)}.",
                       f"Which is {more}, the {small} or the {big}? The {big} is."))


def comparison_document(rng: random.Random) -> str:
    return " ".join(_number_comparison(rng) if rng.random() < 0.4 else _thing_comparison(rng)
                    for _ in range(rng.randint(2, 5)))
