"""Compiled decoding (`generation.compile_for_decoding`, `--compile`): every strategy gives the same
tokens as eager decoding, through generate, beam search, padded batches, the server's batcher and
the CLI. Compilation takes tens of seconds, so one compiled model serves the module."""

from __future__ import annotations

import copy

import pytest
import torch

from chatfoundry.generation import GenerationConfig, compile_for_decoding, generate, generate_batch
from chatfoundry.models.decoder import DecoderLM
from conftest import TINY, last_json, randomize, run_cli, tiny_chat_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[5, 9, 2, 23, 7], [11, 3], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def pair(tok):
    """An eager model and its compiled twin: grouped-query attention, rotary positions, 64-token context."""
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=tok.get_vocab_size(), n_kv_head=2, block_size=64)
    eager = randomize(DecoderLM(cfg)).eval()
    return eager, compile_for_decoding(copy.deepcopy(eager))


@pytest.mark.parametrize("cfg", [
    dict(),  # greedy
    dict(do_sample=True, top_p=0.9, top_k=20, temperature=0.8, seed=3),
    dict(num_beams=3, num_return_sequences=2, length_penalty=0.7),  # 3 rows: the batched graph
], ids=["greedy", "top-p", "beam"])
def test_compiled_decoding_equals_eager(pair, cfg):
    eager, compiled = pair
    cfg = GenerationConfig(max_new_tokens=40, eos_token_id=None, **cfg)
    for prompt in PROMPTS:
        want, got = generate(eager, prompt, cfg), generate(compiled, prompt, cfg)
        assert got.sequences == want.sequences
        for a, b in zip(got.token_logprobs, want.token_logprobs):
            assert a == pytest.approx(b, abs=1e-4)


def test_compiled_padded_batches_and_window_slides_equal_eager(pair):
    eager, compiled = pair
    cfg = GenerationConfig(max_new_tokens=20, eos_token_id=None)
    assert generate_batch(compiled, PROMPTS, cfg).sequences == generate_batch(eager, PROMPTS, cfg).sequences
    long = GenerationConfig(max_new_tokens=90, eos_token_id=None)  # past the 64-token context: the window slides
    assert generate(compiled, PROMPTS[0], long).sequences == generate(eager, PROMPTS[0], long).sequences


def test_compiled_model_is_for_inference_and_grad_calls_stay_eager(pair):
    eager, compiled = pair
    assert not compiled.training and not any(p.requires_grad for p in compiled.parameters())
    ids = torch.tensor([PROMPTS[0]])
    with torch.enable_grad():  # a forward that records gradients bypasses the frozen compiled step
        want, _ = eager(ids[:, :1])
        got, _ = compiled(ids[:, :1])
    torch.testing.assert_close(got, want)


def test_the_server_batcher_decodes_the_same_with_a_compiled_model(pair, tok):
    from chatfoundry.serve.api import Job
    from chatfoundry.serve.batcher import Batcher

    eager, compiled = pair
    jobs = [Job(p, GenerationConfig(max_new_tokens=15), []) for p in PROMPTS]
    batcher = Batcher(compiled, tok, start=False)  # all three wait, then decode as one batch
    streams = [batcher.submit(job) for job in jobs]
    batcher.start()
    for job, events in zip(jobs, streams):
        got = [e["token"] for e in events if e.get("token", -1) >= 0]
        assert got == generate(eager, job.ids, job.cfg).sequences[0]
    assert batcher.batch_sizes == [3]
    batcher.close()


def test_generate_cli_compile_flag(tmp_path, capsys):
    from chatfoundry.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out)]) == 0
    args = ["generate", "--ckpt", str(out), "--prompt", "The ", "--max_new_tokens", "10", "--json"]
    plain = run_cli(args, capsys)
    fast = run_cli([*args, "--compile"], capsys)
    assert plain[0] == fast[0] == 0, fast[2]
    assert last_json(fast[1])["token_ids"] == last_json(plain[1])["token_ids"]
