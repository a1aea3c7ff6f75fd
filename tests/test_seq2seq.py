"""The encoder-decoder (T5): parity with transformers (logits, greedy, beam), conversion both ways,
the KV cache, span corruption, a learning test and the CLI.

Every model is tiny and random, built here with its transformers twin (same weights), weights
spread so logits are far from flat and argmax ties cannot hide a bug.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate, generate_seq2seq
from chatfoundry.models import hf_t5
from chatfoundry.models.seq2seq import Seq2SeqConfig, Seq2SeqLM, relative_position_bucket
from chatfoundry.train import span
from conftest import last_json, run_cli

transformers = pytest.importorskip("transformers")

VOCAB = 61
PAD = 0  # T5's decoder start token and pad
KINDS = {"relu_tied": ("relu", True), "gated_untied": ("gated-gelu", False)}


def tiny_t5_config(ff: str = "gated-gelu", tied: bool = True, **kw) -> Seq2SeqConfig:
    # 3 heads of 8 (inner 24 != d_model 32), few buckets and a short max distance so the
    # logarithmic buckets are reached within the test's lengths
    base = dict(vocab_size=VOCAB, block_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                feed_forward_proj=ff, tie_word_embeddings=tied)
    return Seq2SeqConfig(**{**base, **kw})


def hf_twin(ours: Seq2SeqLM):
    """transformers' T5ForConditionalGeneration with our weights."""
    c = ours.config
    fields = {k: v for k, v in hf_t5.to_hf_config(c, {"pad": PAD}).items()
              if k not in ("chatfoundry", "architectures", "torch_dtype", "model_type", "scale_decoder_outputs")}
    theirs = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields))
    if not c.tie_word_embeddings:  # transformers 5 shares the head unless told otherwise by the weights
        theirs.lm_head.weight = torch.nn.Parameter(torch.empty_like(theirs.lm_head.weight))
    missing, unexpected = theirs.load_state_dict(hf_t5.state_dict_to_hf(ours.state_dict(), c), strict=False)
    assert not unexpected and all("embed_tokens" in k or k == "lm_head.weight" and c.tie_word_embeddings
                                  for k in missing), missing
    return theirs.eval()


_PAIRS: dict[str, tuple] = {}


def pair(kind: str, **overrides):
    key = kind + str(overrides)
    if key not in _PAIRS:
        torch.manual_seed(0)
        ours = Seq2SeqLM(tiny_t5_config(*KINDS[kind], **overrides)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # spread the weights: norms off 1, a sharper head
            for name, p in ours.named_parameters():
                p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=g)) if "norm" in name else p.mul_(1.6)
        _PAIRS[key] = (ours, hf_twin(ours))
    return _PAIRS[key]


INPUTS = [[3, 17, 5, 42, 8, 11, 2, 60, 9, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 43, 1],
          [12, 7, 19, 1]]


def padded(inputs):
    width = max(map(len, inputs))
    ids = torch.tensor([x + [PAD] * (width - len(x)) for x in inputs])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs])
    return ids, mask


# ---------------------------------------------------------------- the model against transformers


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.arange(-300, 300)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (16, 50)):
            ours = relative_position_bucket(offsets, bidirectional, buckets, distance)
            theirs = T5Attention._relative_position_bucket(offsets, bidirectional, buckets, distance)
            assert torch.equal(ours, theirs), (bidirectional, buckets, distance)
            assert ours.max() == buckets - 1  # the far buckets are reached


@pytest.mark.parametrize("kind", list(KINDS) + ["deeper_decoder"])
def test_logits_match_transformers_with_padding(kind):
    ours, theirs = pair(kind) if kind in KINDS else pair("relu_tied", num_decoder_layers=3)
    ids, mask = padded(INPUTS)
    dec = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, _ = ours(ids, dec, mask=mask.bool())
        want = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert got.abs().max() > 3  # far from flat
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the loss with labels, shifted right behind the start token, equals theirs too
    labels = dec.clone()
    labels[1, 20:] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels, mask=mask.bool())[1],
                                   theirs(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_matches_transformers_step_for_step(kind):
    """Same weights, same padded batches (masked inputs, -100 labels), same AdamW: the two models'
    losses stay equal over several steps, so gradients (through the tied, rescaled head too) agree."""
    torch.manual_seed(0)
    ours = Seq2SeqLM(tiny_t5_config(*KINDS[kind])).train()
    theirs = hf_twin(ours).train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ours, theirs)]
    ids, mask = padded(INPUTS)
    labels = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    labels[1, 6:] = -100
    for _ in range(6):
        losses = [ours(ids, labels=labels, mask=mask.bool())[1],
                  theirs(input_ids=ids, attention_mask=mask, labels=labels).loss]
        torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses[0] < 3.0  # it learns the batch (log 61 = 4.1 at the start)


def test_relative_position_bias_gets_its_own_faster_undecayed_lr():
    from chatfoundry.train.loop import TrainConfig, make_optimizer

    model = Seq2SeqLM(tiny_t5_config(position_bias_lr_scale=7.0))
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    bias = [g for g in groups if g.get("lr_scale")]
    assert len(bias) == 1 and bias[0]["lr_scale"] == 7.0 and bias[0]["weight_decay"] == 0.0
    assert {id(p) for p in bias[0]["params"]} == {id(model.encoder.relative_attention_bias.weight),
                                                  id(model.decoder.relative_attention_bias.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_cached_decoding_equals_the_full_pass():
    ours, _ = pair("gated_untied")
    ids, mask = padded(INPUTS)
    dec = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = ours(ids, dec, mask=mask.bool())
        bound = ours.bind(INPUTS)
        cache = bound.new_cache(2, 12)
        steps = []
        for chunk in (dec[:, :5], dec[:, 5:6], dec[:, 6:7], dec[:, 7:]):  # a prefill, then token by token
            steps.append(bound(chunk, cache=cache)[0])
            cache.pos += chunk.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def their_generate(theirs, inputs, **kw):
    ids, mask = padded(inputs)
    with torch.no_grad():
        return theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                               output_scores=True, pad_token_id=PAD, decoder_start_token_id=PAD, **kw)


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_matches_transformers_generate(kind):
    ours, theirs = pair(kind)
    for extra in (dict(repetition_penalty=1.5), {}):
        out = generate_seq2seq(ours, INPUTS, GenerationConfig(max_new_tokens=15, **extra))
        ref = their_generate(theirs, INPUTS, max_new_tokens=15, eos_token_id=None, **extra)
        assert out.sequences == ref.sequences[:, 1:].tolist(), extra
    # an EOS that really occurs (not first) stops its row where transformers stops it
    free = out.sequences[0]
    eos = next(t for t in free if free.index(t) > 0)
    out = generate_seq2seq(ours, INPUTS[:1], GenerationConfig(max_new_tokens=15, eos_token_id=eos))
    ref = their_generate(theirs, INPUTS[:1], max_new_tokens=15, eos_token_id=eos)
    assert out.sequences[0] == ref.sequences[0, 1:].tolist() == free[:free.index(eos) + 1]


@pytest.mark.parametrize("kind", list(KINDS))
def test_beam_search_matches_transformers_generate(kind):
    ours, theirs = pair(kind)
    free = generate_seq2seq(ours, INPUTS[:1], GenerationConfig(max_new_tokens=10, num_beams=4, num_return_sequences=4))
    eos = max(set(t for s in free.sequences for t in s[1:]), key=lambda t: sum(s.count(t) for s in free.sequences))
    for nb, nrs, lp in ((4, 2, 0.5), (4, 4, 2.0), (3, 3, 1.0)):
        cfg = GenerationConfig(max_new_tokens=10, num_beams=nb, num_return_sequences=nrs, length_penalty=lp,
                               eos_token_id=eos)
        out = generate_seq2seq(ours, INPUTS[:1], cfg)
        ref = their_generate(theirs, INPUTS[:1], max_new_tokens=10, num_beams=nb, num_return_sequences=nrs,
                             length_penalty=lp, eos_token_id=eos)
        lengths = (ref.beam_indices != -1).sum(dim=1).tolist()
        want = [ref.sequences[i, 1:1 + n].tolist() for i, n in enumerate(lengths)]
        assert out.sequences == want, (nb, nrs, lp)
        assert out.scores == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)
    # a batch of inputs of different lengths: each as if alone
    batch = generate_seq2seq(ours, INPUTS, GenerationConfig(max_new_tokens=10, num_beams=3, num_return_sequences=2))
    alone = [generate_seq2seq(ours, [x], GenerationConfig(max_new_tokens=10, num_beams=3, num_return_sequences=2))
             for x in INPUTS]
    assert batch.sequences == [s for a in alone for s in a.sequences]


def test_sampling_through_the_bound_decoder_is_seeded_and_top_k_one_is_greedy():
    ours, _ = pair("relu_tied")
    bound = ours.bind(INPUTS[:1])
    greedy = generate(bound, [PAD], GenerationConfig(max_new_tokens=10)).sequences[0]
    cfg = dict(max_new_tokens=10, do_sample=True, num_return_sequences=3, temperature=1.3)
    a, b = (generate(bound, [PAD], GenerationConfig(seed=5, **cfg)) for _ in range(2))
    assert a == b and len(set(map(tuple, a.sequences))) > 1
    top1 = generate(bound, [PAD], GenerationConfig(seed=5, top_k=1, **cfg)).sequences
    assert top1 == [greedy] * 3


# ---------------------------------------------------------------- checkpoints and conversion


@pytest.fixture(scope="module")
def tokenizer():
    from chatfoundry.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog, backwards"], "char")
    span.add_sentinels(tok, VOCAB - tok.get_vocab_size())  # fill the vocabulary up to VOCAB
    assert tok.get_vocab_size() == VOCAB
    return tok


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_ours_hf_ours_is_lossless_and_transformers_loads_the_export(tmp_path, capsys, tokenizer, kind):
    from safetensors.torch import load_file

    from chatfoundry.checkpoint import load_model, save_checkpoint

    ours, theirs = pair(kind)
    save_checkpoint(tmp_path / "ours", ours, tokenizer)
    code, _, err = run_cli(["convert", "--to_hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "t5" and config["architectures"] == ["T5ForConditionalGeneration"]
    assert config["decoder_start_token_id"] == 0
    loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded(INPUTS)
    dec = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        want = ours(ids, dec, mask=mask.bool())[0]
        torch.testing.assert_close(loaded.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   want, atol=1e-4, rtol=0)
    # transformers' own save of it comes back in through --from_hf, weights bit for bit
    loaded.save_pretrained(tmp_path / "theirs")
    (tmp_path / "theirs" / "tokenizer.json").write_text((tmp_path / "hf" / "tokenizer.json").read_text())
    capsys.readouterr()
    code, out, err = run_cli(["convert", "--from_hf", str(tmp_path / "theirs"), "--out", str(tmp_path / "back"),
                              "--json"], capsys)
    assert code == 0, err and last_json(out)["architecture"] == "t5"
    back, _ = load_model(tmp_path / "back", seq2seq=True)
    assert back.config.tie_word_embeddings == ours.config.tie_word_embeddings
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert set(load_file(tmp_path / "back" / "model.safetensors")) == set(load_file(tmp_path / "hf" / "model.safetensors"))


def test_decoder_only_commands_refuse_a_t5_checkpoint_in_one_line(tmp_path, capsys, tokenizer):
    from chatfoundry.checkpoint import load_model, save_checkpoint

    save_checkpoint(tmp_path / "t5", pair("relu_tied")[0], tokenizer)
    with pytest.raises(UserError, match="encoder-decoder"):
        load_model(tmp_path / "t5")
    code, _, err = run_cli(["eval", "--ckpt", str(tmp_path / "t5")], capsys)
    assert code == 2 and "encoder-decoder (T5)" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- span corruption


def test_span_corruption_layout_and_noise_density():
    rng = np.random.default_rng(0)
    length, sentinels, eos = 200, list(range(1000, 1100)), 2
    noise, spans = span.span_counts(length, 0.15, 3.0)
    assert (noise, spans) == (30, 10)
    for _ in range(50):
        tokens = np.arange(10, 10 + length)
        mask = span.noise_mask(length, 0.15, 3.0, rng)
        assert mask.sum() == noise and not mask[0] and mask[-1]  # starts with kept text, ends with a dropped span
        starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
        assert len(starts) == spans
        inputs, targets = span.corrupt(tokens, mask, sentinels, eos)
        assert len(inputs) == length - noise + spans + 1 and len(targets) == noise + spans + 2
        assert inputs[-1] == eos and targets[-2:] == [sentinels[spans], eos]
        # sentinels in order, in both; putting the spans back where the sentinels stand gives the text
        assert [t for t in inputs if t >= 1000] == sentinels[:spans]
        assert [t for t in targets if t >= 1000] == sentinels[:spans + 1]
        fill, current = {}, None
        for t in targets[:-2]:
            if t >= 1000:
                current = t
                fill[t] = []
            else:
                fill[current].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (fill[t] if t >= 1000 else [t])]
        assert rebuilt == tokens.tolist()
    # the mean span length is T5's 3 (30 dropped tokens in 10 spans, every time)
    masks = np.stack([span.noise_mask(length, 0.15, 3.0, rng) for _ in range(200)])
    runs = [len(r) for m in masks for r in np.split(m, np.flatnonzero(np.diff(m.astype(int))) + 1) if r[0]]
    assert np.mean(runs) == pytest.approx(3.0) and max(runs) > 3  # lengths vary around the mean


def test_too_few_sentinels_is_a_user_error():
    with pytest.raises(UserError, match="span.extra_ids"):
        span.check_spans(512, 0.15, 3.0, 20)


# ---------------------------------------------------------------- learning and the CLI

TINY_T5 = ["--objective", "span", "--data.corpus_chars", "60000", "--tokenizer.kind", "char",
           "--seq2seq.d_model", "32", "--seq2seq.d_kv", "16", "--seq2seq.num_heads", "2", "--seq2seq.d_ff", "64",
           "--seq2seq.num_layers", "2", "--seq2seq.num_decoder_layers", "2", "--seq2seq.block_size", "48",
           "--span.extra_ids", "8", "--train.batch_size", "8", "--train.warmup_steps", "2",
           "--train.eval_batches", "2", "--train.log_every", "2", "--sample.num_samples", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_torch_thread):
    from chatfoundry.cli import main

    out = tmp_path_factory.mktemp("t5") / "pt"
    assert main(["pretrain", *TINY_T5, "--train.steps", "12", "--train.eval_every", "6", "--train.save_every", "6",
                 "--out", str(out)]) == 0
    return out


def test_span_pretraining_writes_a_t5_run(pretrained):
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "samples.txt", "checkpoint/model.safetensors"):
        assert (pretrained / name).is_file(), name
    config = json.loads((pretrained / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "t5" and config["chatfoundry"]["block_size"] == 48
    tok = json.loads((pretrained / "checkpoint" / "tokenizer.json").read_text())
    assert {"<extra_id_0>", "<extra_id_7>"} <= {t["content"] for t in tok["added_tokens"]}
    assert "<extra_id_" in (pretrained / "samples.txt").read_text()


def test_span_pretraining_resumes_bit_exactly(tmp_path, capsys, one_torch_thread):
    from safetensors.torch import load_file

    # a flat schedule after warmup, so that a 4-step run is the first half of an 8-step one
    args = [*TINY_T5, "--train.eval_every", "4", "--train.save_every", "4", "--sample.num_samples", "0",
            "--train.min_lr_ratio", "1"]
    assert run_cli(["pretrain", *args, "--train.steps", "8", "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run_cli(["pretrain", *args, "--train.steps", "4", "--out", str(tmp_path / "b")], capsys)[0] == 0
    code, _, err = run_cli(["pretrain", *args, "--train.steps", "8", "--out", str(tmp_path / "b"), "--resume"], capsys)
    assert code == 0, err
    a, b = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_cli_on_a_t5_checkpoint(pretrained, capsys):
    from chatfoundry.checkpoint import load_model
    from chatfoundry.train.seq2seq import encode_inputs

    args = ["generate", "--ckpt", str(pretrained), "--prompt", "The capital", "--max_new_tokens", "6", "--json"]
    code, out, err = run_cli(args + ["--strategy", "greedy"], capsys)
    assert code == 0, err
    greedy = last_json(out)
    model, tok = load_model(pretrained, seq2seq=True)
    ids = encode_inputs(tok, ["The capital"])
    assert greedy["prompt_token_ids"] == ids[0]
    assert greedy["token_ids"] == generate_seq2seq(model, ids, GenerationConfig(max_new_tokens=6, eos_token_id=2)).sequences[0]
    code, out, err = run_cli(args + ["--strategy", "beam", "--num_beams", "3", "--num_return_sequences", "2"], capsys)
    assert code == 0 and len(last_json(out)["sequences"]) == 2, err
    code, out, err = run_cli(args + ["--strategy", "sample", "--top_p", "0.9", "--seed", "1"], capsys)
    assert code == 0 and len(last_json(out)["token_ids"]) >= 1, err
    code, _, err = run_cli(["generate", "--ckpt", str(pretrained), "--prompt", "x" * 60], capsys)
    assert code == 2 and "--prompt" in err and len(err.strip().splitlines()) == 1


def test_finetune_seq2seq_bad_input_is_one_line_exit_2_and_writes_nothing(pretrained, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    for args, needle in ((["--data", str(bad)], "bad.jsonl:2"), (["--data", "world:nope"], "nope"),
                         (["--data", "world:strings/nope"], "nope"), (["--train.lr", "-1"], "train.lr"),
                         (["--data", "world:strings/sort", "--synthetic", "5"], "synthetic")):
        out = tmp_path / "run"
        code, _, err = run_cli(["finetune-seq2seq", "--init", str(pretrained), "--out", str(out), *args], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
    code, _, err = run_cli(["finetune-seq2seq", "--init", str(tmp_path / "none"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "none" in err


def test_finetune_seq2seq_learns_from_jsonl(pretrained, tmp_path, capsys, one_torch_thread):
    """Seq2seq finetuning learns: the latest letter of five (a..j) on held-out inputs, 0.8 exact
    match after 150 steps, where always answering the commonest ("j") scores about 0.4."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(400)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"input": w, "target": max(w)}) + "\n" for w in words))
    out = tmp_path / "ft"
    code, stdout, err = run_cli(["finetune-seq2seq", "--init", str(pretrained), "--data", str(data), "--out", str(out),
                                 "--train.steps", "150", "--train.batch_size", "16", "--train.lr", "3e-3",
                                 "--train.eval_every", "75", "--train.eval_batches", "2", "--device", "cpu",
                                 "--json"], capsys)
    assert code == 0, err
    result = last_json(stdout)
    assert result["n"] == 40 and result["exact_match"] >= 0.8, result
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "eval.json", "checkpoint/model.safetensors"):
        assert (out / name).is_file(), name


def test_reverse_data_keeps_held_out_strings_out_of_training():
    """world:strings/reverse with synthetic pairs: no test-split word and no held-out random
    string is ever a training string."""
    from chatfoundry.train.seq2seq import FinetuneSeq2SeqConfig, load_pairs, reversed_string

    train, _, test, fresh, _ = load_pairs(FinetuneSeq2SeqConfig(init="x", synthetic=3000, synthetic_eval=200))
    seen = {reversed_string(p) for p in train}
    held = {reversed_string(p) for p in test}
    assert len(train) == 3000 + len({p.input for p in train if p.task}) and len(fresh) == 200
    assert held and not held & seen
    assert not {reversed_string(p) for p in fresh} & (seen | held)
    assert all(p.target == reversed_string(p)[::-1] for p in train + test + fresh)
