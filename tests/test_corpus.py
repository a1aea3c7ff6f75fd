"""The built-in corpus: deterministic, the requested size, varied, and every fact in it true."""

import re

import pytest

from chatfoundry.data import corpus
from chatfoundry.data.builtin import DEFAULT_CHARS, DEFAULT_SEED, generate_corpus, generate_documents, write_corpus
from chatfoundry.data.corpus import Fact, load_facts

N = 200_000
NUM = r"(-?\d+)"


@pytest.fixture(scope="module")
def full_text() -> str:
    return generate_corpus(N, seed=DEFAULT_SEED)


@pytest.fixture(scope="module")
def text(full_text) -> str:
    """The statements, without the quiz documents: questions are not statements, and their
    answers are the world's references (checked by the verifier in test_world.py)."""
    quiz = re.compile(r'^(Question: |Teacher: |Q: |"|[A-Z][a-z]+ asked, ")', re.M)
    return "\n\n".join(d for d in full_text.split("\n\n") if not quiz.match(d))


@pytest.fixture(scope="module")
def facts_by_country() -> dict[str, Fact]:
    return {f.country: f for f in load_facts()}


def test_defaults():
    assert DEFAULT_SEED == 0
    assert DEFAULT_CHARS == 2_000_000


def test_same_seed_same_text_different_seed_different_text(full_text):
    assert generate_corpus(N, seed=DEFAULT_SEED) == full_text
    assert generate_corpus(N, seed=1) != full_text
    assert generate_corpus(N, seed=1) == generate_corpus(N, seed=1)


def test_documents_stream_matches_corpus(full_text):
    stream = generate_documents(DEFAULT_SEED)
    docs = [next(stream) for _ in range(50)]
    assert full_text.startswith("\n\n".join(docs))
    for doc in docs:
        assert doc and doc == doc.strip() and "\n\n" not in doc


@pytest.mark.parametrize("num_chars", [0, 1, 1000, 54_321, N])
def test_size_stops_at_a_document_boundary(num_chars):
    out = generate_corpus(num_chars, seed=3)
    assert out.endswith("\n") and not out.endswith("\n\n")
    docs = out[:-1].split("\n\n")
    assert all(docs)
    assert len(out) >= num_chars
    # Without its last document the corpus would have been too short: it stopped as soon as it could.
    assert len(out) - 1 - len(docs[-1]) - 2 < num_chars or len(docs) == 1
    assert len(out) <= num_chars + max(len(d) for d in docs) + 3


def test_negative_size_is_rejected():
    with pytest.raises(ValueError):
        generate_corpus(-1)


def test_every_arithmetic_statement_is_correct(text):
    ops = {"plus": lambda a, b: a + b, "+": lambda a, b: a + b, "minus": lambda a, b: a - b,
           "-": lambda a, b: a - b, "times": lambda a, b: a * b, "*": lambda a, b: a * b}
    checked = 0
    patterns = [
        (rf"(?<![\w-]){NUM} (plus|minus|times) {NUM} (?:is|equals) {NUM}\.", lambda a, op, b, c: (ops[op](a, b), c)),
        (rf"(?<![\w-]){NUM} ([-+*]) {NUM} = {NUM}\.", lambda a, op, b, c: (ops[op](a, b), c)),
        (rf"If you add {NUM} and {NUM}, you get {NUM}\.", lambda a, b, c: (a + b, c)),
        (rf"If you take {NUM} away from {NUM}, you get {NUM}\.", lambda b, a, c: (a - b, c)),
        (rf"The sum of {NUM} and {NUM} is {NUM}\.", lambda a, b, c: (a + b, c)),
        (rf"The difference between {NUM} and {NUM} is {NUM}\.", lambda a, b, c: (a - b, c)),
        (rf"The product of {NUM} and {NUM} is {NUM}\.", lambda a, b, c: (a * b, c)),
        (rf"had {NUM} (\w+) and found {NUM} more, so s?he had {NUM} (\w+)\.",
         lambda a, t1, b, c, t2: ((a + b, t1), (c, t2))),
        (rf"had {NUM} (\w+) and gave {NUM} away, so s?he had {NUM} (\w+) left\.",
         lambda a, t1, b, c, t2: ((a - b, t1), (c, t2))),
    ]
    for pattern, check in patterns:
        for m in re.finditer(pattern, text):
            args = [int(g) if re.fullmatch(NUM, g) else g for g in m.groups()]
            expected, got = check(*args)
            assert expected == got, m.group(0)
            checked += 1
    assert checked > 500
    # The patterns cover every statement: count the operator words and symbols independently.
    statements = (len(re.findall(r"\d (?:plus|minus|times) -?\d", text)) + len(re.findall(r"\d [-+*] \d", text))
                  + text.count("If you add") + text.count("If you take") + text.count("The sum of")
                  + text.count("The difference between") + text.count("The product of")
                  + text.count(" more, so ") + text.count(" away, so "))
    assert statements == checked
    assert not re.search(r" = -\d+\.| (?:is|equals) -\d+\.", text), "differences are never negative"


def test_every_country_statement_matches_the_table(text, facts_by_country):
    name = r"([A-Z][A-Za-z\- ]*?)"
    start = r"(?:^|(?<=[.!?\"] ))"
    checks = [
        (rf"The capital of {name} is {name}\.", lambda c, cap: facts_by_country[c].capital == cap),
        (rf"{start}{name} is the capital of {name}\.", lambda cap, c: facts_by_country[c].capital == cap),
        (rf"traveled to {name}, the capital of {name}\.", lambda cap, c: facts_by_country[c].capital == cap),
        (rf"{start}{name} is a city in {name}\.", lambda cap, c: facts_by_country[c].capital == cap),
        (rf"{start}{name} is a country in {name}\.", lambda c, cont: facts_by_country[c].continent == cont),
        (rf"The currency of {name} is the ([A-Za-z ]+)\.", lambda c, cur: facts_by_country[c].currency == cur),
        (rf"People in {name} speak {name}\.", lambda c, lang: facts_by_country[c].language == lang),
        (rf"The main language of {name} is {name}\.", lambda c, lang: facts_by_country[c].language == lang),
    ]
    counts = {}
    for pattern, check in checks:
        matches = list(re.finditer(pattern, text, flags=re.M))
        counts[pattern] = len(matches)
        for m in matches:
            assert m.group(1) in facts_by_country or m.group(2) in facts_by_country, m.group(0)
            assert check(*m.groups()), m.group(0)
    assert all(n > 0 for n in counts.values()), counts
    assert text.count("capital of") == sum(counts[p] for p, _ in checks[:3])


def test_every_string_statement_is_correct(text):
    checked = 0
    for word, n in re.findall(r'The word "(\w+)" has (\d+) letters\.', text):
        assert len(word) == int(n)
        checked += 1
    for word, rev in re.findall(r'The word "(\w+)" backwards is "(\w+)"\.', text):
        assert word[::-1] == rev
        checked += 1
    for word, upper in re.findall(r'"(\w+)" in capital letters is "(\w+)"\.', text):
        assert word.upper() == upper
        checked += 1
    for word, spelled in re.findall(r'The word "(\w+)" is spelled ([\w-]+)\.', text):
        assert "-".join(word) == spelled
        checked += 1
    for word, letter, n in re.findall(r'In the word "(\w+)", the letter "(\w)" appears (\d+) times?\.', text):
        assert word.count(letter) == int(n)
        checked += 1
    for first, second in re.findall(r'"(\w+)" comes before "(\w+)" in alphabetical order\.', text):
        assert first < second
        checked += 1
    assert checked > 150


def test_every_comparison_is_correct(text):
    for a, rel, b in re.findall(rf"(?<![\w-]){NUM} is (greater|less|bigger|smaller) than {NUM}\.", text):
        a, b = int(a), int(b)
        assert (a > b) if rel in ("greater", "bigger") else (a < b)
    for which, a, b, c in re.findall(rf"The (larger|smaller) of {NUM} and {NUM} is {NUM}\.", text):
        assert int(c) == (max if which == "larger" else min)(int(a), int(b))
    # Things: the relation must follow the class order of one of the tables.
    def rank(thing, adjective):
        for classes, more, less in corpus.COMPARE_TABLES:
            if adjective in (more, less):
                for i, cls in enumerate(classes):
                    if thing in cls:
                        yield i, adjective == more
    things = 0
    for a, rel, b in re.findall(r"(?:The|A|An|a|an|the) ([a-z ]+?) is (\w+er) than (?:the|a|an) ([a-z ]+?)\.", text):
        ok = any(ra != rb and (ra > rb) == more
                 for ra, more in rank(a, rel) for rb, _ in rank(b, rel))
        assert ok, f"{a} {rel} {b}"
        things += 1
    assert things > 50


def test_all_five_kinds_are_present_and_text_is_varied(text):
    assert re.search(r"\d+ plus \d+ (is|equals) \d+\.", text)
    assert "The capital of " in text
    assert re.search(r"(Once upon a time|Long ago|There was once)", text) and "One day, " in text
    assert "backwards is" in text and "letters." in text
    assert re.search(r"is (bigger|faster|heavier) than", text)
    sentences = set(re.split(r"(?<=[.!?\"])\s+", text))
    words = set(re.findall(r"[A-Za-z]+", text))
    assert len(sentences) > 2500
    assert len(words) > 700
    docs = text.split("\n\n")
    assert len(set(docs)) > 0.95 * len(docs)
    assert text.isascii()


def test_facts_table_is_clean():
    facts = load_facts()
    assert 60 <= len(facts) <= 120
    countries = [f.country for f in facts]
    assert len(countries) == len(set(countries))
    for f in facts:
        assert all(getattr(f, field).strip() == getattr(f, field) != "" for field in corpus.FACT_FIELDS)
    by = {f.country: f for f in facts}
    assert by["Australia"].capital == "Canberra"
    assert by["Canada"].capital == "Ottawa"
    assert by["Brazil"].capital == "Brasilia"
    assert by["Turkey"].capital == "Ankara"
    assert by["France"] == Fact("France", "Paris", "Europe", "French", "euro")


def test_write_corpus_round_trip(tmp_path):
    target = tmp_path / "sub" / "corpus.txt"
    result = write_corpus(target, num_chars=5000, seed=7)
    assert result == target
    assert target.read_text(encoding="utf-8") == generate_corpus(5000, seed=7)
    # Overwrites in place and leaves no temp file behind.
    write_corpus(str(target), num_chars=100, seed=7)
    assert target.read_text(encoding="utf-8") == generate_corpus(100, seed=7)
    assert [p.name for p in target.parent.iterdir()] == ["corpus.txt"]
