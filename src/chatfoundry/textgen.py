"""Text in, text out over `generation` (which works on token ids): streaming and stop strings.

A byte-level token can end in the middle of a UTF-8 character, and the tail of the text can be
the start of a stop string. So a stream decodes the whole continuation after every token and
hands out only what is new and safe: it holds back text that ends in an incomplete character
(decoded as U+FFFD) or that could still grow into a stop string, and ends before a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, sample, stream
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import replace_surrogates, special_id


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _borders(stop: str) -> list[int]:
    """Knuth-Morris-Pratt's table: borders[i] is the length of the longest proper prefix of
    stop[:i + 1] that is also a suffix of it."""
    borders, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = borders[k - 1]
        if stop[i] == stop[k]:
            k += 1
        borders[i] = k
    return borders


def _could_become_stop(text: str, stops: Sequence[str], borders: Sequence[list[int]]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string: one
    KMP pass over the last len(stop) - 1 characters per stop, so O(len(stop)) a token (comparing
    the tail with every prefix was O(len(stop)^2), seconds a token for a long stop string)."""
    longest = 0
    for stop, table in zip(stops, borders):
        k = 0  # the stop's prefix matched so far; the tail is too short to match it whole
        for c in text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else "":
            while k and c != stop[k]:
                k = table[k - 1]
            if c == stop[k]:
                k += 1
        longest = max(longest, k)
    return longest


@dataclass
class TextStream:
    """Token ids in, printable text out: `push(id)` returns the new text that is safe to show."""

    tokenizer: object
    stops: Sequence[str] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already handed out
    stopped: bool = False
    borders: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.borders = [_borders(s) for s in self.stops]

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._text()
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        if text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            return ""
        return self._emit(text[:len(text) - _could_become_stop(text, self.stops, self.borders)])

    def flush(self) -> str:
        """What was held back, once generation has ended."""
        text = self._text()
        cut = _first_stop(text, self.stops)
        return self._emit(text if cut is None else text[:cut])

    def _emit(self, upto: str) -> str:
        new = upto[self.sent:] if len(upto) > self.sent else ""
        self.sent = max(self.sent, len(upto))
        return new


def prompt_ids(tokenizer, prompt: str, context: int, field_name: str = "prompt") -> list[int]:
    """The prompt's ids (an empty prompt starts a fresh document after the end-of-text token)."""
    # a raw prompt: the writer controls the whole text, so control-token literals are tokens here
    ids = tokenizer.encode(replace_surrogates(prompt), add_special_tokens=False).ids if prompt else []
    ids = ids or [special_id(tokenizer, "eos") or 0]
    if len(ids) >= context:
        raise UserError(f"{field_name}: {len(ids)} tokens leave no room in the model's context of {context}")
    return ids


def stream_text(model: DecoderLM, tokenizer, ids: list[int], cfg: GenerationConfig,
                stops: Sequence[str] = ()) -> Iterator[tuple[str, int, float]]:
    """(new text, token id, logprob) per generated token until EOS, a stop string or the limit;
    a last ("", -1, 0.0) may carry text held back to the end."""
    text = TextStream(tokenizer, [s for s in stops if s])
    for token, logprob in stream(model, ids, cfg):
        yield text.push(token), token, logprob
        if text.stopped:
            return
    rest = text.flush()
    if rest:
        yield rest, -1, 0.0


def complete(model: DecoderLM, tokenizer, ids: list[int], cfg: GenerationConfig,
             stops: Sequence[str] = (), on_text: Callable[[str], None] | None = None) -> dict:
    """One continuation as `chatfoundry generate --json` reports it; text ends before a stop string.
    `on_text` receives each new piece of text as it is decoded (for streaming to a terminal)."""
    pieces, tokens, logprobs = [], [], []
    for piece, token, logprob in stream_text(model, tokenizer, ids, cfg, stops):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
        if token >= 0:
            tokens.append(token)
            logprobs.append(logprob)
    return {"text": "".join(pieces), "prompt_token_ids": ids, "token_ids": tokens, "logprobs": logprobs}


def generate_text(model: DecoderLM, tokenizer, prompt: str, n: int, max_new_tokens: int, temperature: float,
                  top_k: int, seed: int) -> list[str]:
    """`n` sampled continuations of `prompt` (greedy at temperature 0), as text."""
    if n == 0:
        return []
    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    outs = sample(model, ids, max_new_tokens, n, temperature, top_k or None, special_id(tokenizer, "eos"), gen)
    model.train(was_training)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
