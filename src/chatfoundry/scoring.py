"""A reward model's score of chat responses: the chats encoded as the reward model reads them
(... <|assistant|> response <|end|>, read at that last token) and scored in batches of similar
length. The reward-model stage trains on these rows; `label`, `ppo` and `score` score with them.
A language model's log-likelihood of the same rows (`row_logprobs`) is the other score: the RM's
baseline, and calibration's probability of each option.
"""

from __future__ import annotations

import json

import torch

from chatfoundry.errors import UserError
from chatfoundry.models.heads import RewardModel
from chatfoundry.tokenizer import encode_batch_ids, encode_chat, special_id


def encode_responses(tokenizer, prompts: list[tuple[dict, ...] | list[dict]], responses: list[str],
                     block: int) -> tuple[list[list[int]], list[int], int]:
    """Token ids of each (prompt, response) as the chat it ends: ... <|assistant|> response <|end|>.
    A row longer than the context keeps its last `block` tokens. Returns (rows, where each row's
    response begins, how many rows were cut)."""
    end = special_id(tokenizer, "end")
    if end is None:
        raise UserError("tokenizer: lacks the chat token <|end|>; the reward model reads chat-format responses")
    prompt_ids = {}
    for p in prompts:
        key = json.dumps(list(p))
        if key not in prompt_ids:
            prompt_ids[key] = encode_chat(tokenizer, list(p))
    rows, starts, cut = [], [], 0
    for p, r in zip(prompts, encode_batch_ids(tokenizer, responses)):
        prompt = prompt_ids[json.dumps(list(p))]
        start, row = len(prompt), prompt + r + [end]
        if len(row) > block:
            row, start, cut = row[-block:], max(0, start - (len(row) - block)), cut + 1
        rows.append(row)
        starts.append(start)
    return rows, starts, cut


def by_length(rows: list[list[int]], pad_id: int, batch_size: int, device):
    """(row indices, right-padded idx) for batches of rows of similar length."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        yield chunk, torch.tensor([rows[i] + [pad_id] * (width - len(rows[i])) for i in chunk], device=device)


@torch.no_grad()
def score_rows(model: RewardModel, rows: list[list[int]], pad_id: int, batch_size: int = 64) -> list[float]:
    """The reward of each token row (read at its last token), batched by length."""
    device = model.score.weight.device
    out = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    for chunk, idx in by_length(rows, pad_id, batch_size, device):
        last = torch.tensor([len(rows[i]) - 1 for i in chunk], device=device)
        for i, r in zip(chunk, model.rewards(idx, last).tolist()):
            out[i] = r
    model.train(was_training)
    return out


def score_texts(model: RewardModel, tokenizer, prompts: list[list[dict]], responses: list[str],
                batch_size: int = 64) -> list[float]:
    """The reward of each response to its prompt (a conversation ending with a user message)."""
    rows, _, _ = encode_responses(tokenizer, prompts, responses, model.config.block_size)
    return score_rows(model, rows, special_id(tokenizer, "pad") or 0, batch_size)


@torch.no_grad()
def row_logprobs(lm, rows: list[list[int]], starts: list[int], pad_id: int, batch_size: int = 64) -> list[float]:
    """Each row's log-likelihood from its `start` on under a decoder LM: the sum of
    log p(token | every token before) over rows[i][starts[i]:], batched by length."""
    device = lm.embed_tokens.weight.device
    out = [0.0] * len(rows)
    was_training = lm.training
    lm.eval()
    for chunk, idx in by_length(rows, pad_id, batch_size, device):
        logits, _ = lm(idx[:, :-1])
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
        col = torch.arange(1, idx.shape[1], device=device)
        first = torch.tensor([max(starts[i], 1) for i in chunk], device=device)
        end = torch.tensor([len(rows[i]) for i in chunk], device=device)
        # Token at column c is predicted from column c - 1; a cut row's first token has no context.
        keep = (col[None] >= first[:, None]) & (col[None] < end[:, None])
        for i, v in zip(chunk, (logp * keep).sum(1).tolist()):
            out[i] = v
    lm.train(was_training)
    return out
