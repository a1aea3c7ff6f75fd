"""Decoding parity with transformers: processors, greedy, beam search; seeded sampling; validation.

Every model is tiny and random, built here with its transformers twin (same weights). Weights are
redrawn with std 0.3 so logits are far from flat and argmax ties cannot hide a bug.
"""

from __future__ import annotations

import pytest
import torch

from chatfoundry.errors import UserError
from chatfoundry.generation import (GenerationConfig, generate, min_p_filter, no_repeat_ngram, process_logits,
                                    repetition_penalty, sample, sample_rows, top_k_filter, top_p_filter)
from chatfoundry.models import hf
from chatfoundry.models.decoder import DecoderLM

transformers = pytest.importorskip("transformers")
from transformers import (MinPLogitsWarper, NoRepeatNGramLogitsProcessor,  # noqa: E402
                          RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from conftest import hf_model_for, randomize, tiny_config  # noqa: E402

VOCAB = 61
PAD = VOCAB - 1  # only a filler for transformers' padded outputs; lengths come from beam_indices


def hf_twin(model: DecoderLM):
    """The transformers model computing the same function as ours (same weights)."""
    theirs = hf_model_for(model.config)
    theirs.load_state_dict(hf.state_dict_to_hf(model.state_dict(), model.config), strict=False)
    if model.config.tie_embeddings:
        theirs.tie_weights()
    return theirs.eval()


_PAIRS: dict[str, tuple] = {}


def pair(flavour: str):
    if flavour not in _PAIRS:
        torch.manual_seed(0)
        cfg = tiny_config(flavour, vocab_size=VOCAB, block_size=48, n_kv_head=2 if flavour == "llama" else 4)
        ours = randomize(DecoderLM(cfg), seed=1 if flavour == "gpt2" else 2, std=0.3).eval()
        _PAIRS[flavour] = (ours, hf_twin(ours))
    return _PAIRS[flavour]


PROMPT = [3, 17, 5, 42, 8, 11]


def their_generate(theirs, prompt, **kw):
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        return theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               pad_token_id=PAD, return_dict_in_generate=True, output_scores=True, **kw)


def strip(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


# ---------------------------------------------------------------- processors


def random_logits(seed: int, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(rows, VOCAB, generator=g)


def random_history(seed: int, rows: int = 4, T: int = 20, high: int = 4) -> torch.Tensor:
    # few distinct ids, so n-grams repeat
    return torch.randint(0, high, (rows, T), generator=torch.Generator().manual_seed(seed))


def assert_same_filtering(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    fin = torch.isfinite(theirs)
    torch.testing.assert_close(ours[fin], theirs[fin], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_warpers_match_transformers(seed):
    logits, ids = random_logits(seed), random_history(seed)
    for k in (1, 5, 60, 61, 100):
        assert_same_filtering(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.01, 0.3, 0.9, 0.999, 1.0):
        assert_same_filtering(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))
    for m in (0.0, 0.05, 0.5, 1.0):
        assert_same_filtering(min_p_filter(logits, m), MinPLogitsWarper(m)(ids, logits.clone()))
    assert_same_filtering(process_logits(logits, ids, GenerationConfig(do_sample=True, temperature=0.7)),
                          TemperatureLogitsWarper(0.7)(ids, logits.clone()))


def test_top_p_ties_and_edges_match_transformers():
    flat = torch.zeros(2, VOCAB)
    flat[1, :3] = 5.0
    ids = torch.zeros(2, 1, dtype=torch.long)
    for p in (0.1, 0.5, 0.999):
        assert_same_filtering(top_p_filter(flat, p), TopPLogitsWarper(p)(ids, flat.clone()))
        assert_same_filtering(min_p_filter(flat, p), MinPLogitsWarper(p)(ids, flat.clone()))
    assert torch.isfinite(top_p_filter(random_logits(9), 1e-6)).sum(-1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(3))
def test_processors_match_transformers(seed):
    logits, ids = random_logits(seed), random_history(seed)
    for penalty in (0.7, 1.3, 2.0):
        assert_same_filtering(repetition_penalty(logits, ids, penalty),
                              RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))
    for n in (1, 2, 3, 4, 25):
        ours = no_repeat_ngram(logits, ids, n)
        assert_same_filtering(ours, NoRepeatNGramLogitsProcessor(n)(ids, logits.clone()))
        if n <= 3:
            assert torch.isinf(ours).any()  # the case really bans something


def test_processing_order_matches_transformers_list():
    logits, ids = random_logits(5), random_history(5)
    cfg = GenerationConfig(do_sample=True, repetition_penalty=1.5, no_repeat_ngram_size=2, temperature=0.8,
                           top_k=20, top_p=0.9, min_p=0.05)
    chain = transformers.LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(2), TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)])
    assert_same_filtering(process_logits(logits, ids, cfg), chain(ids, logits.clone()))
    # greedy applies the processors, never the warpers
    greedy = GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, temperature=0.1, top_k=1)
    processors_only = transformers.LogitsProcessorList(chain[:2])
    assert_same_filtering(process_logits(logits, ids, greedy), processors_only(ids, logits.clone()))


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("extra", [{}, dict(repetition_penalty=1.8), dict(no_repeat_ngram_size=2)],
                         ids=["plain", "rep", "ngram"])
def test_greedy_matches_transformers(flavour, extra):
    ours, theirs = pair(flavour)
    out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=20, **extra))
    ref = their_generate(theirs, PROMPT, do_sample=False, max_new_tokens=20, **extra)
    assert out.sequences == [ref.sequences[0, len(PROMPT):].tolist()]
    assert len(out.sequences[0]) == 20
    # token logprobs are the model's own (raw) log-softmax at the chosen tokens
    their_lp = [torch.log_softmax(s[0], -1) for s in ref.scores] if not extra else None
    if their_lp is not None:
        want = [their_lp[i][t].item() for i, t in enumerate(out.sequences[0])]
        assert out.token_logprobs[0] == pytest.approx(want, abs=1e-4)
        assert out.scores[0] == pytest.approx(sum(want), abs=1e-3)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_greedy_stops_at_eos_like_transformers(flavour):
    ours, _ = pair(flavour)
    free = generate(ours, PROMPT, GenerationConfig(max_new_tokens=20)).sequences[0]
    eos = free[6]
    ours, theirs = pair(flavour)
    out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=20, eos_token_id=eos)).sequences[0]
    ref = their_generate(theirs, PROMPT, do_sample=False, max_new_tokens=20, eos_token_id=eos)
    assert out == strip(ref.sequences[0, len(PROMPT):].tolist(), eos)
    assert out[-1] == eos and len(out) == free.index(eos) + 1


def test_greedy_equals_sample_at_temperature_zero():
    ours, _ = pair("llama")
    out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=15))
    assert out.sequences == sample(ours, PROMPT, 15, temperature=0)


# ---------------------------------------------------------------- beam search


def beam_eos(flavour: str) -> int:
    """A token that actually ends some beams: a frequent pick of the unconstrained search."""
    ours, _ = pair(flavour)
    out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=12, num_beams=4, num_return_sequences=4))
    counts: dict[int, int] = {}
    for s in out.sequences:
        for t in s[1:]:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


BEAM_CASES = [(nb, nrs, lp, es) for nb, nrs in ((4, 2), (4, 4)) for lp in (0.5, 1.0, 2.0)
              for es in (True, False, "never")]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos"])
def test_beam_search_matches_transformers(flavour, with_eos):
    ours, theirs = pair(flavour)
    eos = beam_eos(flavour) if with_eos else None
    ended_early = False
    for nb, nrs, lp, es in BEAM_CASES:
        cfg = GenerationConfig(max_new_tokens=12, num_beams=nb, num_return_sequences=nrs, length_penalty=lp,
                               early_stopping=es, eos_token_id=eos)
        out = generate(ours, PROMPT, cfg)
        ref = their_generate(theirs, PROMPT, do_sample=False, max_new_tokens=12, num_beams=nb,
                             num_return_sequences=nrs, length_penalty=lp, early_stopping=es, eos_token_id=eos)
        lengths = (ref.beam_indices != -1).sum(dim=1).tolist()
        want = [ref.sequences[i, len(PROMPT):len(PROMPT) + n].tolist() for i, n in enumerate(lengths)]
        case = (nb, nrs, lp, es, eos)
        assert out.sequences == want, case
        assert out.scores == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4), case
        assert out.scores == sorted(out.scores, reverse=True)
        for s, lps in zip(out.sequences, out.token_logprobs):
            assert len(lps) == len(s) and all(x <= 0 for x in lps)
        if with_eos:
            ended_early |= any(s[-1] == eos and len(s) < 12 for s in out.sequences)
    if with_eos:
        assert ended_early  # the eos case really exercised finished hypotheses


def test_beam_search_with_processors_matches_transformers():
    ours, theirs = pair("gpt2")
    kw = dict(num_beams=4, num_return_sequences=3, repetition_penalty=1.5, no_repeat_ngram_size=2)
    out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=10, **kw))
    ref = their_generate(theirs, PROMPT, do_sample=False, max_new_tokens=10, **kw)
    assert out.sequences == ref.sequences[:, len(PROMPT):].tolist()
    assert out.scores == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)


def test_one_beam_token_logprobs_sum_to_its_score():
    ours, _ = pair("llama")
    out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=3,
                                                  length_penalty=0.0))
    for s, lps in zip(out.scores, out.token_logprobs):
        assert s == pytest.approx(sum(lps), abs=1e-4)  # no processors, no length penalty


# ---------------------------------------------------------------- sampling


def test_sampling_is_seeded():
    ours, _ = pair("gpt2")
    cfg = dict(max_new_tokens=15, do_sample=True, num_return_sequences=3, top_p=0.95, temperature=1.2)
    a = generate(ours, PROMPT, GenerationConfig(seed=1, **cfg))
    b = generate(ours, PROMPT, GenerationConfig(seed=1, **cfg))
    c = generate(ours, PROMPT, GenerationConfig(seed=2, **cfg))
    assert a == b
    assert a.sequences != c.sequences
    assert [len(s) for s in a.sequences] == [15, 15, 15]
    for seq, lps, score in zip(a.sequences, a.token_logprobs, a.scores):
        assert len(lps) == len(seq) and score == pytest.approx(sum(lps))


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_top_k_one_and_tiny_top_p_equal_greedy(flavour):
    ours, _ = pair(flavour)
    greedy = generate(ours, PROMPT, GenerationConfig(max_new_tokens=12)).sequences[0]
    for extra in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = generate(ours, PROMPT, GenerationConfig(max_new_tokens=12, do_sample=True, num_return_sequences=2,
                                                      seed=3, temperature=1.5, **extra))
        assert out.sequences == [greedy, greedy], extra


def test_sampling_stops_rows_at_eos():
    ours, _ = pair("gpt2")
    cfg = dict(max_new_tokens=20, do_sample=True, num_return_sequences=4, seed=7)
    free = generate(ours, PROMPT, GenerationConfig(**cfg)).sequences
    eos = free[0][3]
    out = generate(ours, PROMPT, GenerationConfig(eos_token_id=eos, **cfg)).sequences
    assert out[0] == free[0][:4]
    for s, f in zip(out, free):
        assert s == strip(f, eos)


def test_sample_rows_draws_from_each_rows_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25, 0.0]])
    n = 20000
    picked = sample_rows(probs.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).view(3, n)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in picked]).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)  # 4.5 standard errors at p = 0.5
    assert not picked[probs.repeat_interleave(n, 0).view(3, n, 5).gather(2, picked[..., None])[..., 0] == 0].numel()
    a = sample_rows(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_rows(probs, torch.Generator().manual_seed(3)))  # seeded


def test_sample_rows_never_picks_an_impossible_token_at_the_top_end(monkeypatch):
    # A draw that rounds up to the whole mass would fall past the end; it lands on the last
    # token that has probability, never on the zero-probability tail.
    monkeypatch.setattr(torch, "rand", lambda n, _, **kw: torch.ones(n, 1, dtype=torch.float64))
    assert sample_rows(torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])).tolist() == [1, 3]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kw,name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, do_sample=True), "num_beams"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(eos_token_id=-2), "eos_token_id"),
])
def test_validate_names_the_field(kw, name):
    with pytest.raises(UserError, match=f"generation.{name}"):
        GenerationConfig(**kw).validate()


def test_defaults_validate_and_beam_search_too_long_is_a_user_error():
    GenerationConfig().validate()
    GenerationConfig(do_sample=True, num_return_sequences=5).validate()
    ours, _ = pair("gpt2")
    with pytest.raises(UserError, match="generation.max_new_tokens"):
        generate(ours, PROMPT, GenerationConfig(max_new_tokens=100, num_beams=2))


def test_beam_early_stopping_never_differs_from_false_and_matches_transformers():
    # a case (found by search) where the "never" heuristic keeps searching past the point where
    # early_stopping=False gives up, and finds a different set of hypotheses
    ours, theirs = pair("gpt2")
    prompt, kw = [20, 34, 29], dict(num_beams=3, num_return_sequences=3, length_penalty=2.0, eos_token_id=57)
    results = {}
    for es in (False, "never"):
        out = generate(ours, prompt, GenerationConfig(max_new_tokens=12, early_stopping=es, **kw))
        ref = their_generate(theirs, prompt, do_sample=False, max_new_tokens=12, early_stopping=es, **kw)
        lengths = (ref.beam_indices != -1).sum(dim=1).tolist()
        assert out.sequences == [ref.sequences[i, len(prompt):len(prompt) + n].tolist() for i, n in enumerate(lengths)]
        assert out.scores == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)
        results[es] = out.sequences
    assert results[False] != results["never"]
