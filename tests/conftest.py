"""Shared test set-up: a private cache, tiny run settings and a helper to call the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as chatfoundry/__init__.py: before torch starts

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A run small enough for a test: ~100k-parameter model, 60k characters of built-in corpus.
TINY = ["--data.corpus_chars", "60000", "--tokenizer.kind", "char", "--model.n_layer", "2",
        "--model.n_embd", "32", "--model.n_head", "2", "--model.n_kv_head", "2", "--model.block_size", "32",
        "--train.batch_size", "8", "--train.steps", "12", "--train.warmup_steps", "2", "--train.eval_every", "6",
        "--train.eval_batches", "2", "--train.save_every", "6", "--train.log_every", "2",
        "--sample.num_samples", "1", "--sample.max_new_tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Token shards and trained tokenizers go to a per-session cache, never ~/.cache."""
    os.environ["CHATFOUNDRY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes two spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- tiny random models


def tiny_config(flavour: str = "gpt2", **overrides):
    """A 2-layer, 32-wide decoder config of either flavour; overrides refine it."""
    from chatfoundry.models.decoder import FLAVOURS, DecoderConfig

    base = dict(preset="tiny", flavour=flavour, vocab_size=61, block_size=32, n_layer=2, n_head=4,
                n_kv_head=4, n_embd=32, **FLAVOURS[flavour])
    cfg = DecoderConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def randomize(model, seed: int = 0, std: float = 0.15):
    """Redraw every parameter (norm gains and biases too) so no part of the model is trivial and
    argmax ties cannot hide a bug (the 0.02 init gives nearly flat logits)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_" in name or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_chat_tokenizer():
    """A char tokenizer with the chat tokens, over the few letters the chat tests type."""
    from chatfoundry.tokenizer import train_tokenizer

    return train_tokenizer(["hello there, how are you? Be brief. fine thanks"], "char")


def tiny_chat_model(tok):
    """A random Llama-flavour decoder with a 64-token context for that tokenizer."""
    import torch

    from chatfoundry.models.decoder import DecoderLM

    torch.manual_seed(0)
    return randomize(DecoderLM(tiny_config("llama", vocab_size=tok.get_vocab_size(), block_size=64))).eval()


def hf_model_for(cfg, **kwargs):
    """The untrained transformers model of our config's architecture (GPT-2 or Llama)."""
    import torch
    import transformers

    from chatfoundry.models import hf

    fields = hf.to_hf_config(cfg)
    for key in ("chatfoundry", "architectures", "torch_dtype"):
        fields.pop(key, None)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `chatfoundry ARGV` in this process: (exit code, stdout, stderr)."""
    from chatfoundry.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def cli_subprocess_cmd() -> list[str]:
    return [sys.executable, "-m", "chatfoundry"]


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def subprocess_env() -> dict[str, str]:
    """The environment for a CLI run in a child process, under torchrun or not: one thread a
    process, the session's private cache, no torchrun variables inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CHATFOUNDRY_CACHE comes along from the session fixture
    assert env.get("CHATFOUNDRY_CACHE")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_subprocess(cmd: list[str]):
    """Run `cmd` in a child process (`subprocess_env`); fail the test with its stderr unless it succeeds."""
    import subprocess

    done = subprocess.run(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    return done


@contextlib.contextmanager
def served(app):
    """uvicorn serving `app` on a free localhost port in a background thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
