"""Masked-LM pretraining (BERT): hide some tokens, predict them from both sides.

`chatfoundry pretrain --objective mlm` runs the pretraining stage (corpus, tokenizer, shards,
loop: train/pretrain.py) with the pieces here in place of next-token prediction:

    random windows of the token stream -> [CLS] window [SEP]    (documents inside a window are
                                                                 already split by <|eos|> = [SEP])
      -> choose 15% of the non-special tokens; of those, 80% become [MASK], 10% a random token,
         10% stay as they are; the loss is cross-entropy on the chosen tokens only (labels -100
         elsewhere)
      -> EncoderLM (models/encoder.py)

Why not [MASK] everywhere: finetuning and embedding never show [MASK], so the model must also
build good vectors for visible tokens; the random and unchanged 10%s make every token a possible
question. Held-out scoring masks every chosen token (a fill-in-the-blank test) and compares the
masked-token accuracy with the unigram baseline (always guess the training text's most frequent
token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from chatfoundry.config import require
from chatfoundry.data.shards import BlockSampler
from chatfoundry.errors import UserError
from chatfoundry.tokenizer import encoder_ids


@dataclass
class MLMConfig:
    mask_prob: float = 0.15  # share of (non-special) tokens the model must predict
    mask_token_prob: float = 0.8  # of those: replaced by [MASK]
    random_token_prob: float = 0.1  # of those: replaced by a random token (the rest are left as they are)

    def validate(self) -> None:
        require(0 < self.mask_prob < 1, "mlm.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        for name in ("mask_token_prob", "random_token_prob"):
            require(0 <= getattr(self, name) <= 1, f"mlm.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        require(self.mask_token_prob + self.random_token_prob <= 1, "mlm.random_token_prob",
                "mlm.mask_token_prob + mlm.random_token_prob must be <= 1")


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: list[int], mask_prob: float = 0.15,
                mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for a batch of token ids: BERT's corruption.

    Each token that is not special ([CLS], [SEP], [PAD]) is chosen with probability mask_prob;
    a chosen token becomes [MASK] with probability mask_token_prob, a uniformly random token with
    random_token_prob, else stays. labels hold the original id at chosen positions, -100 elsewhere.
    """
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & ~torch.isin(ids, torch.tensor(special_ids))
    labels = torch.where(chosen, ids, -100)
    how = torch.rand(ids.shape, generator=generator)  # one draw decides [MASK] / random / unchanged
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (how < mask_token_prob), mask_id, ids)
    swap = chosen & (how >= mask_token_prob) & (how < mask_token_prob + random_token_prob)
    return torch.where(swap, random_ids, inputs), labels


class MaskedLM:
    """The MLM objective for the pretraining stage: rows from the token stream, corruption, loss,
    held-out scoring and the unigram baseline."""

    def __init__(self, cfg: MLMConfig, tokenizer, train_tokens: np.ndarray, val_tokens: np.ndarray, block: int,
                 seed: int):
        ids = encoder_ids(tokenizer)
        missing = [role for role in ("cls", "sep", "mask") if ids[role] is None]
        if missing:
            raise UserError(f"tokenizer: has no {', '.join('[' + m.upper() + ']' for m in missing)} token for "
                            "masked-LM pretraining (chatfoundry's tokenizers do: <|bos|>, <|eos|>, <|mask|>)")
        require(block >= 4, "train.block_size", f"{block} leaves no room for text between [CLS] and [SEP]")
        self.cfg, self.block, self.seed = cfg, block, seed
        self.cls, self.sep, self.mask = ids["cls"], ids["sep"], ids["mask"]
        self.specials = sorted({i for i in (ids["cls"], ids["sep"], ids["pad"], ids["mask"]) if i is not None})
        self.vocab = tokenizer.get_vocab_size()
        self.val_tokens = val_tokens
        # BlockSampler(data, n) draws n + 1 tokens: the window between [CLS] and [SEP].
        self.sampler = BlockSampler(train_tokens, block - 3, seed)
        counts = np.bincount(np.asarray(train_tokens), minlength=self.vocab).astype(np.float64)
        counts[self.specials] = 0  # specials are never asked for
        self.unigram_logp = torch.from_numpy(np.log((counts + 1) / (counts + 1).sum())).float()  # add-one
        self.most_frequent = int(counts.argmax())

    def rows(self, windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        return torch.cat([torch.full((n, 1), self.cls), windows, torch.full((n, 1), self.sep)], dim=1)

    def corrupt(self, rows: torch.Tensor, generator: torch.Generator | None = None,
                mask_token_prob: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return mask_tokens(rows, self.mask, self.vocab, self.specials, c.mask_prob,
                           c.mask_token_prob if mask_token_prob is None else mask_token_prob,
                           c.random_token_prob if mask_token_prob is None else 0.0, generator)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n training rows, corrupted with torch's global RNG (saved in the trainer state: resume is exact)."""
        return self.corrupt(self.rows(self.sampler.sample(n)))

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        inputs, labels = batch
        return model(inputs, labels)[1]

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, batches: int, device) -> dict[str, float]:
        """Loss and accuracy on held-out windows with every chosen token shown as [MASK]; the same
        windows and choices at every evaluation (fixed seeds), and the unigram baseline on them."""
        windows = BlockSampler(self.val_tokens, self.block - 3, self.seed + 1)
        gen = torch.Generator().manual_seed(self.seed + 1)
        loss = correct = base_loss = base_correct = count = 0.0
        for _ in range(batches):
            inputs, labels = self.corrupt(self.rows(windows.sample(batch_size)), gen, mask_token_prob=1.0)
            logits, batch_loss = model(inputs.to(device), labels.to(device))
            targets = labels[labels != -100]
            n = len(targets)
            loss += batch_loss.item() * n
            correct += (logits.argmax(-1).cpu() == targets).sum().item()
            base_loss -= self.unigram_logp[targets].sum().item()
            base_correct += (targets == self.most_frequent).sum().item()
            count += n
        count = max(count, 1)
        return {"val_loss": loss / count, "val_ppl": math.exp(min(loss / count, 50.0)),
                "val_accuracy": correct / count, "unigram_loss": base_loss / count,
                "unigram_accuracy": base_correct / count}
