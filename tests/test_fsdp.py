"""FSDP2 (`--dist fsdp`): 2 processes under torchrun (gloo on CPU), the weights, gradients and
AdamW's moments sharded, train what 1 process trains over the same global batch; the checkpoint
holds torch.distributed.checkpoint's shards beside the whole weights, and a run killed mid-way
resumes from them exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from chatfoundry import checkpoint as ckpt
from chatfoundry.metrics import read_metrics

from conftest import TINY, TORCHRUN_2, cli_subprocess_cmd, run_subprocess as _run, subprocess_env as _env

pytestmark = pytest.mark.slow

# Global batch 8 in micro-batches of 4: 1 process accumulates 2, 2 processes take 1 each.
ARGS = [*TINY, "--train.batch_size", "8", "--train.micro_batch_size", "4", "--model.dropout", "0",
        "--train.log_every", "1"]
TORCHRUN = [*TORCHRUN_2, "-m", "chatfoundry"]


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker`."""
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker in open(f"/proc/{pid}/cmdline").read().replace("\0", " "):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _run([*cli_subprocess_cmd(), "pretrain", *ARGS, "--out", str(root / "one")])
    fsdp = _run([*TORCHRUN, "pretrain", *ARGS, "--dist", "fsdp", "--out", str(root / "two")])
    assert "4 x 1 steps x 2 processes (FSDP)" in fsdp.stdout
    return root


def test_pretrain_losses_and_weights_equal_one_process(root):
    one, two = _losses(root / "one"), _losses(root / "two")
    assert list(one) == list(two) == list(range(1, 13))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert one[12] < one[1]  # it trained
    wa, wb = load_file(root / "one" / "checkpoint" / "model.safetensors"), load_file(root / "two" / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_the_checkpoint_holds_the_shards_and_the_whole_weights(root):
    folder = root / "two" / "checkpoint"
    assert (folder / ckpt.SHARDS / ".metadata").is_file() and len(list((folder / ckpt.SHARDS).glob("*.distcp"))) == 2
    assert "optimizer" not in ckpt.load_trainer_state(root / "two")  # it is in the shards
    model, _ = ckpt.load_model(root / "two")  # the whole model, as any command reads it
    assert all(not type(p).__name__ == "DTensor" for p in model.parameters())
    assert not (root / "two" / "checkpoint.shards.tmp").exists()


def test_resuming_across_kinds_is_refused(root, tmp_path):
    import shutil

    for src, dist in (("two", "ddp"), ("one", "fsdp")):
        run = tmp_path / src
        shutil.copytree(root / src, run)
        cmd = TORCHRUN if dist == "fsdp" else cli_subprocess_cmd()
        done = subprocess.run([*cmd, "pretrain", *ARGS, "--train.steps", "18", "--out", str(run), "--resume",
                               "--dist", dist], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=600)
        assert done.returncode != 0 and f"with --dist {'fsdp' if dist == 'ddp' else 'ddp'}" in done.stderr, done.stderr[-2000:]


def test_sft_losses_equal_one_process(root, tmp_path):
    args = ["--init", str(root / "one"), "--train.steps", "5", "--train.batch_size", "8", "--train.micro_batch_size",
            "4", "--train.warmup_steps", "1", "--train.log_every", "1", "--train.eval_every", "5",
            "--train.save_every", "5", "--data.conversations", "32", "--eval.per_family", "2",
            "--eval.max_new_tokens", "4", "--device", "cpu"]
    _run([*cli_subprocess_cmd(), "sft", *args, "--out", str(tmp_path / "one")])
    _run([*TORCHRUN, "sft", *args, "--dist", "fsdp", "--out", str(tmp_path / "two")])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert list(one) == list(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert (tmp_path / "two" / "eval.json").is_file()  # the main process scored the whole model


def test_a_killed_fsdp_run_resumes_exactly(root, tmp_path):
    args = [*ARGS, "--train.steps", "120", "--train.save_every", "6", "--train.eval_every", "60", "--dist", "fsdp"]
    straight, killed = tmp_path / "a", tmp_path / "b"
    _run([*TORCHRUN, "pretrain", *args, "--out", str(straight)])
    proc = subprocess.Popen([*TORCHRUN, "pretrain", *args, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / ckpt.TRAINER_STATE
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    _kill_all(str(killed))  # torchrun and both workers (each in a session of its own)
    proc.wait(timeout=60)
    at = int(ckpt.load_trainer_state(killed)["step"])
    assert at % 6 == 0 and 0 < at < 120, at
    _run([*TORCHRUN, "pretrain", *args, "--out", str(killed), "--resume"])
    wa = load_file(straight / "checkpoint" / "model.safetensors")
    wb = load_file(killed / "checkpoint" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"resumed from step {at}: weights differ from the straight run"
    a, b = _losses(straight), _losses(killed)
    assert all(b[s] == a[s] for s in a if s in b) and max(b) == 120
