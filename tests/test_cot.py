"""Chain of thought: the world's multi-step questions (steps inside the table, a worked answer the
verifier checks step by step, held out by computation) and `chatfoundry cot`, which pretrains,
asks zero-shot, finetunes on direct and on worked answers, scores, resumes and refuses bad input."""

from __future__ import annotations

import json
import random
import re

import pytest

from chatfoundry import cot
from chatfoundry.data import corpus, world

from conftest import last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_step_is_a_line_of_the_table_and_the_worked_answer_checks():
    rng = random.Random(0)
    kinds = set()
    for _ in range(500):
        task = world.multistep_task(rng)
        kinds.add(task.kind)
        steps = world.steps_of(*world.computation(task))
        assert 2 <= len(steps) <= 3 and str(steps[-1][3]) == task.answer
        for x, op, y, z in steps:
            assert 0 <= x <= corpus.ARITHMETIC_MAX and 0 <= y <= corpus.ARITHMETIC_MAX and z >= 0
        assert world.stated_steps(world.worked(task)) == steps  # products first, then left to right
        assert world.steps_valid(task, world.worked(task)) and world.is_correct(task, world.worked(task))
        assert world.is_correct(task, task.reference) and not world.steps_valid(task, task.reference)
        assert world.gold_reward(task, world.worked(task)) == world.gold_reward(task, task.reference) == 1.0
    assert kinds == {"expression", "story"}


def test_the_verifier_reads_the_steps():
    task = world.multistep_question((3, 4, 2), "+*", "What is {e}?")
    assert task.prompt == "What is 3 + 4 * 2?" and task.answer == "11" and task.group == "3+4*2"
    assert world.worked(task) == "4 * 2 = 8. 3 + 8 = 11. 3 + 4 * 2 is 11."
    assert world.steps_valid(task, "4 * 2 = 8. 3 + 8 = 11. The answer is 11.")
    assert not world.steps_valid(task, "4 * 2 = 9. 3 + 9 = 11. The answer is 11.")  # a wrong step
    assert not world.steps_valid(task, "3 + 8 = 11. The answer is 11.")  # a step left out
    assert not world.is_correct(task, "4 * 2 = 8. 3 + 8 = 12. 3 + 4 * 2 is 12.")
    story = world.multistep_question((7, 5, 3), "+-", "How many {things} does {name} have now?", "Hugo", "he",
                                     "pencils")
    assert story.prompt == ("Hugo had 7 pencils. He found 5 more and gave 3 away. How many pencils does Hugo have now?")
    assert story.answer == "9" and story.group == "7+5-3" and world.worked(story).startswith("7 + 5 = 12. 12 - 3 = 9.")
    assert world.steps_of((3, 11), "*") == [(3, "*", 11, 33)]  # the last step may leave 0..12
    assert world.steps_of((3, 11, 1), "*+") is None and world.steps_of((3, 5), "-") is None  # off the table
    assert world.steps_of((2, 3, 3, 5), "+*-") == [(3, "*", 3, 9), (2, "+", 9, 11), (11, "-", 5, 6)]
    assert world.steps_of((2, 3, 4, 5), "+*-") is None  # 2 + 12 = 14, then 14 is off the table


def _groups(text: str) -> list[str]:
    """The computation of every question in a quiz-form text, read back from its expression or story."""
    stories = []
    for ops, template in world._STORIES.items():
        pattern = re.escape(template)
        for i in range(len(ops) + 1):
            pattern = pattern.replace(re.escape("{%d}" % i), r"(\d+)")
        for name in ("name", "He", "things"):
            pattern = pattern.replace(re.escape("{%s}" % name), r"\w+")
        stories.append((ops, re.compile(pattern + r" How many .+\?")))
    groups = []
    for question in re.findall(r"Question: (.*)\n", text):
        if m := re.search(r"\d+(?: [-+*] \d+)+", question):
            groups.append(m.group(0).replace(" ", ""))
            continue
        ops, m = next((ops, m) for ops, p in stories if (m := p.fullmatch(question)))
        groups.append("".join(f"{n}{op}" for n, op in zip(m.groups(), ops)) + m.groups()[-1])
    return groups


def test_held_out_computations_are_never_answered_in_the_corpus_or_sft():
    cfg = cot.CotConfig(corpus_chars=60_000, sft_questions=300, test_questions=100)
    tasks = cot.held_out(cfg)
    assert len(tasks) == 100 and {t.kind for t in tasks} == {"expression", "story"}
    assert all(world.split_of(t.group) == "test" for t in tasks)
    text = "\n\n".join(cot.corpus_texts(cfg)) + "\n"
    groups = _groups(text)
    assert len(groups) > 300 and all(world.split_of(g) == "train" for g in groups)
    assert _groups("".join(f"Question: {t.prompt}\n" for t in tasks)) == [t.group for t in tasks]  # the reader reads
    assert text.count(cot.TRIGGER) > 50 and "times" in text  # worked answers, and the table
    for worked in (False, True):
        examples = cot.sft_examples(cfg, worked)
        prompts = "".join(f"Question: {ex['messages'][0]['content']}\n" for ex in examples)
        assert len(examples) == 300 and all(world.split_of(g) == "train" for g in _groups(prompts))
        assert all(bool(world.stated_steps(ex["messages"][1]["content"])) == worked for ex in examples)


TINY = ["--sizes", "tiny", "--seeds", "3", "--corpus_chars", "60000", "--pretrain_steps", "12", "--pretrain_batch", "4",
        "--sft_questions", "64", "--sft_steps", "4", "--test_questions", "12", "--max_new_tokens", "24",
        "--device", "cpu"]


@pytest.mark.slow
def test_cot_pretrains_finetunes_both_ways_scores_and_resumes(tmp_path, capsys):
    out = tmp_path / "cot"
    code, stdout, err = run_cli(["cot", "--out", str(out), *TINY, "--json"], capsys)
    assert code == 0, err
    r = last_json(stdout)
    s = r["sizes"]["tiny"]
    for key in ("direct", "worked", "gap", "worked_steps_valid"):
        assert set(s[key]["per_seed"]) == {"3"} and 0 <= abs(s[key]["mean"]) <= 1, key
    assert set(s["zero_shot"]) == {"plain", "step_by_step", "gap", "plain_worked"} and r["test_questions"] == 12
    seed = out / "tiny" / "seed3"
    for run in ("pretrain", "sft_direct", "sft_worked"):  # ordinary runs, each in its own folder
        assert (seed / run / "checkpoint" / "model.safetensors").is_file() and (seed / run / "config.yaml").is_file()
    answers = [json.loads(x) for x in (seed / "answers_worked.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and {"prompt", "answer", "response", "correct"} <= set(answers[0])
    for name in ("cot.json", "cot.png", "config.yaml", "metrics.jsonl", "corpus.jsonl", "sft_direct.jsonl",
                 "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    # The SFT arms differ only in the answers: the same questions, in the same order.
    direct, worked = ((out / f"sft_{arm}.jsonl").read_text().splitlines() for arm in ("direct", "worked"))
    assert [json.loads(a)["messages"][0] for a in direct] == [json.loads(a)["messages"][0] for a in worked]
    # A second call trains nothing again and reports the same.
    first = (seed / "result.json").stat().st_mtime_ns
    code, stdout, err = run_cli(["cot", "--out", str(out), *TINY, "--json"], capsys)
    assert code == 0, err
    assert (seed / "result.json").stat().st_mtime_ns == first and last_json(stdout)["sizes"] == r["sizes"]


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "huge"], "sizes: unknown preset 'huge'"),
    (["--worked_share", "1"], "worked_share: must be in (0, 1)"),
    (["--seeds", "1", "1"], "give each size and each seed once"),
], ids=["preset", "share", "seeds"])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "cot"
    args = [a for a in TINY if a not in ("--sizes", "tiny", "--seeds", "3")]
    code, _, err = run_cli(["cot", "--out", str(out), *args, *(extra if "--sizes" in extra else ["--sizes", "tiny"]),
                            *(extra if "--sizes" not in extra else [])], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_context_too_short_for_the_worked_answers_is_refused_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(cot.PRESETS, "tiny", (4, 4, 128, 32))
    cfg = cot.CotConfig(out=str(tmp_path / "cot"), sizes=["tiny"], corpus_chars=20_000, sft_questions=64)
    with pytest.raises(cot.UserError, match=r"sizes: tiny's context of 32 tokens does not hold the longest worked"):
        cot.prepare(cfg, tmp_path / "cot")
    assert not (tmp_path / "cot").exists()
