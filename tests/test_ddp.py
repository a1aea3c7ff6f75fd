"""Data parallelism: 2 processes (torchrun, gloo on CPU) train exactly what 1 process with gradient
accumulation over the same global batch trains."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from chatfoundry import checkpoint as ckpt
from chatfoundry.metrics import read_metrics

from conftest import TINY, TORCHRUN_2, cli_subprocess_cmd, run_subprocess as _run

pytestmark = pytest.mark.slow

# Global batch 8 in micro-batches of 4: 1 process accumulates 2, 2 processes take 1 each.
# Dropout is 0 (the default), so the two runs compute the same sums in a different order.
ARGS = [*TINY, "--train.batch_size", "8", "--train.micro_batch_size", "4", "--model.dropout", "0",
        "--train.log_every", "1", "--json"]


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    single = _run([*cli_subprocess_cmd(), "pretrain", *ARGS, "--out", str(one)])
    ddp = _run([*TORCHRUN_2, "-m", "chatfoundry", "pretrain", *ARGS, "--out", str(two)])
    return (one, single), (two, ddp)


def test_the_runs_split_the_batch_as_intended(runs):
    (one, single), (two, ddp) = runs
    assert "batch 8 x 32 = 4 x 2 steps x 1 processes" in single.stdout
    assert "batch 8 x 32 = 4 x 1 steps x 2 processes" in ddp.stdout
    assert ckpt.load_trainer_state(one)["step"] == ckpt.load_trainer_state(two)["step"] == 12


def test_train_losses_agree_at_every_logged_step(runs):
    (one, _), (two, _) = runs
    a = [r for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["step"]
        assert rb["lr"] == ra["lr"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), ra["step"]
    assert a[-1]["loss"] < a[0]["loss"]  # it trained


def test_validation_losses_agree(runs):
    (one, _), (two, _) = runs
    a = [r for r in read_metrics(one / "metrics.jsonl") if "val_loss" in r]
    b = [r for r in read_metrics(two / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [6, 12]
    for ra, rb in zip(a, b):
        assert math.isclose(ra["val_loss"], rb["val_loss"], rel_tol=1e-4)


def test_final_weights_agree(runs):
    (one, _), (two, _) = runs
    wa = load_file(one / "checkpoint" / "model.safetensors")
    wb = load_file(two / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-5, worst


def test_one_metrics_file_and_one_checkpoint(runs):
    (_, _), (two, _) = runs
    records = read_metrics(two / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "both ranks wrote metrics"
    assert not (two / "checkpoint.tmp").exists() and not (two / "checkpoint.old").exists()
    assert sorted(p.name for p in (two / "checkpoint").iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         ckpt.TRAINER_STATE])


def test_summary_json_matches_the_single_process_run(runs):
    (_, single), (_, ddp) = runs
    a = _json_lines(single.stdout)[-1]
    b = next(s for s in _json_lines(ddp.stdout) if "samples" in s)  # rank 0's
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert b["params"] == a["params"]


def test_only_rank_0_prints_the_json_summary(runs):
    (_, _), (_, ddp) = runs
    assert len(_json_lines(ddp.stdout)) == 1
