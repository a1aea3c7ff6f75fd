"""Sampling with the KV cache: greedy equals the cache-free argmax loop, top-k, EOS, long outputs."""

from __future__ import annotations

import torch

from chatfoundry.generation import filter_logits, sample
from chatfoundry.models.decoder import DecoderConfig, DecoderLM


def tiny(flavour: str = "gpt2", block: int = 16) -> DecoderLM:
    cfg = DecoderConfig.from_preset("tiny", flavour)
    cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd = 50, block, 2, 32
    torch.manual_seed(0)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():  # spread the logits so argmax ties cannot hide a wrong cache
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def greedy_without_cache(model: DecoderLM, prompt: list[int], n: int) -> list[int]:
    """nanoGPT's loop: the whole (cropped) context through the model at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_the_loop_without_cache():
    for flavour in ("gpt2", "llama"):
        model = tiny(flavour)
        prompt = [3, 1, 4, 1, 5]
        assert sample(model, prompt, 11, temperature=0) == [greedy_without_cache(model, prompt, 11)]


def test_generation_runs_past_the_context_and_restarts_the_window():
    model = tiny(block=16)
    out = sample(model, [1, 2, 3], 100, num_samples=2, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert [len(o) for o in out] == [100, 100]
    assert all(0 <= t < 50 for o in out for t in o)
    # Until the context is full, the sliding window changes nothing.
    assert sample(model, [1, 2, 3], 13, temperature=0)[0] == sample(model, [1, 2, 3], 40, temperature=0)[0][:13]


def test_same_generator_seed_same_samples_and_eos_stops():
    model = tiny()
    a = sample(model, [7], 20, num_samples=3, generator=torch.Generator().manual_seed(5))
    b = sample(model, [7], 20, num_samples=3, generator=torch.Generator().manual_seed(5))
    assert a == b
    eos = a[0][4]  # pretend the fifth token of the first sample is the end of text
    stopped = sample(model, [7], 20, num_samples=3, eos_id=eos, generator=torch.Generator().manual_seed(5))
    assert stopped[0] == a[0][:5]
    for s in stopped:
        assert eos not in s[:-1] and (s[-1] == eos or len(s) == 20)


def test_top_k_keeps_exactly_the_k_largest_and_temperature_scales():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, 1.0, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.allclose(filter_logits(logits, 0.5, None), logits * 2)
    model = tiny()
    draws = sample(model, [1], 1, num_samples=200, top_k=1, generator=torch.Generator().manual_seed(0))
    assert {d[0] for d in draws} == {sample(model, [1], 1, temperature=0)[0][0]}
