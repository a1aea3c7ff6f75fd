"""Decoding on token ids: temperature and top-k sampling (greedy at temperature 0) with a KV cache.

Knows nothing of text. The prompt is run once (prefill), then one token per step reuses the
cached keys and values of every earlier position.
"""

from __future__ import annotations

import torch

from chatfoundry.models.decoder import DecoderLM


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Scale by 1/temperature and keep the top_k largest logits (the rest become -inf)."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@torch.no_grad()
def sample(model: DecoderLM, prompt: list[int], max_new_tokens: int, num_samples: int = 1,
           temperature: float = 1.0, top_k: int | None = None, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """`num_samples` continuations of one prompt; each stops at eos_id (kept) or after max_new_tokens.

    Past the model's context the window slides, as nanoGPT does: the cache restarts from the
    last half-context of tokens, so generation can run on as long as asked.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    device = model.lm_head.weight.device
    context = model.config.block_size
    seqs = torch.tensor([prompt[-context:]] * num_samples, device=device)
    cache = model.new_cache(num_samples)
    idx = seqs
    out = [[] for _ in range(num_samples)]
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        if cache.pos + idx.shape[1] > context:  # full: re-read the recent half-context
            idx, cache.pos = seqs[:, -(context // 2):], 0
        logits, _ = model(idx, cache=cache)
        cache.pos += idx.shape[1]
        logits = logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(logits, temperature, top_k), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        idx = nxt[:, None]
        seqs = torch.cat([seqs[:, -(context - 1):], idx], dim=1)
    return out
