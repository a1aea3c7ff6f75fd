"""Best-of-n: the reward's pick of n samples, written as ranked comparisons and as SFT chats that
the other stages read, and the held-out best-of-k curve."""

from __future__ import annotations

import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.data.formats import load_comparisons, load_sft
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import chat_stop_ids, train_tokenizer
from chatfoundry.train.best_of_n import dense_ranks

from conftest import last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bon")
    questions = [t for f in world.FAMILIES for t in world.tasks("train", f, 60, 0)]
    text = " ".join(t.prompt + " " + t.reference for t in questions) + " abcdefghijklmnopqrstuvwxyz0123456789"
    tok = train_tokenizer(iter([text]), "char", 0)
    torch.manual_seed(0)
    model = randomize(DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=128)), std=0.05)
    save_checkpoint(root / "sft", model, tok, generation={"eos_token_id": chat_stop_ids(tok)})
    (root / "rewards.py").write_text("def say_a(prompt, response):\n"
                                     "    return response.count('a') / max(len(response), 1)\n")
    return root


def test_dense_ranks():
    assert dense_ranks([0.9, 0.5, 0.9, 0.1]) == [0, 1, 0, 2]


def test_best_of_n_writes_ranked_samples_and_sft_chats_and_its_curve_rises(root, tmp_path, capsys):
    out = tmp_path / "bon"
    code, stdout, err = run_cli(["best-of-n", "--init", str(root / "sft"), "--reward",
                                 f"python:{root / 'rewards.py'}:say_a", "--out", str(out), "--n", "8",
                                 "--train_prompts", "12", "--prompts", "world:arithmetic,strings",
                                 "--eval.per_family", "4", "--rollout.max_new_tokens", "12", "--device", "cpu",
                                 "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    comparisons, chats = load_comparisons(out / "samples.jsonl"), load_sft(out / "best.jsonl")
    assert 0 < len(comparisons) == len(chats) == summary["kept"] <= 12
    for c, chat in zip(comparisons, chats):
        assert chat.messages[-1]["content"] == c.responses[0] and c.ranks[0] == 0  # the best first
    curve = summary["curve"]
    assert [c["k"] for c in curve] == [1, 2, 4, 8] and summary["heldout_prompts"] == 8
    rewards = [c["reward"] for c in curve]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0]  # the max of more samples
    assert all("gold_gain" in c for c in curve) and curve[0]["gold_gain"] == pytest.approx(0, abs=1e-9)
    assert (out / "best_of_n.png").is_file()
    assert [(r["step"], r["reward"]) for r in read_metrics(out / "metrics.jsonl")] == [(c["k"], c["reward"]) for c in curve]


def test_a_group_of_one_is_refused(root, tmp_path, capsys):
    code, _, err = run_cli(["best-of-n", "--init", str(root / "sft"), "--reward", "verifier", "--n", "1",
                            "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "n: must be >= 2" in err and not (tmp_path / "o").exists()
