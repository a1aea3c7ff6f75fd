"""Streaming text: split multi-byte characters, stop strings, and equality with non-streamed output."""

from __future__ import annotations

import pytest
import torch

from chatfoundry.generation import GenerationConfig, generate
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.textgen import TextStream, complete, stream_text
from chatfoundry.tokenizer import train_tokenizer
from conftest import randomize, tiny_config

TEXT = "Grüße, 世界! naïve café 🙂🎉 done."


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(["plain ascii text only, so other characters split into bytes"] * 5, "bpe", 300)


def test_a_character_split_across_tokens_is_never_shown_half(bpe):
    ids = bpe.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) > len(TEXT.encode()) // 2  # many tokens are single bytes of multi-byte characters
    stream = TextStream(bpe)
    chunks = [stream.push(i) for i in ids]
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + stream.flush() == TEXT
    assert "" in chunks  # some tokens completed no character and showed nothing


def test_stop_string_ends_the_text_and_a_possible_start_is_held_back():
    tok = train_tokenizer(["Hello there\nUser: hi\nUsual"], "char")
    stream = TextStream(tok, ["\nUser:"])
    shown = []
    for i in tok.encode("Hello\nUsual\nUser: more", add_special_tokens=False).ids:
        shown.append(stream.push(i))
        if stream.stopped:
            break
    assert "".join(shown) == "Hello\nUsual"
    assert stream.stopped
    # "\nUs" could have been the start of "\nUser:" and was held back until "ual" ruled it out.
    assert "Hello\nUs" not in ["".join(shown[:k]) for k in range(len(shown))]


def test_streamed_text_equals_the_non_streamed_generation():
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"], "char")
    cfg_model = tiny_config("llama", vocab_size=tok.get_vocab_size(), block_size=24, n_kv_head=2)
    torch.manual_seed(0)
    model = randomize(DecoderLM(cfg_model), std=0.3).eval()
    prompt = tok.encode("the ", add_special_tokens=False).ids
    for cfg in (GenerationConfig(max_new_tokens=40), GenerationConfig(max_new_tokens=40, do_sample=True, top_p=0.8,
                                                                      seed=3)):
        whole = generate(model, prompt, cfg)
        streamed = list(stream_text(model, tok, prompt, cfg))
        assert [t for _, t, _ in streamed if t >= 0] == whole.sequences[0]
        assert "".join(p for p, _, _ in streamed) == tok.decode(whole.sequences[0], skip_special_tokens=True)
        result = complete(model, tok, prompt, cfg, stops=[])
        assert result["token_ids"] == whole.sequences[0]
        assert result["logprobs"] == pytest.approx(whole.token_logprobs[0])
    # A stop string cuts the text before it and stops generating.
    full = complete(model, tok, prompt, GenerationConfig(max_new_tokens=40))
    stop = full["text"][10:12]
    cut = complete(model, tok, prompt, GenerationConfig(max_new_tokens=40), stops=[stop])
    assert cut["text"] == full["text"][:full["text"].find(stop)]
    assert len(cut["token_ids"]) < len(full["token_ids"])
