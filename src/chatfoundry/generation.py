"""Decoding on token ids: greedy, sampling (temperature, top-k, top-p, min-p, repetition penalty,
no-repeat n-grams) and beam search, all with a KV cache.

Knows nothing of text. The prompt is run once (prefill), then one token per step reuses the
cached keys and values of every earlier position.

The logits processors follow `transformers` exactly (same order, same ties, same edge cases), so
`generate` picks the same tokens as `model.generate` of the identical transformers model:

    processors (always):     repetition_penalty, no_repeat_ngram_size
    warpers (do_sample only): temperature, top_k, top_p, min_p

Greedy and sampling apply them to the raw logits; beam search applies the processors to the
log-softmax of the logits (as transformers does) and adds the result to the beam's running score.

Log-probabilities reported per token (`GenerationOutput.token_logprobs`) are those of the model's
own distribution, log_softmax of the raw logits, before any processor: transformers'
`output_logits`, not its `output_scores`. They say how likely the model finds the text whatever
knobs chose it. `GenerationOutput.scores` is their sum for greedy and sampling; for beam search it
is the beam score as transformers defines it (`sequences_scores`): the sum of the *processed*
log-probabilities divided by (number of new tokens, EOS included) ** length_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator, Sequence
from typing import Callable, Literal

import torch

from chatfoundry.config import require
from chatfoundry.errors import UserError
from chatfoundry.models.decoder import DecoderLM

# ---------------------------------------------------------------- logits processors
#
# Each takes logits (rows, vocab) and returns a new tensor; `history` (rows, T) holds every token
# seen so far, prompt included.


def repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already seen: positive logits / penalty, negative * penalty."""
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def no_repeat_ngram(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Ban every token that would complete an n-gram already present in the row's history."""
    cur_len = history.shape[1]
    if cur_len < n:
        return logits
    banned = torch.zeros_like(logits, dtype=torch.bool)
    for row, tokens in enumerate(history.tolist()):
        prefix = tokens[cur_len - n + 1:]  # the n-1 last tokens (none when n == 1)
        for start in range(cur_len - n + 1):
            if tokens[start:start + n - 1] == prefix:
                banned[row, tokens[start + n - 1]] = True
    return logits.masked_fill(banned, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (all those tied with the k-th too); the rest become -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the most likely tokens whose probabilities sum to at least p.

    As transformers: sort ascending, drop the tokens whose cumulative mass is <= 1 - p, and
    always keep the `min_keep` most likely.
    """
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely token's probability."""
    probs = torch.softmax(logits, dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    drop.scatter_(-1, keep, False)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Scale by 1/temperature and keep the top_k largest logits (the rest become -inf)."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits = top_k_filter(logits, top_k)
    return logits


# ---------------------------------------------------------------- configuration


@dataclass
class GenerationConfig:
    """How to continue a prompt. Defaults: greedy, 32 new tokens, no EOS."""

    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy (num_beams 1) or beam search
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float | None = None  # None: off
    repetition_penalty: float = 1.0  # 1.0: off
    no_repeat_ngram_size: int = 0  # 0: off
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum logprobs / len ** length_penalty
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None  # one id or several (a chat model stops at <|end|> or EOS)
    seed: int | None = None  # None: torch's global generator

    @property
    def eos_ids(self) -> list[int]:
        return _as_ids(self.eos_token_id)

    def validate(self) -> None:
        def req(ok: bool, name: str, message: str) -> None:
            require(ok, f"generation.{name}", f"{message}, got {getattr(self, name)!r}")

        req(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        req(self.temperature > 0, "temperature", "must be > 0 (greedy: do_sample false)")
        req(self.top_k is None or self.top_k >= 0, "top_k", "must be >= 0 (0: off)")
        req(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        req(self.min_p is None or 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        req(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        req(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0 (0: off)")
        req(self.num_beams >= 1, "num_beams", "must be >= 1")
        req(not (self.do_sample and self.num_beams > 1), "num_beams",
            "beam search is deterministic here; use num_beams 1 with do_sample")
        req(self.early_stopping in (True, False, "never"), "early_stopping", "must be true, false or 'never'")
        req(self.num_return_sequences >= 1, "num_return_sequences", "must be >= 1")
        if self.num_beams > 1:
            req(self.num_return_sequences <= self.num_beams, "num_return_sequences",
                f"must be <= num_beams ({self.num_beams})")
        elif not self.do_sample:
            req(self.num_return_sequences == 1, "num_return_sequences", "greedy decoding returns one sequence")
        req(all(isinstance(i, int) and i >= 0 for i in self.eos_ids), "eos_token_id", "must be ids >= 0")


@dataclass
class GenerationOutput:
    """Best first for beam search; in row order for sampling. New tokens only (EOS kept)."""

    sequences: list[list[int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    token_logprobs: list[list[float]] = field(default_factory=list)


def process_logits(logits: torch.Tensor, history: torch.Tensor, cfg: GenerationConfig,
                   warp: bool = True) -> torch.Tensor:
    """All processors in transformers' order; the warpers only when sampling (and `warp`)."""
    if cfg.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        logits = no_repeat_ngram(logits, history, cfg.no_repeat_ngram_size)
    if warp and cfg.do_sample:
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.top_k:
            logits = top_k_filter(logits, cfg.top_k)
        if cfg.top_p < 1.0:
            logits = top_p_filter(logits, cfg.top_p)
        if cfg.min_p is not None:
            logits = min_p_filter(logits, cfg.min_p)
    return logits


# ---------------------------------------------------------------- greedy and sampling

# Picks the next token of every row: (raw logits (R, V) float32, history (R, T)) -> ids (R,)
Picker = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (R, V), by inverting each row's cumulative distribution at
    one uniform draw. torch.multinomial draws an exponential per vocabulary entry (R * V numbers);
    this draws R, which more than halves a small model's decoding step on a CPU. A token of
    probability 0 is never picked: its interval is empty, and a draw that rounds up to the whole
    mass (past the end) takes the last token that has probability."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    past = picked == probs.shape[-1]
    if past.any():  # rare, so not paid on every step
        picked[past] = probs.shape[-1] - 1 - (probs[past].flip(-1) > 0).int().argmax(dim=-1)
    return picked


def _steps(model: DecoderLM, prompts: list[list[int]], max_new_tokens: int, pick: Picker,
           eos: Sequence[int] = ()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The token-by-token loop shared by greedy, sampling and streaming: yields, per step, every
    row's next token (R,) and its logprob under the model's own distribution (R,).

    Prompts of different lengths are left-padded into one batch; a key mask keeps padding out of
    attention and out of the positions. Past the model's context the window slides, as nanoGPT
    does: the cache restarts from the last half-context of tokens, so generation can run on as
    long as asked. The caller stops early by not asking for the next step.

    A row that emits an id in `eos` is done: once a quarter of the rows in the batch are, they
    leave it (their cache rows are dropped), so short answers stop costing compute while a long
    one runs on. What a done row yields afterwards is meaningless. The picker still sees every
    row (done ones with dummy logits), so a sampled row draws the same random numbers, and the
    same tokens, whether or not other rows stopped.
    """
    if not prompts or not all(prompts):
        raise ValueError("every prompt must hold at least one token")
    device = model.lm_head.weight.device
    context = model.config.block_size
    width = max(len(p) for p in prompts)
    history = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # for the processors
    real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    padded = not bool(real.all())
    seqs, seqs_real = history[:, -context:], real[:, -context:]  # what the model can see
    need = seqs.shape[1] + max_new_tokens  # a cache for the positions this call uses, not the whole block
    cache = model.new_cache(len(prompts), need if need <= context else None)
    cached_real = real[:, :0]  # which cached positions hold real tokens
    idx, idx_real = seqs, seqs_real
    rows = torch.arange(len(prompts), device=device)  # the batch's rows, as indices into prompts
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos_ids = torch.tensor(list(eos), dtype=torch.long, device=device)
    logits = torch.zeros(len(prompts), model.lm_head.weight.shape[0], device=device)  # done rows keep their last
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if len(eos_ids) and int(done[rows].sum()) * 4 >= len(rows):  # drop the done rows
                keep = ~done[rows]
                rows, idx, idx_real = rows[keep], idx[keep], idx_real[keep]
                seqs, seqs_real, cached_real = seqs[keep], seqs_real[keep], cached_real[keep]
                cache.k, cache.v = [k[keep] for k in cache.k], [v[keep] for v in cache.v]
            if cache.pos + idx.shape[1] > context:  # full: re-read the recent half-context
                idx, idx_real = seqs[:, -(context // 2):], seqs_real[:, -(context // 2):]
                cache.pos, cached_real = 0, seqs_real[:, :0]
            cached_real = torch.cat([cached_real, idx_real], dim=1)
            out, _ = model(idx, cache=cache, key_mask=cached_real if padded else None)
            cache.pos += idx.shape[1]
            logits[rows] = out[:, -1, :].float()
            nxt = pick(logits, history)
            yield nxt, torch.log_softmax(logits, dim=-1).gather(1, nxt[:, None]).squeeze(1)
            if len(eos_ids):
                done |= torch.isin(nxt, eos_ids)
            idx, idx_real = nxt[rows, None], torch.ones_like(rows[:, None], dtype=torch.bool)
            seqs = torch.cat([seqs[:, -(context - 1):], idx], dim=1)
            seqs_real = torch.cat([seqs_real[:, -(context - 1):], idx_real], dim=1)
            history = torch.cat([history, nxt[:, None]], dim=1)


def _as_ids(eos: int | Sequence[int] | None) -> list[int]:
    """An EOS setting (None, one id or several, as in transformers' generation config) as a list."""
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _decode(model: DecoderLM, prompts: list[list[int]], max_new_tokens: int, pick: Picker,
            eos_id: int | Sequence[int] | None) -> tuple[list[list[int]], list[list[float]]]:
    """New tokens and their logprobs per prompt; each stops at an EOS id (kept) or max_new_tokens."""
    eos = set(_as_ids(eos_id))
    rows = len(prompts)
    out: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    done = [False] * rows
    for nxt, chosen in _steps(model, prompts, max_new_tokens, pick, list(eos)):
        for i, (t, lp) in enumerate(zip(nxt.tolist(), chosen.tolist())):
            if not done[i]:
                out[i].append(t)
                logprobs[i].append(lp)
                done[i] = t in eos
        if all(done):
            break
    return out, logprobs


def sample(model: DecoderLM, prompt: list[int], max_new_tokens: int, num_samples: int = 1,
           temperature: float = 1.0, top_k: int | None = None, eos_id: int | Sequence[int] | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """`num_samples` continuations of one prompt (greedy at temperature 0); each stops at eos_id
    (kept) or after max_new_tokens. The window slides past the context (see `_steps`)."""
    cfg = GenerationConfig(do_sample=temperature > 0, temperature=temperature or 1.0, top_k=top_k)
    return _decode(model, [prompt] * num_samples, max_new_tokens, _picker(model, cfg, generator), eos_id)[0]


# ---------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(model: DecoderLM, prompt: list[int], cfg: GenerationConfig) -> GenerationOutput:
    """Beam search for one prompt (see `beam_search_batch`)."""
    return beam_search_batch(model, [prompt], cfg)[0]


@torch.inference_mode()
def beam_search_batch(model: DecoderLM, prompts: list[list[int]], cfg: GenerationConfig) -> list[GenerationOutput]:
    """Beam search as transformers does it (`_beam_search`), for several prompts at once.

    Each step scores, per prompt, all num_beams * vocab continuations (running score + processed
    logprob) and keeps the best 2 * num_beams. Those ending in EOS, or reaching max_new_tokens,
    are offered to the prompt's pool of finished hypotheses (score / new_len ** length_penalty;
    only candidates among the top num_beams qualify), the rest continue. The pool keeps the
    num_beams best. A prompt is done when no running beam can improve on its pool
    (early_stopping False: judged at the current length; "never": at the longest length when
    length_penalty > 0), when its pool is full and early_stopping is True, or when every
    candidate has stopped; the search ends when every prompt is done. Prompts of different
    lengths are left-padded with a key mask, so each gets what it would alone.
    """
    if not prompts or not all(prompts):
        raise ValueError("every prompt must hold at least one token")
    B, nb, n_new, lp = len(prompts), cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    width = max(len(p) for p in prompts)
    if width + n_new > model.config.block_size:
        raise UserError(f"generation.max_new_tokens: prompt ({width}) + {n_new} new tokens exceed the "
                        f"model's context ({model.config.block_size}); beam search does not slide the window")
    device = model.lm_head.weight.device
    keep = 2 * nb  # enough candidates that num_beams survive even if num_beams of them end in EOS
    NEG = -1.0e9
    top_nb = torch.arange(keep, device=device) < nb
    rows = torch.arange(B, device=device)[:, None]  # for indexing (B, beams) by per-prompt beam ids
    eos = torch.tensor(cfg.eos_ids, device=device)

    # running beams (B, nb, ...): new tokens, their raw logprobs, score; beam 0 alone at the start
    running = torch.zeros(B, nb, n_new, dtype=torch.long, device=device)
    running_lp = torch.zeros(B, nb, n_new, device=device)
    running_scores = torch.full((B, nb), NEG, device=device)
    running_scores[:, 0] = 0.0
    # finished pools: each prompt's num_beams best hypotheses so far (empty slots score -1e9)
    done, done_lp = running.clone(), running_lp.clone()
    done_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    done_scores = torch.full((B, nb), NEG, device=device)
    done_real = torch.zeros(B, nb, dtype=torch.bool, device=device)
    open_ = torch.ones(B, dtype=torch.bool, device=device)  # prompts still searching

    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device).repeat_interleave(nb, 0)
    real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    # Which cached positions hold real tokens: the prompts' padding never does, new tokens always.
    key_mask = None if bool(real.all()) else torch.cat(
        [real.repeat_interleave(nb, 0), torch.ones(B * nb, n_new, dtype=torch.bool, device=device)], 1)
    cache = model.new_cache(B * nb, width + n_new)
    logits, _ = model(prompt_ids, cache=cache, key_mask=None if key_mask is None else key_mask[:, :width])
    cache.pos += width
    for step in range(n_new):
        raw = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        history = torch.cat([prompt_ids, running.view(B * nb, n_new)[:, :step]], dim=1)
        logprobs = process_logits(raw, history, cfg, warp=False).view(B, nb, -1)
        raw = raw.view(B, nb, -1)
        vocab = logprobs.shape[-1]

        # per prompt, the best `keep` continuations over its beams
        cand_scores, flat = torch.topk((logprobs + running_scores[..., None]).view(B, -1), keep)
        src, tok = flat // vocab, flat % vocab
        cand = running[rows, src].clone()
        cand[..., step] = tok
        cand_lp = running_lp[rows, src].clone()
        cand_lp[..., step] = raw[rows, src, tok]
        stopped = torch.full((B, keep), step + 1 == n_new, device=device)
        if cfg.eos_ids:
            stopped |= torch.isin(tok, eos)

        # the best num_beams candidates that did not stop run on
        run_scores = cand_scores + stopped.float() * NEG
        nxt = torch.topk(run_scores, nb).indices
        running, running_lp = cand[rows, nxt], cand_lp[rows, nxt]
        running_scores, beam_src = run_scores[rows, nxt], src[rows, nxt]

        # stopped candidates among the top num_beams compete for their prompt's pool
        offer = cand_scores / ((step + 1) ** lp)
        closed = done_real.all(1) & (cfg.early_stopping is True)  # a full pool that takes no more
        offer += ((~stopped | ~top_nb) | (closed | ~open_)[:, None]).float() * NEG
        merged = torch.topk(torch.cat([done_scores, offer], 1), nb).indices
        done = torch.cat([done, cand], 1)[rows, merged]
        done_lp = torch.cat([done_lp, cand_lp], 1)[rows, merged]
        done_len = torch.cat([done_len, torch.full((B, keep), step + 1, device=device)], 1)[rows, merged]
        done_scores = torch.cat([done_scores, offer], 1)[rows, merged]
        done_real = torch.cat([done_real, stopped & top_nb & (~closed & open_)[:, None]], 1)[rows, merged]

        # can a running beam still beat the worst finished one?
        best_len = n_new if (cfg.early_stopping == "never" and lp > 0.0) else step + 1
        best_possible = running_scores[:, 0] / (best_len ** lp)
        can_improve = ~done_real.all(1) | (best_possible > done_scores.min(1).values)
        pool_closed = done_real.all(1) & (cfg.early_stopping is True)
        open_ &= can_improve & ~pool_closed & ~stopped.all(1)
        if not bool(open_.any()):
            break

        src_rows = (beam_src + rows * nb).view(-1)  # each beam continues from its parent's keys and values
        for i in range(len(cache.k)):
            cache.k[i] = cache.k[i].index_select(0, src_rows)
            cache.v[i] = cache.v[i].index_select(0, src_rows)
        logits, _ = model(running.view(B * nb, n_new)[:, step:step + 1], cache=cache,
                          key_mask=None if key_mask is None else key_mask[:, :cache.pos + 1])
        cache.pos += 1

    n = cfg.num_return_sequences
    outputs = []
    for b in range(B):
        lengths = done_len[b, :n].tolist()
        outputs.append(GenerationOutput(
            sequences=[done[b, i, :lengths[i]].tolist() for i in range(n)],
            scores=done_scores[b, :n].tolist(),
            token_logprobs=[done_lp[b, i, :lengths[i]].tolist() for i in range(n)]))
    return outputs


# ---------------------------------------------------------------- one entry point


def _picker(model: DecoderLM, cfg: GenerationConfig, generator: torch.Generator | None = None) -> Picker:
    """Greedy or sampling from the processed logits, drawing from `generator` or the config's seed."""
    if generator is None and cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed)

    def pick(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        scores = process_logits(logits, history, cfg)
        if not cfg.do_sample:
            return scores.argmax(dim=-1)
        return sample_rows(torch.softmax(scores, dim=-1), generator)

    return pick


def generate(model: DecoderLM, prompt: list[int], cfg: GenerationConfig) -> GenerationOutput:
    """Continue one prompt: beam search when num_beams > 1, else greedy or sampling."""
    cfg.validate()
    if cfg.num_beams > 1:
        return beam_search(model, prompt, cfg)
    pick = _picker(model, cfg)
    seqs, logprobs = _decode(model, [prompt] * cfg.num_return_sequences, cfg.max_new_tokens, pick,
                             cfg.eos_token_id)
    return GenerationOutput(sequences=seqs, scores=[sum(lp) for lp in logprobs], token_logprobs=logprobs)


def generate_batch(model: DecoderLM, prompts: list[list[int]], cfg: GenerationConfig) -> GenerationOutput:
    """Continuations of several prompts of any lengths, in one batch (left padding and a key mask
    make each row as if it ran alone). Greedy or sampled: row i continues prompts[i]. Beam
    search: num_return_sequences rows per prompt, best first, prompt after prompt (as transformers)."""
    cfg.validate()
    if cfg.num_beams > 1:
        outs = beam_search_batch(model, prompts, cfg)
        return GenerationOutput(sequences=[s for o in outs for s in o.sequences], scores=[x for o in outs for x in o.scores],
                                token_logprobs=[t for o in outs for t in o.token_logprobs])
    require(cfg.num_return_sequences == 1, "generation.num_return_sequences",
            "batched sampling takes one sequence per prompt (repeat a prompt for more)")
    seqs, logprobs = _decode(model, prompts, cfg.max_new_tokens, _picker(model, cfg), cfg.eos_token_id)
    return GenerationOutput(sequences=seqs, scores=[sum(lp) for lp in logprobs], token_logprobs=logprobs)


def stream(model: DecoderLM, prompt: list[int], cfg: GenerationConfig) -> Iterator[tuple[int, float]]:
    """Greedy or sampled tokens of one continuation as they come: (token id, logprob), EOS included.

    The same tokens as `generate` with the same config (num_return_sequences 1, no beams).
    """
    cfg.validate()
    require(cfg.num_beams == 1, "generation.num_beams", "streaming decodes one sequence: num_beams must be 1")
    for nxt, chosen in _steps(model, [prompt], cfg.max_new_tokens, _picker(model, cfg)):
        token = int(nxt[0])
        yield token, float(chosen[0])
        if token in cfg.eos_ids:
            return


# ---------------------------------------------------------------- compiled decoding

# Inductor settings for the one-token step. On CPU a decode step is a string of matrix-vector
# products; inductor's own C++ GEMM (chosen by autotuning against MKL) packs the frozen weights
# and splits each product over the cores, and the C++ wrapper calls the kernels without Python
# in between. Measured on 2 cores, ~6M Llama-flavour model, batch 1: 4.1 ms a step eager, 1.05 ms
# compiled (benchmarks/generate_throughput.py).
# Other devices get freezing alone (untested there: no GPU has run it yet).
_CPU_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True,
                 "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # last two: quiet


def compile_for_decoding(model: DecoderLM) -> DecoderLM:
    """Compile `model`'s one-token decoding step with torch.compile; in place, returns the model.

    Every strategy benefits (greedy, sampling, beam search, batches, padding): they all call the
    model one token at a time after the prompt. The prompt itself (prefill) and anything run with
    gradients stay eager. Shapes are compiled dynamic, so prompt and cache lengths reuse one
    compiled step, and every batch of several rows another; each first use compiles (tens of
    seconds on a CPU).

    For inference only: the weights are folded into the compiled code (inductor's freezing), so
    later changes to them are not seen. The model is put in eval mode without gradients to say so.
    """
    from torch._inductor import config as inductor_config

    model.eval().requires_grad_(False)
    eager = model.forward
    step = torch.compile(eager, dynamic=True)
    options = _CPU_INDUCTOR if model.lm_head.weight.device.type == "cpu" else {"freezing": True}

    def forward(idx: torch.Tensor, *args, **kwargs):
        if idx.shape[1] != 1 or torch.is_grad_enabled():
            return eager(idx, *args, **kwargs)
        # Inductor reads these when it compiles, which happens inside a call (first use, or a
        # recompilation); torch.compile's own `options` do not reach freezing, hence the patch.
        with inductor_config.patch(options):
            return step(idx, *args, **kwargs)

    model.forward = forward
    return model


def generate_seq2seq(model, inputs: list[list[int]], cfg: GenerationConfig) -> GenerationOutput:
    """An encoder-decoder's outputs for inputs of any lengths: each input is encoded once
    (`Seq2SeqLM.bind`) and the decoder writes from its start token with the same search as a
    decoder-only LM. One input: as `generate` (num_return_sequences samples or beams); several:
    as `generate_batch`."""
    bound = model.bind(inputs)
    start = [model.config.decoder_start_token_id]
    return generate(bound, start, cfg) if len(inputs) == 1 else generate_batch(bound, [start] * len(inputs), cfg)
