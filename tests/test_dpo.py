"""DPO: the loss and its gradients against TRL's DPOTrainer on a tiny random model, the reply
log-probabilities against a plain forward, the pairs a ranking gives, learning from preferences
end to end through the command, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.data.formats import Comparison
from chatfoundry.models import hf
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import chat_stop_ids, train_tokenizer
from chatfoundry.train.dpo import Pairs, batch_loss, dpo_loss, make_pairs, reference_logps, reply_logps

from conftest import hf_model_for, last_json, randomize, run_cli, tiny_chat_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows_of(seed: int, vocab: int, n: int = 3):
    """Random (prompt, chosen, rejected) token ids of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": draw(4 + i), "chosen_ids": draw(3 + i), "rejected_ids": draw(5 - i)} for i in range(n)]


# ---------------------------------------------------------------- parity with TRL


@pytest.mark.parametrize("loss_type, nll_coef", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_loss_and_gradients_equal_trls_dpo_trainer(loss_type, nll_coef, tmp_path):
    import transformers
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tiny_chat_tokenizer()
    cfg = tiny_config("llama", vocab_size=tok.get_vocab_size(), block_size=64)
    policy, ref = randomize(DecoderLM(cfg), seed=0), randomize(DecoderLM(cfg), seed=1).eval()

    def to_hf(model):
        theirs = hf_model_for(cfg)
        theirs.load_state_dict(hf.state_dict_to_hf(model.state_dict(), cfg), strict=False)  # lm_head: tied
        return theirs

    policy_hf, ref_hf = to_hf(policy), to_hf(ref)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    # RPO is TRL's loss_type [sigmoid, sft] weighted [1, coef].
    types, weights = ([loss_type, "sft"], [1.0, nll_coef]) if nll_coef else ([loss_type], [1.0])
    args = TRLConfig(output_dir=str(tmp_path), beta=0.1, loss_type=types, loss_weights=weights, report_to=[],
                     use_cpu=True, bf16=False, per_device_train_batch_size=2)
    data = Dataset.from_list([{"prompt": "hello", "chosen": " fine", "rejected": " be"}] * 2)
    trainer = DPOTrainer(model=policy_hf, ref_model=ref_hf, args=args, train_dataset=data, processing_class=fast)
    examples = rows_of(0, cfg.vocab_size)
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=0)(examples), False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs.backward()

    starts = [len(e["prompt_ids"]) for e in examples]
    chosen = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
    rejected = [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    pairs = Pairs(chosen, rejected, starts, starts)
    reference_logps(ref, pairs, 0, mean=loss_type == "ipo")
    ours = batch_loss(policy, pairs, list(range(len(examples))), 0.1, loss_type, nll_coef)
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    grads = hf.state_dict_to_hf({k: p.grad for k, p in policy.named_parameters()}, cfg)
    their_grads = dict(policy_hf.named_parameters())
    for name, g in grads.items():
        assert torch.allclose(g, their_grads[name].grad, atol=1e-5, rtol=0), name


def test_the_losses_equal_a_hand_computation():
    c, r, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    h = (c - rc) - (r - rr)  # [0.5 + 1, -1 - 1]
    assert h.tolist() == [1.5, -2.0]
    losses, rewards = dpo_loss(c, r, rc, rr, beta=0.5)  # -log sigmoid(beta h) = log(1 + exp(-beta h))
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.0))]))
    assert torch.allclose(rewards["chosen"], 0.5 * (c - rc)) and torch.allclose(rewards["rejected"], 0.5 * (r - rr))
    losses, _ = dpo_loss(c, r, rc, rr, beta=0.5, kind="ipo")
    assert torch.allclose(losses, (h - 1.0) ** 2)


def test_reply_logps_are_a_plain_forwards_sum_over_the_reply():
    tok = tiny_chat_tokenizer()
    model = randomize(DecoderLM(tiny_config("gpt2", vocab_size=tok.get_vocab_size(), block_size=64))).eval()
    examples = rows_of(3, model.config.vocab_size, n=4)
    rows = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
    starts = [len(e["prompt_ids"]) for e in examples]
    got = reply_logps(model, rows, starts, 0)
    for row, start, value in zip(rows, starts, got.tolist()):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([row]))[0][0, :-1], -1)
        want = sum(logp[c - 1, row[c]].item() for c in range(start, len(row)))
        assert value == pytest.approx(want, abs=1e-5)
    mean = reply_logps(model, rows, starts, 0, mean=True)
    assert torch.allclose(mean, got / torch.tensor([len(r) - s for r, s in zip(rows, starts)]), atol=1e-6)


def test_a_ranking_gives_all_its_ordered_pairs_or_its_best_against_its_worst():
    tok = tiny_chat_tokenizer()
    ranking = Comparison(({"role": "user", "content": "hello"},), ("fine", "be", "there", "how"), (0, 0, 1, 2))
    gold = [{"gold": [1.0, 0.9, 0.5, 0.0]}]
    every, _ = make_pairs(tok, [ranking], 64, "all", gold)
    assert len(every) == 5  # (0,2) (0,3) (1,2) (1,3) (2,3): the tie (0,1) gives none
    assert every.gold == [(1.0, 0.5), (1.0, 0.0), (0.9, 0.5), (0.9, 0.0), (0.5, 0.0)]
    ends, _ = make_pairs(tok, [ranking], 64, "best_vs_worst", gold)
    assert len(ends) == 1 and ends.gold == [(1.0, 0.0)]
    assert tok.decode(ends.chosen[0][ends.chosen_start[0]:-1]) == "fine"


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random chat model and preferences on world questions: the reference answer over the
    same answer shouted in capitals (a preference a random model can learn and carry to held-out
    prompts; a wrong number is one it could only memorise)."""
    root = tmp_path_factory.mktemp("dpo")
    questions = [t for f in ("arithmetic", "compare") for t in world.tasks("train", f, 40, 0)]
    text = " ".join(t.prompt + " " + t.reference for t in questions) + " abcdefghijklmnopqrstuvwxyz0123456789"
    tok = train_tokenizer(iter([text]), "char", 0)
    torch.manual_seed(0)
    save_checkpoint(root / "sft", DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=128)), tok,
                    generation={"eos_token_id": chat_stop_ids(tok)})
    lines = [{"prompt": t.prompt, "chosen": t.reference, "rejected": t.reference.upper()} for t in questions]
    (root / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def dpo_cli(argv, capsys):
    code, out, err = run_cli(["dpo", *argv, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    return last_json(out)


def test_dpo_learns_the_preferences_and_reports_on_held_out_prompts(setup, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--init", str(setup / "sft"), "--data", str(setup / "prefs.jsonl"), "--out", str(out),
            "--train.batch_size", "16", "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.eval_every", "10",
            "--prompts", "world:arithmetic,compare", "--eval.per_family", "3", "--eval.max_new_tokens", "8",
            "--eval.samples", "2", "--data.val_fraction", "0.2"]
    summary = dpo_cli([*base, "--train.steps", "30"], capsys)
    # At step 0 the policy is the reference: every implicit reward is 0 and the loss log 2.
    assert summary["heldout_loss"] < 0.5 * math.log(2)
    assert summary["heldout_accuracy"] >= 0.9 and summary["heldout_reward_margin"] > 0
    assert summary["heldout_prompts"] == 6 and summary["kl_heldout"] > 0
    assert {"gold_gain", "gold_gain_se", "kl_heldout"} <= set(summary)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["heldout_pairs"]["accuracy"] == summary["heldout_accuracy"]
    assert all((out / name).is_file() for name in ("loss.png", "rewards.png", "metrics.jsonl", "config.yaml"))
    # --resume continues to a later step from the checkpoint.
    resumed = dpo_cli([*base, "--train.steps", "40", "--resume"], capsys)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert resumed["steps"] == 40 and max(steps) == 40 and steps == sorted(steps)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "prefs.jsonl:2: chosen and rejected are identical"),
    ({"prompt": "hi", "chosen": "yes"}, "prefs.jsonl:2:"),
])
def test_bad_preferences_are_one_line_exit_2_and_write_nothing(setup, bad, message, tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(bad) + "\n")
    code, _, err = run_cli(["dpo", "--init", str(setup / "sft"), "--data", str(path), "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
