"""Transformer building blocks shared by every model family.

Norms, MLPs, positions and attention. Projections keep Hugging Face's names and shapes
(q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj) and rotary embeddings use
their half-rotation layout, so converting a checkpoint is renaming, never permuting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- norms and MLPs


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class MLP(nn.Module):
    """Feed-forward block. Plain: down(act(up x)), GPT-2's "gelu" (tanh GELU), GPT-NeoX's
    "gelu_exact" (erf GELU) or T5 v1.0's "relu". Gated: down(act(gate x) * up x), Llama's "swiglu"
    (SiLU) or T5 v1.1's "geglu" (tanh GELU)."""

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool):
        super().__init__()
        assert kind in ("gelu", "gelu_exact", "relu", "swiglu", "geglu"), kind
        self.swiglu = kind in ("swiglu", "geglu")  # gated
        self.act = {"swiglu": F.silu, "relu": F.relu, "gelu_exact": F.gelu}.get(kind, _gelu_tanh)
        if self.swiglu:
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new", T5 v1.1's gated-gelu


# ---------------------------------------------------------------- positions


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The original Transformer's fixed encoding: sin on even channels, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim) in the half-rotation layout (Hugging Face, GPT-NeoX)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, d) by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# ---------------------------------------------------------------- attention and its cache


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    `pos` is the number of positions already written; `Attention` writes the new positions at
    [pos, pos + T) and attends over [0, pos + T). The caller advances `pos` after a forward pass.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0

    @classmethod
    def allocate(cls, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> "KVCache":
        shape = (batch, n_kv_head, max_len, head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_head divides n_head; 1 = multi-query).

    The math runs in `F.scaled_dot_product_attention`, which picks flash or memory-efficient
    kernels where the hardware has them. For T5: `head_dim` apart from dim / n_head, `scale` 1.0
    (T5 folds 1/sqrt(d) into its init), an additive float `mask` (the relative position bias) and
    `kv` for cross-attention.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, bias: bool, dropout: float, causal: bool = True,
                 qkv_bias: bool = False, head_dim: int | None = None, scale: float | None = None):
        super().__init__()
        assert n_head % n_kv_head == 0 and (head_dim or dim % n_head == 0)
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim or dim // n_head
        self.causal, self.dropout, self.scale = causal, dropout, scale  # scale None: 1 / sqrt(head_dim)
        self.q_proj = nn.Linear(dim, n_head * self.head_dim, bias=bias or qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_head * self.head_dim, bias=bias or qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_head * self.head_dim, bias=bias or qkv_bias)
        self.o_proj = nn.Linear(n_head * self.head_dim, dim, bias=bias)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n_kv_head, S, head_dim) of a sequence: cross-attention computes
        them once from the encoder's output and passes them to every decoding step as `kv`."""
        B, S, _ = context.shape
        k = self.k_proj(context).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`mask` (B, 1, T, S), optional: bool, which keys each query may see (padded batches), or
        float, added to the scores (T5's position bias, -inf where a key is hidden).
        `kv`: cross-attention, to these keys and values (`project_kv`) instead of x's; no cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_head != self.n_head)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        k, v = self.project_kv(x)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        is_causal = mask is None and self.causal and T > 1
        if cache is not None:
            start, end = cache.pos, cache.pos + T
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
            if is_causal and start > 0:  # new queries see the whole prefix and their own past
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                is_causal = False
        # enable_gqa: each key/value head serves its group of query heads, without copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
