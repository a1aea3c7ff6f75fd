"""PPO for the language model: the batch layout, per-token rewards and GAE against a hand
computation, log-probabilities of the distribution actually sampled, the ratio exactly 1 on the
first minibatch, the KL controller in a run, a toy-reward learning test ("say the letter a"),
determinism, resume, the KL-penalty objective, PPO-ptx, and the CLI's errors.

The core math itself (GAE, whitening, surrogates, controllers) is tested in test_rl_core.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatfoundry.checkpoint import load_model, save_checkpoint
from chatfoundry.data import tasks, world
from chatfoundry.eval import policy as policy_eval
from chatfoundry.generation import GenerationConfig, generate_batch
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.rl import core
from chatfoundry.tokenizer import chat_stop_ids, encode_chat, special_id, train_tokenizer
from chatfoundry.train import ppo
from chatfoundry.train import rollout as rollouts
from chatfoundry.train.ppo import PPOConfig, per_token_rewards
from chatfoundry.train.rollout import make_batch, rollout

from conftest import last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = "def say_a(prompt, response):\n    return response.count('a') / max(len(response), 1)\n"
FAST = ["--iterations", "3", "--rollout.batch_size", "8", "--rollout.max_new_tokens", "8", "--rollout.pool", "50",
        "--minibatch_size", "4", "--epochs", "2", "--eval.per_family", "2", "--eval.max_new_tokens", "8",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def tok():
    tasks = [t for f in world.FAMILIES for t in world.tasks("train", f, 60, 0)]
    text = " ".join(t.prompt + " " + t.reference for t in tasks) + " abcdefghijklmnopqrstuvwxyz0123456789"
    return train_tokenizer(iter([text]), "char", 0)


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory):
    """A tiny SFT stand-in (random weights), a reward model on its body and the toy reward module."""
    root = tmp_path_factory.mktemp("ppo_models")
    torch.manual_seed(0)
    lm = DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=128))
    save_checkpoint(root / "sft", lm, tok, generation={"eos_token_id": chat_stop_ids(tok)})
    rm = randomize(RewardModel.from_lm(lm), seed=1, std=0.1)
    save_checkpoint(root / "rm", rm, tok)
    (root / "toy_reward.py").write_text(TOY)
    return root


@pytest.fixture
def toy(models, monkeypatch):
    monkeypatch.syspath_prepend(str(models))
    return "python:toy_reward:say_a"


def cli_ok(argv: list[str], capsys) -> dict:
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    return last_json(out)


def close(t: torch.Tensor, expected, atol: float = 1e-6) -> bool:
    return torch.allclose(t.float(), torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the batch, rewards and advantages


def test_batch_layout_puts_each_response_after_its_prompt_and_the_rm_reads_a_closed_turn():
    end, eos, pad = 7, 2, 0
    b = make_batch([[5, 11, 6], [5, 12, 13, 14, 6]], [[20, 21, end], [22, 23, 24, 25]], [end, eos], end, pad, "cpu")
    assert b.idx.tolist() == [[5, 11, 6, 20, 21, end, 0, 0, 0], [5, 12, 13, 14, 6, 22, 23, 24, 25]]
    assert b.tokens.tolist() == [[20, 21, end, 0], [22, 23, 24, 25]]
    assert b.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # Response token t is predicted at column len(prompt) - 1 + t; past the end, the last such column.
    assert b.pos.tolist() == [[2, 3, 4, 4], [4, 5, 6, 7]]
    assert all(b.idx[r, b.pos[r, t] + 1] == b.tokens[r, t] for r in range(2) for t in range(4) if b.mask[r, t])
    # The RM reads prompt + content + <|end|>: the second response was cut, so <|end|> is appended.
    assert b.ended.tolist() == [True, False]
    assert b.rm_idx.tolist() == [[5, 11, 6, 20, 21, end, 0, 0, 0, 0], [5, 12, 13, 14, 6, 22, 23, 24, 25, end]]
    assert b.rm_last.tolist() == [5, 9]
    # An <|eos|> stop is read as <|end|> too.
    b = make_batch([[5, 6]], [[30, eos]], [end, eos], end, pad, "cpu")
    assert b.rm_idx.tolist() == [[5, 6, 30, end]] and b.ended.tolist() == [True]


def test_select_packs_rows_and_each_row_gets_what_it_gets_alone(models):
    # Minibatch rows are packed into lines with segments; logits and values at each response
    # position must equal those of the row run alone.
    policy, _ = load_model(models / "sft")
    critic = randomize(RewardModel.from_lm(policy), seed=2, std=0.1)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(8, 60, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(n) for n in (3, 9, 4, 12, 5, 2)]
    responses = [rand(n) + [7] for n in (1, 6, 2, 14, 3, 0)]
    b = make_batch(prompts, responses, [7, 2], 7, 0, "cpu")
    part = rollouts.select(b, torch.arange(len(prompts)))
    assert part.idx.shape[0] < len(prompts) and part.idx.shape[1] == max(len(p) + len(r) for p, r in
                                                                          zip(prompts, responses)) - 1
    with torch.no_grad():
        logits, values = rollouts.response_logits(policy, part), rollouts.values_of(critic, part)  # logits: real tokens only
        assert logits.shape[0] == sum(map(len, responses))
        for i, (p, r, row_logits) in enumerate(zip(prompts, responses, logits.split([len(r) for r in responses]))):
            alone, _ = policy(torch.tensor([p + r]))
            torch.testing.assert_close(row_logits, alone[0, len(p) - 1:len(p) + len(r) - 1], atol=1e-5, rtol=0)
            v = critic(torch.tensor([p + r]))[0, len(p) - 1:len(p) + len(r) - 1]
            torch.testing.assert_close(values[i, :len(r)], v, atol=1e-5, rtol=0)
    assert torch.isfinite(values).all()  # padding positions too


def test_per_token_rewards_and_gae_equal_a_hand_computation():
    cfg = PPOConfig(init="x", reward="rm:y")
    cfg.rollout.no_eos_penalty = 0.5
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    batch = rollouts.Batch(idx=None, pos=None, tokens=None, mask=mask, rm_idx=None, rm_last=None,
                      ended=torch.tensor([False, True]))
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    logp_ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.5, 9.0]])
    ro = rollouts.Rollout(batch, ["", ""], logp, logp, logp_ref, values, torch.tensor([2.0, 1.0]), torch.zeros(2, 3))
    beta = 0.1
    rewards, kl, scores = per_token_rewards(ro, beta, cfg)
    # k1: log pi - log pi_ref per token; the score (minus the no-EOS penalty for row 0) at the last real token.
    assert close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(scores, [1.5, 1.0])
    assert close(rewards, [[-0.05, 0.1, 1.5], [-0.1, 1.0, 0.0]])
    adv, ret = core.sequence_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0 by hand: deltas d_t = r_t + V_{t+1} - V_t (no V after the last token), A_t = d_t + 0.95 A_{t+1}.
    d = [-0.05 + 0.4 - 0.2, 0.1 + 0.6 - 0.4, 1.5 - 0.6]
    a2 = d[2]
    a1 = d[1] + 0.95 * a2
    a0 = d[0] + 0.95 * a1
    d1 = [-0.1 + 0.5 - 1.0, 1.0 - 0.5]
    b1 = d1[1]
    b0 = d1[0] + 0.95 * b1
    assert close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    assert close(ret, [[a0 + 0.2, a1 + 0.4, a2 + 0.6], [b0 + 1.0, b1 + 0.5, 0.0]])
    # Whitening sees real tokens only: padding stays 0 and the real ones have mean 0.
    w = core.masked_whiten(adv, mask)
    assert w[1, 2] == 0 and core.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    # k3 is offered and never negative.
    cfg.kl.estimator = "k3"
    assert (per_token_rewards(ro, beta, cfg)[1] >= 0).all()


# ---------------------------------------------------------------- log-probabilities and the ratio


def _prompts(n: int) -> list[tasks.Prompt]:
    return tasks.source("world:arithmetic").prompts("train", n, 0)


def test_rollout_logprobs_are_the_sampled_distributions(models):
    policy, tok = load_model(models / "sft")
    randomize(policy, seed=3, std=0.1)  # peaked logits, so a temperature visibly changes them
    prompts = _prompts(6)
    cfg = PPOConfig(init="x", reward="rm:y").rollout
    cfg.max_new_tokens = 10
    ro = rollout(policy, policy, None, lambda p, r: [0.0] * len(r), tok, prompts, cfg, seed=5, chunk=3)
    # Temperature 1: the recomputed log-probabilities are those generation reported for its samples.
    gen = generate_batch(policy, [encode_chat(tok, list(p.messages)) for p in prompts],
                         GenerationConfig(max_new_tokens=10, do_sample=True, eos_token_id=chat_stop_ids(tok), seed=5))
    assert [ro.batch.tokens[i, :len(s)].tolist() for i, s in enumerate(gen.sequences)] == gen.sequences
    for i, lp in enumerate(gen.token_logprobs):
        assert ro.logp[i, :len(lp)].tolist() == pytest.approx(lp, abs=1e-4)
    assert torch.equal(ro.logp, ro.logp_raw)
    assert torch.allclose(ro.logp_ref, ro.logp, atol=1e-6)  # reference = policy here
    # Temperature 0.5: the ratio's log-probabilities are the warped distribution's, the KL's the raw ones.
    cfg.temperature = 0.5
    hot = rollout(policy, policy, None, lambda p, r: [0.0] * len(r), tok, prompts, cfg, seed=5, chunk=3)
    logits = rollouts.response_logits(policy, hot.batch)
    real = hot.batch.mask.bool()
    expect = rollouts.spread(torch.log_softmax(logits / 0.5, -1).gather(-1, hot.batch.tokens[real][:, None]).squeeze(-1), real)
    assert torch.allclose(hot.logp, expect, atol=1e-5)
    assert not torch.allclose(hot.logp, hot.logp_raw)


def test_first_minibatch_ratio_is_exactly_one_and_the_update_moves_the_policy(models):
    policy, tok = load_model(models / "sft")
    ref, _ = load_model(models / "sft")
    critic = RewardModel.from_lm(policy)
    cfg = PPOConfig(init="x", reward="rm:y")
    cfg.rollout.max_new_tokens, cfg.minibatch_size, cfg.epochs, cfg.lr = 8, 4, 2, 1e-3
    ro = rollout(policy, ref, critic, lambda p, r: [float(len(x)) for x in r], tok, _prompts(8), cfg.rollout,
                 seed=0, chunk=4)
    rewards, _, _ = per_token_rewards(ro, 0.05, cfg)
    adv, ret = core.sequence_gae(rewards, ro.values, ro.batch.mask)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-3)
    stats = ppo.ppo_update(policy, critic, opt, ro, core.masked_whiten(adv, ro.batch.mask), ret, cfg, 1.0,
                           torch.Generator().manual_seed(0))
    assert stats["ratio_first"] == 1.0  # bit for bit: the same forward, the same shapes
    assert stats["epochs"] == 2 and stats["approx_kl"] > 0


# ---------------------------------------------------------------- runs


def test_ppo_raises_a_toy_reward(models, toy, tmp_path):
    """Say the letter a: the reward is the share of a's in the response; PPO must raise it."""
    cfg = PPOConfig(init=str(models / "sft"), reward=toy, out=str(tmp_path / "run"), device="cpu", iterations=25)
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens, cfg.rollout.pool = 32, 12, 200
    cfg.rollout.no_eos_penalty = 0.0
    cfg.minibatch_size, cfg.lr, cfg.critic_lr, cfg.target_kl = 16, 3e-3, 3e-3, None
    cfg.kl.coef, cfg.kl.control = 0.01, "fixed"
    cfg.eval.per_family = 0
    summary = ppo.run(cfg, log=lambda *a: None)
    rewards = [r["rm_reward"] for r in metrics(tmp_path / "run")]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert start < 0.1 and end > start + 0.15, rewards
    assert summary["train_rm_reward"]["last_fifth"] > summary["train_rm_reward"]["first"]
    assert all(r["ratio_first"] == 1.0 for r in metrics(tmp_path / "run"))


def _pull_away(models, out, control: str) -> list[dict]:
    """A run whose reward pulls away from the reference (say the letter a), with a weak start beta."""
    cfg = PPOConfig(init=str(models / "sft"), reward="python:toy_reward:say_a", out=str(out), device="cpu", iterations=40)
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens, cfg.rollout.pool = 16, 12, 200
    cfg.rollout.no_eos_penalty = 0.0
    cfg.minibatch_size, cfg.lr, cfg.critic_lr, cfg.target_kl = 8, 3e-3, 3e-3, None
    cfg.kl.coef, cfg.kl.control, cfg.kl.target, cfg.kl.horizon = 0.01, control, 2.0, 16
    cfg.eval.per_family = 0
    ppo.run(cfg, log=lambda *a: None)
    return metrics(out)


def test_adaptive_kl_controller_holds_the_kl_at_its_target_when_the_reward_pulls_away(models, toy, tmp_path):
    fixed = _pull_away(models, tmp_path / "fixed", "fixed")
    rows = _pull_away(models, tmp_path / "adaptive", "adaptive")
    tail = lambda rs: sum(r["kl"] for r in rs[-10:]) / 10  # noqa: E731
    assert tail(fixed) > 10  # with the start beta fixed, the policy runs far away
    assert 1.0 < tail(rows) < 4.0, [round(r["kl"], 2) for r in rows]  # the target is 2 nats
    betas = [r["kl_coef"] for r in rows]
    # No wind-up: beta never falls while the policy has not yet reached the target...
    first = next(i for i, r in enumerate(rows) if r["kl"] >= 2.0)
    assert betas[:first + 1] == [0.01] * (first + 1)
    # ...and afterwards moves up when the iteration's KL was above the target, down when below.
    moves = [(r["kl"] > 2.0, b1 > b0) for r, b0, b1 in zip(rows[first:], betas[first:], betas[first + 1:])]
    assert all(above == up for above, up in moves) and betas[-1] > 0.03


def test_best_of_n_takes_the_reward_models_favourite_in_each_group_of_n():
    def answer(gold: float) -> world.Score:
        return world.Score(gold == 1.0, False, True, True, True, gold)

    gold = np.array([[1.0, 0.3, 0.0, 0.3], [0.0, 0.3, 1.0, 0.0]])
    rm = np.array([[0.5, 0.9, 0.1, 0.2], [0.3, 0.1, 0.2, 0.0]])
    scores = np.empty(gold.shape, dtype=object)
    scores[:] = [[answer(g) for g in row] for row in gold]
    sampled = policy_eval.Sampled(gold, rm, np.zeros_like(gold), scores)
    # n = 2: groups (0.5, 0.9) (0.1, 0.2) pick 0.3 and 0.3; (0.3, 0.1) (0.2, 0.0) pick 0.0 and 1.0.
    golds, chosen = policy_eval.best_of_n(sampled, 2)
    assert golds.tolist() == [0.3, 0.5] and [c.reward for c in chosen] == [0.3, 0.3, 0.0, 1.0]
    # n = 4: the favourite of all four; n = 3 uses one group of three and leaves the rest.
    assert policy_eval.best_of_n(sampled, 4)[0].tolist() == [0.3, 0.0]
    assert policy_eval.best_of_n(sampled, 3)[0].tolist() == [0.3, 0.0]


def test_cli_run_writes_artifacts_is_deterministic_and_resumes_exactly(models, tmp_path, capsys, monkeypatch):
    # Runs started with paths relative to their folder; --eval_only and --resume work from any other.
    (tmp_path / "m").symlink_to(models)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    base = ["ppo", "--init", "m/sft", "--reward", "rm:m/rm", *FAST]
    s = cli_ok([*base, "--out", "a"], capsys)
    a = tmp_path / "a"
    assert {p.name for p in a.iterdir()} >= {"config.yaml", "metrics.jsonl", "ppo.png", "eval.json", "checkpoint",
                                            "critic"}
    for key in ("gold_reward", "gold_reward_se", "sft_gold_reward", "kl", "rm_reward", "sft_rm_reward",
                "win_rate_rm", "win_rate_gold", "gold_reward_sampled", "gold_gain_sampled", "gold_gain_sampled_se",
                "kl_heldout"):
        assert key in s, key
    assert s["prompts"] == 2 * len(world.FAMILIES)
    assert s["kl_budget"] == 1.0 and s["kl_within_budget"] == (s["kl_heldout"] <= 1.0)  # the held-out KL
    # The sampled gain is paired: the mean of per-prompt differences, so the difference of the means.
    assert s["gold_gain_sampled"] == pytest.approx(s["gold_reward_sampled"] - s["sft_gold_reward_sampled"], abs=2e-4)
    assert s["samples"] == 4 and s["gold_gain_sampled_se"] >= 0
    assert s["exact_match_sampled_gain"] == pytest.approx(s["exact_match_sampled"] - s["sft_exact_match_sampled"], abs=2e-4)
    assert s["reward_heldout_ppo"] == s["rm_reward"] and s["heldout_prompts"] == s["prompts"]
    assert set(json.loads((a / "eval.json").read_text())["sampled_families"]) == set(world.FAMILIES)
    # SFT sampled cooler, the sharpening baseline.
    cool = s["sft_tempered"]
    assert [t["temperature"] for t in cool] == [0.6, 0.4] and all("gold_gain_sampled" in t for t in cool)
    # Best-of-n from SFT's samples at the analytic KL; every answer's gold reward has its parts.
    assert [(b["n"], b["kl"]) for b in s["best_of_n"]] == [(4, 0.6363), (16, 1.8351)]
    assert set(s["parts"]) == set(s["parts_sampled"]) == set(s["best_of_n"][0]["parts"]) == set(world.PARTS)
    # Evaluated again from the run folder alone: the same numbers; more samples per prompt on request;
    # nothing in the folder changes.
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    monkeypatch.chdir(elsewhere)
    again = cli_ok(["ppo", "--out", str(a), "--eval_only"], capsys)
    assert {k: again[k] for k in ("gold_gain", "gold_gain_sampled", "gold_gain_sampled_se", "kl_heldout")} == \
        {k: s[k] for k in ("gold_gain", "gold_gain_sampled", "gold_gain_sampled_se", "kl_heldout")}
    more = cli_ok(["ppo", "--out", str(a), "--eval_only", "--eval.samples", "8", "--eval.temperatures", "0.25"], capsys)
    assert more["samples"] == 8 and more["sft_tempered"][0]["kl_heldout"] > 0.1  # far from SFT's own sampling
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before
    monkeypatch.chdir(tmp_path)
    first = metrics(a)
    assert len(first) == 3 and all(k in first[0] for k in (
        "rm_reward", "gold_reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss",
        "explained_variance", "response_length"))
    # The output is a chat model; the critic a reward-model folder.
    lm, _ = load_model(a)
    assert json.loads((a / "checkpoint" / "generation_config.json").read_text())["eos_token_id"] == [7, 2]
    # Same seed, same run; also when it replaces a finished run (--overwrite clears its critic/ folder too).
    cli_ok([*base, "--out", str(tmp_path / "b")], capsys)
    cli_ok([*base, "--out", str(tmp_path / "b"), "--overwrite"], capsys)
    assert metrics(tmp_path / "b") == [{**r, "rollout_s": metrics(tmp_path / "b")[i]["rollout_s"],
                                        "update_s": metrics(tmp_path / "b")[i]["update_s"]} for i, r in enumerate(first)]
    # Two iterations, then resumed to three: the same weights as the straight run.
    cli_ok([*base, "--out", "c", "--iterations", "2"], capsys)
    monkeypatch.chdir(elsewhere)
    cli_ok(["ppo", "--out", str(tmp_path / "c"), "--iterations", "3", "--resume"], capsys)
    resumed, _ = load_model(tmp_path / "c")
    for (name, p), q in zip(lm.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert [r["step"] for r in metrics(tmp_path / "c")] == [1, 2, 3]


def test_sfts_side_of_the_evaluation_beside_training_gives_the_same_report(models, tmp_path, capsys):
    # With a core to spare on CPU, SFT's side of the held-out evaluation runs in a second process
    # while PPO trains on one thread: the report is the one computed after training.
    torch.set_num_threads(2)  # one_torch_thread puts it back
    base = ["ppo", "--init", str(models / "sft"), "--reward", f"rm:{models / 'rm'}", *FAST]
    code, out, err = run_cli([*base, "--out", str(tmp_path / "a"), "--json"], capsys)
    assert code == 0 and "runs in a second process" in out + err, err
    inline = cli_ok([*base, "--out", str(tmp_path / "b"), "--eval_beside", "false"], capsys)
    same = lambda s: {k: v for k, v in s.items() if k not in ("out", "checkpoint", "train_s", "wall_s")}  # noqa: E731
    assert same(last_json(out)) == same(inline) and inline["best_of_n"] and inline["sft_tempered"]


def test_kl_penalty_objective_and_ptx_run(models, tmp_path, capsys):
    s = cli_ok(["ppo", "--init", str(models / "sft"), "--reward", f"rm:{models / 'rm'}", "--out", str(tmp_path / "k"),
                *FAST,
                "--objective", "kl_penalty", "--ptx_coef", "0.5", "--ptx_batch_size", "2",
                "--eval.samples", "0"], capsys)
    rows = metrics(tmp_path / "k")
    assert s["objective"] == "kl_penalty" and "gold_reward_sampled" not in s
    assert all("penalty_beta" in r and r["ptx_loss"] > 0 and r["ratio_first"] == 1.0 for r in rows)
    assert all(r["kl"] == pytest.approx(0.0) for r in rows[:1]) and "penalty_kl" in rows[0]


@pytest.mark.parametrize("case", ["missing", "rm_as_init", "lm_as_rm", "tokenizer", "config", "bad_callable"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, models, tok, tmp_path, capsys):
    init, rm, extra = str(models / "sft"), str(models / "rm"), []
    expect = {"missing": "no such checkpoint", "rm_as_init": "a reward model, not a language model",
              "lm_as_rm": "a language model, not a reward model", "tokenizer": "tokenizer differs",
              "config": "minibatch_size", "bad_callable": "cannot import"}[case]
    if case == "missing":
        init = str(tmp_path / "nowhere")
    elif case == "rm_as_init":
        init = rm
    elif case == "lm_as_rm":
        rm = init
    elif case == "tokenizer":
        other = train_tokenizer(iter(["a different alphabet: xyz?!"]), "char", 0)
        cfg = tiny_config(vocab_size=other.get_vocab_size(), block_size=128)
        save_checkpoint(tmp_path / "other_rm", RewardModel(cfg), other)
        rm = str(tmp_path / "other_rm")
    elif case == "config":
        extra = ["--minibatch_size", "3"]
    else:
        rm = "python:no_such_module:f"
    reward = rm if rm.startswith("python:") else f"rm:{rm}"
    code, out, err = run_cli(["ppo", "--init", init, "--reward", reward, "--out", str(tmp_path / "run"), *FAST, *extra],
                             capsys)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_eval_only_without_a_run_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["ppo", "--out", str(tmp_path / "nothing"), "--eval_only"], capsys)
    assert code == 2 and "no run to evaluate here" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "nothing").exists()


def test_special_ids_of_the_test_tokenizer(tok):
    # The checkpoint's generation config above expects the chat format's fixed ids.
    assert special_id(tok, "end") == 7 and special_id(tok, "eos") == 2
