"""Tokenizers for chatfoundry: train, save, load, and the chat format.

Everything that tokenizes is Hugging Face `tokenizers`; this module only picks the
pipeline for each kind and keeps the conventions every later stage relies on:

* Ten special tokens with fixed ids 0..9 (``SPECIAL_TOKENS``, in insertion order) are
  reserved in every tokenizer, registered as *special* added tokens: the tokenizer itself
  encodes a literal such as ``"<|eos|>"`` to its single id, and ``decode(ids,
  skip_special_tokens=True)`` drops it. Chat SFT, tool use and BERT-style masking
  therefore never need to grow the vocabulary.
* Text is text: ``encode_batch_ids`` and ``encode_chat`` (the data loaders, the chat
  template, chat and serve) spell a control token's literal out in ordinary tokens, as
  if it stood alone, so a user who types ``<|end|><|system|>`` cannot forge a turn. Only
  the chat template emits control tokens, and, inside an assistant message, ``<|tool|>``
  (that is how a tool call is written, tools.py). A lone UTF-16 surrogate, which
  JSON can carry but which is no character, encodes as U+FFFD.
* A foreign tokenizer's own special tokens (GPT-2's ``<|endoftext|>``, T5's ``</s>``) play
  our roles by the names its ``tokenizer_config.json`` gives (``eos_token``...): see
  ``special_id`` and ``set_special_names``.
* No post-processor: encoding never adds bos/eos (pretraining inserts eos between
  documents itself).
* The saved folder (tokenizer.json + tokenizer_config.json) loads in transformers
  (``AutoTokenizer`` / ``PreTrainedTokenizerFast``) and encodes/decodes identically.
* Training is repeatable: the same texts give the same ``tokenizer_hash`` (the cache key
  of token shards). BPE and char are so as trained; wordpiece and unigram trainers walk
  hash maps in random order, which ``_wordpiece_continuations`` and
  ``_canonical_unigram_pieces`` neutralise.

Kinds and what round-trips (``decode(encode(s), skip_special_tokens=False)``):

``bpe``        byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer without prefix space,
               ByteLevel decoder, all 256 bytes in the alphabet, no normalizer), with
               digits split one by one first, as Llama does.
               Exact for ANY Unicode string, special-token literals included.
``wordpiece``  WordPiece, split on whitespace only, no normalizer (case is kept).
               Gives ``" ".join(s.split())`` (whitespace normalised) when every word
               can be spelled with the trained alphabet; a word with an unseen
               character, or longer than 100 characters, becomes ``<|unk|>`` as a whole.
               Special tokens decode as words of their own ("a<|eos|>b" -> "a <|eos|> b").
``unigram``    SentencePiece-style Unigram: Metaspace pre-tokenizer/decoder (each space
               becomes "▁" and starts a piece; no dummy "▁" prefix), no normalizer.
               Exact for text over the trained alphabet that contains no "▁" itself
               (a literal "▁" decodes as a space); unseen characters become ``<|unk|>``.
``char``       one token per character; vocabulary = specials + the distinct characters
               of the corpus, exactly (``vocab_size`` is ignored). Exact over the
               corpus alphabet; an unseen character becomes ``<|unk|>``.

Chat format (``CHAT_TEMPLATE`` and ``render_chat`` produce the same string): each message
is ``<|{role}|>{content}<|end|>`` with role one of system/user/assistant/tool, messages
concatenated with nothing in between (no newline, no bos); ``add_generation_prompt``
appends ``<|assistant|>``. Example::

    <|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

The exported template also renders OpenAI-style ``tool_calls`` as ``<|tool|>name arguments``.
transformers' ``apply_chat_template(..., sanitize_control_tokens=True)`` then gives the ids
``encode_chat`` gives (tested); without that flag transformers reads control-token text in
content as control tokens, as it does for every model.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from chatfoundry.errors import UserError

KINDS = ("bpe", "wordpiece", "unigram", "char")

# Insertion order is the id order: pad=0, bos=1, ..., mask=9.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "unk": "<|unk|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
    "tool": "<|tool|>",
    "mask": "<|mask|>",
}

CHAT_ROLES = ("system", "user", "assistant", "tool")
NAMED_ROLES = ("bos", "eos", "pad", "unk", "mask")  # the roles a tokenizer_config.json names (eos_token...)
TOKENIZER_FORMAT = 4  # bumped when training changes (4: BPE splits digits one by one): keys the trained-tokenizer cache

# BERT's roles, played by our special tokens; a foreign BERT tokenizer's own names count too.
# [CLS] opens every input (its final hidden state stands for the text), [SEP] closes each text,
# [MASK] hides a token from the masked-LM, [PAD] fills a batch.
ENCODER_TOKENS = {"cls": ("bos", "[CLS]"), "sep": ("eos", "[SEP]"), "mask": ("mask", "[MASK]"),
                  "pad": ("pad", "[PAD]"), "unk": ("unk", "[UNK]")}

# Whitespace-controlled ({%- -%}) so the template emits only the message text, whatever
# jinja options (trim_blocks, lstrip_blocks) the renderer uses. `raise_exception` is the
# helper transformers provides to chat templates. Each control token is a whole literal
# (never '<|' ~ role ~ '|>'), so transformers' sanitize_control_tokens knows them all.
# OpenAI-style tool_calls ({"function": {"name", "arguments"}}) render as our calls do.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- elif message['role'] == 'tool' -%}{{- '<|tool|>' -}}"
    "{%- else -%}{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set function = call['function'] -%}"
    "{{- '<|tool|>' ~ function['name'] ~ ' ' -}}"
    "{%- if function['arguments'] is string -%}{{- function['arguments'] -}}"
    "{%- else -%}{{- function['arguments'] | tojson -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

_SPECIALS = list(SPECIAL_TOKENS.values())
_UNK = SPECIAL_TOKENS["unk"]
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in _SPECIALS))
_BYTE_ALPHABET_SIZE = 256
_UNIGRAM_DECIMALS = 3
_UNIGRAM_PENALTY_STEP = 1e-4  # tokenizers' UnigramTrainer: min_score_penalty_delta


# ---------------------------------------------------------------------------- training


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 4096) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts` (documents or lines, any iterable of str).

    `vocab_size` counts everything (specials, alphabet, learned pieces); the trainers may
    stop below it on a small corpus, and a UserError says so if the corpus alphabet alone
    does not fit. It is ignored for "char", whose vocabulary is exact. Deterministic: the
    same texts give the same tokenizer (same `tokenizer_hash`), see `_finished`.
    "wordpiece" holds the corpus in memory (it needs two passes); the others stream it.
    """
    if kind not in KINDS:
        raise UserError(f"tokenizer kind {kind!r} unknown: choose one of {', '.join(KINDS)}")
    if kind != "char":
        _check_vocab_size(kind, vocab_size)

    saw_text = [False]  # set by _checked_texts as the trainer consumes the texts
    texts = _checked_texts(texts, saw_text)
    continuations: list[str] = []
    if kind == "wordpiece":
        texts = list(texts)
        continuations = _wordpiece_continuations(texts)
    tok, trainer = _untrained(kind, vocab_size, continuations)
    tok.train_from_iterator(texts, trainer=trainer)
    if not saw_text[0]:
        raise UserError("corpus is empty: no non-whitespace text to train the tokenizer on")

    tok = _finished(kind, tok)
    if kind != "char" and tok.get_vocab_size() > vocab_size:
        raise UserError(
            f"vocab_size {vocab_size} too small for {kind} on this corpus: its characters alone"
            f" need {tok.get_vocab_size()} tokens with the specials; raise vocab_size"
        )
    _check_specials(tok)
    return tok


def train_tokenizer_from_files(
    paths: Sequence[str | Path], kind: str = "bpe", vocab_size: int = 4096
) -> Tokenizer:
    """Train on UTF-8 text files, streamed line by line (see `train_tokenizer`)."""
    if isinstance(paths, (str, Path)):  # a lone path would otherwise iterate characters
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("corpus is empty: no files given")
    # Validate every file before training so a bad one fails fast and is named, instead
    # of surfacing from inside the Rust trainer halfway through.
    if not any([_check_text_file(p) for p in paths]):
        raise UserError(f"corpus is empty: {', '.join(str(p) for p in paths)} hold no text")

    def lines() -> Iterator[str]:
        for p in paths:
            with open(p, encoding="utf-8", newline="") as f:
                yield from f

    return train_tokenizer(lines(), kind=kind, vocab_size=vocab_size)


def _check_vocab_size(kind: str, vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UserError(f"vocab_size must be an integer, got {vocab_size!r}")
    n = len(SPECIAL_TOKENS)
    if kind == "bpe" and vocab_size <= _BYTE_ALPHABET_SIZE + n:
        raise UserError(
            f"vocab_size {vocab_size} too small for bpe: must exceed {_BYTE_ALPHABET_SIZE + n}"
            f" ({_BYTE_ALPHABET_SIZE} byte tokens, always included, + {n} special tokens)"
        )
    if vocab_size <= n:
        raise UserError(f"vocab_size {vocab_size} too small: must exceed the {n} special tokens")


def _assemble(kind: str, model) -> Tokenizer:
    """A Tokenizer around `model` with the pipeline of `kind` and the specials registered.

    The specials are added before training, so they hold ids 0..9 (the trainers, given
    the same list, also put them first).
    """
    tok = Tokenizer(model)
    if kind == "bpe":
        # Digits one by one (as Llama splits them): a number is spelled the same wherever it
        # stands (" 836", "836", "(836"), so the model can copy numbers to and from a tool.
        # GPT-4's runs of up to three digits keep small numbers whole, but the tiny model then
        # copied 3-digit numbers wrong (calculator questions: 0.00 with the tool, 0.46 with digits).
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "wordpiece":
        # Whitespace only (not BERT's punctuation split) so decoding gives back the text
        # with whitespace normalised; cleanup=False because its English heuristics
        # (" ." -> ".", " ," -> ",", ...) would change text such as "1 . 2".
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    elif kind == "unigram":
        # prepend_scheme "never" (SentencePiece's add_dummy_prefix=false): with a dummy
        # "▁" prefix the decoder strips one leading space, so " x" would decode as "x",
        # and a token decoded on its own would lose its space. Without it decoding is
        # exact; the price is that a text's first word is not spelled "▁word".
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    else:  # char: no pre-tokenizer, the model sees the whole text (fast: see _untrained)
        tok.decoder = decoders.Fuse()  # concatenate, no spaces
    tok.add_special_tokens(_SPECIALS)
    return tok


def _untrained(kind: str, vocab_size: int, wordpiece_continuations: list[str]):
    """An untrained Tokenizer of `kind` and the trainer that fills it."""
    if kind == "bpe":
        tok = _assemble(kind, models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unk ever
            show_progress=False,
        )
    elif kind == "wordpiece":
        tok = _assemble(kind, models.WordPiece(unk_token=_UNK, continuing_subword_prefix="##"))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            # The "##c" pieces passed as trainer specials get fixed ids up front; see
            # _wordpiece_continuations. _finished turns them back into ordinary pieces.
            special_tokens=_SPECIALS + wordpiece_continuations,
            continuing_subword_prefix="##",
            show_progress=False,
        )
    elif kind == "unigram":
        # Empty vocab: the default Unigram() holds a placeholder "<unk>" at id 0.
        tok = _assemble(kind, models.Unigram([]))
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=_SPECIALS,
            unk_token=_UNK,
            show_progress=False,
        )
    else:  # char
        # A merge-free BPE over single characters is a character vocabulary with an unk
        # fallback that encodes a whole text in one pass (a per-character pre-tokenizer
        # with WordLevel is several times slower on a 1 MB string).
        tok = _assemble(kind, models.BPE(unk_token=_UNK, fuse_unk=False))
        # For training only: split words from whitespace so the trainer counts a small
        # table of words; every character (whitespace included) still enters the alphabet.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
        trainer = trainers.BpeTrainer(
            # Below specials + alphabet: the trainer keeps the whole alphabet, learns no merges.
            vocab_size=len(_SPECIALS),
            special_tokens=_SPECIALS,
            show_progress=False,
        )
    return tok, trainer


def _wordpiece_continuations(texts: list[str]) -> list[str]:
    """"##c" for every character c that can occur inside a word, sorted.

    The WordPiece trainer numbers these pieces in the order it meets them while walking
    its (randomly ordered) hash map of words, and breaks ties between equally frequent
    pairs by those numbers: two runs on the same corpus learn different vocabularies.
    Handing them over up front, sorted, fixes their ids and makes training repeatable.
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    # Whitespace never reaches the model (WhitespaceSplit). Python's isspace() also counts
    # \x1c-\x1f, which Rust does not split on: keep those.
    return sorted("##" + c for c in chars if not c.isspace() or c in "\x1c\x1d\x1e\x1f")


def _finished(kind: str, tok: Tokenizer) -> Tokenizer:
    """The trained tokenizer in its final, canonical form."""
    if kind == "char":
        tok.pre_tokenizer = None  # the training split changes nothing without merges
        return tok
    if kind == "wordpiece":
        # Rebuild from the trained vocab so the "##c" trainer specials become plain pieces.
        vocab = tok.get_vocab(with_added_tokens=False)
        return _assemble(kind, models.WordPiece(vocab, unk_token=_UNK, continuing_subword_prefix="##"))
    if kind == "unigram":
        vocab = json.loads(tok.to_str())["model"]["vocab"]
        specials = [(t, 0.0) for t in _SPECIALS]
        pieces = _canonical_unigram_pieces([(p, s) for p, s in vocab if p not in SPECIAL_TOKENS.values()])
        return _assemble(kind, models.Unigram(specials + pieces, unk_id=_SPECIALS.index(_UNK), byte_fallback=False))
    return tok  # bpe: the trainer is already deterministic


def _checked_texts(texts: Iterable[str], saw_text: list[bool]) -> Iterator[str]:
    """Pass `texts` through to a trainer, noting whether any of it is not whitespace.

    Text is cut at special-token literals, as encoding does (the trainers themselves
    do not), so a corpus with "<|eos|>" between documents does not spend vocabulary on
    pieces of "<|eos|>".
    """
    if isinstance(texts, str):
        raise UserError("texts must be an iterable of strings, not a single string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"texts[{i}]: expected a string, got {type(text).__name__}")
        if not saw_text[0] and text and not text.isspace():
            saw_text[0] = True
        if "<|" in text:  # cheap test first: most texts hold no special token
            yield from (part for part in _SPECIAL_SPLIT.split(text) if part)
        else:
            yield text


def _check_text_file(path: Path) -> bool:
    """UserError unless `path` is a readable UTF-8 file; True if it holds non-whitespace."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text = False
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: not UTF-8 text (bad byte at offset {offset + e.start})") from None
                has_text = has_text or (bool(text) and not text.isspace())
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise UserError(f"{path}: not UTF-8 text (truncated character at end of file)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return has_text


def _check_specials(tok: Tokenizer) -> None:
    # An invariant of this module, not something a user can break: fail loudly.
    for i, token in enumerate(_SPECIALS):
        got = tok.token_to_id(token)
        if got != i:
            raise RuntimeError(f"special token {token} got id {got}, expected {i}")


def _canonical_unigram_pieces(pieces: list) -> list[tuple[str, float]]:
    """Trained Unigram (piece, score) pairs in a form that does not vary between runs.

    The Unigram trainer walks a hash map of words in a per-process random order, so
    (1) its float sums differ in the last bits (about 1e-10 on a 2 MB corpus), and
    (2) the characters it must keep but had pruned get scores lowest, lowest + 1e-4,
    lowest + 2e-4, ... handed out in that random order. Undo both: give that bottom band
    of single characters the lowest score, round every score to 1e-3 nats (far below
    what changes a segmentation on purpose), and order equal scores by piece.
    Repeatable in practice rather than by proof: a score lying within ~1e-10 of a rounding
    boundary, or an exact tie at a pruning cut, could still differ between runs.
    """
    pieces = [(p, float(s)) for p, s in pieces]
    if not pieces:
        return []
    lowest = min(s for _, s in pieces)
    # Grow the band one 1e-4 step per character found in it, until no more are found.
    n_band, eps = 0, 1e-7
    while True:
        top = lowest + n_band * _UNIGRAM_PENALTY_STEP + eps
        n = sum(1 for p, s in pieces if len(p) == 1 and s <= top)
        if n == n_band:
            break
        n_band = n
    top = lowest + n_band * _UNIGRAM_PENALTY_STEP + eps
    canon = [(p, lowest if len(p) == 1 and s <= top else s) for p, s in pieces]
    canon = [(p, round(s, _UNIGRAM_DECIMALS)) for p, s in canon]
    return sorted(canon, key=lambda x: (-x[1], x[0]))


# ------------------------------------------------------------------------ save / load


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int | None = None,
                   encoder: bool = False) -> None:
    """Write out_dir/tokenizer.json and out_dir/tokenizer_config.json (transformers-loadable).

    Only the special tokens `tok` actually has are named in the config, so saving a
    foreign tokenizer (e.g. GPT-2's) does not make transformers add new tokens.
    `model_max_length` is written only when given (transformers then has no limit).
    `encoder`: also name the [CLS] and [SEP] roles (`ENCODER_TOKENS`), as BERT's tokenizers do.
    """
    out = Path(out_dir)
    if model_max_length is not None and (
        isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length <= 0
    ):
        raise UserError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")

    has = {name: special_id(tok, name) is not None for name in SPECIAL_TOKENS}
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in NAMED_ROLES:
        if has[name]:  # ours, or the foreign token that plays the role (set_special_names)
            config[f"{name}_token"] = tok.id_to_token(special_id(tok, name))
    if encoder:
        ids = encoder_ids(tok)
        for role in ("cls", "sep"):
            if ids[role] is not None:
                config[f"{role}_token"] = tok.id_to_token(ids[role])
    config["additional_special_tokens"] = [
        SPECIAL_TOKENS[n] for n in ("system", "user", "assistant", "end", "tool") if has[n]
    ]
    if all(has[r] for r in CHAT_ROLES) and has["end"]:
        config["chat_template"] = CHAT_TEMPLATE
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    # No decode-side text rewriting, and no bos/eos added on encode: decode/encode must
    # match our Tokenizer exactly.
    config["clean_up_tokenization_spaces"] = False
    config["add_bos_token"] = False
    config["add_eos_token"] = False

    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
        _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"{out}: cannot write tokenizer ({e.strerror or e})") from None


def _write_atomic(path: Path, text: str) -> None:
    # Temp file in the same directory, then rename: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a directory holding tokenizer.json, or a tokenizer.json file itself.

    Any valid HF tokenizer.json loads, also one without our special tokens (then
    `special_id` returns None for them).
    """
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{path}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON / schema
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file}: not a valid tokenizer.json ({reason})") from None
    config = file.with_name("tokenizer_config.json")
    if config.is_file():
        set_special_names(tok, _names_in_config(config))
    return tok


def _names_in_config(path: Path) -> dict[str, str]:
    """{"eos": "</s>", ...}: the special tokens a tokenizer_config.json names (a string, or
    transformers' {"content": ...} form); one that cannot be read names none."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    names = {}
    for role in NAMED_ROLES:
        value = config.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            names[role] = value
    return names


# ----------------------------------------------------------------------------- helpers


def special_id(tok: Tokenizer, name: str) -> int | None:
    """Id of the special token `name` (a key of SPECIAL_TOKENS) in `tok`: ours, else (bos, eos,
    pad, unk, mask) the token its tokenizer_config.json names for the role; None if neither."""
    if name not in SPECIAL_TOKENS:
        raise KeyError(f"unknown special token name {name!r}: one of {', '.join(SPECIAL_TOKENS)}")
    found = tok.token_to_id(SPECIAL_TOKENS[name])
    if found is None and name in NAMED_ROLES:
        other = getattr(tok, _NAMES_ATTR, {}).get(name)
        found = tok.token_to_id(other) if other else None
    return found


def set_special_names(tok: Tokenizer, names: dict[str, str]) -> None:
    """Let a foreign tokenizer's tokens play our roles: {"eos": "</s>", "pad": "<pad>"}. Kept
    on the tokenizer object; `save_tokenizer` writes them to tokenizer_config.json and
    `load_tokenizer` reads them back. Roles that `tok` has under our names keep those."""
    known = {role: token for role, token in names.items() if role in NAMED_ROLES and tok.token_to_id(token) is not None}
    setattr(tok, _NAMES_ATTR, {**getattr(tok, _NAMES_ATTR, {}), **known})


def encoder_ids(tok: Tokenizer) -> dict[str, int | None]:
    """Ids of the roles in ENCODER_TOKENS (cls, sep, mask, pad, unk): ours, else BERT's names, else None."""
    out = {}
    for role, (ours, bert) in ENCODER_TOKENS.items():
        mine = special_id(tok, ours)
        out[role] = mine if mine is not None else tok.token_to_id(bert)
    return out


def chat_stop_ids(tok: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: <|end|> (the chat format's) and <|eos|>, those the tokenizer has."""
    return [i for i in (special_id(tok, "end"), special_id(tok, "eos")) if i is not None]


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 hex of the tokenizer's JSON: a cache key for token shards."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def replace_surrogates(text: str) -> str:
    """`text` with each lone UTF-16 surrogate as U+FFFD. JSON's \\ud800 escapes and Python's
    surrogateescape can put one in a str; it is no character, and the tokenizer refuses it."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def encode_batch_ids(tok: Tokenizer, texts: list[str], roles: Sequence[str | None] | None = None) -> list[list[int]]:
    """Token ids of each text as text (parallel, no offsets, no specials added): a control
    token's literal in it ("<|end|>") is spelled out in ordinary tokens, as it would be alone,
    never read as the control token. With `roles`, texts[i] is the content of a message of
    roles[i]; in an assistant message "<|tool|>" opens a tool call (tools.py) and
    encodes as that token. Text without control-token literals encodes as `tok.encode` does."""
    texts = [replace_surrogates(t) for t in texts]
    roles = roles if roles is not None else [None] * len(texts)
    if len(roles) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(roles)} roles")
    control = _control(tok)
    # each text as pieces: strings to encode, and lists of ids to take as they are
    pieced = [control.pieces(t, role == "assistant") if control.literals else [t] for t, role in zip(texts, roles)]
    strings = [p for pieces in pieced for p in pieces if isinstance(p, str)]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: tokenizers >= 0.20
    encoded = iter([e.ids for e in encode(strings, add_special_tokens=False)])
    return [[i for p in pieces for i in (next(encoded) if isinstance(p, str) else p)] for pieces in pieced]


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat format as a string; identical to rendering CHAT_TEMPLATE.

    Each message becomes ``<|{role}|>{content}<|end|>``, concatenated; with
    `add_generation_prompt`, ``<|assistant|>`` follows so the model writes the reply.
    """
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"messages[{i}]: expected a dict with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise UserError(f"messages[{i}]: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        parts.append(f"<|{role}|>{content}{SPECIAL_TOKENS['end']}")
    if add_generation_prompt:
        parts.append(SPECIAL_TOKENS["assistant"])
    return "".join(parts)


def encode_chat(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the conversation in the chat format, ending with the generation prompt. The
    format's own markers are control tokens; every message's content is text (see
    `encode_batch_ids`: only an assistant message's "<|tool|>" is read as the call marker).
    For text without control-token literals these are the ids of `render_chat`'s string."""
    render_chat(messages)  # the same checks: roles, content strings
    marker = _control(tok).marker
    contents = encode_batch_ids(tok, [m["content"] for m in messages], [m["role"] for m in messages])
    ids = []
    for message, content in zip(messages, contents):
        ids += marker(f"<|{message['role']}|>") + content + marker(SPECIAL_TOKENS["end"])
    return ids + marker(SPECIAL_TOKENS["assistant"])


@dataclass(frozen=True)
class _Control:
    """A tokenizer's control tokens, as `encode_batch_ids` needs them."""

    tok: Tokenizer
    size: int  # vocabulary size when built: a tokenizer that gained tokens is looked at again
    literals: dict[str, list[int]]  # each special token's text -> its ids as plain text
    split: re.Pattern | None  # finds any of them, longest first
    call: int | None  # the <|tool|> id

    def pieces(self, text: str, calls: bool) -> list[str | list[int]]:
        if not any(literal in text for literal in self.literals):  # the common case, fast
            return [text]
        out: list[str | list[int]] = []
        for i, part in enumerate(self.split.split(text)):
            if i % 2 == 0:
                if part:
                    out.append(part)
            elif calls and part == CALL_TOKEN and self.call is not None:
                out.append([self.call])
            else:
                out.append(self.literals[part])
        return out

    def marker(self, literal: str) -> list[int]:
        """The template's own control token: its id (as text if this tokenizer lacks it)."""
        found = self.tok.token_to_id(literal)
        return [found] if found is not None else self.tok.encode(literal, add_special_tokens=False).ids


_CONTROL: dict[int, _Control] = {}  # id(tokenizer) -> its _Control; the entry keeps the tokenizer alive
_CONTROL_LOCK = threading.Lock()  # the server encodes from several threads
_NAMES_ATTR = "chatfoundry_special_names"
_SURROGATE = re.compile("[\ud800-\udfff]")
CALL_TOKEN = SPECIAL_TOKENS["tool"]


def _spelled(plain: Tokenizer, literal: str, controls: set[int], unk: int | None) -> list[int]:
    """A control token's literal as text. WordPiece and Unigram vocabularies hold the specials
    as pieces too, so a plain encoding can still give the control id: then each character is
    encoded on its own (no piece of one character is a control token's; if one is, <|unk|>)."""
    ids = plain.encode(literal, add_special_tokens=False).ids
    if controls.isdisjoint(ids):
        return ids
    ids = [i for c in literal for i in plain.encode(c, add_special_tokens=False).ids]
    return [i for i in (unk if i in controls else i for i in ids) if i is not None]


def _control(tok: Tokenizer) -> _Control:
    """The _Control of `tok`, built once (a copy of the tokenizer that does not parse special
    tokens spells each literal out; the copy is dropped, the ids stay)."""
    size = tok.get_vocab_size(with_added_tokens=True)
    hit = _CONTROL.get(id(tok))
    if hit is not None and hit.tok is tok and hit.size == size:
        return hit
    specials = sorted({t.content for t in tok.get_added_tokens_decoder().values() if t.special}, key=len, reverse=True)
    literals = {}
    if specials:
        plain = Tokenizer.from_str(tok.to_str())
        plain.encode_special_tokens = True
        controls = {tok.token_to_id(s) for s in specials} - {special_id(tok, "unk")}
        literals = {s: _spelled(plain, s, controls, special_id(tok, "unk")) for s in specials}
    split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
    control = _Control(tok, size, literals, split, tok.token_to_id(CALL_TOKEN))
    with _CONTROL_LOCK:
        if len(_CONTROL) >= 16:  # a few tokenizers live in a process; drop the oldest entry
            _CONTROL.pop(next(iter(_CONTROL)))
        _CONTROL[id(tok)] = control
    return control
