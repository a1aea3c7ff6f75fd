"""The reward-model stage: labeling (simulated, model and callable labelers), the K-wise ranking
loss against a hand computation, Spearman, the scalar head's parity with transformers'
...ForSequenceClassification through `convert --to_hf`, normalisation, resume, `score`, bad
data, and a learning test on held-out comparisons."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from chatfoundry.checkpoint import load_model, load_reward_model, save_checkpoint
from chatfoundry.data import world
from chatfoundry.data.formats import Comparison, load_comparisons
from chatfoundry.errors import UserError
from chatfoundry.models.heads import RewardModel
from chatfoundry.tokenizer import train_tokenizer
from chatfoundry.train.label import ranks_from
from chatfoundry.scoring import score_texts
from chatfoundry.train.reward import Encoded, collate, comparison_loss, encode_comparisons, spearman

from conftest import TINY, last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A pretrained policy with room for a question and a short answer (block 96, char tokenizer).
POLICY = ["96" if i and TINY[i - 1] == "--model.block_size" else x for i, x in enumerate(TINY)]
LABEL = "--k 3 --train_prompts 25 --val_prompts 30 --max_new_tokens 12 --device cpu".split()
RM = ("--train.steps 6 --train.batch_size 4 --train.warmup_steps 1 --train.eval_every 3 --train.save_every 3 "
      "--device cpu").split()


def cli_ok(argv: list[str], capsys) -> dict:
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    return last_json(out)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from chatfoundry.cli import main

    out = tmp_path_factory.mktemp("policy") / "run"
    assert main(["pretrain", *POLICY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def labels(policy, tmp_path_factory):
    """Labels from the simulated human with no noise and no tie margin: the gold order itself."""
    from chatfoundry.cli import main

    out = tmp_path_factory.mktemp("labels") / "run"
    assert main(["label", "--init", str(policy), "--out", str(out), *LABEL, "--noise", "0", "--tie", "0"]) == 0
    return out


# ---------------------------------------------------------------- labeling


def test_ranks_from_utilities_ties_and_order():
    assert ranks_from([0.1, 0.9, 0.5], tie=0.0) == [2, 0, 1]
    assert ranks_from([0.5, 0.52, 0.1, 0.9], tie=0.05) == [1, 1, 2, 0]  # 0.52 and 0.5 tie
    assert ranks_from([0.3, 0.3], tie=0.0) == [0, 0]  # equal utilities always tie


def test_label_writes_rankings_that_follow_the_gold_reward(labels):
    assert {p.name for p in labels.iterdir()} >= {"train.jsonl", "val.jsonl", "config.yaml", "metrics.jsonl",
                                                  "label.png"}
    train, val = load_comparisons(labels / "train.jsonl"), load_comparisons(labels / "val.jsonl")
    assert train and val
    val_records = [json.loads(line) for line in (labels / "val.jsonl").read_text().splitlines()]
    for c, rec in zip(val, val_records):
        gold = rec["gold_reward"]
        assert list(c.responses) == rec["responses"] and len(set(c.responses)) == len(c.responses) >= 2
        assert all(r.strip() for r in c.responses)
        # noise 0, tie 0: ranks are the gold order, equal gold rewards share a rank
        for i in range(len(gold)):
            for j in range(len(gold)):
                assert (c.ranks[i] < c.ranks[j]) == (gold[i] > gold[j])
    # The gold reward is hidden from the training file.
    assert all("gold_reward" not in json.loads(line) for line in (labels / "train.jsonl").read_text().splitlines())
    prompts = {c.prompt[0]["content"] for c in val}
    assert prompts <= {t.prompt for f in world.FAMILIES for t in world.tasks("val", f, 200, 1337)}


def test_label_with_a_python_callable_judge(policy, tmp_path, capsys, monkeypatch):
    (tmp_path / "judge_mod.py").write_text("def shortest(prompt, response):\n"
                                           "    assert isinstance(prompt, str) and prompt\n"
                                           "    return -len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = cli_ok(["label", "--init", str(policy), "--out", str(tmp_path / "run"), *LABEL, "--val_prompts", "0",
                      "--labeler", "python:judge_mod:shortest"], capsys)
    assert summary["splits"]["train"]["comparisons"] > 0
    for c in load_comparisons(tmp_path / "run" / "train.jsonl"):
        lengths = [len(r) for r in c.responses]
        assert lengths == sorted(lengths)  # best first: the shortest
    code, _, err = run_cli(["label", "--init", str(policy), "--out", str(tmp_path / "x"), *LABEL,
                            "--labeler", "python:judge_mod:nothing"], capsys)
    assert code == 2 and "cannot import" in err and not (tmp_path / "x").exists()


def test_label_stops_when_a_split_gives_no_comparison(policy, tmp_path, capsys, monkeypatch):
    (tmp_path / "flat_mod.py").write_text("def flat(prompt, response):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # every response ties: no prompt gives a comparison
    code, _, err = run_cli(["label", "--init", str(policy), "--out", str(tmp_path / "run"), *LABEL,
                            "--labeler", "python:flat_mod:flat"], capsys)
    assert code == 2 and "train_prompts: none of the 24 train prompts" in err.strip().splitlines()[-1]  # after the bar


def test_label_says_when_a_family_runs_out_of_questions(policy, tmp_path, capsys, monkeypatch):
    real = world.tasks  # a split that holds only two facts questions
    monkeypatch.setattr(world, "tasks", lambda split, family, n, seed=0:
                        real(split, family, min(n, 2) if family == "facts" else n, seed))
    code, out, err = run_cli(["label", "--init", str(policy), "--out", str(tmp_path / "run"), *LABEL], capsys)
    assert code == 0
    said = out + err
    assert "label train: the world's train split gave too few distinct facts questions, so 16 prompts, not 25" in said
    assert "label val: the world's val split gave too few distinct facts questions" in said


# ---------------------------------------------------------------- the loss


def test_k_wise_loss_equals_a_hand_computation():
    # Two comparisons: K=3 with a tie between the last two, and a plain pair.
    items = [Encoded([[1, 2], [1, 3], [1, 4, 5]], [0, 1, 1]), Encoded([[6], [7, 8]], [0, 1])]
    batch = collate(items, pad_id=0)
    assert batch["idx"].tolist() == [[1, 2, 0], [1, 3, 0], [1, 4, 5], [6, 0, 0], [7, 8, 0]]
    assert batch["last"].tolist() == [1, 4, 8, 9, 13]  # into idx.flatten()
    assert list(zip(batch["winner"].tolist(), batch["loser"].tolist())) == [(0, 1), (0, 2), (3, 4)]
    r = torch.tensor([0.5, -0.2, 0.1, 1.0, 2.0])
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    first = -(ls(0.5 + 0.2) + ls(0.5 - 0.1)) / 2  # its two ranked pairs, averaged: it weighs as one comparison
    second = -ls(1.0 - 2.0)
    assert comparison_loss(r, batch).item() == pytest.approx((first + second) / 2, abs=1e-6)
    # Margin per rank step; centring adds coef * mean(r^2).
    with_margin = (-(ls(0.5 + 0.2 - 0.3) + ls(0.5 - 0.1 - 0.3)) / 2 - ls(1.0 - 2.0 - 0.3)) / 2
    assert comparison_loss(r, batch, margin=0.3).item() == pytest.approx(with_margin, abs=1e-6)
    centred = comparison_loss(r, batch, center=0.1).item() - comparison_loss(r, batch).item()
    assert centred == pytest.approx(0.1 * (r ** 2).mean().item(), abs=1e-6)
    # Two responses: exactly -log sigmoid(r_chosen - r_rejected), the pairwise (TRL) loss.
    pair = collate([Encoded([[1], [2]], [0, 1])], 0)
    x = torch.tensor([0.3, 1.1])
    assert comparison_loss(x, pair).item() == pytest.approx(-F.logsigmoid(x[0] - x[1]).item(), abs=1e-6)


@pytest.mark.parametrize("flavour", ["gpt2", "neox", "llama"])
def test_packed_responses_score_as_they_do_alone(flavour):
    # Packing is how `rm` trains: each response must see only itself, from position 0.
    model = randomize(RewardModel(tiny_config(flavour))).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 9, 3], [12, 2], [7, 7, 7, 1]]
    items = [Encoded([torch.randint(1, 61, (n,), generator=g).tolist() for n in ns], list(range(len(ns))))
             for ns in lengths]
    batch = collate(items, pad_id=0, width=16)
    assert batch["idx"].shape == (4, 16)  # 60 tokens in 4 rows (first fit, longest first), not 9 x 12
    with torch.no_grad():
        packed = model(batch["idx"], segments=batch["segments"]).flatten()[batch["last"]]
        alone = [model(torch.tensor([row]))[0, -1] for it in items for row in it.rows]
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert batch["winner"].tolist() == collate(items, pad_id=0)["winner"].tolist()


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their mean rank: x ranks (0, 1, 2.5, 2.5), y ranks (0, 2, 1, 3).
    rx, ry = [0, 1, 2.5, 2.5], [0, 2, 1, 3]
    mx, my = sum(rx) / 4, sum(ry) / 4
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([1, 2, 3, 3], [0.1, 0.9, 0.5, 1.5]) == pytest.approx(expected)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


# ---------------------------------------------------------------- the model and transformers


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer(iter(["What is 2 plus 3? 2 plus 3 is 5. Paris is in France."]), "char", 0)


HF_CLASS = {"gpt2": "GPT2ForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
            "llama": "LlamaForSequenceClassification"}


@pytest.mark.parametrize("arch", list(HF_CLASS))
def test_export_loads_in_transformers_with_equal_rewards(arch, char_tok, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    rotary = {"pos": "rope"} if arch == "gpt_neox" else {}  # GPT-2's block with rotary positions
    cfg = tiny_config("llama" if arch == "llama" else "gpt2", vocab_size=char_tok.get_vocab_size(), block_size=64,
                      **rotary)
    model = randomize(RewardModel(cfg)).eval()
    model.offset, model.normalization = -0.7, {"mean": 0.7, "std": 1.3, "responses": 10}
    save_checkpoint(tmp_path / "ours", model, char_tok)
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 2 + [[{"role": "user", "content": "Paris?"}]]
    responses = ["2 plus 3 is 5.", "It is 6.", "Paris is in France."]
    ours = score_texts(load_reward_model(tmp_path / "ours")[0], char_tok, prompts, responses)

    summary = cli_ok(["convert", "--to_hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")], capsys)
    assert summary["reward_model"] and summary["architecture"] == arch
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf",
                                                                               output_loading_info=True)
    assert type(hf).__name__ == HF_CLASS[arch]
    assert hf.config.num_labels == 1
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    from chatfoundry.scoring import encode_responses

    rows, _, _ = encode_responses(char_tok, prompts, responses, 64)
    pad = hf.config.pad_token_id
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    with torch.no_grad():
        theirs = hf.eval()(ids, attention_mask=(ids != pad).long()).logits.squeeze(-1).tolist()
    # A final LayerNorm has a bias: the normalisation is folded into it, the outputs are equal.
    # Llama's RMSNorm has none: transformers gives the raw score, ours minus the recorded offset.
    shift = model.offset if arch == "llama" else 0.0
    assert ("note" in summary) == (arch == "llama")
    assert theirs == pytest.approx([o - shift for o in ours], abs=1e-4)
    # The export is still ours: it loads back with the same rewards.
    again = score_texts(load_reward_model(tmp_path / "hf")[0], char_tok, prompts, responses)
    assert again == pytest.approx(ours, abs=1e-5)


def test_reward_model_and_language_model_folders_are_told_apart(char_tok, tmp_path):
    cfg = tiny_config(vocab_size=char_tok.get_vocab_size())
    save_checkpoint(tmp_path / "rm", RewardModel(cfg), char_tok)
    from chatfoundry.models.decoder import DecoderLM

    save_checkpoint(tmp_path / "lm", DecoderLM(cfg), char_tok)
    with pytest.raises(UserError, match="a reward model, not a language model"):
        load_model(tmp_path / "rm")
    with pytest.raises(UserError, match="a language model, not a reward model"):
        load_reward_model(tmp_path / "lm")
    lm, _ = load_model(tmp_path / "lm")
    rm = RewardModel.from_lm(lm)  # the body is the LM's, minus its vocabulary head
    assert torch.equal(rm.body.embed_tokens.weight, lm.embed_tokens.weight) and rm.body.lm_head is None


def test_held_out_report_accuracy_by_family_and_best_of_k(monkeypatch):
    import chatfoundry.train.reward as reward

    items = [Encoded([[1], [2], [3]], [1, 0, 2], "facts", [1.0, 0.3, 0.0]),  # the RM prefers the 0.3 one
             Encoded([[4], [5]], [1, 0], "compare", [0.3, 1.0])]  # and here the right one
    scores = [0.1, 0.9, 0.0, 0.0, 1.0]
    monkeypatch.setattr(reward, "score_rows", lambda model, rows, pad, batch_size=64: scores[:len(rows)])
    r = reward.evaluate(None, items, 0)
    # Gold pairs: (1.0 > 0.3) missed, (1.0 > 0.0) and (0.3 > 0.0) right; (1.0 > 0.3) right.
    assert r["pairwise_accuracy"] == 0.75 and r["gold_pairs"] == 4 and r["label_accuracy"] == 1.0
    assert r["family_accuracy"] == {"compare": 1.0, "facts": round(2 / 3, 4)}
    # Best-of-K: 0.3 - mean(1, 0.3, 0) and 1.0 - mean(0.3, 1.0).
    assert r["best_of_k_gold_gain"] == round(((0.3 - 1.3 / 3) + (1.0 - 0.65)) / 2, 4)
    # Spearman within each prompt, then averaged: ranks (2, 3, 1) against (3, 2, 1) give 0.5, and
    # (1, 2) against (1, 2) give 1. Pooled over both prompts it is a different number.
    assert r["spearman_within"] == 0.75 and r["spearman_within_prompts"] == 2
    assert r["spearman_gold"] == round(reward.spearman(scores, [1.0, 0.3, 0.0, 0.3, 1.0]), 4) != 0.75


def test_within_prompt_spearman_skips_prompts_whose_gold_rewards_all_tie(monkeypatch):
    import chatfoundry.train.reward as reward

    items = [Encoded([[1], [2]], [0, 1], "facts", [0.3, 0.3]), Encoded([[3], [4]], [0, 1], "facts", [1.0, 0.3])]
    monkeypatch.setattr(reward, "score_rows", lambda model, rows, pad, batch_size=64: [0.0, 1.0, 0.0, 1.0])
    r = reward.evaluate(None, items, 0)
    assert r["spearman_within"] == -1.0 and r["spearman_within_prompts"] == 1


# ---------------------------------------------------------------- the rm stage


def test_rm_on_labels_writes_a_normalised_model_and_its_report(policy, labels, tmp_path, capsys):
    out = tmp_path / "rm"
    s = cli_ok(["rm", "--init", str(policy), "--data", str(labels), "--out", str(out), *RM], capsys)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "rewards.png", "eval.json", "checkpoint/model.safetensors"):
        assert (out / name).is_file(), name
    for key in ("pairwise_accuracy", "spearman_gold", "label_accuracy", "normalization"):
        assert key in s
    assert 0 <= s["pairwise_accuracy"] <= 1 and -1 <= s["spearman_gold"] <= 1
    baseline = json.loads((out / "eval.json").read_text())["loglik_baseline"]
    assert s["loglik_baseline"] == baseline and 0 <= baseline["pairwise_accuracy"] <= 1
    model, tok = load_reward_model(out)
    assert model.offset == pytest.approx(-s["normalization"]["mean"])
    # Normalised: the training responses (the policy's samples) score 0 on average.
    train = load_comparisons(labels / "train.jsonl")
    rewards = score_texts(model, tok, [list(c.prompt) for c in train for _ in c.responses],
                          [r for c in train for r in c.responses])
    assert abs(sum(rewards) / len(rewards)) < 1e-4
    assert s["normalization"]["std"] == pytest.approx(torch.tensor(rewards).std(unbiased=False).item(), rel=1e-3)


def test_rm_resume_continues_exactly(policy, labels, tmp_path, capsys):
    # A flat learning rate after warmup: the schedule of a 3-step run is then the start of a 6-step one.
    args = ["--data", str(labels), *RM, "--train.min_lr_ratio", "1"]
    straight, half, init = tmp_path / "straight", tmp_path / "half", tmp_path / "init"
    a = cli_ok(["rm", *args, "--init", str(policy), "--out", str(straight)], capsys)
    shutil.copytree(policy, init)
    cli_ok(["rm", *args, "--init", str(init), "--out", str(half), "--train.steps", "3"], capsys)
    shutil.rmtree(init)  # the resumed run needs only its own checkpoint; the baseline is skipped
    code, out, err = run_cli(["rm", "--out", str(half), "--resume", "--train.steps", "6", "--json"], capsys)
    assert code == 0, err  # it resumes a normalised model
    b = last_json(out)
    ma, mb = load_reward_model(straight)[0], load_reward_model(half)[0]
    for (name, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(x, y), name
    assert a["normalization"] == b["normalization"] and ma.offset == mb.offset
    assert b["pairwise_accuracy"] == a["pairwise_accuracy"] and "loglik_baseline" not in b
    assert "no log-likelihood baseline" in out + err


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_rm_learns_a_preference_and_scores_held_out_pairs(policy, tmp_path, capsys):
    """Pairs and rankings from files: polite answers over rude ones. Held-out accuracy must be high
    and `chatfoundry score` must rank a new polite answer above a new rude one."""
    import random

    rng = random.Random(0)
    topics = ["the sea", "a cat", "bread", "rain", "music", "a river", "the moon", "trees", "snow", "a city"]
    polite = ["Thank you for asking about {t}.", "Happy to help with {t}.", "Sure, here is a note on {t}."]
    rude = ["Ugh, {t}? Whatever.", "Stupid question about {t}.", "Go away, {t} is boring."]
    pairs, rankings = [], []
    for i in range(120):
        t = rng.choice(topics)
        prompt = f"Tell me about {t}."
        good, bad = rng.choice(polite).format(t=t), rng.choice(rude).format(t=t)
        if i % 2:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
        else:
            other = rng.choice([p for p in polite if p.format(t=t) != good]).format(t=t)
            rankings.append({"prompt": prompt, "responses": [bad, good, other], "ranks": [1, 0, 0]})
    files = [write_jsonl(tmp_path / "pairs.jsonl", pairs), write_jsonl(tmp_path / "ranks.jsonl", rankings)]
    out = tmp_path / "rm"
    s = cli_ok(["rm", "--init", str(policy), "--data", *files, "--out", str(out), "--data.val_fraction", "0.2",
                "--train.steps", "40", "--train.batch_size", "8", "--train.lr", "1e-3", "--train.warmup_steps", "2",
                "--train.eval_every", "20", "--train.save_every", "40", "--device", "cpu"], capsys)
    assert s["pairwise_accuracy"] >= 0.95 and "spearman_gold" not in s  # no gold reward for users' files
    scored = cli_ok(["score", "--rm", str(out), "--prompt", "Tell me about the sun.",
                     "--response", "Happy to help with the sun.", "--response", "Ugh, the sun? Whatever."], capsys)
    assert scored["rewards"][0] > scored["rewards"][1]
    code, out_text, _ = run_cli(["score", "--rm", str(out), "--prompt", "Hi", "--response", "Hello."], capsys)
    assert code == 0 and float(out_text.strip()) == pytest.approx(
        score_texts(load_reward_model(out)[0], load_reward_model(out)[1], [[{"role": "user", "content": "Hi"}]],
                    ["Hello."])[0], abs=1e-4)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Hello."}, "missing field 'rejected'"),
    ({"prompt": "Hi", "responses": ["Hello."]}, "at least 2 responses"),
    ({"prompt": "Hi", "responses": ["Hello.", "Hello."]}, "all responses are identical"),
    ({"prompt": "Hi", "responses": ["Hello.", " "]}, "responses[1] is empty"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}, "identical"),
    ({"text": "just text"}, "nothing to compare"),
])
def test_rm_bad_data_names_the_line_and_writes_nothing(policy, tmp_path, capsys, record, message):
    good = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    code, _, err = run_cli(["rm", "--init", str(policy), "--data", data, "--out", str(tmp_path / "rm"), *RM], capsys)
    assert code == 2 and f"{data}:2: " in err and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "rm").exists()


def test_rm_and_score_usage_errors(policy, labels, tmp_path, capsys):
    code, _, err = run_cli(["rm", "--init", str(policy), "--out", str(tmp_path / "a"), *RM], capsys)
    assert code == 2 and "data.files" in err
    code, _, err = run_cli(["rm", "--init", str(policy), "--data", str(tmp_path), "--out", str(tmp_path / "a"), *RM],
                           capsys)
    assert code == 2 and "no train.jsonl" in err
    code, _, err = run_cli(["score", "--rm", str(policy), "--prompt", "Hi", "--response", "Hello."], capsys)
    assert code == 2 and "not a reward model" in err
    code, _, err = run_cli(["label", "--init", str(policy), "--out", str(tmp_path / "l"), "--k", "1"], capsys)
    assert code == 2 and "k" in err
    for cmd in ("label", "rm", "score"):
        code, out, _ = run_cli([cmd, "--help"], capsys)
        assert code == 0 and "usage" in out


def test_labeler_can_be_a_reward_model(policy, tmp_path, capsys):
    """RLAIF: a reward model ranks the samples; its ranks follow its own scores."""
    out = tmp_path / "judge"
    lm, tok = load_model(policy)
    judge = randomize(RewardModel.from_lm(lm), seed=3)
    save_checkpoint(out, judge, tok)
    cli_ok(["label", "--init", str(policy), "--out", str(tmp_path / "run"), *LABEL, "--val_prompts", "0",
            "--labeler", f"rm:{out}", "--tie", "0"], capsys)
    judge, tok = load_reward_model(out)
    for c in load_comparisons(tmp_path / "run" / "train.jsonl")[:5]:
        scores = score_texts(judge, tok, [list(c.prompt)] * len(c.responses), list(c.responses))
        assert scores == sorted(scores, reverse=True)


def test_loglik_baseline_sums_the_response_tokens_log_probabilities(char_tok):
    """Rows of different lengths in one batch, and a row cut at the front (its response starts at
    column 0, whose token has no context): each gets log p(response + <|end|> | what precedes)."""
    from chatfoundry.models.decoder import DecoderLM
    from chatfoundry.train.reward import loglik_scores

    torch.manual_seed(0)
    lm = randomize(DecoderLM(tiny_config(vocab_size=char_tok.get_vocab_size(), block_size=64))).eval()
    c = Comparison(({"role": "user", "content": "Name a fruit."},), ("A pear.", "Plums, I think, or a fig."), (0, 1))
    [item], _ = encode_comparisons(char_tok, [c], block=64)
    [cut], n_cut = encode_comparisons(char_tok, [c], block=20)
    assert n_cut == 2 and cut.starts == [max(0, s - (len(r) - 20)) for s, r in zip(item.starts, item.rows)]
    scores = loglik_scores(lm, [item, cut], pad_id=0, batch_size=3)
    expected = []
    for row, start in zip(item.rows + cut.rows, item.starts + cut.starts):
        with torch.no_grad():
            logp = torch.log_softmax(lm(torch.tensor([row]))[0][0], -1)
        expected.append(sum(logp[t - 1, row[t]].item() for t in range(max(start, 1), len(row))))
    assert scores == pytest.approx(expected, abs=1e-4)
    assert item.rows[0][item.starts[0]:] == char_tok.encode("A pear.", add_special_tokens=False).ids + item.rows[0][-1:]


def test_comparisons_encode_as_the_chat_they_end(char_tok):
    c = Comparison(({"role": "user", "content": "Hi"},), ("Hello.", "Go."), (0, 1))
    [item], cut = encode_comparisons(char_tok, [c], block=64)
    from chatfoundry.tokenizer import render_chat

    expected = char_tok.encode(render_chat([{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello."}]), add_special_tokens=False).ids
    assert item.rows[0] == expected and item.ranks == [0, 1] and cut == 0
    [short], cut = encode_comparisons(char_tok, [c], block=8)
    assert cut == 2 and short.rows[0] == expected[-8:]  # the response's end is kept
