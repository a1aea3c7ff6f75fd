"""T5's pretraining objective, span corruption: drop spans of the text, learn to write them back.

    text:     Thank you for inviting me to your party last week .
    input:    Thank you <extra_id_0> me to your party <extra_id_1> week . <eos>
    target:   <extra_id_0> for inviting <extra_id_1> last <extra_id_2> <eos>

As the T5 paper (section 3.1.4): `noise_density` (0.15) of a window's tokens are dropped, in
spans of `mean_noise_span_length` (3) on average. The number of dropped tokens and of spans is
fixed by the window's length; where the spans fall and how long each is are random. The window
starts with kept text and ends with a dropped span, and each span is replaced by its own
sentinel, numbered in order. The target lists the spans, each after its sentinel, then one more
sentinel that says there are no more. Windows of one length give inputs and targets of one
length: batches need no padding.
"""

from __future__ import annotations

import numpy as np
import torch

from chatfoundry.errors import UserError

SENTINEL = "<extra_id_{}>"


def add_sentinels(tokenizer, n: int) -> list[int]:
    """Give the tokenizer the special tokens <extra_id_0> .. <extra_id_{n-1}> (those it lacks) and
    return their ids in order. Special: each is one token and decoding can skip them."""
    from tokenizers import AddedToken

    names = [SENTINEL.format(i) for i in range(n)]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in names if tokenizer.token_to_id(t) is None])
    return [tokenizer.token_to_id(t) for t in names]


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of the tokenizer's sentinels, <extra_id_0> first, as far as they go without a gap."""
    ids = []
    while (i := tokenizer.token_to_id(SENTINEL.format(len(ids)))) is not None:
        ids.append(i)
    return ids


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(tokens dropped, spans) for a window of `length` tokens: at least one of each, and at least
    one token kept."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive lengths summing to `total`, uniformly over all such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True on dropped tokens: kept, dropped, kept, dropped, ... spans."""
    noise, spans = span_counts(length, noise_density, mean_span)
    noise_lengths = _random_partition(noise, spans, rng)
    kept_lengths = _random_partition(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for kept, dropped in zip(kept_lengths, noise_lengths):
        pos += kept
        mask[pos:pos + dropped] = True
        pos += dropped
    return mask


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(input, target) of one window given its noise mask (see the module's example)."""
    inputs, targets, span = [], [], 0
    for i, (token, dropped) in enumerate(zip(tokens.tolist(), mask.tolist())):
        starts = dropped and (i == 0 or not mask[i - 1])
        if starts:
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
            span += 1
        (targets if dropped else inputs).append(token)
    return inputs + [eos], targets + [sentinels[span], eos]


def check_spans(length: int, noise_density: float, mean_span: float, sentinels: int) -> None:
    _, spans = span_counts(length, noise_density, mean_span)
    if spans + 1 > sentinels:
        raise UserError(f"span.extra_ids: {sentinels} sentinels are too few for the {spans} spans (+1 to end the "
                        f"target) of a {length}-token window; raise it or shorten train.block_size")


def span_batch(windows: torch.Tensor, noise_density: float, mean_span: float, sentinels: list[int], eos: int,
               rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Windows (B, L) of token ids -> {"input_ids", "labels"}: each window corrupted afresh."""
    pairs = [corrupt(w, noise_mask(len(w), noise_density, mean_span, rng), sentinels, eos) for w in windows.numpy()]
    return {"input_ids": torch.tensor([x for x, _ in pairs]), "labels": torch.tensor([y for _, y in pairs])}
