"""GRPO / RLOO: group advantages and the loss's averaging against hand computations, a toy reward
learned end to end through the command (with --resume), and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.rl import core
from chatfoundry.tokenizer import chat_stop_ids, train_tokenizer
from chatfoundry.train.grpo import group_advantages

from conftest import last_json, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_group_advantages_equal_a_hand_computation():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    # grpo: (r - mean) / (std + 1e-4), std unbiased (torch's and TRL's): group 1 mean 0.5, std 0.57735
    std = (sum((x - 0.5) ** 2 for x in (1, 0, 0, 1)) / 3) ** 0.5
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert torch.allclose(group_advantages(r, 4), torch.tensor(want))
    assert torch.allclose(group_advantages(r, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # rloo: r_i minus the mean of the other three
    loo = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0, 0, 0, 0]
    assert torch.allclose(group_advantages(r, 4, "rloo"), torch.tensor(loo))


def test_the_loss_is_averaged_per_token_per_sequence_or_by_a_constant():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert core.aggregate(x, mask, "token").item() == pytest.approx(10 / 4)
    assert core.aggregate(x, mask, "sequence").item() == pytest.approx((2 + 4) / 2)
    assert core.aggregate(x, mask, "constant", horizon=5).item() == pytest.approx(10 / (2 * 5))


# ---------------------------------------------------------------- the command


REWARDS = ("def say_a(prompt, response):\n    return response.count('a') / max(len(response), 1)\n"
           "def broken(prompt, response):\n    return {}['missing']\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    questions = [t for f in world.FAMILIES for t in world.tasks("train", f, 60, 0)]
    text = " ".join(t.prompt + " " + t.reference for t in questions) + " abcdefghijklmnopqrstuvwxyz0123456789"
    tok = train_tokenizer(iter([text]), "char", 0)
    torch.manual_seed(0)
    save_checkpoint(root / "sft", DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=128)), tok,
                    generation={"eos_token_id": chat_stop_ids(tok)})
    (root / "rewards.py").write_text(REWARDS)
    return root


FAST = ["--rollout.batch_size", "4", "--group", "4", "--rollout.max_new_tokens", "8", "--rollout.pool", "50",
        "--minibatch_size", "8", "--eval.per_family", "2", "--eval.max_new_tokens", "8", "--device", "cpu"]


def test_grpo_raises_a_toy_reward_and_resumes(root, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["grpo", "--init", str(root / "sft"), "--reward", f"python:{root / 'rewards.py'}:say_a", "--out", str(out),
            "--lr", "3e-3", "--kl.coef", "0.01", *FAST]
    code, stdout, err = run_cli([*base, "--iterations", "30", "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.1, (first, last)  # the share of a's in the samples
    assert summary["reward_heldout_grpo"] > summary["reward_heldout_sft"] and summary["kl_heldout"] > 0
    assert {"gold_gain", "gold_gain_se", "kl_heldout"} <= set(summary)
    fam = summary["families"]["arithmetic"]
    assert {"exact_match_sampled", "exact_match_sampled_sft"} <= set(fam)
    assert (out / "grpo.png").is_file() and (out / "eval.json").is_file()
    code, stdout, err = run_cli([*base, "--iterations", "32", "--resume", "--eval.per_family", "0", "--json"], capsys)
    assert code == 0, err
    iterations = [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, 33))


@pytest.mark.parametrize("extra, message", [
    (["--group", "1"], "group: must be >= 2"),
    (["--reward", "python:{root}/rewards.py:broken"], "raised KeyError: 'missing'"),
    (["--reward", "rm"], "reward: give rm:PATH, verifier or python:MODULE:FUNC"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(root, extra, message, tmp_path, capsys):
    extra = [x.format(root=root) for x in extra]
    argv = ["grpo", "--init", str(root / "sft"), "--reward", "verifier", "--out", str(tmp_path / "o"), *FAST, *extra]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
