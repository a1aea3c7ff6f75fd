"""Prompts of different lengths in one left-padded batch: each row as if it ran alone, and as
transformers `generate` with an attention mask."""

from __future__ import annotations

import pytest
import torch

from chatfoundry.generation import GenerationConfig, generate, generate_batch
from chatfoundry.models import hf
from chatfoundry.models.decoder import DecoderLM
from conftest import hf_model_for, randomize, tiny_config

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 2, 33, 41, 7, 12], [8], [30, 31, 2, 11]]


def model_for(flavour: str, **overrides) -> DecoderLM:
    torch.manual_seed(0)
    cfg = tiny_config(flavour, n_kv_head=2 if flavour == "llama" else 4, **overrides)
    return randomize(DecoderLM(cfg), std=0.3).eval()


def transformers_twin(model: DecoderLM):
    """The transformers model with our model's weights."""
    theirs = hf_model_for(model.config)
    theirs.load_state_dict(hf.state_dict_to_hf(model.state_dict(), model.config), strict=False)
    theirs.tie_weights()
    return theirs


@pytest.mark.parametrize("flavour, pos", [("gpt2", "learned"), ("gpt2", "sinusoidal"), ("llama", "rope")])
def test_padded_rows_equal_their_own_unpadded_forward(flavour, pos):
    model = model_for(flavour, pos=pos)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in PROMPTS])
    with torch.no_grad():
        batched, _ = model(ids, key_mask=real)
        for row, p in enumerate(PROMPTS):
            alone, _ = model(torch.tensor([p]))
            torch.testing.assert_close(batched[row, width - len(p):], alone[0], atol=1e-5, rtol=0)
        assert torch.isfinite(batched).all()  # padding queries see themselves: no NaN anywhere


@pytest.mark.parametrize("flavour, pos", [("gpt2", "learned"), ("llama", "rope"), ("llama", "sinusoidal")])
def test_batched_greedy_equals_one_prompt_at_a_time(flavour, pos):
    model = model_for(flavour, pos=pos)
    cfg = GenerationConfig(max_new_tokens=25)  # 7 + 25 = the whole 32-token context
    batched = generate_batch(model, PROMPTS, cfg).sequences
    assert batched == [generate(model, p, cfg).sequences[0] for p in PROMPTS]
    # Past the context the window slides; a padded batch slides all rows at once (so rows may
    # then differ from running alone), and keeps going.
    long = generate_batch(model, PROMPTS, GenerationConfig(max_new_tokens=70)).sequences
    assert [len(s) for s in long] == [70] * 3 and [s[:25] for s in long] == batched


def test_batched_sampling_is_reproducible_and_stops_rows_at_eos():
    model = model_for("llama")
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, top_p=0.9, seed=1)
    a, b = generate_batch(model, PROMPTS, cfg), generate_batch(model, PROMPTS, cfg)
    assert a.sequences == b.sequences
    eos = a.sequences[0][3]
    stopped = generate_batch(model, PROMPTS, GenerationConfig(max_new_tokens=20, do_sample=True, top_p=0.9, seed=1,
                                                              eos_token_id=eos)).sequences
    assert stopped[0] == a.sequences[0][:4]
    assert all(eos not in s[:-1] for s in stopped)



@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_rows_leaving_the_batch_at_eos_change_no_other_row(do_sample):
    # Rows that reach EOS leave the batch (their cache rows are dropped). Every other row must go
    # on exactly as in the batch where nothing stops, through the window's slide past the
    # 32-token context too; a sampled row draws the same numbers whoever left.
    model = model_for("llama")
    prompts = [[(7 * i + j) % 60 + 1 for j in range(1 + i % 6)] for i in range(12)]
    cfg = dict(max_new_tokens=40, do_sample=do_sample, seed=4)
    free = generate_batch(model, prompts, GenerationConfig(**cfg))
    firsts = [s[2] for s in free.sequences]
    eos = max(set(firsts), key=firsts.count)  # a token that ends several rows early, others later or never
    widths, forward = [], model.forward
    model.forward = lambda idx, *a, **kw: widths.append(idx.shape[0]) or forward(idx, *a, **kw)
    stopped = generate_batch(model, prompts, GenerationConfig(eos_token_id=eos, **cfg))
    del model.forward
    assert widths[0] == 12 and widths[-1] < 12  # done rows did leave
    ends = [s.index(eos) + 1 if eos in s else len(s) for s in free.sequences]
    assert 2 <= sum(e < 40 for e in ends) < 12
    for got, lps, want, want_lps, end in zip(stopped.sequences, stopped.token_logprobs, free.sequences,
                                             free.token_logprobs, ends):
        assert got == want[:end]
        assert lps == pytest.approx(want_lps[:end], abs=1e-5)

@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_batched_greedy_equals_transformers_with_attention_mask(flavour):
    model = model_for(flavour)
    theirs = transformers_twin(model)
    width, pad = max(map(len, PROMPTS)), 60
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                          pad_token_id=pad, eos_token_id=None)
    ours = generate_batch(model, PROMPTS, GenerationConfig(max_new_tokens=12)).sequences
    assert ours == out[:, width:].tolist()


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_batched_beam_search_equals_one_prompt_at_a_time(flavour, early_stopping):
    model = model_for(flavour)
    eos = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=3)).sequences[0][2]  # one that really ends beams
    cfg = GenerationConfig(max_new_tokens=12, num_beams=4, num_return_sequences=3, length_penalty=0.7,
                           early_stopping=early_stopping, eos_token_id=eos)
    batched = generate_batch(model, PROMPTS, cfg)
    alone = [generate(model, p, cfg) for p in PROMPTS]
    assert batched.sequences == [s for o in alone for s in o.sequences]
    assert batched.scores == pytest.approx([x for o in alone for x in o.scores], abs=1e-5)
    assert any(s[-1] == eos and len(s) < 12 for s in batched.sequences)  # prompts finish at different steps


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_batched_beam_search_equals_transformers_with_attention_mask(flavour):
    model = model_for(flavour)
    theirs = transformers_twin(model)
    width, pad = max(map(len, PROMPTS)), 60
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, num_beams=4,
                          num_return_sequences=2, length_penalty=1.0, pad_token_id=pad, eos_token_id=None,
                          output_scores=True, return_dict_in_generate=True)
    ours = generate_batch(model, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=4, num_return_sequences=2))
    assert ours.sequences == out.sequences[:, width:].tolist()
    assert ours.scores == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
