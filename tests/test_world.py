"""The task world: deterministic, split by group with nothing of the test split in SFT, and a
verifier (gold reward) whose rules are pinned down by concrete examples."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from chatfoundry.data import builtin, corpus, world
from chatfoundry.data.formats import load_comparisons, load_sft
from chatfoundry.data.world import FAMILIES, SPLITS, Task, score
from chatfoundry.tokenizer import SPECIAL_TOKENS

N = 1000  # tasks per (split, family): enough to exhaust the small families


@pytest.fixture(scope="module")
def drawn():
    return {(s, f): world.tasks(s, f, N) for s in SPLITS for f in FAMILIES}


def fact(country: str, kind: str) -> Task:
    """A facts task built directly, with every other value of its field as a rival."""
    facts = world.load_facts()
    row = next(f for f in facts if f.country == country)
    answer = getattr(row, kind)
    return Task("facts", kind, f"country:{country}", f"{kind}:{country}", f"? {kind} {country}", answer,
                world._FACT_REFERENCES[kind].format(**vars(row)),
                tuple(sorted({getattr(f, kind) for f in facts} - {answer})))


ADD = Task("arithmetic", "add", "7+5", "7+5", "What is 7 plus 5?", "12", "7 plus 5 is 12.")
FASTER = Task("compare", "thing", "things:snail:cheetah", "things:snail:cheetah:faster",
              "Which is faster, the cheetah or the snail?", "cheetah", "The cheetah is faster than the snail.",
              ("cheetah", "snail"))
SMALLER = Task("compare", "thing", "things:ant:elephant", "things:ant:elephant:smaller",
               "Which is smaller, the elephant or the ant?", "ant", "The ant is smaller than the elephant.",
               ("elephant", "ant"))
SORT = Task("strings", "sort", "sort:apple,bread,cat", "sort:apple,bread,cat",
            "Sort these words alphabetically: cat, apple, bread.", "apple, bread, cat",
            "In alphabetical order: apple, bread, cat.", ("cat", "apple", "bread"))
UPPER = Task("strings", "uppercase", "word:apple", "uppercase:apple", 'Write "apple" in capital letters.', "APPLE",
             '"apple" in capital letters is "APPLE".')
REVERSE = Task("strings", "reverse", "word:apple", "reverse:apple", 'Spell "apple" backwards.', "elppa",
               'The word "apple" backwards is "elppa".')
NAME = world.made_up_countries()[0]
UNKNOWN = Task("unanswerable", "capital", f"made-up:{NAME}", f"capital:{NAME}", f"What is the capital of {NAME}?",
               "", "I do not know. I have never heard of that country.")


# ---------------------------------------------------------------- determinism and splits

def test_tasks_and_conversations_are_deterministic_per_seed():
    for f in FAMILIES:
        assert world.tasks("train", f, 50, seed=3) == world.tasks("train", f, 50, seed=3)
        assert world.tasks("train", f, 50, seed=3) != world.tasks("train", f, 50, seed=4)
    assert world.conversations("train", 100, seed=1) == world.conversations("train", 100, seed=1)
    assert world.conversations("train", 100, seed=1) != world.conversations("train", 100, seed=2)
    with pytest.raises(ValueError, match="split"):
        world.tasks("dev", "facts", 5)


def test_splits_are_disjoint_by_group_and_match_split_of(drawn):
    for f in FAMILIES:
        groups = {s: {t.group for t in drawn[s, f]} for s in SPLITS}
        assert all(groups.values()), f
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"], f
        assert not groups["val"] & groups["test"], f
        for s in SPLITS:
            assert all(world.split_of(t.group) == s and t.family == f for t in drawn[s, f])
            assert len({t.key for t in drawn[s, f]}) == len(drawn[s, f])  # each a different question
    assert len(drawn["test", "facts"]) > 0


def test_split_proportions_are_about_80_10_10():
    synthetic = Counter(world.split_of(f"group:{i}") for i in range(20_000))
    assert abs(synthetic["train"] / 20_000 - 0.8) < 0.02
    assert abs(synthetic["val"] / 20_000 - 0.1) < 0.02 and abs(synthetic["test"] / 20_000 - 0.1) < 0.02
    made_up = Counter(world.split_of(f"made-up:{n}") for n in world.made_up_countries())
    assert 0.72 < made_up["train"] / 600 < 0.88 and 0.05 < made_up["test"] / 600 < 0.15


def test_no_test_group_leaks_into_sft(drawn):
    convs = world.conversations("train", 2000)
    users = {m["content"] for c in convs for m in c if m["role"] == "user"}
    train_by_prompt = {t.prompt: t for f in FAMILIES for t in world.tasks("train", f, 2000)}  # the pools
    assert users <= set(train_by_prompt)  # every SFT question is a train task, so of a train group
    test_groups = {t.group for f in FAMILIES for t in drawn["test", f]}
    assert not {train_by_prompt[p].group for p in users} & test_groups
    assert not users & {t.prompt for f in FAMILIES for t in drawn["test", f]}


# ---------------------------------------------------------------- the verifier

def test_every_reference_is_correct_with_full_reward_and_wrong_answers_score_lower():
    rng = random.Random(0)
    for f in FAMILIES:
        for s in SPLITS:
            for t in world.tasks(s, f, 200):
                ref = score(t, t.reference)
                assert ref.correct and ref.reward == 1.0, (t, ref)
                wrong = world.wrong_answer(t, rng)
                assert not score(t, wrong).correct and score(t, wrong).reward < ref.reward, (t, wrong)


def test_wrong_answers_swap_whole_words_only():
    rng = random.Random(0)
    assert world.wrong_answer(SMALLER, rng) == "The elephant is smaller than the ant."
    nums = Task("compare", "number", "numbers:5:59", "numbers:5:59:smaller", "Which is smaller, 59 or 5?", "5",
                "5 is smaller than 59.", ("59", "5"))
    assert world.wrong_answer(nums, rng) == "59 is smaller than 5."
    malay = world.wrong_answer(fact("Malaysia", "language"), rng)
    assert malay.startswith("People in Malaysia speak ") and not malay.endswith("Malay."), malay
    mexico = world.wrong_answer(fact("Mexico", "country"), rng)
    assert mexico.startswith("Mexico City is the capital of ") and not mexico.endswith("Mexico."), mexico


def test_arithmetic_takes_the_last_number():
    assert score(ADD, "7 plus 5 is 12.").correct
    assert not score(ADD, "12 plus 5 is 7.").correct
    assert score(ADD, "12").correct and not score(ADD, "12").sentence


def test_ignorance_is_partial_credit_when_answerable_and_right_when_not():
    right, wrong, unsure = (score(ADD, r) for r in ("7 plus 5 is 12.", "7 plus 5 is 13.", "I do not know."))
    assert unsure.abstained and not unsure.correct
    assert unsure.reward == pytest.approx(0.7 * 0.25 + 0.3)
    assert wrong.reward < unsure.reward < right.reward
    assert score(UNKNOWN, "I do not know.").correct and score(UNKNOWN, "I do not know.").reward == 1.0
    assert score(UNKNOWN, "I'm not sure, I have never heard of it.").correct
    guess = score(UNKNOWN, f"The capital of {NAME} is Paris.")
    assert not guess.correct and guess.reward < score(UNKNOWN, UNKNOWN.reference).reward


def test_facts_reject_a_rival_value():
    france = fact("France", "capital")
    assert score(france, "The capital of France is Paris.").correct
    assert not score(france, "The capital of France is Paris or Rome.").correct
    assert not score(france, "The capital of France is Rome.").correct
    assert not score(france, "I do not know, maybe Paris.").correct


def test_compare_accepts_either_direction_of_the_right_claim():
    assert score(FASTER, "The cheetah is faster than the snail.").correct
    assert score(FASTER, "The snail is slower than the cheetah.").correct
    assert not score(FASTER, "The snail is faster than the cheetah.").correct
    assert not score(FASTER, "The cheetah is slower than the snail.").correct
    assert score(SMALLER, "The elephant is bigger than the ant.").correct
    assert not score(SMALLER, "The elephant is smaller than the ant.").correct


def test_a_right_value_said_of_something_else_is_wrong():
    """Answers the small model really gave: the right value, but about another subject."""
    colombia = fact("Colombia", "currency")
    assert not score(colombia, "Myanmar uses the Colombian peso.").correct
    assert score(colombia, "Colombia uses the Colombian peso.").correct and score(colombia, "Colombian peso").correct
    mexico = fact("Mexico", "country")  # "Mexico City" names Mexico itself, not another place
    assert score(mexico, "Mexico City is the capital of Mexico.").correct
    assert not score(mexico, "Mexico City is the capital of Mexico, like Lima.").correct
    nums = Task("compare", "number", "numbers:91:94", "numbers:91:94:smaller", "Which number is smaller: 91 or 94?",
                "91", "91 is smaller than 94.", ("91", "94"))
    assert score(nums, "91 is smaller than 94.").correct and score(nums, "91").correct
    assert not score(nums, "93 is smaller than 91.").correct
    assert not score(FASTER, "The cheetah is faster than the car.").correct
    assert not score(ADD, "7 times 5 is 12.").correct and not score(ADD, "6 plus 6 is 12.").correct
    big = Task("arithmetic", "subtract", "big:512-89", "512-89", "How much is 512 minus 89?", "423",
               "512 minus 89 is 423.")
    assert score(big, "[calculator: 512 minus 89 = 423] 512 minus 89 is 423.").correct
    count = Task("strings", "count", "word:friend", "count:friend:d", 'Count the letter "d" in the word "friend".', "1",
                 'The letter "d" appears 1 time in "friend".')
    assert score(count, count.reference).correct and score(count, "1").correct
    assert not score(count, 'The letter "f" appears 1 time in "friend".').correct
    assert not score(REVERSE, 'The word "zebra" backwards is "elppa".').correct
    assert not score(SORT, "In alphabetical order: apple, bread, cat, dog.").correct


def test_sort_and_exact_string_rules():
    assert score(SORT, "apple, bread, cat").correct
    assert not score(SORT, "In alphabetical order: apple, bread.").correct
    assert not score(SORT, "In alphabetical order: cat, bread, apple.").correct
    assert not score(SORT, "In alphabetical order: apple, cat, bread.").correct
    assert score(UPPER, "APPLE").correct
    assert not any(score(UPPER, r).correct for r in ('"Apple".', "APPLES", "A P P L E", "apple"))
    assert score(REVERSE, '"elppa"').correct
    assert not any(score(REVERSE, r).correct for r in ("elpp", "ELPPA", "apple", "elppas"))


def test_style_parts_of_the_reward():
    assert score(ADD, "").reward == 0.0 and score(ADD, "   \n").reward == 0.0
    rude = score(ADD, "Obviously, 7 plus 5 is 12, you idiot.")
    assert rude.correct and not rude.polite and rude.reward == pytest.approx(0.9)
    ramble = score(ADD, "Well, let me think about this for a while, because numbers are fun and I like them "
                        "a lot, and after careful thought: 7 plus 5 is 12.")
    assert ramble.correct and not ramble.concise and ramble.reward == pytest.approx(0.9)
    for r in ("7 plus 5 is 12", "the sum is 12."):
        s = score(ADD, r)
        assert s.correct and not s.sentence and s.reward == pytest.approx(0.9)
    assert world.gold_reward(ADD, "7 plus 5 is 12!") == 1.0


# ---------------------------------------------------------------- made-up names and the corpus

def test_made_up_countries_are_unknown_everywhere():
    names = world.made_up_countries()
    assert len(names) == len(set(names)) >= 100
    real = {getattr(f, k).lower() for f in world.load_facts() for k in corpus.FACT_FIELDS}
    assert not {n.lower() for n in names} & real
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in names)
    text = builtin.generate_corpus(300_000)
    assert not set(re.findall(r"[A-Z][a-z]+", text)) & set(names)
    assert "Question:" in text or " asked, " in text


def test_quiz_documents_are_plain_text_about_real_things():
    names = set(world.made_up_countries())
    for seed in range(300):
        doc = world.quiz_document(random.Random(seed))
        assert doc and "<|" not in doc and not any(tok in doc for tok in SPECIAL_TOKENS.values())
        assert not set(re.findall(r"[A-Z][a-z]+", doc)) & names
        assert "I do not know" not in doc


# ---------------------------------------------------------------- conversations and candidates

def test_conversations_alternate_roles_and_answer_with_references():
    convs = world.conversations("train", 500, crowd={"careful": 1.0})
    assert len(convs) == 500
    by_prompt = {t.prompt: t for f in FAMILIES for t in world.tasks("train", f, 500)}  # the pools
    assert 0 < sum(c[0]["role"] == "system" for c in convs) < 500
    assert 0 < sum(sum(m["role"] == "user" for m in c) > 1 for c in convs) < 500
    for c in convs:
        body = c[1:] if c[0]["role"] == "system" else c
        assert body and [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
        assert len(body) % 2 == 0 and all(m["role"] != "system" for m in body)
        for q, a in zip(body[::2], body[1::2]):
            task = by_prompt[q["content"]]
            assert a["content"] == task.reference and score(task, a["content"]).correct


# ---------------------------------------------------------------- the crowd

@pytest.fixture(scope="module")
def demos():
    return world.demonstrations("train", 3000) + world.tool_demonstrations("train", 1000)


def test_each_writer_has_its_habit_and_only_it(demos):
    scores = {w: [] for w in world.WRITERS}
    unanswerable = {w: [] for w in world.WRITERS}
    for d in demos:
        assert [m["content"] for m in d.messages if m["role"] == "assistant" and not m["content"].startswith("<|")] \
            == d.answers and len(d.tasks) == len(d.answers)
        for t, a in zip(d.tasks, d.answers):
            (unanswerable if t.family == "unanswerable" else scores)[d.writer].append(score(t, a))
    mean = lambda xs, part: sum(getattr(x, part) for x in xs) / len(xs)  # noqa: E731
    assert all(len(scores[w]) > 100 for w in world.WRITERS)
    assert all(x.reward == 1.0 for x in scores["careful"] + unanswerable["careful"])
    assert mean(scores["terse"], "sentence") == 0 and mean(scores["terse"], "correct") == 1  # the bare value
    assert mean(scores["chatty"], "concise") == 0 and mean(scores["chatty"], "correct") == 1
    assert mean(scores["brusque"], "polite") == 0 and mean(scores["brusque"], "correct") == 1
    # The guesser never admits ignorance: it invents on made-up countries and on some facts.
    assert mean(scores["guesser"] + unanswerable["guesser"], "abstained") == 0
    assert mean(unanswerable["guesser"], "correct") == 0
    for w in ("careful", "terse", "chatty", "brusque", "sloppy"):
        assert mean(unanswerable[w], "correct") == 1, w
    facts = lambda w: [x for d in demos if d.writer == w for t, x in zip(d.tasks, map(score, d.tasks, d.answers))  # noqa: E731
                       if t.family == "facts"]
    assert 0.15 < 1 - mean(facts("guesser"), "correct") < 0.45 and mean(facts("sloppy"), "correct") == 1
    # A habit is not a style: guessers and sloppy writers write in the stylists' styles, so no
    # style goes with wrong answers more than another.
    stylists = sum(world.CROWD[w] for w in world.STYLES)
    for habit in world.HABITS:
        styles = Counter(d.style for d in demos if d.writer == habit)
        assert set(styles) == set(world.STYLES), styles
        for style, n in styles.items():  # the stylists' own shares
            assert abs(n / sum(styles.values()) - world.CROWD[style] / stylists) < 0.1, (habit, styles)
    assert all(d.style == d.writer for d in demos if d.writer in world.STYLES)
    # The sloppy writer slips in mental arithmetic, never when copying the calculator's result.
    heads = [(t, a, d) for d in demos if d.writer == "sloppy" for t, a in zip(d.tasks, d.answers) if t.family == "arithmetic"]
    mental = [score(t, a).correct for t, a, d in heads if not any(m["role"] == "tool" for m in d.messages)]
    tool = [score(t, a).correct for t, a, d in heads if any(m["role"] == "tool" for m in d.messages)]
    assert 0.55 < sum(mental) / len(mental) < 0.85 and tool and all(tool)


def test_the_crowd_changes_answers_not_questions_and_careful_alone_writes_the_references():
    mixed = world.demonstrations("train", 400, seed=5)
    careful = world.demonstrations("train", 400, seed=5, crowd={"careful": 1.0})
    asked = lambda ds: [[m for m in d.messages if m["role"] != "assistant"] for d in ds]  # noqa: E731
    assert asked(mixed) == asked(careful)
    assert all(a == t.reference for d in careful for t, a in zip(d.tasks, d.answers))
    assert {d.writer for d in mixed} == set(world.WRITERS) and {d.writer for d in careful} == {"careful"}
    assert len({d.writer for d in world.demonstrations("train", 400, crowd={"terse": 1, "chatty": 0})}) == 1
    # No writer is a majority of the default crowd, in any family.
    for f in FAMILIES:
        writers = Counter(d.writer for d in mixed for t in d.tasks if t.family == f)
        assert max(writers.values()) < 0.5 * sum(writers.values()), (f, writers)


def test_crowd_report_gives_each_writers_share_and_gold(demos):
    report = world.crowd_report(demos)
    assert report["conversations"] == len(demos) and set(report["writers"]) == set(world.WRITERS)
    assert sum(w["share"] for w in report["writers"].values()) == pytest.approx(1, abs=1e-3)
    assert report["writers"]["careful"]["gold_reward"] == 1.0
    assert report["writers"]["terse"]["parts"]["sentence"] < 0.2 and report["writers"]["brusque"]["parts"]["polite"] == 0
    assert 0.85 < report["gold_reward"] < 0.97  # what SFT imitates is worse than the reference
    parts = report["parts"]
    assert report["gold_reward"] == pytest.approx(
        0.7 * parts["content"] + 0.1 * (parts["sentence"] + parts["concise"] + parts["polite"]), abs=1e-3)


@pytest.mark.parametrize("spec, message", [
    (["careful:1", "poet:1"], "unknown writer 'poet'"), (["careful:-1", "terse:1"], "careful: the weight must be >= 0"),
    (["careful:0", "terse:0"], "no writer has a weight above 0"), (["careful"], "write each writer as writer:weight"),
    (["careful:x"], "the weight must be a number"), (["careful:1", "careful:2"], "given twice")])
def test_a_bad_crowd_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        world.parse_crowd(spec)
    assert world.parse_crowd(["careful:3", "terse:1"]) == {"careful": 3.0, "terse": 1.0}


def test_candidates_start_with_the_best_reference():
    rng = random.Random(0)
    for f in FAMILIES:
        for t in world.tasks("train", f, 40):
            cands = world.candidates(t, rng)
            assert cands[0] == t.reference and len(cands) == len(set(cands))
            assert len(cands) >= 5
            rewards = [world.gold_reward(t, c) for c in cands]
            assert rewards[0] == max(rewards) == 1.0 and min(rewards) < 0.5


def test_off_topic_answers_keep_the_answer_but_change_the_subject():
    rng = random.Random(0)
    for f in FAMILIES:
        for s in SPLITS:
            for t in world.tasks(s, f, 200):
                other = world.off_topic_answer(t, rng)
                if f == "unanswerable" or t.kind == "sort":
                    assert other is None
                    continue
                assert other != t.reference and world.off_topic(t, other) and not score(t, other).correct, (t, other)
                assert any(world.off_topic(t, c) for c in world.candidates(t, random.Random(0)))
    faster = world.off_topic_answer(FASTER, rng)
    assert faster.startswith("The cheetah is faster than the ") and not faster.endswith("snail."), faster
    colombia = world.off_topic_answer(fact("Colombia", "currency"), rng)
    assert colombia.endswith(" uses the Colombian peso.") and not colombia.startswith("Colombia "), colombia
    assert world.off_topic_answer(ADD, rng) in {f"{a} plus 5 is 12." for a in (6, 8, 9)}


# ---------------------------------------------------------------- export

def test_export_writes_every_format_loadably(tmp_path):
    counts = builtin.export(tmp_path, conversations_n=200, test_per_family=20, corpus_chars=20_000)
    names = ["corpus.jsonl", "sft_train.jsonl", "sft_val.jsonl", "prompt_completion_train.jsonl",
             "alpaca_train.jsonl", "sft_tools_train.jsonl", "quiz_train.jsonl", "preference_train.jsonl",
             "rankings_train.jsonl", "test.jsonl", "calculator_test.jsonl"]
    assert sorted(counts) == sorted(names)
    for name in names:
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        assert counts[name] == len(lines) > 0, name
    assert counts["sft_train.jsonl"] == 200 and counts["test.jsonl"] == 5 * 20
    for name in names[:7]:
        assert len(load_sft(tmp_path / name)) == counts[name]
    quiz = json.loads((tmp_path / "quiz_train.jsonl").read_text().splitlines()[0])["text"]
    assert quiz.startswith("Question: ") and "\nAnswer: " in quiz  # the corpus' quiz form, as `eval --shots` asks
    assert len(load_comparisons(tmp_path / "preference_train.jsonl")) == counts["preference_train.jsonl"]
    assert len(load_comparisons(tmp_path / "rankings_train.jsonl")) == counts["rankings_train.jsonl"]
    writers = [json.loads(line)["writer"] for line in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    assert set(writers) == set(world.WRITERS)  # each demonstration says who wrote it

    by_prompt = {t.prompt: t for f in FAMILIES for t in world.tasks("train", f, 200 // len(FAMILIES))}
    for line in (tmp_path / "rankings_train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        task = by_prompt[rec["prompt"]]
        rewards = [world.gold_reward(task, r) for r in rec["responses"]]
        assert rec["ranks"] == sorted(rec["ranks"]) and rec["ranks"][0] == 0
        assert rewards[0] == max(rewards) and rewards == sorted(rewards, reverse=True)
    for line in (tmp_path / "test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["family"] in FAMILIES and rec["completion"]


def test_parse_reads_every_drawn_question_back_and_nothing_the_world_does_not_ask(drawn):
    for (split, family), tasks in drawn.items():
        for t in tasks:
            assert world.parse(t.prompt) == t, t
    name = world.made_up_countries()[0]
    assert world.parse(f"  What is the capital of {name}?  ").family == "unanswerable"
    for other in ("What is 25 plus 3?", "What is 3 minus 9?", "What is 07 times 2?",  # outside the world's ranges
                  "Which is larger, 5 or 5?", 'Reverse the word "xylophone".', "What is the capital of Atlantis?",
                  'How many times does the letter "z" appear in "apple"?', "What is bigger: a ant or a cow?",
                  "Which is bigger, the ant or the bee?", "Sort these words alphabetically: cat, cat, dog.",
                  "What is bigger: horse or a cat?", "What is 7 times 8", ""):
        assert world.parse(other) is None, other
