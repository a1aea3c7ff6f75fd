"""The encoder-only Transformer (BERT): every token sees every other token.

Next to `decoder.py` the differences are few and all visible here:

* attention is bidirectional (`Attention(causal=False)`), with a key mask for padded batches;
* the input is the sum of three embeddings, token + learned position + token type (segment A
  or B of a sentence pair), normalised by a LayerNorm;
* blocks are post-norm, as in the original Transformer: x = norm(x + attn(x)), then
  x = norm(x + mlp(x)); no final norm;
* the MLP's GELU is the exact (erf) one; GPT-2 uses the tanh approximation (`hidden_act`).

Three small modules sit on the body (`Encoder`), each a plain composition:

    EncoderLM          body + masked-LM head: dense, GELU, LayerNorm, then the token embedding
                       matrix (tied) plus a bias     -> transformers' BertForMaskedLM
    Encoder            body (+ pooler: tanh(dense(h[CLS])))                   -> BertModel
    EncoderClassifier  body + pooler + Linear(hidden, num_labels): classify (num_labels >= 2,
                       cross-entropy) or regress (num_labels 1, squared error)
                                                           -> BertForSequenceClassification

Field names of `EncoderConfig` are transformers' BertConfig names, so config.json is our
config as it is (models/hf_encoder.py maps the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatfoundry.config import require
from chatfoundry.models.layers import Attention

# Sizes by name: (num_hidden_layers, num_attention_heads, hidden_size, max_position_embeddings).
PRESETS = {
    "tiny": (2, 4, 128, 128),     # 0.69M parameters with a 2k vocabulary: the CPU default (README: Encoders)
    "mini": (4, 4, 256, 256),     # BERT-mini's shape
    "small": (4, 8, 512, 512),    # BERT-small's shape
    "base": (12, 12, 768, 512),   # BERT-base: 110M parameters with its 30522 vocabulary
}


@dataclass
class EncoderConfig:
    """Everything that shapes the encoder. Defaults are the `tiny` preset."""

    PRESET_KEYS = ("preset",)  # applied before other overrides (see config.build_config)

    preset: str = "tiny"  # size by name (tiny, mini, small, base): layers, heads, hidden_size, max_position_embeddings
    vocab_size: int = 0  # 0: the tokenizer's size
    hidden_size: int = 128  # width of the embeddings and hidden states
    num_hidden_layers: int = 2  # Transformer blocks
    num_attention_heads: int = 4  # attention heads; must divide hidden_size
    intermediate_size: int = 0  # 0: 4 * hidden_size
    max_position_embeddings: int = 128  # the longest input, [CLS] and [SEP] included
    type_vocab_size: int = 2  # segments: 0 for the first text, 1 for the second of a pair
    hidden_act: Literal["gelu", "gelu_new"] = "gelu"  # gelu: exact (erf), BERT's; gelu_new: tanh approximation
    layer_norm_eps: float = 1e-12  # added to the variance in every LayerNorm
    hidden_dropout_prob: float = 0.0  # BERT pretrained with 0.1; tiny CPU runs learn faster without
    attention_probs_dropout_prob: float = 0.0  # dropout on the attention weights, in training only
    # std of the normal init of every matrix and embedding. BERT's 0.02 suits its 768 channels; a
    # narrow post-norm model starts with attention so flat (q.k ~ std^2 * width) that MLM sits at
    # the unigram baseline for hundreds of steps before it learns to look at neighbours.
    initializer_range: float = 0.02

    @classmethod
    def from_preset(cls, preset: str = "tiny") -> "EncoderConfig":
        require(preset in PRESETS, "encoder.preset", f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        layers, heads, hidden, positions = PRESETS[preset]
        return cls(preset=preset, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden,
                   max_position_embeddings=positions)

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                     "type_vocab_size"):
            require(getattr(self, name) > 0, f"encoder.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.max_position_embeddings >= 3, "encoder.max_position_embeddings",
                "must leave room for [CLS], a token and [SEP]")
        require(self.vocab_size >= 0, "encoder.vocab_size", f"must be >= 0, got {self.vocab_size}")
        require(self.intermediate_size >= 0, "encoder.intermediate_size", "must be >= 0")
        require(self.hidden_size % self.num_attention_heads == 0, "encoder.hidden_size",
                f"{self.hidden_size} is not divisible by encoder.num_attention_heads {self.num_attention_heads}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            require(0.0 <= getattr(self, name) < 1.0, f"encoder.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        require(self.layer_norm_eps > 0, "encoder.layer_norm_eps", "must be > 0")
        require(self.initializer_range > 0, "encoder.initializer_range", "must be > 0")


def gelu(x: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    return F.gelu(x, approximate="tanh" if cfg.hidden_act == "gelu_new" else "none")


class FeedForward(nn.Module):
    """down(gelu(up x)): layers.MLP's GELU branch with BERT's exact GELU (its is GPT-2's tanh one)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_dim)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size)
        self.config = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.up_proj(x), self.config))


class EncoderBlock(nn.Module):
    """Post-norm residual block: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.self_attn = Attention(d, h, h, bias=True, dropout=cfg.attention_probs_dropout_prob, causal=False)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = FeedForward(cfg)
        self.mlp_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.self_attn(x, mask=mask)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


def init_weights(model: nn.Module, std: float) -> None:
    """BERT's init: N(0, initializer_range) for matrices and embeddings, zero biases, unit LayerNorm gains."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, hidden_size): the body every head shares.

    With `pooler=True` it also holds BERT's pooler, tanh(dense(h[CLS])), the sentence vector its
    classification head reads.
    """

    def __init__(self, cfg: EncoderConfig, pooler: bool = False):
        super().__init__()
        assert cfg.vocab_size > 0, "set vocab_size (the tokenizer's size) before building the model"
        self.config = cfg
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, d)
        self.embed_types = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = nn.Linear(d, d) if pooler else None
        init_weights(self, cfg.initializer_range)

    def forward(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` (B, T) bool marks real tokens of a padded batch (no token attends to padding);
        `token_type_ids` (B, T) the segment of each token (default 0)."""
        T = idx.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(T, device=idx.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.embed_tokens(idx) + self.embed_positions(positions) + self.embed_types(types)
        x = self.drop(self.embed_norm(x))
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B, 1, 1, T): every query alike
        for block in self.layers:
            x = block(x, mask)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler output: tanh(dense(hidden state of [CLS], the first token))."""
        return torch.tanh(self.pooler(hidden[:, 0]))


def pool(hidden: torch.Tensor, key_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """A sentence vector per row: the mean over its real tokens ("mean"), or its [CLS] hidden state ("cls")."""
    if how == "cls":
        return hidden[:, 0]
    if key_mask is None:
        return hidden.mean(1)
    weights = key_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class EncoderLM(nn.Module):
    """Masked-LM: token ids -> logits over the vocabulary at every position.

    The output matrix is the token embedding (tied, as BERT's), plus a bias per token.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.body = Encoder(cfg)
        self.head_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.head_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        init_weights(self, cfg.initializer_range)
        self.lm_head.weight = self.body.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.head_norm(gelu(self.head_dense(hidden), self.config)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Without targets: logits (B, T, vocab), loss None.

        With targets (B, T), -100 where nothing is predicted: logits (N, vocab) at the N predicted
        positions only, in row-major order, and their mean cross-entropy. MLM predicts ~15% of
        the positions, so this skips most of the vocabulary projection.
        """
        hidden = self.body(idx, key_mask, token_type_ids)
        if targets is None:
            return self.logits(hidden), None
        chosen = targets != -100
        logits = self.logits(hidden[chosen])
        return logits, F.cross_entropy(logits.float(), targets[chosen])


class EncoderClassifier(nn.Module):
    """A head on the sentence vector: num_labels >= 2 classes (logits), or 1 (a regression value).

    Reads the pooler output, as BERT's sequence classifier does; dropout before the last layer.
    """

    def __init__(self, cfg: EncoderConfig, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.body = Encoder(cfg, pooler=True)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        init_weights(self, cfg.initializer_range)
        # What the outputs mean, saved in config.json: task ("classify" or "regress"), labels
        # (class names in output order), dropout; written by `chatfoundry finetune-head`.
        self.head: dict = {"task": "classify" if num_labels > 1 else "regress", "dropout": dropout}

    @classmethod
    def from_encoder(cls, body_state: dict[str, torch.Tensor], cfg: EncoderConfig, num_labels: int,
                     dropout: float = 0.1) -> "EncoderClassifier":
        """A fresh head (and pooler, unless `body_state` has one) on a pretrained body."""
        model = cls(cfg, num_labels, dropout)
        missing, unexpected = model.body.load_state_dict(body_state, strict=False)
        assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
        return model

    def forward(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_labels) logits; for regression (B, 1) values."""
        hidden = self.body(idx, key_mask, token_type_ids)
        return self.classifier(self.drop(self.body.pooled(hidden)))


# ---------------------------------------------------------------- size and cost


def flops_per_token(cfg: EncoderConfig, seq_len: int | None = None, predicted: float = 1.0) -> int:
    """Training FLOPs per token, as decoder.flops_per_token counts them; the vocabulary projection
    (and its transform) runs on the `predicted` share of positions only (0.15 for MLM)."""
    d, f, T = cfg.hidden_size, cfg.ffn_dim, seq_len or cfg.max_position_embeddings
    body = cfg.num_hidden_layers * (4 * d * d + 2 * d * f)
    head = d * d + d * cfg.vocab_size
    return int(6 * (body + predicted * head) + 12 * cfg.num_hidden_layers * d * T)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
