"""Self-instruct: ROUGE-L by hand, each filter on a case it must drop, and the command end to end on
a tiny teacher trained here, writing Alpaca JSONL that `sft --data` reads."""

from __future__ import annotations

import json

import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.data.formats import load_sft
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import chat_stop_ids, train_tokenizer
from chatfoundry.train.self_instruct import (SelfInstructConfig, answer_verdict, diversity, instruction_verdict,
                                             near_duplicate, rouge_l, words)

from conftest import last_json, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rouge_l_against_hand_computed_values():
    peru, chile = words("What is the capital of Peru?"), words("What is the capital of Chile?")
    assert peru == ["what", "is", "the", "capital", "of", "peru"]
    assert rouge_l(peru, chile) == pytest.approx(2 * 5 / 12)  # LCS "what is the capital of": P = R = 5/6
    # LCS "is the capital of" (4) of 7 and 6 words: P = 4/7, R = 4/6, F = 2PR/(P+R) = 8/13
    assert rouge_l(words("Which city is the capital of Peru?"), chile) == pytest.approx(8 / 13)
    assert rouge_l(list("abcd"), list("acdb")) == pytest.approx(0.75)  # a subsequence, not a substring: "acd"
    assert rouge_l(peru, peru) == 1.0 and rouge_l(peru, ["dog"]) == 0.0 and rouge_l([], peru) == 0.0
    assert rouge_l(peru, chile) == rouge_l(chile, peru)


def test_near_duplicates_are_dropped_and_new_instructions_pass():
    cfg = SelfInstructConfig(teacher="t")
    pool = [words("What is the capital of Peru?")]
    assert near_duplicate(words("What is the capital of Chile?"), pool, 0.7)  # 0.83
    assert not near_duplicate(words("Which city is the capital of Chile?"), pool, 0.7)  # 0.62
    assert near_duplicate(words("what is the capital of peru"), pool, 1.0)  # a copy, whatever the threshold
    assert instruction_verdict("What is the capital of Chile?", True, None, pool, SelfInstructConfig(
        teacher="t", seed_tasks="seeds.jsonl")) == "near_duplicate"
    train = next(t for t in world.tasks("train", "facts", 50) if t.kind == "capital")
    assert instruction_verdict(train.prompt, True, train, [], cfg) is None


def test_instruction_filters():
    cfg = SelfInstructConfig(teacher="t", max_words=8)
    train = world.tasks("train", "arithmetic", 1)[0]
    test = world.tasks("test", "facts", 1)[0]
    assert instruction_verdict("", True, None, [], cfg) == "malformed_instruction"
    assert instruction_verdict(train.prompt, False, train, [], cfg) == "malformed_instruction"  # the line never ended
    assert instruction_verdict("a " * 9, True, None, [], cfg) == "malformed_instruction"  # too long
    assert instruction_verdict(test.prompt, True, test, [], cfg) == "held_out"  # the student is scored on it
    assert instruction_verdict("Which is loud in Samoa?", True, None, [], cfg) == "unverifiable"
    keep = SelfInstructConfig(teacher="t", unverifiable="keep")
    assert instruction_verdict("Which is loud in Samoa?", True, None, [], keep) is None
    # a file's seeds: no verifier, so nothing is unverifiable
    assert instruction_verdict("Which is loud in Samoa?", True, None, [], SelfInstructConfig(teacher="t", seed_tasks="f")) is None


def test_answer_filters_malformed_and_verifier():
    task = world.parse("What is 7 times 8?")
    assert task is not None and task.answer == "56"
    assert answer_verdict(task.prompt, "7 times 8 is 56.", True, task, 40) is None
    assert answer_verdict(task.prompt, "7 times 8 is 54.", True, task, 40) == "verifier"  # wrong, by the gold check
    assert answer_verdict(task.prompt, "", True, task, 40) == "malformed_answer"
    assert answer_verdict(task.prompt, "7 times 8 is 56.", False, task, 40) == "malformed_answer"  # never ended
    assert answer_verdict(task.prompt, "56 " * 41, True, task, 40) == "malformed_answer"  # too long
    assert answer_verdict(task.prompt, "What is 7 times 8? 56", True, task, 40) == "malformed_answer"  # repeats it
    assert answer_verdict("Say hi.", "Hi!", True, None, 40) is None  # no verifier: kept as it is
    unknown = world.parse(f"What is the capital of {world.made_up_countries()[0]}?")
    assert unknown.family == "unanswerable"
    assert answer_verdict(unknown.prompt, "I do not know.", True, unknown, 40) is None
    assert answer_verdict(unknown.prompt, "Its capital is Paris.", True, unknown, 40) == "verifier"


def test_diversity():
    d = diversity(["What is 7 times 8?", "What is 7 times 8?", "Spell \"dog\" backwards."], seed=0)
    # 13 words, 8 distinct; 10 bigrams, 6 distinct
    assert d["distinct_1"] == pytest.approx(8 / 13, abs=1e-4) and d["distinct_2"] == pytest.approx(6 / 10)
    assert d["mean_pairwise_rouge_l"] == pytest.approx(1 / 3, abs=1e-4)  # 1, 0, 0
    assert d["families"] == {"arithmetic": pytest.approx(2 / 3, abs=1e-4), "strings": pytest.approx(1 / 3, abs=1e-4)}


# ---------------------------------------------------------------- the command


QUESTIONS = [t for f in ("arithmetic", "strings") for t in world.tasks("train", f, 40, 0)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny char model SFT-ed here on the world's questions as "Question:" lines and as chats: it
    writes lines that end and answers that stop, which is all the command needs of it."""
    root = tmp_path_factory.mktemp("si")
    text = "\n".join(t.prompt + " " + t.reference for t in QUESTIONS) + " abcdefghijklmnopqrstuvwxyzQ:\n"
    tok = train_tokenizer(iter([text]), "char", 0)
    torch.manual_seed(0)
    save_checkpoint(root / "base", DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=160)), tok,
                    generation={"eos_token_id": chat_stop_ids(tok)})
    lines = [{"text": "".join(f"Question: {t.prompt}\n" for t in QUESTIONS[i:i + 4])} for i in range(0, 80, 4)]
    lines += [{"prompt": t.prompt, "completion": t.answer} for t in QUESTIONS]
    (root / "teach.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code = _cli(["sft", "--init", str(root / "base"), "--data", str(root / "teach.jsonl"), "--out", str(root / "sft"),
                 "--train.steps", "150", "--train.lr", "5e-3", "--train.batch_size", "16", "--train.warmup_steps", "5",
                 "--train.eval_every", "150", "--train.save_every", "150", "--eval.per_family", "0", "--device", "cpu"])
    assert code == 0
    seeds = [{"instruction": t.prompt, "instances": [{"input": "", "output": t.reference}]} for t in QUESTIONS[:6]]
    seeds.append({"prompt": [{"role": "user", "content": QUESTIONS[6].prompt}]})
    (root / "seeds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in seeds))
    return root


def _cli(argv: list[str]) -> int:
    from chatfoundry.cli import main

    return main(argv)


def test_self_instruct_writes_alpaca_jsonl_that_sft_reads(teacher, tmp_path, capsys):
    out = tmp_path / "si"
    code, stdout, err = run_cli(["self-instruct", "--teacher", str(teacher / "sft"), "--seed_tasks",
                                 str(teacher / "seeds.jsonl"), "--n", "6", "--max_written", "128", "--shots", "3",
                                 "--max_answer_tokens", "24", "--out", str(out), "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert 0 < len(rows) == summary["kept"] <= 6 and summary["seeds"] == 7
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in rows)
    assert summary["written"] == summary["kept"] + summary["surplus"] + sum(summary["dropped"].values())
    assert summary["teacher_tokens"]["total"] > 0 and summary["teacher_cpu_s"] > 0
    assert {"distinct_1", "distinct_2", "mean_pairwise_rouge_l", "families"} <= set(summary["diversity"])
    examples = load_sft(out / "data.jsonl")
    assert [e.messages[-1]["content"] for e in examples] == [r["output"] for r in rows]
    assert (out / "self_instruct.png").is_file() and (out / "config.yaml").is_file()
    assert read_metrics(out / "metrics.jsonl")[-1]["kept"] == len(rows)
    code, _, err = run_cli(["sft", "--init", str(teacher / "base"), "--data", str(out / "data.jsonl"), "--out",
                            str(tmp_path / "student"), "--train.steps", "2", "--train.batch_size", "2",
                            "--train.eval_every", "2", "--train.save_every", "2", "--eval.per_family", "0",
                            "--device", "cpu"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("line, message", [
    (None, "no such file"),
    ('{"instruction": "Say hi."}\n{"text": "no instruction"}\n', ':2: expected an "instruction"'),
    ('{"instruction": "Say hi."}\n{"instruction": \n', ":2: invalid JSON"),
    ('{"instruction": "   "}\n', ":1: an empty instruction"),
])
def test_bad_seed_files_are_one_line_and_exit_2(teacher, tmp_path, capsys, line, message):
    seeds = tmp_path / "seeds.jsonl"
    if line is not None:
        seeds.write_text(line)
    code, stdout, err = run_cli(["self-instruct", "--teacher", str(teacher / "sft"), "--seed_tasks", str(seeds),
                                 "--out", str(tmp_path / "si"), "--device", "cpu"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "si" / "data.jsonl").exists()
