"""In-context learning: `eval --shots K` asks a base model in its corpus' quiz form after K worked
questions of the same family from the train split, as many as the context holds."""

from __future__ import annotations

import json

import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.data.builtin import generate_corpus
from chatfoundry.eval.world import quiz_prompt, quiz_prompts
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import train_tokenizer

from conftest import last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("kshot")
    tok = train_tokenizer(iter([generate_corpus(20_000)]), "char", 0)
    torch.manual_seed(0)
    model = randomize(DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=160)), std=0.05)
    save_checkpoint(root / "pre", model, tok)
    return root / "pre", tok


def test_the_prompt_is_the_corpus_quiz_form():
    task, worked = world.tasks("test", "facts", 1)[0], world.tasks("train", "facts", 2)
    assert quiz_prompt(task, []) == f"Question: {task.prompt}\nAnswer:"
    text = quiz_prompt(task, worked)
    assert text == "".join(f"Question: {w.prompt}\nAnswer: {w.reference}\n" for w in worked) + quiz_prompt(task, [])
    # One of the corpus' own quiz layouts: a document of such lines is what pretraining saw.
    assert 'Question: {q}\nAnswer: {r}' in world._QUIZ_FORMATS


def test_worked_questions_are_the_familys_from_train_and_fit_the_context(base):
    _, tok = base
    tasks = [t for f in ("arithmetic", "facts", "unanswerable") for t in world.tasks("test", f, 5)]
    for shots, block in ((0, 160), (2, 400), (8, 160)):
        prompts = quiz_prompts(tok, tasks, shots, block, room=24)
        for task, (ids, examples) in zip(tasks, prompts):
            assert len(examples) <= shots and len(ids) + 24 <= block
            assert all(e.family == task.family and world.split_of(e.group) == "train" for e in examples)
            assert ids[0] == tok.token_to_id("<|eos|>")  # a fresh document
        if shots == 2:  # room enough: every prompt holds both
            assert all(len(e) == 2 for _, e in prompts)
        if shots == 8:  # 160 characters hold fewer than 8 worked questions: the first ones go
            assert all(len(e) < 8 for _, e in prompts) and any(len(e) >= 1 for _, e in prompts)
    assert quiz_prompts(tok, tasks, 2, 400, 24) == quiz_prompts(tok, tasks, 2, 400, 24)  # the same draw each time


def test_eval_shots_scores_a_base_model(base, capsys):
    ckpt, _ = base
    code, stdout, err = run_cli(["eval", "--ckpt", str(ckpt), "--shots", "2", "--per_family", "3",
                                 "--max_new_tokens", "16", "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    assert summary["shots"] == 2 and 0 < summary["shots_used"] <= 2 and set(summary["families"]) == set(world.FAMILIES)
    assert "asked in the quiz form, 2-shot" in stdout


@pytest.mark.parametrize("extra, message", [(["--shots", "-1"], "--shots: must be >= 0"),
                                            (["--shots", "1", "--system", "Be brief."], "--system is for a chat model"),
                                            (["--shots", "1", "--tool_questions", "2"], "--tool_questions is for a chat")])
def test_bad_shots_are_one_line(base, capsys, extra, message):
    ckpt, _ = base
    code, _, err = run_cli(["eval", "--ckpt", str(ckpt), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_eval_scores_the_multi_step_questions_of_cot(base, capsys, tmp_path):
    ckpt, _ = base
    code, stdout, err = run_cli(["eval", "--ckpt", str(ckpt), "--shots", "1", "--families", "multistep",
                                 "--per_family", "3", "--max_new_tokens", "8", "--out", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    assert set(summary["families"]) == {"multistep"} and summary["overall"]["n"] == 3
    answers = json.loads((tmp_path / "eval.json").read_text())["answers"]
    assert {a["prompt"] for a in answers} == {t.prompt for t in world.tasks("test", world.MULTISTEP, 3)}
    code, _, err = run_cli(["eval", "--ckpt", str(ckpt), "--families", "multi_step"], capsys)
    assert code == 2 and "is not one of arithmetic" in err and "multistep" in err, err
