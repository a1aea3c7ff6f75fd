"""The encoder-decoder Transformer (T5): an encoder reads the input, a decoder writes the output.

    input ids  -> embed -> encoder blocks (bidirectional self-attention, MLP) -> final norm -> memory
    output ids -> embed -> decoder blocks (causal self-attention, cross-attention to the memory,
                  MLP) -> final norm -> lm_head -> next-token logits

As T5 has it: pre-norm RMSNorm blocks without biases; no position embeddings, but a learned bias
added to the attention scores per head and per *bucket* of key-minus-query offset, computed by
each stack's first layer and shared by all its layers (bidirectional buckets in the encoder,
past-only in the decoder; none in cross-attention); attention scores are not scaled by
1/sqrt(d) (T5 folds that into its initialisation); one embedding shared by encoder, decoder
and (tied, T5 v1.0) the output projection, whose input is then scaled by d_model ** -0.5.
Feed-forward: T5 v1.0's ReLU MLP or v1.1's gated GELU. Attention, norms and MLPs are the
decoder's own layers (layers.py).

Generation drives this model through `bind(inputs)`: the encoder runs once and the result is
an object with the decoder-only contract generation.py knows (forward(idx, cache), new_cache,
config.block_size), so greedy, beam search and sampling run unchanged. Its cache holds the
decoder's self-attention keys and values, growing one token per step, and the cross-attention
keys and values, computed once from the encoder's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatfoundry.config import require
from chatfoundry.models.layers import MLP, Attention, KVCache, RMSNorm

# Sizes by name: (num_layers per stack, num_heads, d_model, d_kv, d_ff, block_size).
PRESETS = {
    "tiny": (3, 4, 128, 32, 256, 128),  # ~1.4M parameters with a char vocabulary: the CPU default
    "mini": (4, 8, 256, 32, 640, 256),
    "small": (8, 6, 512, 64, 1024, 512),  # T5 v1.1 small's shape (77M with its 32k vocabulary)
}


@dataclass
class Seq2SeqConfig:
    """Everything that shapes the network; field names are transformers' T5Config's."""

    PRESET_KEYS = ("preset",)

    preset: str = "tiny"  # size by name (tiny, mini, small): layers, num_heads, d_model, d_kv, d_ff, block_size
    vocab_size: int = 0  # 0: the tokenizer's size
    block_size: int = 128  # longest input and output in use (the generation cache); positions have no limit
    d_model: int = 128  # width of the embeddings and hidden states
    d_kv: int = 32  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 256  # hidden width of each feed-forward block
    num_layers: int = 3  # encoder blocks
    num_decoder_layers: int = 3  # decoder blocks
    num_heads: int = 4  # heads of every self- and cross-attention layer
    relative_attention_num_buckets: int = 32  # key-query offset buckets, a learned bias per head each
    relative_attention_max_distance: int = 128  # offsets this far or farther share the last bucket
    feed_forward_proj: Literal["relu", "gated-gelu"] = "gated-gelu"  # T5 v1.0 / v1.1
    tie_word_embeddings: bool = True  # lm_head = the shared embedding, its input scaled by d_model ** -0.5
    dropout_rate: float = 0.0  # on embeddings, attention weights and residual branches, in training only
    layer_norm_epsilon: float = 1e-6  # added to the mean square in every RMSNorm
    decoder_start_token_id: int = 0  # the decoder's first input (T5: the pad id)
    # Learning-rate multiplier of the relative position bias. Adam moves every weight by about lr
    # a step; matrices live at ~0.05 but a bias must reach ~5 to make attention positional (the
    # only position signal T5 has). At 1x the bias barely moves in 1,000 steps (max 0.19 after
    # 600 steps at lr 3e-3): the encoder stays a bag of characters, span corruption stalls at
    # the unigram loss and reversal is not learned.
    position_bias_lr_scale: float = 10.0

    @classmethod
    def from_preset(cls, preset: str = "tiny") -> "Seq2SeqConfig":
        require(preset in PRESETS, "seq2seq.preset", f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        layers, heads, d_model, d_kv, d_ff, block = PRESETS[preset]
        return cls(preset=preset, num_layers=layers, num_decoder_layers=layers, num_heads=heads, d_model=d_model,
                   d_kv=d_kv, d_ff=d_ff, block_size=block)

    @property
    def mlp(self) -> str:
        return "geglu" if self.feed_forward_proj == "gated-gelu" else "relu"

    def validate(self) -> None:
        for name in ("block_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            require(getattr(self, name) > 0, f"seq2seq.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.vocab_size >= 0, "seq2seq.vocab_size", f"must be >= 0, got {self.vocab_size}")
        require(self.relative_attention_num_buckets >= 4, "seq2seq.relative_attention_num_buckets",
                "must be >= 4 (half exact, half logarithmic, in each direction)")
        require(self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
                "seq2seq.relative_attention_max_distance", "must exceed the exact buckets (num_buckets / 4)")
        require(0.0 <= self.dropout_rate < 1.0, "seq2seq.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        require(self.layer_norm_epsilon > 0, "seq2seq.layer_norm_epsilon", "must be > 0")
        require(self.position_bias_lr_scale > 0, "seq2seq.position_bias_lr_scale",
                f"must be > 0, got {self.position_bias_lr_scale}")
        require(0 <= self.decoder_start_token_id and (not self.vocab_size or self.decoder_start_token_id < self.vocab_size),
                "seq2seq.decoder_start_token_id", f"{self.decoder_start_token_id} is not a token id")


# ---------------------------------------------------------------- relative position bias


def relative_position_bucket(offset: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket for each key-minus-query offset.

    Near offsets get a bucket each; farther ones share buckets whose widths grow
    logarithmically up to `max_distance`; everything beyond falls in the last bucket. The
    encoder (bidirectional) spends half its buckets on keys after the query and half on keys
    before it; the decoder sees no keys after the query, so all its buckets describe the past.
    """
    bucket = torch.zeros_like(offset)
    if bidirectional:
        num_buckets //= 2
        bucket = (offset > 0).long() * num_buckets  # keys after the query: the upper half
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)  # how far back the key is; later keys count as 0 (masked anyway)
    exact = num_buckets // 2
    # Log-spaced: distance `exact` maps to bucket `exact`, distance max_distance to num_buckets.
    log_scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_scaled * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


# ---------------------------------------------------------------- blocks and stacks


class Block(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention (decoder only), MLP."""

    def __init__(self, cfg: Seq2SeqConfig, cross: bool):
        super().__init__()

        def attention():
            return Attention(cfg.d_model, cfg.num_heads, cfg.num_heads, False, cfg.dropout_rate,
                             head_dim=cfg.d_kv, scale=1.0)

        self.self_attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = attention()
        if cross:
            self.cross_attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
            self.cross_attn = attention()
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, bias=False)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, bias, cache=None, layer=0, cross_kv=None, cross_bias=None):
        x = x + self.drop(self.self_attn(self.self_attn_norm(x), cache=cache, layer=layer, mask=bias))
        if cross_kv is not None:
            x = x + self.drop(self.cross_attn(self.cross_attn_norm(x), mask=cross_bias, kv=cross_kv))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention)."""

    def __init__(self, cfg: Seq2SeqConfig, decoder: bool):
        super().__init__()
        self.config, self.is_decoder = cfg, decoder
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.layers = nn.ModuleList(Block(cfg, cross=decoder) for _ in range(n))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def position_bias(self, start: int, T: int, S: int, device) -> torch.Tensor:
        """(1, heads, T, S): the learned bias of queries start .. start + T - 1 over keys 0 .. S - 1;
        in the decoder -inf where a key comes after its query."""
        queries = torch.arange(start, start + T, device=device)
        offset = torch.arange(S, device=device)[None, :] - queries[:, None]
        cfg = self.config
        buckets = relative_position_bucket(offset, not self.is_decoder, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]
        if self.is_decoder:
            bias = bias.masked_fill(offset > 0, float("-inf"))
        return bias

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                cross_kv: list | None = None, cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: embedded tokens (B, T, d_model). Encoder: `key_mask` (B, T) bool marks real tokens.
        Decoder: `cross_kv` per layer and `cross_bias` (B, 1, 1, S) hiding the encoder's padding;
        with a cache, x holds positions cache.pos .. cache.pos + T - 1 (the caller advances pos)."""
        T = x.shape[1]
        start = cache.pos if cache is not None else 0
        bias = self.position_bias(start, T, start + T, x.device)  # once, shared by every layer
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        x = self.drop(x)
        for i, block in enumerate(self.layers):
            x = block(x, bias, cache, i, cross_kv[i] if cross_kv is not None else None, cross_bias)
        return self.drop(self.final_norm(x))


# ---------------------------------------------------------------- the model


@dataclass
class Seq2SeqCache(KVCache):
    """The decoder's self-attention keys and values (KVCache), plus per layer the cross-attention
    keys and values of the encoder's output and the bias that hides its padding."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    cross_bias: torch.Tensor | None = None


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of real tokens -> (B, 1, 1, S) additive: 0 where real, -inf on padding."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))[:, None, None]


class Seq2SeqLM(nn.Module):
    """(input ids (B, S), decoder input ids (B, T)) -> next-token logits (B, T, vocab)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "set vocab_size (the tokenizer's size) before building the model"
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self._init_weights()
        for stack in (self.encoder, self.decoder):  # read by train.loop.make_optimizer
            stack.relative_attention_bias.weight.lr_scale = cfg.position_bias_lr_scale

    @torch.no_grad()
    def _init_weights(self) -> None:
        """T5's initialisation: each matrix's std is 1/sqrt(fan-in), the embedding's 1. Queries get
        a further 1/sqrt(d_kv): the 1/sqrt(d) that attention does not apply."""
        cfg = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model ** -0.5)  # logits of unit scale, as the tied head's
        for name, p in self.named_parameters():
            if name.endswith("relative_attention_bias.weight"):
                nn.init.normal_(p, std=cfg.d_model ** -0.5)
            elif name.endswith("q_proj.weight"):
                nn.init.normal_(p, std=(cfg.d_model * cfg.d_kv) ** -0.5)
            elif name.endswith(("k_proj.weight", "v_proj.weight", "o_proj.weight", "up_proj.weight",
                                "gate_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=p.shape[1] ** -0.5)

    # -- the three steps: encode, project the memory, decode

    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids (and bool mask of real tokens, for right-padded batches) -> memory (B, S, d_model)."""
        return self.encoder(self.shared(input_ids), key_mask=mask)

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values of the memory: computed once."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder.layers]

    def decode(self, ids: torch.Tensor, cross_kv: list, cross_bias: torch.Tensor | None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Decoder ids (B, T) -> logits (B, T, vocab)."""
        h = self.decoder(self.shared(ids), cache=cache, cross_kv=cross_kv, cross_bias=cross_bias)
        if self.config.tie_word_embeddings:
            h = h * self.config.d_model ** -0.5  # the shared embedding has std 1: bring logits to unit scale
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits, and with `labels` (B, T; -100 = ignore) the mean cross-entropy.
        Without decoder_input_ids the decoder reads the labels shifted right behind the start token."""
        if decoder_input_ids is None:
            decoder_input_ids = self.shift_right(labels)
        memory = self.encode(input_ids, mask)
        logits = self.decode(decoder_input_ids, self.cross_kv(memory), None if mask is None else padding_bias(mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """[start, y0, y1, ...]: the decoder's input when it learns to write y (ignored labels read as 0)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        return torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)

    def bind(self, inputs: list[list[int]]) -> "BoundDecoder":
        """Encode the inputs (any lengths) once; the result decodes like a decoder-only LM."""
        return BoundDecoder(self, inputs)


class BoundDecoder:
    """The decoder with its memory fixed: what generation.py drives. A batch of `rows` decoder
    sequences per input (beams, samples) reads that input's memory: row r reads input r // rows."""

    def __init__(self, model: Seq2SeqLM, inputs: list[list[int]]):
        if not inputs or not all(inputs):
            raise ValueError("every input must hold at least one token")
        self.model, self.config, self.lm_head = model, model.config, model.lm_head
        device = model.shared.weight.device
        width = max(len(x) for x in inputs)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=device)
        self.mask = torch.tensor([[True] * len(x) + [False] * (width - len(x)) for x in inputs], device=device)
        with torch.inference_mode():
            self.memory = model.encode(ids, self.mask)

    def new_cache(self, batch: int, max_len: int | None = None) -> Seq2SeqCache:
        n = len(self.memory)
        assert batch % n == 0, f"{batch} decoder rows for {n} inputs"
        cfg, p = self.config, self.model.shared.weight
        memory, mask = self.memory.repeat_interleave(batch // n, 0), self.mask.repeat_interleave(batch // n, 0)
        shape = (batch, cfg.num_heads, max_len or cfg.block_size, cfg.d_kv)
        with torch.inference_mode():
            cross = self.model.cross_kv(memory)
        return Seq2SeqCache([torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.num_decoder_layers)],
                            [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.num_decoder_layers)],
                            cross_kv=cross, cross_bias=padding_bias(mask))

    def __call__(self, idx: torch.Tensor, cache: Seq2SeqCache | None = None, key_mask: torch.Tensor | None = None,
                 **_) -> tuple[torch.Tensor, None]:
        if key_mask is not None and not bool(key_mask.all()):
            raise ValueError("decoder prompts must not be padded (they are the start token)")
        if cache is None:  # no cache: the whole decoder sequence at once
            cache = self.new_cache(len(idx), idx.shape[1])
        return self.model.decode(idx, cache.cross_kv, cache.cross_bias, cache), None

    def eval(self) -> "BoundDecoder":
        return self


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
