"""Text in, vectors and filled-in blanks out: the encoder's side of what textgen.py is for decoders.

Every text becomes [CLS] tokens [SEP] (BERT's input; our tokenizers add no specials themselves),
cut to the model's context, and a batch is right-padded with [PAD] and a key mask.
"""

from __future__ import annotations

import json

import torch

from chatfoundry.errors import UserError
from chatfoundry.models.encoder import pool
from chatfoundry.tokenizer import encode_batch_ids, encoder_ids

MASK = "[MASK]"  # what a user writes for a blank, whatever the tokenizer calls its mask token


def encode_texts(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """[CLS] ids [SEP] per text, cut to max_len; returns the rows and how many were cut."""
    ids = encoder_ids(tokenizer)
    if ids["cls"] is None or ids["sep"] is None:
        raise UserError("tokenizer: has no [CLS]/[SEP] tokens (chatfoundry's use <|bos|> and <|eos|>)")
    rows, cut = [], 0
    for body in encode_batch_ids(tokenizer, texts):
        if len(body) + 2 > max_len:
            body, cut = body[:max_len - 2], cut + 1
        rows.append([ids["cls"], *body, ids["sep"]])
    return rows, cut


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, key_mask), right-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    key_mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, key_mask


def _pad_id(tokenizer) -> int:
    pad = encoder_ids(tokenizer)["pad"]
    return 0 if pad is None else pad


@torch.no_grad()
def embed_texts(body, tokenizer, texts: list[str], pooling: str = "mean", batch_size: int = 64) -> torch.Tensor:
    """(len(texts), hidden_size) sentence vectors from an Encoder: the mean of each text's final
    hidden states over its tokens ([CLS] and [SEP] included), or its [CLS] hidden state."""
    device = body.embed_tokens.weight.device
    rows, _ = encode_texts(tokenizer, texts, body.config.max_position_embeddings)
    out = []
    for start in range(0, len(rows), batch_size):
        ids, key_mask = pad_rows(rows[start:start + batch_size], _pad_id(tokenizer))
        ids, key_mask = ids.to(device), key_mask.to(device)
        out.append(pool(body(ids, key_mask), key_mask, pooling).float().cpu())
    return torch.cat(out)


def _absorbs_space(tokenizer) -> bool:
    """Whether a word's token carries its leading space (byte-level BPE's "Ġword", Unigram's
    "▁word"); then the space before [MASK] belongs to the hidden word, as RoBERTa's <mask> takes it."""
    pre = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    return bool(kinds & {"ByteLevel", "Metaspace"})


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5, where: str = "--text") -> list[list[dict]]:
    """For each [MASK] in `text`, the top_k tokens an EncoderLM puts there: token, token_id, prob."""
    ids = encoder_ids(tokenizer)
    if MASK not in text:
        raise UserError(f"{where}: has no {MASK} to fill (e.g. \"Paris is the capital of {MASK}.\")")
    if ids["mask"] is None:
        raise UserError("tokenizer: has no mask token")
    pieces = text.split(MASK)
    if _absorbs_space(tokenizer):
        pieces = [p.rstrip(" ") if i < len(pieces) - 1 else p for i, p in enumerate(pieces)]
    encoded = encode_batch_ids(tokenizer, pieces)
    body = encoded[0]
    for piece in encoded[1:]:
        body += [ids["mask"], *piece]
    row = [ids["cls"], *body, ids["sep"]]
    limit = model.config.max_position_embeddings
    if len(row) > limit:
        raise UserError(f"{where}: {len(row)} tokens with [CLS] and [SEP], more than the model's {limit}")
    device = model.lm_head.weight.device
    logits, _ = model(torch.tensor([row], device=device))
    positions = [i for i, t in enumerate(row) if t == ids["mask"]]
    probs = logits[0, positions].float().softmax(-1).cpu()
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[{"token": tokenizer.decode([i], skip_special_tokens=False).strip(), "token_id": i, "prob": round(p, 6)}
             for p, i in zip(values.tolist(), indices.tolist())] for values, indices in zip(top.values, top.indices)]
