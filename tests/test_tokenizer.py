"""Tests for chatfoundry.tokenizer: the four kinds, the reserved specials, save/load,
transformers compatibility, the chat format, errors and determinism.

Corpora are built here, tiny and seeded; every tokenizer trains in well under a second.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chatfoundry.errors import UserError
from chatfoundry.tokenizer import (
    CHAT_TEMPLATE,
    KINDS,
    SPECIAL_TOKENS,
    encode_batch_ids,
    load_tokenizer,
    render_chat,
    save_tokenizer,
    special_id,
    tokenizer_hash,
    train_tokenizer,
    train_tokenizer_from_files,
)

SPECIALS = list(SPECIAL_TOKENS.values())
VOCAB = {"bpe": 400, "wordpiece": 300, "unigram": 200, "char": 4096}


def make_corpus(n: int = 1500, seed: int = 0) -> list[str]:
    """Sentences over ~150 made-up words, some capitalised, with punctuation and a few
    accented and non-Latin words: enough repeats for merges, enough ties to expose any
    hash-order dependence in the trainers."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(150)]
    words += ["café", "naïve", "über", "日本語", "ΑΒΓΔ", "ЖЗИЙ"]
    out = []
    for _ in range(n):
        sent = [rng.choice(words) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            sent[0] = sent[0].capitalize()
        out.append(" ".join(sent) + rng.choice([".", "!", "?", ",", ""]))
    return out


CORPUS = make_corpus()
SAMPLES = CORPUS[:40] + ["Hello there, world!", "a  b   c", " leading", "trailing  ", "line\nbreak\ttab"]


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    return {kind: train_tokenizer(CORPUS, kind, VOCAB[kind]) for kind in KINDS}


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind, tok in trained.items():
        out[kind] = tmp_path_factory.mktemp(f"tok_{kind}")
        save_tokenizer(tok, out[kind], model_max_length=128)
    return out


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- training, specials


@pytest.mark.parametrize("kind", KINDS)
def test_specials_have_fixed_ids_and_are_special(trained, kind):
    tok = trained[kind]
    added = tok.get_added_tokens_decoder()
    for i, (name, token) in enumerate(SPECIAL_TOKENS.items()):
        assert tok.token_to_id(token) == i
        assert special_id(tok, name) == i
        assert added[i].content == token and added[i].special
    assert sorted(added) == list(range(len(SPECIALS)))  # nothing else was added


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_is_respected(trained, kind):
    size = trained[kind].get_vocab_size()
    if kind == "char":
        assert size == len(SPECIALS) + len(set("".join(CORPUS)))  # exact, vocab_size ignored
    elif kind == "bpe":
        assert 0.95 * VOCAB[kind] <= size <= VOCAB[kind]
    else:
        assert len(SPECIALS) < size <= VOCAB[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_no_bos_or_eos_added_on_encode(trained, kind):
    tok = trained[kind]
    assert tok.encode("hello world").ids == ids(tok, "hello world")
    assert not {1, 2} & set(tok.encode("hello world").ids)


@pytest.mark.parametrize("kind", KINDS)
def test_special_literal_encodes_to_one_id_and_skip_drops_it(trained, kind):
    tok = trained[kind]
    for i, lit in enumerate(SPECIALS):
        text = f"café{lit}world"
        got = ids(tok, text)
        assert got.count(i) == 1
        assert not set(got) & (set(range(len(SPECIALS))) - {i, 3})  # 3: unk may stand for a char
        assert lit not in tok.decode(got, skip_special_tokens=True)
        kept = tok.decode(got, skip_special_tokens=False)
        assert lit in kept
        if kind != "wordpiece":  # wordpiece joins pieces with a space
            assert kept == text


@pytest.mark.parametrize("kind", KINDS)
def test_corpus_special_literals_are_not_learned_as_pieces(kind):
    tok = train_tokenizer(["ab<|eos|>cd", "<|user|>ab cd<|end|>"] * 20, kind, VOCAB[kind])
    learned = set(tok.get_vocab(with_added_tokens=False)) - set(SPECIALS)
    # "|" alone is in bpe's byte alphabet; nothing longer may contain it.
    assert not [p for p in learned if "|" in p and len(p.removeprefix("##")) > 1]


# ---------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def bpe(trained) -> Tokenizer:
    return trained["bpe"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(bpe, s):
    assert bpe.decode(ids(bpe, s), skip_special_tokens=False) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIALS))).map("".join))
def test_bpe_round_trips_text_with_special_literals(bpe, s):
    assert bpe.decode(ids(bpe, s), skip_special_tokens=False) == s


def test_bpe_never_produces_unk(bpe):
    assert 3 not in ids(bpe, "\x00 \U0010ffff ☃ 🙂 \ud7ff")


def test_char_round_trips_its_alphabet_and_maps_unknown_to_unk(trained):
    tok = trained["char"]
    alphabet = sorted(set("".join(CORPUS)))
    rng = random.Random(1)
    text = "".join(rng.choice(alphabet) for _ in range(2000))
    got = ids(tok, text)
    assert len(got) == len(text) and 3 not in got  # one token per character
    assert tok.decode(got) == text  # concatenated, no spaces added
    assert ids(tok, "a§b") == [tok.token_to_id("a"), special_id(tok, "unk"), tok.token_to_id("b")]
    assert ids(tok, "§§") == [3, 3]


def test_char_encodes_a_megabyte_in_one_call(trained):
    tok = trained["char"]
    text = ("the quick brown fox, " * 50_000)[:1_000_000]
    enc = tok.encode(text, add_special_tokens=False)
    assert len(enc.ids) == len(text) and encode_batch_ids(tok, [text]) == [enc.ids]
    assert tok.decode(enc.ids) == text


def test_wordpiece_round_trip_normalises_whitespace(trained):
    # What holds: decode(encode(s)) == " ".join(s.split()) when every word is spelled
    # with characters the tokenizer saw; a word with an unseen character -> one unk.
    tok = trained["wordpiece"]
    for s in SAMPLES:
        if all(c in tok.get_vocab() for c in set(s) if not c.isspace()):
            assert tok.decode(ids(tok, s)) == " ".join(s.split())
    assert ids(tok, "café x§y") == ids(tok, "café") + [special_id(tok, "unk")]


def test_unigram_round_trip_is_exact(trained):
    # Exact, spaces included, for text over the trained alphabet.
    tok = trained["unigram"]
    checked = 0
    for s in SAMPLES:
        if all(c in tok.get_vocab() or c == " " for c in s):
            assert tok.decode(ids(tok, s)) == s
            checked += 1
    assert checked >= 40
    assert tok.decode(ids(tok, "  café  Ab  ")) == "  café  Ab  "
    assert 3 in ids(tok, "café§")  # unseen character -> unk


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_ids_matches_encode(trained, kind):
    tok = trained[kind]
    assert encode_batch_ids(tok, SAMPLES) == [ids(tok, s) for s in SAMPLES]
    assert encode_batch_ids(tok, []) == []


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(trained, saved, kind):
    tok, folder = trained[kind], saved[kind]
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for loaded in (load_tokenizer(folder), load_tokenizer(folder / "tokenizer.json"), load_tokenizer(str(folder))):
        assert tokenizer_hash(loaded) == tokenizer_hash(tok)
        for s in SAMPLES + ["x<|eos|>y"]:
            assert ids(loaded, s) == ids(tok, s)
            assert loaded.decode(ids(tok, s)) == tok.decode(ids(tok, s))


def test_tokenizer_config_contents(saved):
    cfg = json.loads((saved["bpe"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"], cfg["mask_token"]) == (
        "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|mask|>")
    assert cfg["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>"]
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["model_max_length"] == 128
    assert cfg["clean_up_tokenization_spaces"] is False


def test_save_overwrites_and_omits_max_length_when_none(trained, tmp_path):
    save_tokenizer(trained["char"], tmp_path / "a" / "b")  # creates parents
    save_tokenizer(trained["bpe"], tmp_path / "a" / "b")
    assert tokenizer_hash(load_tokenizer(tmp_path / "a" / "b")) == tokenizer_hash(trained["bpe"])
    cfg = json.loads((tmp_path / "a" / "b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "model_max_length" not in cfg
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def gpt2_like_tokenizer() -> Tokenizer:
    """A byte-level BPE with only GPT-2's "<|endoftext|>": none of our specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS[:200], trainer=trainer)
    return tok


def test_loads_a_foreign_tokenizer_without_our_specials(tmp_path):
    path = tmp_path / "gpt2" / "tokenizer.json"
    path.parent.mkdir()
    gpt2_like_tokenizer().save(str(path))
    tok = load_tokenizer(path.parent)
    assert all(special_id(tok, name) is None for name in SPECIAL_TOKENS)
    assert tok.decode(ids(tok, "hello world<|endoftext|>")) == "hello world"
    # Saving it names none of our specials, so transformers adds no tokens.
    save_tokenizer(tok, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "eos_token" not in cfg and "chat_template" not in cfg and cfg["additional_special_tokens"] == []
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert len(hf) == tok.get_vocab_size()


# ---------------------------------------------------------------- transformers


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_and_matches(trained, saved, kind):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, folder = trained[kind], saved[kind]
    auto = AutoTokenizer.from_pretrained(str(folder))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.unk_token_id, auto.mask_token_id) == (
        0, 1, 2, 3, 9)
    assert auto.model_max_length == 128
    assert len(auto) == tok.get_vocab_size()
    for s in SAMPLES + ["x<|eos|>y", "<|user|>hi<|end|>"]:
        want = ids(tok, s)
        assert auto(s)["input_ids"] == want
        assert auto.encode(s) == want
        assert fast.encode(s) == want
        for skip in (False, True):
            assert auto.decode(want, skip_special_tokens=skip) == tok.decode(want, skip_special_tokens=skip)
            assert fast.decode(want, skip_special_tokens=skip) == tok.decode(want, skip_special_tokens=skip)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def test_render_chat_exact_format():
    assert render_chat(CONVERSATION) == (
        "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>4<|end|>")
    assert render_chat(CONVERSATION[:2], add_generation_prompt=True) == (
        "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>")
    assert render_chat([{"role": "tool", "content": "42"}]) == "<|tool|>42<|end|>"
    assert render_chat([]) == ""


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_chat_template_matches_render_chat(trained, saved, kind):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(saved[kind]))
    for messages in (CONVERSATION, CONVERSATION[:2], [{"role": "tool", "content": "x\ny"}]):
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == render_chat(messages, add_generation_prompt=gen)
    chat_ids = ids(trained[kind], render_chat(CONVERSATION))
    assert [chat_ids[0], chat_ids[-1]] == [special_id(trained[kind], "system"), special_id(trained[kind], "end")]


def test_render_chat_rejects_bad_messages():
    with pytest.raises(UserError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(UserError, match="content"):
        render_chat([{"role": "user", "content": None}])
    with pytest.raises(UserError, match=r"messages\[0\]"):
        render_chat(["hi"])


# ---------------------------------------------------------------- errors


def test_unknown_kind():
    with pytest.raises(UserError, match="sentencepiece"):
        train_tokenizer(CORPUS, "sentencepiece")


@pytest.mark.parametrize("kind, size", [("bpe", 266), ("wordpiece", 10), ("unigram", 5)])
def test_vocab_too_small(kind, size):
    with pytest.raises(UserError, match="vocab_size") as e:
        train_tokenizer(CORPUS, kind, size)
    if kind == "bpe":
        assert "256" in str(e.value)


def test_vocab_too_small_for_the_corpus_alphabet():
    with pytest.raises(UserError, match="too small for wordpiece"):
        train_tokenizer(["abcdefghijklmnopqrstuvwxyz"], "wordpiece", 30)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("texts", [[], ["", "  \n", "\t"], iter([])])
def test_empty_corpus(kind, texts):
    with pytest.raises(UserError, match="corpus is empty"):
        train_tokenizer(texts, kind, VOCAB[kind])


def test_non_string_text():
    with pytest.raises(UserError, match=r"texts\[1\]"):
        train_tokenizer(["ok", b"bytes"], "bpe", 300)


def test_files_train_like_their_lines(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(CORPUS[:300]) + "\n", encoding="utf-8")
    b.write_text("\n".join(CORPUS[300:600]), encoding="utf-8")
    lines = [line + "\n" for line in CORPUS[:600]]
    lines[-1] = lines[-1][:-1]
    for kind in ("bpe", "char"):
        from_files = train_tokenizer_from_files([a, str(b)], kind, VOCAB[kind])
        assert tokenizer_hash(from_files) == tokenizer_hash(train_tokenizer(lines, kind, VOCAB[kind]))


def test_file_errors_name_the_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello world\n", encoding="utf-8")
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match="missing.txt"):
        train_tokenizer_from_files([good, missing], "bpe", 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt.*UTF-8"):
        train_tokenizer_from_files([good, latin1], "char")
    with pytest.raises(UserError, match="not a regular file"):
        train_tokenizer_from_files([tmp_path], "char")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="corpus is empty.*empty.txt"):
        train_tokenizer_from_files([empty], "bpe", 300)
    with pytest.raises(UserError, match="corpus is empty"):
        train_tokenizer_from_files([], "bpe", 300)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path.name}: no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="nothing.json: no tokenizer.json"):
        load_tokenizer(tmp_path / "nothing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 42}', encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    bad.write_text("not json at all", encoding="utf-8")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_special_id_unknown_name(trained):
    with pytest.raises(KeyError):
        special_id(trained["bpe"], "cls")


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic(kind):
    # The wordpiece and unigram trainers walk hash maps in a per-instance random order;
    # this corpus has enough equal counts that, uncorrected, runs differ.
    corpus = make_corpus(600, seed=3) + ["ΑΒΓΔΕΖΗΘ " * 3] * 40 + ["ЖЗИЙКЛ"] * 30
    hashes = {tokenizer_hash(train_tokenizer(corpus, kind, VOCAB[kind])) for _ in range(3)}
    assert len(hashes) == 1


def test_tokenizer_hash(trained):
    h = tokenizer_hash(trained["bpe"])
    assert len(h) == 64 and int(h, 16) >= 0
    assert len({tokenizer_hash(t) for t in trained.values()}) == len(KINDS)
