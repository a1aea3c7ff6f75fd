"""align-compare: every method at its strengths on one tiny SFT model, reward model and label
folder; the frontier, the over-optimisation picture, the report and the --json keys; resuming
skips what is done. And Gao et al.'s forms, fitted, recover their coefficients."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatfoundry.align_compare import fit
from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.data import world
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.tokenizer import chat_stop_ids, train_tokenizer

from conftest import last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gao_forms_fit_their_own_curves():
    ds = [0.3, 0.6, 0.9, 1.2, 1.5]
    bon = [{"kl_heldout": d * d, "gold_gain": d * (0.5 - 0.2 * d)} for d in ds]
    rl = [{"kl_heldout": d * d, "gold_gain": d * (0.3 - 0.1 * math.log(d))} for d in ds]
    f = fit("bon", bon)
    assert f["a"] == pytest.approx(0.5, abs=1e-4) and f["b"] == pytest.approx(0.2, abs=1e-4) and f["r2"] > 0.999
    f = fit("ppo", rl)
    assert f["a"] == pytest.approx(0.3, abs=1e-4) and f["b"] == pytest.approx(0.1, abs=1e-4) and f["r2"] > 0.999


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A pipeline-shaped folder: a tiny SFT model, a reward model on its body, a label folder."""
    root = tmp_path_factory.mktemp("align")
    questions = [t for f in world.FAMILIES for t in world.tasks("train", f, 30, 0)]
    text = " ".join(t.prompt + " " + t.reference for t in questions) + " abcdefghijklmnopqrstuvwxyz0123456789"
    tok = train_tokenizer(iter([text]), "char", 0)
    torch.manual_seed(0)
    lm = DecoderLM(tiny_config(vocab_size=tok.get_vocab_size(), block_size=128))
    save_checkpoint(root / "sft", lm, tok, generation={"eos_token_id": chat_stop_ids(tok)})
    save_checkpoint(root / "rm", randomize(RewardModel.from_lm(lm), seed=1, std=0.1), tok)
    (root / "label").mkdir()
    for split, tasks in (("train", questions[:60]), ("val", questions[60:80])):
        lines = [{"prompt": t.prompt, "responses": [t.reference, t.reference.upper()], "ranks": [0, 1]} for t in tasks]
        (root / "label" / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_align_compare_runs_every_method_and_resumes(demo, tmp_path, capsys):
    argv = ["align-compare", "--pipeline", str(demo), "--out", str(tmp_path / "cmp"), "--n", "4", "--samples", "2",
            "--per_family", "1", "--ppo_kl", "0.1", "0.5", "--grpo_kl", "0.5", "--dpo_beta", "0.5",
            "--ppo_iterations", "2", "--grpo_iterations", "2", "--dpo_steps", "4", "--device", "cpu", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    summary = last_json(out)
    assert set(summary["methods"]) == {"bon4", "bon16", "dpo", "grpo", "ppo"} - {"bon16"}  # n 4: no best-of-16
    for m in summary["methods"].values():
        assert {"gold_gain", "gold_gain_se", "kl_heldout"} <= set(m)
    assert summary["methods"]["ppo"]["run"] in ("ppo_0.1", "ppo_0.5")
    cmp = tmp_path / "cmp"
    assert all((cmp / f).is_file() for f in ("frontier.png", "overoptimization.png", "report.md", "report.json"))
    report = (cmp / "report.md").read_text()
    assert "| ppo_0.1 |" in report and "| bon4 |" in report and "content" in report
    code, out, err = run_cli(argv, capsys)  # everything done: skipped
    assert code == 0 and out.count("done, skipped") == 5


def test_a_missing_pipeline_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["align-compare", "--pipeline", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "sft:" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
