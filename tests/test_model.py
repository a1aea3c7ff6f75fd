"""The decoder: KV cache, causality, parity with transformers, positions, presets, cost, validation.

Every model here is tiny and random, built in the test; nothing is downloaded. Weights are
redrawn with a larger spread than the training init (std 0.02 makes attention nearly uniform
and logits nearly flat, so a wrong cache or a wrong rotation could hide under the tolerance).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatfoundry.errors import UserError
from chatfoundry.models import hf
from chatfoundry.models.decoder import FLAVOURS, PRESETS, DecoderConfig, DecoderLM, flops_per_token, num_params
from chatfoundry.models.layers import apply_rotary, rotary_tables, sinusoidal_table

transformers = pytest.importorskip("transformers")

from conftest import hf_model_for as conftest_hf_model_for, randomize, tiny_config  # noqa: E402

VOCAB = 61


def build(cfg: DecoderConfig, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return randomize(DecoderLM(cfg), seed).eval()


def random_ids(batch: int, T: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- KV cache and causality

ATTENTION = {"mha": 4, "gqa": 2, "mqa": 1}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("attn", list(ATTENTION))
def test_kv_cache_chunks_equal_full_forward(flavour, pos, attn):
    cfg = tiny_config(flavour, pos=pos, n_kv_head=ATTENTION[attn])
    model = build(cfg)
    ids = random_ids(2, 16, seed=1)
    with torch.no_grad():
        full, _ = model(ids)
        assert full.std() > 0.1  # logits far from flat: atol 1e-5 below means something
        cache = model.new_cache(batch=2)
        pieces = []
        # prefill 5, a 4-token chunk at pos 5, then one token at a time
        bounds = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, 16)]
        for a, b in bounds:
            assert cache.pos == a
            logits, _ = model(ids[:, a:b], cache=cache)
            assert logits.shape == (2, b - a, VOCAB)
            pieces.append(logits)
            cache.pos += b - a
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_kv_cache_holds_only_kv_heads_and_rejects_overflow(flavour):
    cfg = tiny_config(flavour, n_kv_head=2)
    model = build(cfg)
    cache = model.new_cache(batch=3, max_len=20)
    assert len(cache.k) == len(cache.v) == cfg.n_layer
    assert cache.k[0].shape == (3, 2, 20, cfg.head_dim) and cache.max_len == 20
    full = model.new_cache(batch=3)
    full.pos = cfg.block_size - 2
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(3, 3), cache=full)
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(1, cfg.block_size + 1))


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_causality(flavour, pos):
    model = build(tiny_config(flavour, pos=pos, n_kv_head=2))
    ids = random_ids(1, 20, seed=3)
    with torch.no_grad():
        base, _ = model(ids)
        for t in (0, 7, 19):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % VOCAB
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (logits[:, t] - base[:, t]).abs().max() > 1e-3  # the change is visible where it should be


# ---------------------------------------------------------------- parity with transformers


def hf_model_for(cfg: DecoderConfig):
    return conftest_hf_model_for(cfg, attn_implementation="eager")


HF_CASES = {
    "gpt2": dict(flavour="gpt2"),
    "gpt2_inner_eps": dict(flavour="gpt2", intermediate_size=48, norm_eps=1e-6, block_size=40),
    "llama_gqa_tied": dict(flavour="llama", n_kv_head=2),
    "llama_gqa_untied": dict(flavour="llama", n_kv_head=2, tie_embeddings=False),
    "llama_mqa_untied": dict(flavour="llama", n_kv_head=1, tie_embeddings=False),
    "llama_bias": dict(flavour="llama", n_kv_head=2, bias=True),
    "llama_bias_untied_theta": dict(flavour="llama", n_kv_head=4, bias=True, tie_embeddings=False,
                                    rope_theta=500.0, intermediate_size=48),
}


def hf_case(name: str) -> DecoderConfig:
    kw = dict(HF_CASES[name])
    return tiny_config(kw.pop("flavour"), **kw)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_ours_to_transformers_logits(case):
    cfg = hf_case(case)
    expected_type = "gpt2" if cfg.flavour == "gpt2" else "llama"
    assert hf.hf_architecture(cfg) == expected_type
    ours = build(cfg, seed=2)
    theirs = hf_model_for(cfg)
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if expected_type == "gpt2" else "LlamaForCausalLM")
    hf_sd = hf.state_dict_to_hf(ours.state_dict(), cfg)
    result = theirs.load_state_dict(hf_sd, strict=False)
    assert result.unexpected_keys == []
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert set(result.missing_keys) <= allowed_missing
    if cfg.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()
    # every weight transformers holds came from ours
    their_sd = theirs.state_dict()
    for k, v in hf_sd.items():
        assert torch.equal(their_sd[k], v), k
    ids = random_ids(2, 24, seed=4)
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
    assert a.std() > 0.1
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_to_ours_logits(case):
    cfg = hf_case(case)
    theirs = randomize(hf_model_for(cfg), seed=5)
    sd = hf.state_dict_from_hf(theirs.state_dict(), cfg)
    ours = DecoderLM(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    ids = random_ids(2, 24, seed=6)
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
    assert b.std() > 0.1
    assert (a - b).abs().max().item() <= 1e-4


ROUND_TRIP_CASES = {**HF_CASES,
                    "sinusoidal": dict(flavour="gpt2", pos="sinusoidal"),
                    "gpt2_gqa": dict(flavour="gpt2", n_kv_head=2),
                    "gpt2_untied": dict(flavour="gpt2", tie_embeddings=False),
                    "llama_learned": dict(flavour="llama", pos="learned")}


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_round_trip_ours_hf_ours_is_bit_exact(case):
    kw = dict(ROUND_TRIP_CASES[case])
    cfg = tiny_config(kw.pop("flavour"), **kw)
    sd = build(cfg, seed=7).state_dict()
    back = hf.state_dict_from_hf(hf.state_dict_to_hf(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert hf.from_hf_config(hf.to_hf_config(cfg)) == cfg


def test_hf_architecture_choices():
    assert hf.hf_architecture(tiny_config("gpt2")) == "gpt2"
    assert hf.hf_architecture(tiny_config("llama", n_kv_head=1)) == "llama"
    assert hf.hf_architecture(tiny_config("gpt2", pos="sinusoidal")) is None
    assert hf.hf_architecture(tiny_config("gpt2", n_kv_head=2)) is None  # GPT-2 has no GQA
    assert hf.hf_architecture(tiny_config("gpt2", tie_embeddings=False)) is None
    assert hf.to_hf_config(tiny_config("gpt2", pos="sinusoidal"))["model_type"] == "chatfoundry"


# ---------------------------------------------------------------- positions


@pytest.mark.parametrize("head_dim,theta,offset", [(8, 10000.0, 0), (16, 10000.0, 5), (6, 500.0, 11)])
def test_rotary_matches_transformers(head_dim, theta, offset):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    n_head, T, length = 3, 9, 32
    config = transformers.LlamaConfig(hidden_size=head_dim * n_head, num_attention_heads=n_head, head_dim=head_dim,
                                      max_position_embeddings=length, rope_theta=theta,
                                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    rot = LlamaRotaryEmbedding(config)
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, n_head, T, head_dim, generator=g)
    k = torch.randn(2, 1, T, head_dim, generator=g)
    position_ids = torch.arange(offset, offset + T)[None].expand(2, -1)
    cos_hf, sin_hf = rot(q, position_ids)
    cos, sin = rotary_tables(length, head_dim, theta)
    cos, sin = cos[offset:offset + T], sin[offset:offset + T]
    torch.testing.assert_close(cos, cos_hf[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0], atol=1e-6, rtol=0)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf, atol=1e-6, rtol=0)
    if offset:
        assert not torch.allclose(q_hf, q, atol=1e-3)  # a real rotation happened


def test_rotary_preserves_norm_and_relative_positions():
    cos, sin = rotary_tables(64, 8, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def rot(x, p):
        return apply_rotary(x, cos[p:p + 1], sin[p:p + 1])

    torch.testing.assert_close(rot(q, 17).norm(), q.norm(), atol=1e-5, rtol=0)
    # <R(m) q, R(n) k> depends only on m - n
    a = (rot(q, 10) * rot(k, 3)).sum()
    b = (rot(q, 40) * rot(k, 33)).sum()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dim", [8, 32])
def test_sinusoidal_table_formula(dim):
    table = sinusoidal_table(50, dim)
    assert table.shape == (50, dim)
    for pos in (0, 1, 7, 49):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


# ---------------------------------------------------------------- presets, size and cost


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_validates(preset, flavour):
    cfg = DecoderConfig.from_preset(preset, flavour)
    cfg.validate()
    n_layer, n_head, n_embd, block = PRESETS[preset]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (n_layer, n_head, n_embd, block)
    for key, value in FLAVOURS[flavour].items():
        assert getattr(cfg, key) == value
    assert cfg.preset == preset and cfg.flavour == flavour


def test_unknown_preset_or_flavour_is_a_user_error():
    with pytest.raises(UserError, match="model.preset"):
        DecoderConfig.from_preset("huge")
    with pytest.raises(UserError, match="model.flavour"):
        DecoderConfig.from_preset("tiny", "mistral")


def meta_params(cfg: DecoderConfig) -> int:
    with torch.device("meta"):
        return num_params(DecoderLM(cfg))


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("preset,vocab,lo,hi", [("tiny", 2048, 0.8e6, 1.3e6), ("mini", 4096, 5e6, 9e6)])
def test_preset_sizes(preset, vocab, lo, hi, flavour):
    cfg = replace(DecoderConfig.from_preset(preset, flavour), vocab_size=vocab)
    assert lo <= meta_params(cfg) <= hi


def test_gpt2_preset_is_124m():
    cfg = replace(DecoderConfig.from_preset("gpt2", "gpt2"), vocab_size=50257)
    n = meta_params(cfg)
    assert abs(n - 124_439_808) <= 0.005 * 124_439_808


def test_num_params_counts_a_tied_embedding_once():
    tied = tiny_config("llama")
    untied = replace(tied, tie_embeddings=False)
    assert meta_params(untied) - meta_params(tied) == VOCAB * tied.n_embd


FLOP_CASES = [tiny_config("gpt2"), tiny_config("llama", n_kv_head=2), tiny_config("llama", n_kv_head=1, bias=True),
              tiny_config("gpt2", pos="sinusoidal", tie_embeddings=False, intermediate_size=40),
              replace(DecoderConfig.from_preset("mini", "llama"), vocab_size=4096)]


@pytest.mark.parametrize("cfg", FLOP_CASES, ids=lambda c: f"{c.flavour}-{c.n_kv_head}kv-{c.pos}")
@pytest.mark.parametrize("seq_len", [None, 7])
def test_flops_per_token(cfg, seq_len):
    with torch.device("meta"):
        model = DecoderLM(cfg)
    matmul = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear))
    matmul += model.lm_head.weight.numel()
    T = seq_len or cfg.block_size
    assert flops_per_token(cfg, seq_len) == 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * T


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides,field", [
    (dict(n_embd=30, n_head=4), "model.n_embd"),
    (dict(n_head=4, n_kv_head=3), "model.n_kv_head"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(dropout=-0.1), "model.dropout"),
    (dict(n_embd=12, n_head=4, n_kv_head=4, pos="rope"), "model.pos"),  # head_dim 3
    (dict(n_layer=0), "model.n_layer"),
    (dict(vocab_size=-1), "model.vocab_size"),
])
def test_validate_names_the_field(overrides, field):
    cfg = DecoderConfig(**{**dict(vocab_size=VOCAB), **overrides})
    with pytest.raises(UserError) as info:
        cfg.validate()
    assert field in str(info.value)


def test_valid_odd_head_dim_without_rope():
    DecoderConfig(n_embd=12, n_head=4, n_kv_head=4, pos="learned").validate()


# ---------------------------------------------------------------- dropout and loss


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_dropout_only_in_train_mode(flavour):
    cfg = tiny_config(flavour, dropout=0.5, n_kv_head=2)
    model = build(cfg)
    ids = random_ids(2, 12, seed=8)
    model.eval()
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(ids)
        no_dropout = DecoderLM(replace(cfg, dropout=0.0)).eval()
        no_dropout.load_state_dict(model.state_dict())
        c, _ = no_dropout(ids)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)  # eval ignores the rate entirely
    model.train()
    with torch.no_grad():
        x, _ = model(ids)
        y, _ = model(ids)
    assert (x - y).abs().max() > 1e-3
    assert (x - a).abs().max() > 1e-3


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_loss_is_cross_entropy_ignoring_minus_100(flavour):
    model = build(tiny_config(flavour, n_kv_head=2))
    ids = random_ids(3, 10, seed=9)
    targets = random_ids(3, 10, seed=10)
    targets[0, :4] = -100
    targets[2, -3:] = -100
    logits, loss = model(ids, targets)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    keep = targets != -100
    manual = -torch.log_softmax(logits, dim=-1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)
    # the mean is over kept positions only: dropping the ignored rows gives the same loss
    kept_logits = logits[keep]
    torch.testing.assert_close(loss, F.cross_entropy(kept_logits, targets[keep]), atol=1e-6, rtol=1e-6)
    _, no_loss = model(ids)
    assert no_loss is None
    loss.backward()
    assert model.embed_tokens.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0
