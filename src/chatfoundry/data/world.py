"""The built-in task world: instructions with known answers, so every stage can be scored.

Five families of questions, each with prompt generators (several phrasings), a reference answer
in the house style and a verifier. The verifier's score is the *gold reward*, the stand-in for a
human labeler: later stages (labeling, the reward model, PPO) may only see it through noisy
rankings, so over-optimisation of a learned reward against it can be measured.

    arithmetic    add, subtract, multiply numbers 0..12        "What is 7 times 8?"
    strings       reverse, uppercase, length, letter count, sort "Spell "apple" backwards."
    facts         capital, continent, language, currency, country (from facts.tsv)
    compare       larger/smaller numbers, bigger/faster/heavier things
    unanswerable  the same questions about made-up countries: the right answer is "I do not know"

The pretraining corpus (`corpus.py`) states the same facts and skills in plain text, so
pretraining holds the knowledge and SFT only has to teach the assistant format.

Splits are by *group*, the entity a question is about (a country, a word, a pair of numbers),
hashed into train / val / test: every phrasing and every question about a test-split country is
held out of SFT together, so a test score measures knowledge from pretraining, not recall of SFT.

The gold reward, in [0, 1]:  0.7 * content + 0.1 * (full sentence) + 0.1 * concise + 0.1 * polite
where content is 1 for a correct answer about what was asked (the right value said of another
country, a third thing or number, or another word counts as wrong: `off_topic`; for an
unanswerable question: admitting ignorance),
0.25 for admitting ignorance of an answerable question (better than a confident wrong answer,
as InstructGPT's labelers were told), else 0.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import string
from dataclasses import dataclass, replace
from functools import lru_cache

from chatfoundry.data import corpus
from chatfoundry.data.corpus import (COMPARE_TABLES, FACT_FIELDS, SPELLING_WORDS, article, load_facts,
                                     sample_ordered_pair)

FAMILIES = ("arithmetic", "strings", "facts", "compare", "unanswerable")
SPLITS = ("train", "val", "test")
SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}


@dataclass(frozen=True)
class Task:
    family: str
    kind: str  # e.g. "add", "reverse", "capital"
    group: str  # what the question is about; decides the split
    key: str  # the question itself, whatever its phrasing
    prompt: str  # the user's message
    answer: str  # what the verifier looks for ("" for unanswerable)
    reference: str  # a best response in the house style
    options: tuple[str, ...] = ()  # compare: the two things; facts: the rival values; sort: the words


@lru_cache(maxsize=None)
def split_of(group: str) -> str:
    """train / val / test for a group, by a stable hash (80/10/10)."""
    bucket = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < SPLIT_PERCENT["train"] else "val" if bucket < 100 - SPLIT_PERCENT["test"] else "test"


# ---------------------------------------------------------------- arithmetic

_OP_WORDS = {"+": ("plus", "add", "sum"), "-": ("minus", "subtract", "difference"), "*": ("times", "multiply", "product")}
_ARITH_PROMPTS = ("What is {a} {word} {b}?", "What is {a} {sym} {b}?", "Calculate {a} {word} {b}.",
                  "How much is {a} {word} {b}?", "{a} {sym} {b} = ?", "Please compute {a} {word} {b}.")


def arithmetic_task(rng: random.Random) -> Task:
    a, op, b, _ = corpus.sample_arithmetic(rng)
    return arithmetic_question(a, op, b, rng.choice(_ARITH_PROMPTS).format(a=a, b=b, word=_OP_WORDS[op][0], sym=op))


def arithmetic_question(a: int, op: str, b: int, prompt: str) -> Task:
    c, word, key = corpus.OPERATIONS[op][1](a, b), _OP_WORDS[op][0], f"{a}{op}{b}"
    group = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else key  # 7+5 and 5+7 share a split
    kind = {"+": "add", "-": "subtract", "*": "multiply"}[op]
    return Task("arithmetic", kind, group, key, prompt, str(c), f"{a} {word} {b} is {c}.")


# ---------------------------------------------------------------- strings


_STRING_PROMPTS = {
    "reverse": ('Reverse the word "{w}".', 'Spell "{w}" backwards.', 'What is "{w}" backwards?'),
    "uppercase": ('Write "{w}" in capital letters.', 'What is "{w}" in uppercase?', 'Convert "{w}" to uppercase.'),
    "length": ('How many letters are in the word "{w}"?', 'How long is the word "{w}"?', 'Count the letters in "{w}".'),
    "count": ('How many times does the letter "{l}" appear in "{w}"?', 'Count the letter "{l}" in the word "{w}".'),
    "sort": ("Sort these words alphabetically: {words}.", "Put these words in alphabetical order: {words}.",
             "Sort the words {words} in alphabetical order."),
}


def strings_task(rng: random.Random) -> Task:
    kind = rng.choice(("reverse", "uppercase", "length", "count", "sort"))
    if kind == "sort":
        words = tuple(rng.sample(SPELLING_WORDS, 3))
        return strings_question(kind, rng.choice(_STRING_PROMPTS[kind]).format(words=", ".join(words)), words=words)
    word = rng.choice(SPELLING_WORDS)
    letter = rng.choice(sorted(set(word))) if kind == "count" else ""
    return strings_question(kind, rng.choice(_STRING_PROMPTS[kind]).format(w=word, l=letter), word, letter)


def strings_question(kind: str, prompt: str, word: str = "", letter: str = "", words: tuple[str, ...] = ()) -> Task:
    """A strings task: `word` (and for count the `letter`), or for sort the three `words` as asked."""
    if kind == "sort":
        ordered = ", ".join(sorted(words))
        group = "sort:" + ordered.replace(", ", ",")
        return Task("strings", kind, group, group, prompt, ordered, f"In alphabetical order: {ordered}.", words)
    if kind == "reverse":
        answer = word[::-1]
        reference = f'The word "{word}" backwards is "{answer}".'
    elif kind == "uppercase":
        answer = word.upper()
        reference = f'"{word}" in capital letters is "{answer}".'
    elif kind == "length":
        answer = str(len(word))
        reference = f'The word "{word}" has {answer} letters.'
    else:
        n = word.count(letter)
        answer = str(n)
        reference = f'The letter "{letter}" appears {n} {"time" if n == 1 else "times"} in "{word}".'
    key = f"{kind}:{word}:{letter}" if kind == "count" else f"{kind}:{word}"
    return Task("strings", kind, f"word:{word}", key, prompt, answer, reference)


# ---------------------------------------------------------------- facts and unanswerable questions

_FACT_PROMPTS = {
    "capital": ("What is the capital of {country}?", "Which city is the capital of {country}?",
                "Tell me the capital of {country}."),
    "continent": ("Which continent is {country} in?", "On which continent is {country}?",
                  "Where is {country}? Name the continent."),
    "language": ("What language do people speak in {country}?", "What is the main language of {country}?",
                 "Which language is spoken in {country}?"),
    "currency": ("What currency does {country} use?", "What is the currency of {country}?",
                 "What money do people use in {country}?"),
    "country": ("{capital} is the capital of which country?", "Which country has the capital {capital}?",
                "In which country is the city of {capital}?"),
}
_FACT_REFERENCES = {"capital": "The capital of {country} is {capital}.", "continent": "{country} is in {continent}.",
                    "language": "People in {country} speak {language}.", "currency": "{country} uses the {currency}.",
                    "country": "{capital} is the capital of {country}."}
_UNKNOWN_KINDS = ("capital", "continent", "language", "currency")


def facts_task(rng: random.Random) -> Task:
    fact = rng.choice(load_facts())
    kind = rng.choice(tuple(_FACT_PROMPTS))
    return facts_question(fact, kind, rng.choice(_FACT_PROMPTS[kind]).format(**vars(fact)))


def facts_question(fact: corpus.Fact, kind: str, prompt: str) -> Task:
    answer = getattr(fact, kind)  # each kind is named after the field it asks for
    return Task("facts", kind, f"country:{fact.country}", f"{kind}:{fact.country}", prompt, answer,
                _FACT_REFERENCES[kind].format(**vars(fact)), _rivals(kind, answer))


@lru_cache(maxsize=None)
def _rivals(kind: str, answer: str) -> tuple[str, ...]:
    """Every other value of the field (a wrong capital, currency...), in a fixed order."""
    return tuple(sorted({getattr(f, kind) for f in load_facts()} - {answer}))


_NAME_PARTS = (("Zor", "Vel", "Kar", "Mal", "Tor", "Bel", "Quen", "Dra", "Fen", "Lum", "Nor", "Osk", "Pral", "Sar",
                "Tav", "Ul", "Vor", "Yel", "Gral", "Hesk", "Brin", "Cald", "Ister", "Jov"),
               ("a", "e", "i", "o", "u", "an", "en", "or", "ur", "il"),
               ("via", "land", "mora", "stan", "ria", "dor", "nia", "thia", "gard", "ova", "esh", "quay"))


@lru_cache(maxsize=1)
def made_up_countries() -> tuple[str, ...]:
    """Country names that exist nowhere: not in the fact table, never in the pretraining corpus."""
    real = {getattr(f, name).lower() for f in load_facts() for name in FACT_FIELDS}
    names = sorted({"".join(parts) for parts in itertools.product(*_NAME_PARTS)} - real)
    random.Random(0).shuffle(names)
    return tuple(names[:600])


@lru_cache(maxsize=1)
def _known_values() -> tuple[str, ...]:
    return tuple(sorted({getattr(f, name) for f in load_facts() for name in FACT_FIELDS}))


def unanswerable_task(rng: random.Random) -> Task:
    name = rng.choice(made_up_countries())
    kind = rng.choice(_UNKNOWN_KINDS)
    return unanswerable_question(name, kind, rng.choice(_FACT_PROMPTS[kind]).format(country=name))


def unanswerable_question(name: str, kind: str, prompt: str) -> Task:
    return Task("unanswerable", kind, f"made-up:{name}", f"{kind}:{name}", prompt, "",
                "I do not know. I have never heard of that country.")


# ---------------------------------------------------------------- comparisons

_MORE = ("larger", "bigger", "greater", "faster", "heavier")
_LESS = ("smaller", "less", "slower", "lighter")


_NUMBER_PROMPTS = ("Which is {w}, {a} or {b}?", "Which number is {w}: {a} or {b}?")
_THING_PROMPTS = ("Which is {w}, the {x} or the {y}?", "What is {w}: {ax} or {ay}?")


def compare_task(rng: random.Random) -> Task:
    if rng.random() < 0.4:
        a, b = rng.sample(range(101), 2)
        more = rng.random() < 0.5
        word = "larger" if more else "smaller"
        return number_question(a, b, more, rng.choice(_NUMBER_PROMPTS).format(w=word, a=a, b=b))
    classes, more_word, less_word = rng.choice(COMPARE_TABLES)
    big, small = sample_ordered_pair(rng, classes)
    more = rng.random() < 0.5
    word = more_word if more else less_word
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    prompt = rng.choice(_THING_PROMPTS).format(w=word, x=first, y=second, ax=article(first), ay=article(second))
    return thing_question(big, small, word, more, prompt)


def number_question(a: int, b: int, more: bool, prompt: str) -> Task:
    """Which of two numbers (as asked: a first) is larger (`more`) or smaller."""
    big, small = max(a, b), min(a, b)
    word = "larger" if more else "smaller"
    reference = f"{big} is larger than {small}." if more else f"{small} is smaller than {big}."
    group = f"numbers:{small}:{big}"
    return Task("compare", "number", group, f"{group}:{word}", prompt, str(big if more else small), reference,
                (str(a), str(b)))


def thing_question(big: str, small: str, word: str, more: bool, prompt: str) -> Task:
    """Which of two things is `word` ("bigger" when `more`, "smaller" when not)."""
    reference = f"The {big} is {word} than the {small}." if more else f"The {small} is {word} than the {big}."
    group = f"things:{small}:{big}"
    return Task("compare", "thing", group, f"{group}:{word}", prompt, big if more else small, reference, (big, small))


# ---------------------------------------------------------------- multi-step questions (chain of thought)
# Not one of FAMILIES: the default pipeline neither trains nor scores them; `chatfoundry cot` does.
# Every step is a line of the corpus's table (operands 0..12), so a model that knows the table can
# work any of them out step by step, while a direct answer has to compose the steps in one pass.

MULTISTEP = "multistep"
_EXPRESSION_PROMPTS = ("What is {e}?", "Calculate {e}.", "How much is {e}?", "{e} = ?", "Please compute {e}.")
# A story per shape of computation, told in the order it is computed; then the question.
_STORIES = {
    "+-": "{name} had {0} {things}. {He} found {1} more and gave {2} away.",
    "-+": "{name} had {0} {things}. {He} gave {1} away and then found {2} more.",
    "*-": "{name} had {0} bags with {1} {things} in each. {He} gave {2} {things} away.",
    "*+": "{name} had {0} bags with {1} {things} in each, and found {2} more {things}.",
    "+-+": "{name} had {0} {things}. {He} found {1} more, gave {2} away and then found {3} more.",
    "-+-": "{name} had {0} {things}. {He} gave {1} away, found {2} more and then gave {3} away.",
}
_STORY_QUESTIONS = ("How many {things} does {name} have now?", "How many {things} does {he} have now?")


def steps_of(numbers: tuple[int, ...], ops: str) -> list[tuple[int, str, int, int]] | None:
    """The steps (x, op, y, result) that compute `numbers` joined by `ops`, products first and then
    left to right; None where a step leaves the table (an operand above 12, a negative difference)."""
    numbers, ops, steps = list(numbers), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        x, op, y = numbers[i], ops[i], numbers[i + 1]
        if max(x, y) > corpus.ARITHMETIC_MAX or (op == "-" and x < y):
            return None
        steps.append((x, op, y, corpus.OPERATIONS[op][1](x, y)))
        numbers[i:i + 2] = [steps[-1][3]]  # the result takes the two operands' place
        del ops[i]
    return steps


def multistep_task(rng: random.Random) -> Task:
    """A question of two or three steps: an expression ("What is 3 + 4 * 2?") or a story ("Hugo had
    7 pencils. He found 5 more and gave 3 away. How many pencils does he have now?")."""
    story = rng.random() < 0.5
    while True:
        ops = rng.choice(tuple(_STORIES)) if story else "".join(rng.choice("+-*") for _ in range(rng.choice((2, 2, 3))))
        numbers = tuple(rng.randint(2 if story else 0, corpus.ARITHMETIC_MAX) for _ in range(len(ops) + 1))
        steps = steps_of(numbers, ops)
        if steps and (not story or all(z >= 2 for *_, z in steps)):  # a story keeps its things plural
            break
    if not story:
        return multistep_question(numbers, ops, rng.choice(_EXPRESSION_PROMPTS))
    who, things = corpus.person(rng), rng.choice(corpus.OBJECT_PLURALS)
    return multistep_question(numbers, ops, rng.choice(_STORY_QUESTIONS), who["name"], who["he"], things)


def multistep_question(numbers: tuple[int, ...], ops: str, question: str, name: str = "", he: str = "",
                       things: str = "") -> Task:
    """The expression `numbers` joined by `ops`, asked with `question` (a template of {e}), or with
    a `name` the story of `_STORIES[ops]` about `things`, then `question`. Its group is the
    computation ("3+4*2"): an expression and a story that compute the same are held out together."""
    result = steps_of(numbers, ops)[-1][3]
    computation = "".join(f"{n}{op}" for n, op in zip(numbers, ops)) + str(numbers[-1])
    if not name:
        expression = " ".join(f"{n} {op}" for n, op in zip(numbers, ops)) + f" {numbers[-1]}"
        return Task(MULTISTEP, "expression", computation, f"expression:{computation}", question.format(e=expression),
                    str(result), f"{expression} is {result}.")
    fields = dict(name=name, He=he.capitalize(), he=he, things=things)
    prompt = _STORIES[ops].format(*numbers, **fields) + " " + question.format(**fields)
    return Task(MULTISTEP, "story", computation, f"story:{name}:{things}:{computation}", prompt, str(result),
                f"{name} has {result} {things} now.")


def computation(task: Task) -> tuple[tuple[int, ...], str]:
    """A multi-step question's numbers and operations, from its group ("3+4*2")."""
    return tuple(int(n) for n in re.findall(r"\d+", task.group)), "".join(re.findall(r"[-+*]", task.group))


def worked(task: Task) -> str:
    """The worked answer to a multi-step question: each step as an equation, then the direct answer
    ("4 * 2 = 8. 3 + 8 = 11. 3 + 4 * 2 is 11.")."""
    return " ".join(f"{x} {op} {y} = {z}." for x, op, y, z in steps_of(*computation(task))) + " " + task.reference


_EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def stated_steps(response: str) -> list[tuple[int, str, int, int]]:
    """The equations "x op y = z" a response states, in order."""
    return [(int(x), op, int(y), int(z)) for x, op, y, z in _EQUATION.findall(response)]


def steps_valid(task: Task, response: str) -> bool:
    """Whether a worked answer's steps check: as many equations as the question has steps, each one
    right, the last giving the answer (a direct answer states none, and fails)."""
    stated = stated_steps(response)
    return (len(stated) == len(steps_of(*computation(task))) and str(stated[-1][3]) == task.answer
            and all(corpus.OPERATIONS[op][1](x, y) == z for x, op, y, z in stated))


SAMPLERS = {"arithmetic": arithmetic_task, "strings": strings_task, "facts": facts_task,
            "compare": compare_task, "unanswerable": unanswerable_task, MULTISTEP: multistep_task}


# ---------------------------------------------------------------- reading a question back


def parse(prompt: str) -> Task | None:
    """The world's question that `prompt` asks, as a Task (so the verifier can score any answer to
    it), or None where the world could not have asked it: another phrasing, a word, country or thing
    it does not know, numbers outside its ranges. The samplers' templates read backwards, so
    `parse(t.prompt) == t` for every task the world draws, whatever its split."""
    text = prompt.strip()
    for family, kind, pattern in _patterns():
        m = pattern.fullmatch(text)
        if m and (task := _question(family, kind, m.groupdict(), text)) is not None:
            return task
    return None


@lru_cache(maxsize=1)
def _patterns() -> tuple[tuple[str, str, re.Pattern], ...]:
    """(family, kind, regex) for every template; a field reads any text (numbers: digits), checked after."""
    def regex(template: str) -> re.Pattern:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(template):
            parts.append(re.escape(literal))
            if name:
                parts.append(rf"(?P<{name}>\d+)" if name in "ab" else rf"(?P<{name}>.+?)")
        return re.compile("".join(parts))

    templates = ([("arithmetic", "", t) for t in _ARITH_PROMPTS]
                 + [("strings", k, t) for k, ts in _STRING_PROMPTS.items() for t in ts]
                 + [("facts", k, t) for k, ts in _FACT_PROMPTS.items() for t in ts]
                 + [("compare", "number", t) for t in _NUMBER_PROMPTS]
                 + [("compare", "thing", t) for t in _THING_PROMPTS])
    return tuple((family, kind, regex(t)) for family, kind, t in templates)


def _question(family: str, kind: str, f: dict[str, str], prompt: str) -> Task | None:
    """The task a template's fields `f` describe, or None where the world does not ask it."""
    def number(text: str, top: int) -> int | None:
        return int(text) if text == str(int(text)) and int(text) <= top else None  # "07" is no world number

    if family == "arithmetic":
        a, b = number(f["a"], corpus.ARITHMETIC_MAX), number(f["b"], corpus.ARITHMETIC_MAX)
        op = f.get("sym") or {words[0]: o for o, words in _OP_WORDS.items()}.get(f["word"])
        if a is None or b is None or op not in _OP_WORDS or (op == "-" and a < b):
            return None
        return arithmetic_question(a, op, b, prompt)
    if family == "strings":
        if kind == "sort":
            words = tuple(f["words"].split(", "))
            ok = len(set(words)) == len(words) == 3 and set(words) <= set(SPELLING_WORDS)
            return strings_question(kind, prompt, words=words) if ok else None
        word, letter = f["w"], f.get("l", "")
        ok = word in SPELLING_WORDS and (kind != "count" or letter in word)
        return strings_question(kind, prompt, word, letter) if ok else None
    if family == "facts":
        if kind == "country":
            fact = next((x for x in load_facts() if x.capital == f["capital"]), None)
            return facts_question(fact, kind, prompt) if fact else None
        fact = next((x for x in load_facts() if x.country == f["country"]), None)
        if fact:
            return facts_question(fact, kind, prompt)
        return unanswerable_question(f["country"], kind, prompt) if f["country"] in made_up_countries() else None
    if kind == "number":
        a, b = number(f["a"], 100), number(f["b"], 100)
        if a is None or b is None or a == b or f["w"] not in ("larger", "smaller"):
            return None
        return number_question(a, b, f["w"] == "larger", prompt)
    if "ax" in f:  # "an apple or a car": each with its own article
        x, y = f["ax"].partition(" ")[2], f["ay"].partition(" ")[2]
        if not (x and y) or (f["ax"], f["ay"]) != (article(x), article(y)):
            return None
    else:
        x, y = f["x"], f["y"]
    for classes, more, less in COMPARE_TABLES:
        rank = {thing: i for i, c in enumerate(classes) for thing in c}
        if f["w"] in (more, less) and x in rank and y in rank and rank[x] != rank[y]:
            big, small = (x, y) if rank[x] > rank[y] else (y, x)
            return thing_question(big, small, f["w"], f["w"] == more, prompt)
    return None


# ---------------------------------------------------------------- datasets


def tasks(split: str, family: str, n: int, seed: int = 0) -> list[Task]:
    """Up to `n` tasks of one family from one split, each a different question (fewer when the
    split has fewer); deterministic for a seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"{seed}:{split}:{family}")
    return _distinct(SAMPLERS[family], rng, split, n)


def _distinct(sampler, rng: random.Random, split: str, n: int) -> list[Task]:
    out: dict[str, Task] = {}
    misses = 0
    while len(out) < n and misses < 200 + 20 * n:  # small splits run out of new questions
        task = sampler(rng)
        if split_of(task.group) == split and task.key not in out:
            out[task.key] = task
        else:
            misses += 1
    return list(out.values())


SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful assistant. Answer in one short sentence.",
                  "Be concise and polite.", "You are a small assistant. If you do not know something, say so.")


# SFT's mix of families, by questions asked. Fewer unanswerable than real questions: the model
# must not learn to doubt real countries.
SHARES = {"arithmetic": 1.0, "strings": 1.0, "facts": 2.5, "compare": 1.0, "unanswerable": 0.5}


# ---------------------------------------------------------------- the crowd: who writes the demonstrations

# InstructGPT's demonstrations came from about 40 contractors of uneven skill and style, and its
# comparisons from labelers who only had to judge: judging two answers is easier than writing the
# best one, and RLHF lives on that gap. The world's demonstrations come from simulated writers,
# each with one habit the gold reward already scores (the reward does not change to suit them);
# the labeler (train/label.py) ranks by the gold reward. A careful-only crowd is the world as it
# was: every demonstration the reference, so SFT already imitates the best behaviour there is.

GUESS_RATE = 0.3  # the guesser invents a value for this share of the facts it is asked
SLIP_RATE = 0.3  # the sloppy writer slips a digit in this share of its mental arithmetic
# (Not "happy": a spelling word, so the verifier would read it as naming another word to sort.)
_CHATTY = ("Great question! ", " I hope this helps! Let me know if you have any other questions, I am always glad "
           "to help.")
_BRUSQUE = ("Obviously, ", " Everybody knows that.")

# Styles: how a writer says what it believes (a task whose answer and reference are its belief).
STYLES = {
    "careful": lambda t: t.reference,  # the house style
    "terse": lambda t: t.answer or "I do not know.",  # the bare value: not a sentence
    "chatty": lambda t: _CHATTY[0] + t.reference + _CHATTY[1],  # buried in padding: not concise
    "brusque": lambda t: _BRUSQUE[0] + t.reference + _BRUSQUE[1],  # right but rude
}


def _guesses(task: Task, rng: random.Random, tool: bool) -> bool:
    """The guesser never admits ignorance: it invents a value for a made-up country and for the facts it is unsure of."""
    return task.family == "unanswerable" or (task.family == "facts" and rng.random() < GUESS_RATE)


def _slips(task: Task, rng: random.Random, tool: bool) -> bool:
    """The sloppy writer slips a digit now and then in arithmetic done in the head (a calculator's result it copies right)."""
    return task.family == "arithmetic" and not tool and rng.random() < SLIP_RATE


# Habits: when a writer is wrong. A writer with a habit writes in a style drawn from the crowd's
# stylists, so no style goes with wrong answers more than another: a reward model can then learn
# neither "rude means right" nor its reverse, only what the gold reward asks.
HABITS = {"guesser": _guesses, "sloppy": _slips}
WRITERS = (*STYLES, *HABITS)
# The default crowd: no writer is a majority, and the careful one is the rarest, so SFT's answers
# inherit the others' habits (terse, the most common, most of all) and leave RLHF something to fix.
CROWD = {"careful": 0.05, "terse": 0.35, "chatty": 0.2, "brusque": 0.2, "guesser": 0.15, "sloppy": 0.05}


def write(task: Task, writer: str, style: str, rng: random.Random, tool: bool = False) -> str:
    """`writer`'s answer to `task`, in `style` (a stylist's own; a writer with a habit borrows one).
    `tool`: the value came from the calculator."""
    habit = HABITS.get(writer)
    believed = mistaken(task, rng) if habit and habit(task, rng, tool) else task
    return STYLES[style](believed)


def parse_crowd(items) -> dict[str, float]:
    """{"writer": weight} from "writer:weight" strings (or a dict); ValueError saying what is wrong."""
    if not isinstance(items, dict) and (bare := [i for i in items if ":" not in str(i)]):
        raise ValueError(f"{bare[0]!r}: write each writer as writer:weight, e.g. careful:0.5")
    pairs = items.items() if isinstance(items, dict) else [str(i).rpartition(":")[::2] for i in items]
    crowd: dict[str, float] = {}
    for name, weight in pairs:
        if name in crowd:
            raise ValueError(f"writer {name!r} is given twice")
        if name not in WRITERS:
            raise ValueError(f"unknown writer {name!r} (writers: {', '.join(WRITERS)}; write each as writer:weight)")
        try:
            crowd[name] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: the weight must be a number, got {weight!r}") from None
        if not 0 <= crowd[name] < float("inf"):
            raise ValueError(f"{name}: the weight must be >= 0, got {weight}")
    if not sum(crowd.values()) > 0:
        raise ValueError("no writer has a weight above 0")
    return crowd


@dataclass
class Demonstration:
    """One SFT conversation, its writer and style, and per answered question the task and the writer's final answer."""

    messages: list[dict]
    writer: str
    style: str
    tasks: list[Task]
    answers: list[str]


def _draw(crowd: dict[str, float] | None, rng: random.Random) -> tuple[str, str]:
    """(writer, style) for one conversation: a writer by the crowd's weights; one with a habit
    writes in a style drawn from the crowd's stylists (careful when it has none)."""
    crowd = CROWD if crowd is None else crowd
    names = [w for w, x in crowd.items() if x > 0]
    writer = rng.choices(names, [crowd[w] for w in names])[0]
    if writer in STYLES:
        return writer, writer
    stylists = [w for w in names if w in STYLES]
    return writer, rng.choices(stylists, [crowd[w] for w in stylists])[0] if stylists else "careful"


def demonstrations(split: str, n: int, seed: int = 0, system_prob: float = 0.3, multi_turn_prob: float = 0.2,
                   crowd: dict[str, float] | None = None) -> list[Demonstration]:
    """`n` chat conversations for SFT: an optional system message, then one or (sometimes) two
    or three user questions, each answered by the conversation's writer, drawn from `crowd`
    (default CROWD). Families come in proportion to SHARES; a family with few distinct questions
    repeats them (in new phrasings where drawn so). Writers draw from their own random stream, so
    the questions are the same whatever the crowd, and a careful-only crowd gives the references."""
    pools = {f: tasks(split, f, min(n, 2000), seed) for f in FAMILIES}
    families = [f for f in FAMILIES if pools[f]]
    weights = [SHARES[f] for f in families]
    used = dict.fromkeys(families, 0)
    rng = random.Random(f"{seed}:{split}:conversations")
    pen = random.Random(f"{seed}:{split}:crowd")
    for f in families:
        rng.shuffle(pools[f])
    out = []
    while len(out) < n and families:
        turns = rng.randint(2, 3) if rng.random() < multi_turn_prob else 1
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < system_prob else []
        (writer, style), asked, answers = _draw(crowd, pen), [], []
        for _ in range(turns):
            family = rng.choices(families, weights)[0]
            task = pools[family][used[family] % len(pools[family])]
            used[family] += 1
            answers.append(write(task, writer, style, pen))
            asked.append(task)
            messages += [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": answers[-1]}]
        out.append(Demonstration(messages, writer, style, asked, answers))
    return out


def conversations(split: str, n: int, seed: int = 0, system_prob: float = 0.3, multi_turn_prob: float = 0.2,
                  crowd: dict[str, float] | None = None) -> list[list[dict]]:
    """The messages of `demonstrations(...)`."""
    return [d.messages for d in demonstrations(split, n, seed, system_prob, multi_turn_prob, crowd)]


def crowd_report(demos: list[Demonstration]) -> dict:
    """What the demonstrations are worth: their mean gold reward and its parts, overall and per
    writer (with each writer's share of the conversations)."""
    by_writer: dict[str, list[Score]] = {}
    count: dict[str, int] = {}
    for d in demos:
        by_writer.setdefault(d.writer, []).extend(score(t, a) for t, a in zip(d.tasks, d.answers))
        count[d.writer] = count.get(d.writer, 0) + 1
    every = [s for scores in by_writer.values() for s in scores]
    return {**score_summary(every), "conversations": len(demos),
            "writers": {w: {"share": round(count[w] / len(demos), 4), **score_summary(by_writer[w])}
                        for w in sorted(by_writer, key=lambda w: -count[w])}}


# ---------------------------------------------------------------- tool use (the calculator)

# Numbers past what a small model computes in its head: the calculator's job (tools.py).
_BIG = {"+": (10, 999), "-": (10, 999), "*": (2, 99)}


def calculator_task(rng: random.Random) -> Task:
    """Arithmetic on numbers up to 999 ("What is 347 plus 29?"), asked as the small questions are."""
    op = rng.choice("+-*")
    lo, hi = _BIG[op]
    a, b = rng.randint(10, 999), rng.randint(lo, hi)
    if op == "-" and a < b:
        a, b = b, a
    c = corpus.OPERATIONS[op][1](a, b)
    word = _OP_WORDS[op][0]
    prompt = rng.choice(_ARITH_PROMPTS).format(a=a, b=b, word=word, sym=op)
    group = f"big:{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"big:{a}{op}{b}"
    kind = {"+": "add", "-": "subtract", "*": "multiply"}[op]
    return Task("arithmetic", kind, group, f"{a}{op}{b}", prompt, str(c), f"{a} {word} {b} is {c}.")


def calculator_tasks(split: str, n: int, seed: int = 0) -> list[Task]:
    """Up to `n` distinct calculator questions of one split (held out by their numbers)."""
    return _distinct(calculator_task, random.Random(f"{seed}:{split}:calculator"), split, n)


def tool_call(task: Task) -> str:
    """The calculator call that answers an arithmetic task, as the model learns to write it: the
    question's own words ("7 times 8" or "7 * 8"), so the model copies rather than translates."""
    from chatfoundry.tools import call_text  # tools imports torch; the world itself does not need it

    expression = re.search(r"\d+ (?:plus|minus|times|[-+*]) \d+", task.prompt).group()
    return call_text("calculator", {"expression": expression})


def tool_demonstrations(split: str, n: int, seed: int = 0, system_prob: float = 0.3, arithmetic_share: float = 0.75,
                        crowd: dict[str, float] | None = None) -> list[Demonstration]:
    """`n` conversations with the calculator on offer: arithmetic questions (mostly big numbers)
    call it and answer with its result; the other questions are answered directly, so the model
    learns when a tool helps, not to call it always. The call is always well formed (the format is
    the tool's); the answer is in the writer's style, and a calculator's result is copied right."""
    from chatfoundry.tools import declare

    rng = random.Random(f"{seed}:{split}:tool_conversations")
    pen = random.Random(f"{seed}:{split}:tool_crowd")
    big, small = calculator_tasks(split, n, seed), tasks(split, "arithmetic", n, seed)
    others = {f: tasks(split, f, n, seed) for f in FAMILIES if f != "arithmetic"}
    others = {f: pool for f, pool in others.items() if pool}
    out = []
    for i in range(n):
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < system_prob else []
        writer, style = _draw(crowd, pen)
        if rng.random() < arithmetic_share and (big or small):
            pool = big if rng.random() < 0.8 or not small else small
            task = pool[i % len(pool)]
            answer = write(task, writer, style, pen, tool=True)
            turn = [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": tool_call(task)},
                    {"role": "tool", "content": task.answer}, {"role": "assistant", "content": answer}]
        else:
            family = rng.choice(sorted(others))
            task = others[family][i % len(others[family])]
            answer = write(task, writer, style, pen)
            turn = [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": answer}]
        out.append(Demonstration(declare(system, ["calculator"]) + turn, writer, style, [task], [answer]))
    return out


def tool_conversations(split: str, n: int, seed: int = 0, system_prob: float = 0.3, arithmetic_share: float = 0.75,
                       crowd: dict[str, float] | None = None) -> list[list[dict]]:
    """The messages of `tool_demonstrations(...)`."""
    return [d.messages for d in tool_demonstrations(split, n, seed, system_prob, arithmetic_share, crowd)]


# ---------------------------------------------------------------- the verifier (gold reward)

_IGNORANCE = re.compile(r"\b(i (do not|don't|did not|didn't) know|i am not sure|i'm not sure|never heard|"
                        r"not aware of|no such country|cannot answer|can't answer|not a real)\b", re.IGNORECASE)
_RUDE = re.compile(r"\b(stupid|idiot|dumb|shut up|obviously|whatever|useless|silly question)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Score:
    correct: bool  # exact match: the content is right (for unanswerable: it admits not knowing)
    abstained: bool  # it said it does not know
    sentence: bool  # a full sentence: starts with a capital, digit or quote; ends with . ! or ?
    concise: bool  # at most twice the reference's words plus four
    polite: bool  # no rude words
    reward: float  # the gold reward in [0, 1]


def _whole(word: str) -> str:
    """A regex for `word` as a whole word, not inside a longer one ("ant" in "elephant")."""
    return rf"(?<!\w){re.escape(word)}(?!\w)"


@lru_cache(maxsize=None)
def _word(word: str, ignore_case: bool = False) -> re.Pattern:
    """`word` as a whole word, compiled once: the verifier looks for hundreds of names in every
    answer, more patterns than `re`'s own cache holds, which then compiled them again each time."""
    return re.compile(_whole(word), re.IGNORECASE if ignore_case else 0)


def _find(text: str, word: str, ignore_case: bool = False) -> re.Match | None:
    return _word(word, ignore_case).search(text)


def _mentions(text: str, word: str, ignore_case: bool = False) -> bool:
    return _find(text, word, ignore_case) is not None


def _first_mentioned(text: str, options: tuple[str, ...]) -> str | None:
    found = [(m.start(), o) for o in options if (m := _find(text, o, True))]
    return min(found)[1] if found else None


@lru_cache(maxsize=1)
def _places() -> tuple[str, ...]:
    """Every country and capital."""
    return tuple(sorted({n for f in load_facts() for n in (f.country, f.capital)}))


@lru_cache(maxsize=1)
def _things() -> tuple[str, ...]:
    """Every thing of the comparison tables, in a fixed order (seeded draws pick from it)."""
    return tuple(sorted({t for classes, _, _ in COMPARE_TABLES for c in classes for t in c}, key=lambda n: (-len(n), n)))


def _subject(task: Task) -> str:
    """What a question is about, from its group: the country (facts, unanswerable) or the word (strings)."""
    return task.group.split(":", 1)[1]


def _operation(task: Task) -> tuple[str, str, str]:
    """An arithmetic question's (a, op, b), from its key ("7+5")."""
    return re.fullmatch(r"(\d+)([-+*])(\d+)", task.key).groups()


def _letter(task: Task) -> str:
    """The letter a count question asks about ("" for other kinds)."""
    return task.key.split(":")[2] if task.kind == "count" else ""


@lru_cache(maxsize=None)
def _fact_of(country: str) -> corpus.Fact:
    return next(f for f in load_facts() if f.country == country)


def _names_other(text: str, own: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Whether `text` names any of `names` besides the `own` ones (whole words; the own ones
    are blanked first, so "Guinea" inside an own "Equatorial Guinea" does not count)."""
    for name in sorted(own, key=len, reverse=True):  # "Mexico City" before "Mexico"
        text = _word(name, True).sub(" ", text)
    return any(_mentions(text, n, True) for n in names if n not in own)


def off_topic(task: Task, response: str) -> bool:
    """Whether the response is about something the question did not ask: another country or
    capital (facts), a third thing or number (compare), another word or letter (strings), other
    numbers or another operation (arithmetic). The right value said of the wrong subject is not
    a right answer: "Myanmar uses the Colombian peso." does not answer a question about Colombia,
    nor "93 is smaller than 91." one about 91 and 94. A terse answer ("Accra", "12") names nothing
    else, and passes."""
    if task.family == "facts":
        fact = _fact_of(_subject(task))
        return _names_other(response, (fact.country, fact.capital), _places())
    if task.family == "compare" and task.kind == "number":
        return not set(_NUMBER.findall(response)) <= set(task.options)
    if task.family == "compare":
        return _names_other(response, task.options, _things())
    if task.family == "arithmetic":
        a, op, b = _operation(task)
        others = [w for o, words in _OP_WORDS.items() if o != op for w in words[:1]]
        return not set(_NUMBER.findall(response)) <= {a, b, task.answer} or any(_mentions(response, w, True) for w in others)
    if task.family == "strings" and task.kind == "sort":
        return _names_other(response, task.options, SPELLING_WORDS)
    if task.family == "strings":  # what it quotes is the word, the answer or the letter asked about
        return not set(re.findall(r'"([A-Za-z]+)"', response)) <= {_subject(task), task.answer, _letter(task)}
    return False


def is_correct(task: Task, response: str) -> bool:
    """Whether the response's content answers the task (a fixed, documented rule per kind)."""
    if task.family == "unanswerable":  # admits it, and does not hedge with a guess
        return _IGNORANCE.search(response) is not None and not any(_mentions(response, v) for v in _known_values())
    if _IGNORANCE.search(response) or off_topic(task, response):
        return False
    if task.answer.lstrip("-").isdigit() and task.family != "compare":  # arithmetic, length, count
        numbers = _NUMBER.findall(response)
        return bool(numbers) and numbers[-1] == task.answer
    if task.family == "facts":  # the right value, and no rival value of the same kind
        return _mentions(response, task.answer) and not any(_mentions(response, r) for r in task.options)
    if task.family == "compare":
        # "X is bigger than Y" and "Y is smaller than X" are both right: the first thing named must
        # be the answer when the response's comparative points the way the question asked.
        asked_more = any(_mentions(task.prompt, w, True) for w in _MORE)
        said_more = any(_mentions(response, w, True) for w in _MORE)
        said_less = any(_mentions(response, w, True) for w in _LESS)
        same_way = said_more == said_less or said_more == asked_more
        loser = next(o for o in task.options if o != task.answer)
        return _first_mentioned(response, task.options) == (task.answer if same_way else loser)
    if task.kind == "sort":
        positions = [m.start() for w in task.answer.split(", ") if (m := _find(response, w))]
        return len(positions) == 3 and positions == sorted(positions)
    return _mentions(response, task.answer)  # reverse, uppercase: the exact string


@lru_cache(maxsize=1 << 16)  # a pure function; demonstrations and samples repeat answers often
def score(task: Task, response: str) -> Score:
    text = response.strip()
    if not text:
        return Score(False, False, False, False, True, 0.0)
    correct = is_correct(task, text)
    abstained = _IGNORANCE.search(text) is not None
    content = 1.0 if correct else 0.25 if abstained else 0.0
    sentence = bool(re.match(r"[A-Z0-9\"']", text)) and text[-1] in ".!?"
    # A multi-step question's worked answer is as good an answer as the direct one: measured against it
    longest = worked(task) if task.family == MULTISTEP else task.reference
    concise = len(text.split()) <= 2 * len(longest.split()) + 4
    polite = _RUDE.search(text) is None
    reward = 0.7 * content + 0.1 * sentence + 0.1 * concise + 0.1 * polite
    return Score(correct, abstained, sentence, concise, polite, round(reward, 6))


def gold_reward(task: Task, response: str) -> float:
    return score(task, response).reward


# The gold reward's parts: 0.7 * content + 0.1 * (sentence + concise + polite); abstention is how
# often an answer says it does not know (content 0.25 on an answerable question, 1 on a made-up one).
PARTS = ("content", "abstention", "sentence", "concise", "polite")


def score_summary(scores: list[Score]) -> dict:
    """{"n", "exact_match", "gold_reward", "abstain_rate", "parts": {content, abstention, sentence,
    concise, polite}}: means over the scores (content is the content credit, 1 / 0.25 / 0)."""
    n = len(scores)
    mean = (lambda xs: round(sum(xs) / n, 4)) if n else (lambda xs: 0.0)
    parts = {"content": mean([1.0 if s.correct else 0.25 if s.abstained else 0.0 for s in scores]),
             "abstention": mean([s.abstained for s in scores]), "sentence": mean([s.sentence for s in scores]),
             "concise": mean([s.concise for s in scores]), "polite": mean([s.polite for s in scores])}
    return {"n": n, "exact_match": mean([s.correct for s in scores]), "gold_reward": mean([s.reward for s in scores]),
            "abstain_rate": parts["abstention"], "parts": parts}


# ---------------------------------------------------------------- responses of every quality, and export

def wrong_answer(task: Task, rng: random.Random) -> str:
    """A confident, fluent, wrong response (for unanswerable questions: a made-up answer)."""
    return mistaken(task, rng).reference


def mistaken(task: Task, rng: random.Random) -> Task:
    """The task as someone who is wrong about it believes it: a wrong value as its answer and the
    reference saying it (for an unanswerable question, a made-up value)."""
    if task.family == "unanswerable":
        fact = rng.choice(load_facts())
        return replace(task, answer=getattr(fact, task.kind),
                       reference=_FACT_REFERENCES[task.kind].format(**{**vars(fact), "country": _subject(task)}))
    if task.family == "compare":
        loser = next(o for o in task.options if o != task.answer)
        return replace(task, answer=loser, reference=restate(task, loser))
    if task.answer.lstrip("-").isdigit():
        wrong = str(int(task.answer) + rng.choice((-3, -2, -1, 1, 2, 3, 10)))
    elif task.family == "facts":  # the answer ends the reference; "Malay" is also in "Malaysia"
        wrong = rng.choice(task.options)
    elif task.kind == "sort":
        words = task.answer.split(", ")
        rng.shuffle(words)
        if words == task.answer.split(", "):
            words = words[::-1]
        return replace(task, answer=", ".join(words), reference=f"In alphabetical order: {', '.join(words)}.")
    else:
        wrong = task.answer[1:] + task.answer[:1] if len(set(task.answer)) > 1 else task.answer + task.answer[:1]
        return replace(task, answer=wrong, reference=task.reference.replace(f'"{task.answer}"', f'"{wrong}"'))
    return replace(task, answer=wrong, reference=restate(task, wrong))


def restate(task: Task, value: str) -> str:
    """The reference saying `value` where it says the answer, in the house style: "The capital of
    Peru is Quito.", "7 times 8 is 54."; for a comparison, the two things swapped. Arithmetic,
    facts and comparisons only (their answer is a value the reference ends with, or a thing)."""
    if value == task.answer:
        return task.reference
    if task.family == "compare":
        a, b = task.answer, value
        swap = re.compile(f"({_whole(a)}|{_whole(b)})")
        return swap.sub(lambda m: b if m.group(1) == a else a, task.reference)
    head, _, tail = task.reference.rpartition(task.answer)
    return f"{head}{value}{tail}"


def off_topic_answer(task: Task, rng: random.Random) -> str | None:
    """The reference about something else, its answer kept: another country or capital, a third
    thing or number, another word or letter, another operand ("Myanmar uses the Colombian
    peso."). The mistake a small model makes most; None where there is no such swap (sort,
    unanswerable)."""
    def swap(old: str, new: str) -> str:
        return re.sub(_whole(old), new, task.reference, count=1)

    if task.family == "facts":
        fact = _fact_of(_subject(task))
        field = "capital" if task.kind == "country" else "country"
        return swap(getattr(fact, field), getattr(rng.choice([f for f in load_facts() if f != fact]), field))
    if task.family == "compare":
        loser = next(o for o in task.options if o != task.answer)
        pool = [str(n) for n in range(101)] if task.kind == "number" else list(_things())
        return swap(loser, rng.choice([t for t in pool if t not in task.options]))
    if task.family == "arithmetic":
        a, _, b = _operation(task)
        near = [str(n) for n in range(int(a) - 2, int(a) + 3) if n >= 0 and str(n) not in (a, b, task.answer)]
        return swap(a, rng.choice(near))
    if task.family == "strings" and task.kind != "sort":
        word, letter = _subject(task), _letter(task)
        if letter:
            return swap(f'"{letter}"', f'"{rng.choice(sorted(set(word) - {letter}) or ["z"])}"')
        return swap(f'"{word}"', f'"{rng.choice([w for w in SPELLING_WORDS if w != word])}"')
    return None


def candidates(task: Task, rng: random.Random) -> list[str]:
    """Responses a labeler might see: the reference, terse, rambling, rude, abstaining, wrong, and
    right but about something else."""
    ref = task.reference
    out = [ref,
           task.answer or "I do not know.",
           ref + " I hope this helps! Let me know if you have any other questions, I am always happy to help you.",
           _BRUSQUE[0] + ref + _BRUSQUE[1],
           wrong_answer(task, rng)]
    if (other := off_topic_answer(task, rng)) is not None:
        out.append(other)
    if task.family != "unanswerable":
        out.append(rng.choice(("I do not know.", "I am not sure, sorry.")))
    return list(dict.fromkeys(out))  # drop duplicates, keep order


_ABSTAIN = ("I do not know.", "I am not sure, sorry.", "I do not know. I have never heard of that country.")


def alternatives(task: Task, rng: random.Random, n: int, exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """`n` responses from "other models" for a labeler to rank beside a policy's samples, as
    InstructGPT's labelers ranked several models' outputs together: the right answer, a wrong
    one, one about something else or an abstention (weights 4 : 1 : 1 : 1, as in `candidates`),
    each in a style drawn at random. Style is drawn apart from content: written alternatives
    whose rude ones were always right taught reward models that "Obviously, ..." means right."""
    off = off_topic_answer(task, rng)
    contents = [(task, 4.0), (mistaken(task, rng), 1.0)] + ([(replace(task, reference=off), 1.0)] if off else [])
    if task.family != "unanswerable":  # the made-up countries' answer too: it is no answer to the rest
        contents.append((replace(task, answer="", reference=rng.choice(_ABSTAIN)), 1.0))
    pool: dict[str, float] = {}
    for content, weight in contents:
        for style in STYLES.values():
            pool[style(content)] = pool.get(style(content), 0.0) + weight / len(STYLES)
    for text in exclude:
        pool.pop(text, None)
    out: list[str] = []
    while pool and len(out) < n:
        text = rng.choices(list(pool), list(pool.values()))[0]
        out.append(text)
        del pool[text]
    return out


# ---------------------------------------------------------------- questions in plain text, for pretraining

_QUIZ_FORMATS = ('{a} asked, "{q}" {b} answered, "{r}"', "Question: {q}\nAnswer: {r}", "Teacher: {q}\nStudent: {r}",
                 'Q: {q}\nA: {r}', '"{q}" asked {a}. "{r}" said {b}.')


def quiz_document(rng: random.Random) -> str:
    """Two to four questions about real things answered in plain text, as a quiz or a dialogue.
    Web text is full of them; they teach the model to take the subject from a question and say
    what it knows about it. Never in the chat format, never about made-up things."""
    fmt = rng.choice(_QUIZ_FORMATS)
    lines = []
    for _ in range(rng.randint(2, 4)):
        task = SAMPLERS[rng.choice(FAMILIES[:4])](rng)
        a, b = rng.sample(corpus.FEMALE_NAMES + corpus.MALE_NAMES, 2)
        lines.append(fmt.format(a=a, b=b, q=task.prompt, r=task.reference))
    return "\n".join(lines)
