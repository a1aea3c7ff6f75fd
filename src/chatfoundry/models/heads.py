"""A scalar head on the decoder's body: the reward model, and PPO's value model made from it.

The body is the language model's (initialised from the SFT checkpoint, as InstructGPT does);
the vocabulary projection gives way to one linear map from a hidden state to a number. The
reward of a response is that number at its last token; a value model reads it at every token.
Weights are named as transformers' `...ForSequenceClassification` with num_labels 1: the body
plus `score`, a bias-free Linear(n_embd, 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from chatfoundry.models.decoder import DecoderConfig, DecoderLM


class RewardModel(nn.Module):
    """Token ids (B, T) -> a scalar per position (B, T); `rewards` reads each row's last token."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.body = DecoderLM(cfg, lm_head=False)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (cfg.n_embd + 1) ** 0.5)  # unit-scale rewards at the start
        # Added to every output; normalisation sets it. Written to config.json, since transformers'
        # `score` has no bias; an export folds it into the weights where it can (`fold_offset`).
        self.offset = 0.0
        self.normalization: dict = {}  # how `offset` was set: mean and std of the raw rewards, and on what

    @classmethod
    def from_lm(cls, lm: DecoderLM) -> "RewardModel":
        """The language model's body (copied) with a fresh scalar head."""
        model = cls(lm.config)
        body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        model.body.load_state_dict(body)
        return model.to(lm.embed_tokens.weight.device)

    def forward(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """The head's output at every position (a left-padded batch passes `key_mask`, a packed one
        `segments`, as DecoderLM.hidden_states)."""
        hidden = self.body.hidden_states(idx, key_mask=key_mask, segments=segments)
        return self.score(hidden).squeeze(-1).float() + self.offset

    def rewards(self, idx: torch.Tensor, last: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the output at position last[b] of each row: the response's final token."""
        return self(idx, key_mask).gather(1, last[:, None]).squeeze(1)

    @torch.no_grad()
    def fold_offset(self) -> bool:
        """Move `offset` into the weights where transformers will see it: into the bias of the
        LayerNorm before the head (w . (h + d) = w . h + offset for d = offset * w / |w|^2). An
        RMSNorm has no bias; then the offset stays (returns False)."""
        norm_bias = getattr(self.body.norm, "bias", None)
        if norm_bias is None:
            return not self.offset
        w = self.score.weight[0]
        norm_bias.add_(self.offset * w / w.pow(2).sum())
        self.offset = 0.0
        return True
