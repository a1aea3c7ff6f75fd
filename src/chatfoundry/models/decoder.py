"""The decoder-only Transformer (GPT): one module, three flavours.

GPT-2 flavour: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
GPT-NeoX flavour: GPT-2's block with rotary positions (the pretraining default).
Llama flavour: rotary positions, RMSNorm, SwiGLU, no biases, grouped-query attention.
Every choice is a field of `DecoderConfig`, so the flavours are just presets and any mix
(sinusoidal positions with RMSNorm, multi-query GPT-2, ...) is one override away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatfoundry.config import require
from chatfoundry.models.layers import MLP, Attention, KVCache, make_norm, rotary_tables, sinusoidal_table

FLAVOURS = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5),
    "neox": dict(pos="rope", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True, norm_eps=1e-6),
}

# Sizes by name: (n_layer, n_head, n_embd, block_size). Parameter counts depend on the vocabulary.
PRESETS = {
    "micro": (4, 4, 64, 128),     # ~0.3M: a size below the default, for comparisons across sizes (`cot`)
    "tiny": (4, 4, 128, 128),     # ~1M parameters with a 2k vocabulary: the CPU default
    "mini": (6, 8, 256, 256),     # ~7M: the throughput benchmark's size
    "small": (8, 8, 512, 512),    # ~30M
    "gpt2": (12, 12, 768, 1024),  # 124M with GPT-2's 50257 vocabulary
    "1b": (16, 32, 2048, 2048),   # 0.85B with a 50k vocabulary (Llama 3.2 1B's depth and width): for FSDP
}


@dataclass
class DecoderConfig:
    """Everything that shapes the network. Defaults are the `tiny` GPT-2-flavour preset."""

    PRESET_KEYS = ("preset", "flavour")  # applied before other overrides (see config.build_config)

    preset: str = "tiny"  # size by name (micro, tiny, mini, small, gpt2, 1b): sets n_layer, n_head, n_embd, block_size
    # sets pos, norm, mlp, bias, tie_embeddings and norm_eps (FLAVOURS); llama: n_kv_head = n_head / 2
    flavour: Literal["gpt2", "neox", "llama"] = "gpt2"
    vocab_size: int = 0  # 0: the tokenizer's size
    block_size: int = 128  # the longest context the model handles
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention (query) heads; must divide n_embd
    n_kv_head: int = 4  # < n_head: grouped-query attention; 1: multi-query
    n_embd: int = 128  # width of the embeddings and the residual stream
    intermediate_size: int = 0  # 0: 4 * n_embd for GELU, ~8/3 * n_embd for SwiGLU (same parameter count)
    pos: Literal["learned", "sinusoidal", "rope"] = "learned"  # positions: a learned table, fixed sinusoids or rotary
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # before each sublayer and after the last block
    # feed-forward: GELU's tanh approximation (GPT-2's), exact GELU (GPT-NeoX's own) or gated SwiGLU
    mlp: Literal["gelu", "gelu_exact", "swiglu"] = "gelu"
    bias: bool = True  # biases in the linear layers and LayerNorms
    qkv_bias: bool = False  # q/k/v projections biased even when `bias` is off (Qwen2)
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, in training only
    rope_theta: float = 10000.0  # base of the rotary frequencies (pos=rope); larger stretches the longest wavelength
    norm_eps: float = 1e-5  # added to the variance (or mean square) in every norm

    @classmethod
    def from_preset(cls, preset: str = "tiny", flavour: str = "gpt2") -> "DecoderConfig":
        require(preset in PRESETS, "model.preset", f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        require(flavour in FLAVOURS, "model.flavour", f"unknown flavour {flavour!r}; one of {', '.join(FLAVOURS)}")
        n_layer, n_head, n_embd, block = PRESETS[preset]
        # Llama flavour: two query heads share each key/value head (grouped-query attention).
        n_kv_head = n_head // 2 if flavour == "llama" else n_head
        return cls(preset=preset, flavour=flavour, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                   n_embd=n_embd, block_size=block, **FLAVOURS[flavour])

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    def validate(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            require(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.vocab_size >= 0, "model.vocab_size", f"must be >= 0, got {self.vocab_size}")
        require(self.intermediate_size >= 0, "model.intermediate_size", "must be >= 0")
        require(self.n_embd % self.n_head == 0, "model.n_embd",
                f"{self.n_embd} is not divisible by model.n_head {self.n_head}")
        require(self.n_head % self.n_kv_head == 0, "model.n_kv_head",
                f"{self.n_kv_head} does not divide model.n_head {self.n_head}")
        require(self.pos != "rope" or self.head_dim % 2 == 0, "model.pos", "rope needs an even head dimension")
        require(self.pos != "sinusoidal" or self.n_embd % 2 == 0, "model.pos", "sinusoidal needs an even n_embd")
        require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.rope_theta > 0, "model.rope_theta", "must be > 0")
        require(self.norm_eps > 0, "model.norm_eps", "must be > 0")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.self_attn = Attention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.bias, cfg.dropout, qkv_bias=cfg.qkv_bias)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.ffn_dim, cfg.mlp, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, layer=0, mask=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rope, cache, layer, mask))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class DecoderLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab); a softmax away from probabilities.

    With `lm_head=False` it is the body alone, hidden states (B, T, n_embd) through
    `hidden_states`: what the reward and value models put their scalar head on (models/heads.py).
    """

    def __init__(self, cfg: DecoderConfig, lm_head: bool = True):
        super().__init__()
        assert cfg.vocab_size > 0, "set vocab_size (the tokenizer's size) before building the model"
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.embed_positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        else:
            cos, sin = rotary_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False) if lm_head else None
        # Prompt tuning's soft prompt (n, n_embd), None without: see hidden_states and adapters.py.
        self.register_parameter("prompt", None)
        if lm_head and cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink its output
        # projection by sqrt(2 * n_layer) to keep the stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position; with targets also the mean cross-entropy (ignore_index -100).
        The other arguments are those of `hidden_states`."""
        logits = self.lm_head(self.hidden_states(idx, cache, key_mask, segments))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """The final (normed) hidden state of every position, (B, T, n_embd).

        With a cache, `idx` holds the positions [cache.pos, cache.pos + T); the caller advances
        cache.pos afterwards. `key_mask` (B, cache.pos + T) bool marks real tokens in a
        left-padded batch: positions then count each row's real tokens only, and no query
        attends to padding. `segments` (B, T) int marks packed sequences (no cache): a token sees
        only earlier tokens of its own segment, and positions restart at each segment.

        A soft `prompt` (prompt tuning, Lester et al. 2021) is n learned input embeddings before
        every sequence, as peft puts them: they hold positions 0..n-1 and the cache's first n
        columns, while `idx`, `cache.pos`, `key_mask`, the output and `config.block_size` (which
        adapters.add_prompt lowers by n) count the real tokens only, so no caller changes.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x = self.embed_tokens(idx)
        n = 0 if self.prompt is None else self.prompt.shape[0]
        first = n if start == 0 else 0  # the soft prompt's outputs, dropped at the end
        if n:
            if segments is not None:
                raise ValueError("a soft prompt goes before one sequence, not before each packed one")
            if key_mask is not None:
                key_mask = F.pad(key_mask, (n, 0), value=True)
            if first:  # a new sequence: the soft prompt first
                x, T = torch.cat([self.prompt.to(x.dtype).expand(B, -1, -1), x], dim=1), T + n
            else:
                start += n
        queries = torch.arange(start, start + T, device=idx.device)
        positions, mask = queries, None
        if key_mask is not None:
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
            keys = torch.arange(start + T, device=idx.device)
            causal = keys[None, :] <= queries[:, None]
            itself = keys[None, :] == queries[:, None]
            # A padding query sees only itself: softmax stays finite, and no real token sees it.
            mask = ((causal & key_mask[:, None, :]) | itself)[:, None]
        if segments is not None:
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            positions = queries - torch.where(starts, queries, 0).cummax(dim=-1).values
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]
        rope = None
        if self.config.pos == "learned":
            x = x + self.embed_positions(positions)
        elif self.config.pos == "sinusoidal":
            x = x + self.sinusoids[positions]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rope = (cos[:, None], sin[:, None]) if positions.dim() == 2 else (cos, sin)  # (B, 1, T, d): per row
        x = self.drop(x)
        if n and cache is not None:
            caller_pos, cache.pos = cache.pos, start  # the layers write past the soft prompt's columns
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache, i, mask)
        if n and cache is not None:
            cache.pos = caller_pos
        return self.norm(x[:, first:] if first else x)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        cfg = self.config
        n = 0 if self.prompt is None else self.prompt.shape[0]  # the soft prompt's columns
        return KVCache.allocate(cfg.n_layer, batch, cfg.n_kv_head, (max_len or cfg.block_size) + n, cfg.head_dim,
                                p.device, p.dtype)


# ---------------------------------------------------------------- size and cost


def num_params(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: DecoderConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), the PaLM appendix B way.

    6 per weight of every matmul (2 forward, 4 backward), the LM head included, plus the
    attention scores and weighted sum, 12 * n_layer * n_embd * T at sequence length T.
    Embedding lookups and norms are not matmuls and are left out.
    """
    d, f, T = cfg.n_embd, cfg.ffn_dim, seq_len or cfg.block_size
    kv = cfg.n_kv_head * cfg.head_dim
    attn = d * d * 2 + d * kv * 2  # q, o and k, v projections
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    matmul_weights = cfg.n_layer * (attn + mlp) + d * cfg.vocab_size
    return 6 * matmul_weights + 12 * cfg.n_layer * d * T
