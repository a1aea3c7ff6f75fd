"""Calibration: the metrics against torchmetrics and a hand-worked table, temperature scaling
recovering a known temperature, the multiple-choice questions (balanced letters, options the
verifier judges as the question's), the option probabilities against a direct computation, and
`chatfoundry calibrate` end to end with its bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.eval import calibration as cal
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import chat_stop_ids, encode_chat, special_id, train_tokenizer

from conftest import last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_probs(n: int, k: int, seed: int, sharp: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = sharp * rng.standard_normal((n, k))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, rng.integers(0, k, n)


@pytest.mark.parametrize("bins", [5, 10, 15])
def test_ece_equals_torchmetrics(bins):
    from torchmetrics.classification import MulticlassCalibrationError

    probs, target = _random_probs(500, 4, bins)
    m = cal.metrics(probs, target, bins)
    theirs = MulticlassCalibrationError(num_classes=4, n_bins=bins, norm="l1")(
        torch.tensor(probs, dtype=torch.float64), torch.tensor(target))
    conf, correct = probs.max(1), (probs.argmax(1) == target).astype(float)
    assert cal.ece(conf, correct, bins) == pytest.approx(float(theirs), abs=1e-6)
    assert m["ece"] == pytest.approx(float(theirs), abs=1e-4)  # the report rounds to 4 places


def test_metrics_on_a_hand_worked_table():
    # Six questions, two or four options (0-padded), confidences 0.9 0.8 0.6 0.55 0.3 1.0.
    probs = np.array([[0.9, 0.1, 0, 0], [0.1, 0.8, 0.1, 0], [0.6, 0.4, 0, 0], [0.15, 0.15, 0.15, 0.55],
                      [0.3, 0.25, 0.25, 0.2], [0.0, 1.0, 0, 0]])
    answers = np.array([0, 0, 0, 3, 1, 1])  # right, wrong, right, right, wrong, right
    conf, correct = probs.max(1), (probs.argmax(1) == answers).astype(float)
    # Two equal-width bins [0, 0.5) and [0.5, 1]: {0.3: wrong} and {0.9 R, 0.8 W, 0.6 R, 0.55 R, 1.0 R}.
    hand = 1 / 6 * abs(0 - 0.3) + 5 / 6 * abs(4 / 5 - (0.9 + 0.8 + 0.6 + 0.55 + 1.0) / 5)
    assert cal.ece(conf, correct, 2) == pytest.approx(hand, abs=1e-12)
    # Three equal-mass bins by confidence: {0.3 W, 0.55 R}, {0.6 R, 0.8 W}, {0.9 R, 1.0 R}.
    hand = (abs(0.5 - 0.425) + abs(0.5 - 0.7) + abs(1.0 - 0.95)) / 3
    assert cal.adaptive_ece(conf, correct, 3) == pytest.approx(hand, abs=1e-12)
    # Brier: the squared distance from the one-hot answer, summed over the options.
    rows = [0.01 + 0.01, 0.81 + 0.64 + 0.01, 0.16 + 0.16, 3 * 0.0225 + 0.2025, 0.09 + 0.5625 + 0.0625 + 0.04, 0.0]
    assert cal.brier(probs, answers) == pytest.approx(sum(rows) / 6, abs=1e-12)
    m = cal.metrics(probs, answers, 2)
    assert (m["accuracy"], m["mean_confidence"]) == (pytest.approx(4 / 6, abs=1e-4), pytest.approx(4.15 / 6, abs=1e-4))
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.6, 0.55, 0.25, 1.0])), abs=1e-4)
    assert [b["n"] for b in cal.reliability(conf, correct, 2)] == [1, 5]


def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20000, 4))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    answers = np.array([rng.choice(4, p=p) for p in true])
    sharp = np.log(cal.probabilities(3.0 * logits))  # three times too confident
    t = cal.fit_temperature(sharp, answers)
    assert t == pytest.approx(3.0, rel=0.05)
    before, after = cal.metrics(cal.probabilities(sharp), answers, 10), cal.metrics(cal.probabilities(sharp, t), answers, 10)
    assert after["ece"] < 0.02 < before["ece"] and after["nll"] < before["nll"]
    # Two options of four padded with -inf stay at probability 0 whatever the temperature.
    padded = np.array([[math.log(0.7), math.log(0.3), -np.inf, -np.inf]])
    assert cal.probabilities(padded, 2.0)[0, 2:].tolist() == [0.0, 0.0]


def test_the_ece_interval_brackets_ece():
    probs, target = _random_probs(300, 4, 1)
    lo, hi = cal.ece_interval(probs, target, 10, 200, 0)
    assert lo < cal.metrics(probs, target, 10)["ece"] < hi


def test_questions_balance_the_letters_and_their_options_are_judged_by_the_verifier():
    qs = cal.questions("test", cal.FAMILIES, 200)
    assert qs == cal.questions("test", cal.FAMILIES, 200)  # the same for every run
    for family, mine in qs.items():
        k = 2 if family == "compare" else 4
        assert len(mine) >= 30 and all(len(q.options) == len(set(q.options)) == k for q in mine)
        counts = np.bincount([q.answer for q in mine], minlength=k)
        assert counts.max() - counts.min() <= 1, (family, counts)  # no letter is right more often
        for q in mine:
            assert q.options[q.answer] == q.task.answer and world.split_of(q.task.group) == "test"
            said = [world.restate(q.task, o) for o in q.options]
            # The verifier reads the right option's sentence as right, and every other one as wrong.
            assert [world.is_correct(q.task, s) for s in said] == [i == q.answer for i in range(k)], said


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    questions = [t for f in world.FAMILIES for t in world.tasks("train", f, 60, 0)]
    text = " ".join(t.prompt + " " + t.reference for t in questions) + " abcdefghijklmnopqrstuvwxyz0123456789ABCD"
    tok = train_tokenizer(iter([text]), "char", 0)
    for name, seed in (("sft", 0), ("ppo", 1)):
        torch.manual_seed(seed)
        model = randomize(DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=192)), seed, std=0.05)
        save_checkpoint(root / name, model, tok, generation={"eos_token_id": chat_stop_ids(tok)})
    torch.manual_seed(2)
    model = randomize(DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=192)), 2, std=0.05)
    save_checkpoint(root / "pre" / "checkpoint", model, tok)
    (root / "pre" / "config.yaml").write_text("out: pre\nobjective: clm\n")  # as `pretrain` leaves its run
    return root


@pytest.mark.parametrize("form", ["option", "letter"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "quiz"])
def test_option_probabilities_are_the_models_own(root, form, chat):
    from chatfoundry.checkpoint import load_model

    model, tok = load_model(root / "sft")
    qs = [q for mine in cal.questions("val", cal.FAMILIES, 3).values() for q in mine]
    got = cal.option_logprobs(model, tok, qs, chat, form, batch_size=5)
    q = qs[0]  # a facts question, four options: each scored alone, unbatched
    ask = q.task.prompt if form == "option" else cal.lettered(q)
    if chat:
        prompt = encode_chat(tok, [{"role": "user", "content": ask}])
    else:
        prompt = [special_id(tok, "eos")] + tok.encode(f"Question: {ask}\nAnswer:", add_special_tokens=False).ids
    scores = []
    for i, option in enumerate(q.options):
        said = world.restate(q.task, option) if form == "option" else cal.LETTERS[i]
        cont = tok.encode(said if chat else " " + said, add_special_tokens=False).ids
        cont += [special_id(tok, "end")] if chat and form == "option" else []
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + cont]))
        logp = torch.log_softmax(logits[0, :-1].double(), -1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
    want = np.array(scores) - np.logaddexp.reduce(scores)
    assert np.allclose(got[0], want, atol=1e-5)
    assert np.allclose(np.exp(got).sum(1), 1.0) and got.shape == (len(qs), 4)
    assert np.isneginf(got[[i for i, x in enumerate(qs) if x.task.family == "compare"], 2:]).all()


@pytest.mark.slow
def test_calibrate_measures_each_checkpoint_and_writes_its_report(root, tmp_path, capsys):
    out = tmp_path / "cal"
    code, stdout, err = run_cli(["calibrate", "--base", str(root / "pre"), "--ckpt", str(root / "sft"), "--ckpt",
                                 str(root / "ppo"), "--out", str(out), "--questions", "40", "--hallucination", "6",
                                 "--bootstrap", "100", "--max_new_tokens", "12", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    assert [c["name"] for c in summary["checkpoints"]] == ["pre", "sft", "ppo"]
    assert [c["form"] for c in summary["checkpoints"]] == ["quiz", "chat", "chat"] and summary["reference"] == "sft"
    for c in summary["checkpoints"]:
        assert {"ckpt", "accuracy", "ece", "ece_adaptive", "brier", "mean_confidence", "families", "ece_ci",
                "temperature", "scaled", "hallucination"} <= set(c)
        assert set(c["families"]) == set(cal.FAMILIES) and 0 <= c["ece"] <= 1 and c["temperature"] > 0
        assert c["ece_ci"][0] <= c["ece"] <= c["ece_ci"][1] + 1e-9
        assert set(c["hallucination"]) == {"answerable", "made_up"}  # the answers stay in calibration.json
    assert "change" not in summary["checkpoints"][1] and summary["checkpoints"][2]["change"]["vs"] == "sft"
    assert {"ece", "brier", "made_up_confident_wrong"} <= set(summary["checkpoints"][2]["change"])
    for name in ("calibration.json", "metrics.jsonl", "reliability.png", "hallucination.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert summary["figure"] == str(out / "reliability.png")
    assert "| sft | chat |" in stdout and "made-up countries: states a value" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{root}/pre"], "a pretrained base model"),
    (["--ckpt", "{root}/sft", "--bins", "40", "--questions", "30"], "fewer than 40 bins"),
    (["--ckpt", "{root}/sft", "--families", "strings"], "'strings' is not one of"),
    (["--ckpt", "{root}/sft", "--reference", "dpo"], "'dpo' names no checkpoint"),
    (["--ckpt", "{root}/sft", "--names", "a", "b"], "give one per checkpoint"),
    ([], "give a checkpoint to measure"),
], ids=["base-as-chat", "too-few-questions", "family", "reference", "names", "nothing"])
def test_bad_input_is_one_line_and_writes_nothing(root, tmp_path, capsys, argv, message):
    out = tmp_path / "cal"
    code, _, err = run_cli(["calibrate", *[a.format(root=root) for a in argv], "--out", str(out)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
