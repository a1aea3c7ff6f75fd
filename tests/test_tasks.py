"""Task sources and rewards (data/tasks.py): a prompt file's stable split, the world's families,
Python rewards by module or by file, bad input as one line, and a user's own prompts end to end:
label -> rm -> ppo --reward rm:R -> chat, and ppo --reward python:..., each raising its reward
on the file's held-out prompts."""

from __future__ import annotations

import io
import json

import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import tasks, world
from chatfoundry.errors import UserError
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import chat_stop_ids, train_tokenizer

from conftest import last_json, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Prompts the world never asks, with a field for the reward function.
TOPICS = ("the sea", "a red kite", "my garden", "winter", "a small dog", "the moon", "bread", "a long road")
REWARDS = ("def say_a(prompt, response, topic=''):\n"
           "    assert isinstance(prompt, str) and topic in prompt\n"
           "    return response.count('a') / max(len(response), 1)\n"
           "def says_nothing(prompt, response, **fields):\n"
           "    return 'many'\n")


def write_prompts(path, n: int, start: int = 0) -> list[dict]:
    lines = [{"prompt": f"tell me about {TOPICS[i % len(TOPICS)]}, story {i}", "topic": TOPICS[i % len(TOPICS)]}
             for i in range(start, start + n)]
    with open(path, "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return lines


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny chat model (random weights, char tokenizer), 200 prompts and a reward file."""
    root = tmp_path_factory.mktemp("tasks")
    text = " ".join(t.prompt + " " + t.reference for f in world.FAMILIES for t in world.tasks("train", f, 60, 0))
    tok = train_tokenizer(iter([text + " abcdefghijklmnopqrstuvwxyz0123456789,"]), "char", 0)
    torch.manual_seed(0)
    lm = DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=128))
    save_checkpoint(root / "sft", lm, tok, generation={"eos_token_id": chat_stop_ids(tok)})
    write_prompts(root / "prompts.jsonl", 200)
    (root / "lib").mkdir()
    (root / "lib" / "rewards.py").write_text(REWARDS)
    return root


def cli_ok(argv: list[str], capsys) -> dict:
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    return last_json(out)


# ---------------------------------------------------------------- sources


def test_a_prompt_file_splits_by_a_stable_hash_and_keeps_its_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    write_prompts(path, 300)
    src = tasks.source(str(path))
    train, held = src.prompts("train", 10**9, 0), src.prompts("test", 10**9, 0)
    assert len(train) + len(held) == 300 and 15 <= len(held) <= 50  # about 10%
    assert not {p.text for p in train} & {p.text for p in held}
    assert src.prompts("val", 10**9, 0) == held  # a file has one held-out side
    assert all(p.fields["topic"] in p.text and p.task is None and p.family == "" for p in held)
    assert not src.has_verifier
    # The split is by content, not position: a grown file keeps every prompt on its side.
    write_prompts(path, 200, start=300)
    grown = tasks.source(str(path))
    assert {p.text for p in held} <= {p.text for p in grown.prompts("test", 10**9, 0)}
    assert {p.text for p in train} <= {p.text for p in grown.prompts("train", 10**9, 0)}
    # n below the pool: a seeded subset, the same for the same seed
    assert src.prompts("train", 20, 1) == src.prompts("train", 20, 1) != src.prompts("train", 20, 2)
    assert len(src.prompts("train", 20, 1)) == 20
    # --eval_prompts: the whole file trains, the other file is held out
    other = tmp_path / "eval.jsonl"
    write_prompts(other, 7, start=1000)
    src = tasks.source(str(path), eval_prompts=str(other))
    assert len(src.prompts("train", 10**9, 0)) == 500 and len(src.prompts("test", 10**9, 0)) == 7


def test_the_world_as_a_source_and_its_families():
    src = tasks.source("world:arithmetic")
    prompts = src.prompts("train", 30, 0)
    assert src.has_verifier and src.families == ("arithmetic",) and len(prompts) == 30
    assert all(p.family == "arithmetic" and p.messages[0]["content"] == p.task.prompt for p in prompts)
    assert src.verify(prompts[0], prompts[0].task.reference) == 1.0
    default = tasks.source("world")
    assert [p.task for p in default.prompts("train", 100, 3)] == tasks.prompt_tasks("train", 100, 3)
    with pytest.raises(UserError, match="unknown world family 'poems'"):
        tasks.source("world:arithmetic,poems")


def test_python_rewards_by_module_or_by_file(root, tmp_path, monkeypatch):
    chat = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "tell me about winter"})
    prompt = tasks.Prompt(chat, {"topic": "winter"})
    assert prompt.text == "tell me about winter"  # the last user message
    by_file = tasks.python_reward(f"python:{root / 'lib' / 'rewards.py'}:say_a")
    assert by_file([prompt, prompt], ["aab", "bbb"]) == [pytest.approx(2 / 3), 0.0]
    monkeypatch.syspath_prepend(str(root / "lib"))
    assert tasks.python_reward("python:rewards:say_a")([prompt], ["a"]) == [1.0]
    with pytest.raises(UserError, match="returned 'many', not a number"):
        tasks.python_reward("python:rewards:says_nothing")([prompt], ["a"])
    for spec, message in (("python:rewards:nothing", "cannot import"), ("python:no/such/file.py:f", "no such file")):
        with pytest.raises(UserError, match=message):
            tasks.python_reward(spec)


@pytest.mark.parametrize("case", ["no_prompt", "bad_json", "reserved", "no_verifier", "bad_family", "simulated_on_file",
                                  "nothing_held_out"])
def test_bad_prompts_and_rewards_are_one_line_exit_2_and_write_nothing(case, root, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n' + {"no_prompt": '{"question": "hi"}\n', "bad_json": '{"prompt": \n',
                                             "reserved": '{"prompt": "hi", "response": "x"}\n'}.get(case, ""))
    reward = f"python:{root / 'lib' / 'rewards.py'}:say_a"
    stage, prompts, expect = "ppo", str(bad), {
        "no_prompt": f"{bad}:2: missing field 'prompt'", "bad_json": f"{bad}:2: invalid JSON",
        "reserved": f"{bad}:2: field 'response' is reserved", "no_verifier": "have no verifier",
        "bad_family": "unknown world family", "simulated_on_file": "simulated needs a verifier",
        "nothing_held_out": "no held-out prompts"}[case]
    if case == "no_verifier":
        prompts, reward = str(root / "prompts.jsonl"), "verifier"
    elif case == "bad_family":
        prompts = "world:poems"
    elif case == "simulated_on_file":
        stage, prompts = "label", str(root / "prompts.jsonl")
    out = tmp_path / "run"
    argv = (["ppo", "--init", str(root / "sft"), "--reward", reward] if stage == "ppo" else
            ["label", "--init", str(root / "sft")]) + ["--prompts", prompts, "--out", str(out), "--device", "cpu"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_old_names_hear_the_new_ones(tmp_path, capsys):
    for argv, expect in ((["ppo", "--init", "sft", "--rm", "rm"], "unknown option --rm (renamed: --reward (rm:PATH))"),
                         (["ppo", "--init", "sft", "--rollout.prompts", "50"], "(renamed: --rollout.pool)"),
                         (["pipeline", "--ppo.rm", "rm"], "(renamed: --ppo.reward (rm:PATH))"),
                         (["ppo", "--init", "sft", "--ppo.lam", "0.9"], "(renamed: --gae_lambda)"),
                         (["pipeline", "--ppo.ppo.target_kl", "0.1"], "(renamed: --ppo.target_kl)"),
                         (["rl", "train", "--algo", "ppo", "--ppo.clip_vf", "0.2"], "(renamed: --ppo.value_clip)"),
                         (["ppo", "--init", "sft", "--reward", "verifier", "--prompts", "3"], "how many: --rollout.pool")):
        code, _, err = run_cli([*argv, "--out", str(tmp_path / "run")], capsys)
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "old.yaml").write_text("init: sft\nrm: rm\n")
    code, _, err = run_cli(["ppo", "--config", str(tmp_path / "old.yaml"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "unknown config key 'rm' (renamed: 'reward (rm:PATH)')" in err, err
    assert not (tmp_path / "run").exists()


def test_the_pipeline_stays_on_the_world(tmp_path, capsys):
    code, _, err = run_cli(["pipeline", "--out", str(tmp_path / "p"), "--ppo.prompts", "my.jsonl"], capsys)
    assert code == 2 and "ppo.prompts: the pipeline runs on the built-in world" in err
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------- your own prompts, end to end

PPO = ["--iterations", "25", "--rollout.batch_size", "32", "--rollout.max_new_tokens", "12", "--rollout.pool", "200",
       "--rollout.no_eos_penalty", "0", "--minibatch_size", "16", "--lr", "3e-3", "--critic_lr", "3e-3",
       "--target_kl", "none", "--kl.coef", "0.01", "--kl.control", "fixed", "--eval.max_new_tokens", "12",
       "--device", "cpu"]


def test_your_own_prompts_and_reward_end_to_end(root, tmp_path, capsys, monkeypatch):
    """label -> rm -> ppo --reward rm:R -> chat, and ppo --reward python:..., on 200 prompts the
    world never asks: each raises its reward on the file's held-out prompts, with the KL reported."""
    prompts, sft = str(root / "prompts.jsonl"), str(root / "sft")
    reward = f"python:{root / 'lib' / 'rewards.py'}:say_a"
    held = len(tasks.source(prompts).prompts("test", 10**9, 0))
    label = cli_ok(["label", "--init", sft, "--prompts", prompts, "--labeler", reward, "--k", "4", "--tie", "0",
                    "--max_new_tokens", "12", "--out", str(tmp_path / "label"), "--device", "cpu"], capsys)
    assert label["prompts"] == prompts and label["splits"]["train"]["comparisons"] > 50
    assert "sft_gold_reward" not in label["splits"]["train"]  # no verifier, no gold
    rows = [json.loads(x) for x in (tmp_path / "label" / "val.jsonl").read_text().splitlines()]
    assert all("gold_reward" not in r and "family" not in r for r in rows)
    cli_ok(["rm", "--init", sft, "--data", str(tmp_path / "label"), "--out", str(tmp_path / "rm"),
            "--train.steps", "60", "--train.batch_size", "8", "--train.lr", "1e-3", "--train.warmup_steps", "5",
            "--device", "cpu"], capsys)
    for name, how in (("by_rm", f"rm:{tmp_path / 'rm'}"), ("by_function", reward)):
        s = cli_ok(["ppo", "--init", sft, "--prompts", prompts, "--reward", how, "--out", str(tmp_path / name), *PPO],
                   capsys)
        assert s["heldout_prompts"] == held and s["kl_heldout"] > 0 and "gold_reward" not in s
        assert s["reward_heldout_ppo"] > s["reward_heldout_sft"], (name, s)
        assert s["reward_gain_sampled"] > 3 * s["reward_gain_sampled_se"], (name, s)
        answers = json.loads((tmp_path / name / "eval.json").read_text())["answers"]
        assert len(answers) == held and {"prompt", "response", "sft_response", "rm", "sft_rm"} <= set(answers[0])
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me about the sea, story 7\n"))
    code, out, err = run_cli(["chat", "--ckpt", str(tmp_path / "by_rm"), "--max_new_tokens", "8"], capsys)
    assert code == 0 and out.strip(), err
