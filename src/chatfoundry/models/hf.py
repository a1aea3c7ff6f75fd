"""Hugging Face names for our decoder: config.json fields and weight keys.

A checkpoint whose choices match GPT-2 (learned positions, LayerNorm, GELU, biases, tied, no GQA)
is written as `GPT2LMHeadModel`; GPT-2's block with rotary positions as `GPTNeoXForCausalLM`
(sequential residual, rotary over the whole head); one that matches Llama (rotary, RMSNorm,
SwiGLU) as `LlamaForCausalLM` (`Qwen2ForCausalLM` when only q/k/v carry biases); `transformers`
then loads our folder as it is. Other mixes (sinusoidal positions, say) are written under our
own model_type. Our full config always rides along under the `chatfoundry` key, so loading our
own folders never guesses.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, fields

import torch

from chatfoundry.models.decoder import DecoderConfig, DecoderLM


def hf_architecture(cfg: DecoderConfig) -> str | None:
    if cfg.norm == "layernorm" and cfg.mlp in ("gelu", "gelu_exact") and cfg.bias and cfg.n_kv_head == cfg.n_head:
        if cfg.pos == "learned" and cfg.tie_embeddings and cfg.mlp == "gelu":
            return "gpt2"
        if cfg.pos == "rope":
            return "gpt_neox"
    if (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    return None


def to_hf_config(cfg: DecoderConfig, special: dict[str, int | None] | None = None) -> dict:
    special = special or {}
    ids = {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad")}
    arch = hf_architecture(cfg)
    if arch == "gpt2":
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_inner": cfg.ffn_dim, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
              "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
              "scale_attn_weights": True, "tie_word_embeddings": True}
    elif arch == "gpt_neox":
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
        hf = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "max_position_embeddings": cfg.block_size,
              "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
              "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": False, "attention_bias": True,
              "rope_parameters": rope, "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_theta,  # the last two: 4.x
              "attention_dropout": cfg.dropout, "hidden_dropout": cfg.dropout, "classifier_dropout": cfg.dropout,
              "tie_word_embeddings": cfg.tie_embeddings}
    elif arch in ("llama", "qwen2"):
        hf = {"vocab_size": cfg.vocab_size,
              "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings}
        if arch == "llama":
            hf.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=cfg.bias, mlp_bias=cfg.bias)
        else:  # Qwen2: biases on q, k and v only
            hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    else:
        hf = {"architectures": ["ChatfoundryDecoderLM"], "model_type": "chatfoundry", "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings}
    return {**hf, **ids, "torch_dtype": "float32", "chatfoundry": asdict(cfg)}


# transformers' sequence-classification class per architecture: the body plus a bias-free `score`.
_SEQUENCE_CLASSIFICATION = {"gpt2": "GPT2ForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
                            "llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}


def reward_to_hf_config(cfg: DecoderConfig, special: dict[str, int | None], reward: dict) -> dict:
    """config.json of a reward model: `...ForSequenceClassification` with one label, and our
    normalisation (offset, mean, std) under `chatfoundry_reward`, which also marks it as one."""
    hf = to_hf_config(cfg, special)
    hf["architectures"] = [_SEQUENCE_CLASSIFICATION.get(hf_architecture(cfg), "ChatfoundryRewardModel")]
    return {**hf, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "chatfoundry_reward": reward}


def reward_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """A RewardModel's weights (`body.*`, `score.weight`) under transformers' names."""
    body = {k.removeprefix("body."): v for k, v in sd.items() if k.startswith("body.")}
    return {**state_dict_to_hf(body, cfg), "score.weight": sd["score.weight"].contiguous()}


def reward_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Inverse of `reward_state_dict_to_hf`."""
    body = state_dict_from_hf({k: v for k, v in hf_sd.items() if k != "score.weight"}, cfg)
    body.pop("lm_head.weight", None)  # restored from the embedding for a tied LM; the body has none
    out = {"body." + k: v for k, v in body.items()}
    if "score.weight" in hf_sd:
        out["score.weight"] = hf_sd["score.weight"]
    return out


def our_config(hf: dict, cls):
    """The `cls` config stored under a config.json's `chatfoundry` entry (fields it no longer has
    are dropped), or None when the file has no such entry (a foreign checkpoint). A field of the
    wrong type is a ValueError naming it ("chatfoundry.n_layer: expected an integer, got 'four'")."""
    ours = hf.get("chatfoundry")
    if ours is None:
        return None
    if not isinstance(ours, dict):
        raise ValueError(f"chatfoundry: expected an object of config fields, got {type(ours).__name__}")
    known = {f.name for f in fields(cls)}
    cfg = cls(**{k: v for k, v in ours.items() if k in known})
    check_types(cfg, "chatfoundry.")
    return cfg


def check_types(cfg, prefix: str = "") -> None:
    """ValueError naming the first field of the dataclass `cfg` whose value is not of its declared
    type (int, float, bool, str or a Literal): a config read from JSON is checked before any size
    in it is used (an n_layer of "four" or 1e9 would otherwise fail deep inside, or allocate)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(kind) is typing.Literal:
            ok, want = value in typing.get_args(kind), "one of " + ", ".join(map(repr, typing.get_args(kind)))
        elif kind is bool:
            ok, want = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kind is str:
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"{prefix}{f.name}: expected {want}, got {value!r}")


def from_hf_config(hf: dict) -> DecoderConfig:
    """Our config from a config.json we wrote (the `chatfoundry` entry)."""
    cfg = our_config(hf, DecoderConfig)
    if cfg is None:
        raise ValueError("config.json has no 'chatfoundry' entry (importing foreign checkpoints: chatfoundry convert)")
    return cfg


_GPT2_RENAMES = [("embed_tokens", "wte"), ("embed_positions", "wpe"), ("layers.", "h."),
                 ("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2"),
                 ("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")]
# GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight.
_GPT2_CONV = ("o_proj.weight", "up_proj.weight", "down_proj.weight")


def _gpt2_key(name: str) -> str:
    if name.startswith("lm_head"):
        return name
    if name.startswith("norm."):
        return "transformer.ln_f." + name.removeprefix("norm.")
    for ours, theirs in _GPT2_RENAMES:
        name = name.replace(ours, theirs)
    return "transformer." + name


_NEOX_TOP = {"embed_tokens": "gpt_neox.embed_in", "layers": "gpt_neox.layers", "norm": "gpt_neox.final_layer_norm",
             "lm_head": "embed_out"}
_NEOX_INNER = [("self_attn.o_proj", "attention.dense"), ("mlp.up_proj", "mlp.dense_h_to_4h"),
               ("mlp.down_proj", "mlp.dense_4h_to_h")]


def _neox_key(name: str) -> str:
    top, _, rest = name.partition(".")
    name = f"{_NEOX_TOP[top]}.{rest}"
    for ours, theirs in _NEOX_INNER:
        name = name.replace(ours, theirs)
    return name


def _to_fused(sd: dict[str, torch.Tensor], rename, fused: str, fuse, transposed=()) -> dict[str, torch.Tensor]:
    """Our weights under names that fuse q, k and v into one projection (GPT-2, GPT-NeoX):
    `rename` maps a name, `fuse(parts, kind)` makes the fused tensor from [q, k, v]."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".self_attn.q_proj." in k:
            layer, kind = k.split(".self_attn.q_proj.")
            parts = [sd[f"{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{rename(layer)}.{fused}.{kind}"] = fuse(parts, kind).contiguous()
        elif ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k:
            out[rename(k)] = v.t().contiguous() if k.endswith(transposed) else v.contiguous()
    return out


def _from_fused(hf_sd: dict[str, torch.Tensor], cfg: DecoderConfig, rename, fused: str, split,
                transposed=()) -> dict[str, torch.Tensor]:
    """Inverse of `_to_fused`: `split(tensor, kind)` gives back [q, k, v]."""
    ours_by_hf = {rename(k): k for k in _param_names(cfg)}
    sd = {}
    for k, v in hf_sd.items():
        if f".{fused}." in k:
            layer, kind = k.split(f".{fused}.")
            layer = "layers." + layer.rsplit(".", 1)[1]  # transformer.h.3 / gpt_neox.layers.3 -> layers.3
            for p, part in zip("qkv", split(v, kind)):
                sd[f"{layer}.self_attn.{p}_proj.{kind}"] = part.contiguous()
        elif k in ours_by_hf:
            ours = ours_by_hf[k]
            sd[ours] = v.t().contiguous() if ours.endswith(transposed) else v
    return sd


def _gpt2_fuse(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    fused = torch.cat(parts, dim=0)  # GPT-2's c_attn: [q; k; v], a Conv1D (transposed) weight
    return fused.t() if kind == "weight" else fused


def _neox_fuse(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    # GPT-NeoX's query_key_value goes head by head: [q_h; k_h; v_h] for each head h.
    return torch.stack([p.unflatten(0, (heads, -1)) for p in parts], 1).flatten(0, 2)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our weights under the architecture's names; a tied head is left out, as transformers does."""
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    arch = hf_architecture(cfg)
    if arch in ("llama", "qwen2"):
        return {(k if k.startswith("lm_head") else "model." + k): v.contiguous() for k, v in sd.items()}
    if arch == "gpt_neox":
        return _to_fused(sd, _neox_key, "attention.query_key_value", lambda p, kind: _neox_fuse(p, cfg.n_head))
    if arch == "gpt2":
        return _to_fused(sd, _gpt2_key, "attn.c_attn", _gpt2_fuse, _GPT2_CONV)
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_to_hf`; a tied head is restored from the embedding."""
    arch = hf_architecture(cfg)
    if arch in ("llama", "qwen2"):
        sd = {k.removeprefix("model."): v for k, v in hf_sd.items()}
    elif arch == "gpt_neox" and any(k.startswith("gpt_neox.") for k in hf_sd):  # else saved before it exported
        sd = _from_fused(hf_sd, cfg, _neox_key, "attention.query_key_value",
                         lambda v, kind: [p.flatten(0, 1) for p in v.unflatten(0, (cfg.n_head, 3, -1)).unbind(1)])
    elif arch == "gpt2":
        sd = _from_fused(hf_sd, cfg, _gpt2_key, "attn.c_attn",
                         lambda v, kind: (v.t() if kind == "weight" else v).split(cfg.n_embd), _GPT2_CONV)
    else:
        sd = dict(hf_sd)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd


def _param_names(cfg: DecoderConfig) -> list[str]:
    """Our weight names for cfg, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return list(DecoderLM(cfg).state_dict())


# ---------------------------------------------------------------- importing transformers' checkpoints


def config_from_hf(hf: dict, source: str = "config.json") -> DecoderConfig:
    """Our config for a transformers GPT-2, GPT-NeoX, Llama, Mistral or Qwen2 config.json (their field names)."""
    kind = hf.get("model_type")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{source}: {what}")

    if kind == "gpt2":
        need(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"activation_function {hf.get('activation_function')!r} is not GPT-2's tanh GELU")
        n_embd = hf["n_embd"]
        return DecoderConfig(preset="imported", flavour="gpt2", vocab_size=hf["vocab_size"],
                             block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                             n_kv_head=hf["n_head"], n_embd=n_embd, intermediate_size=hf.get("n_inner") or 4 * n_embd,
                             pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                             norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    if kind in ("llama", "mistral", "qwen2"):
        heads = hf["num_attention_heads"]
        need(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} is not SwiGLU's silu")
        need(hf.get("head_dim") in (None, hf["hidden_size"] // heads), "head_dim != hidden_size / num_attention_heads")
        need(bool(hf.get("attention_bias", False)) == bool(hf.get("mlp_bias", False)),
             "attention_bias and mlp_bias differ (one bias setting covers both here)")
        qwen2 = kind == "qwen2"  # Qwen2: q, k and v carry biases, nothing else does
        need((hf.get("rope_scaling") or {}).get("rope_type", "default") == "default",
             "scaled rotary embeddings (rope_scaling) are not supported")
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        need(window is None or window >= hf["max_position_embeddings"], "sliding-window attention is not supported")
        theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        return DecoderConfig(preset="imported", flavour="llama", vocab_size=hf["vocab_size"],
                             block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                             n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=hf["hidden_size"],
                             intermediate_size=hf["intermediate_size"], pos="rope", norm="rmsnorm", mlp="swiglu",
                             bias=bool(hf.get("attention_bias", False)) and not qwen2, qkv_bias=qwen2,
                             tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                             rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6))
    if kind == "gpt_neox":  # only GPT-2's block with full rotary: what we export (Pythia's parallel block is not)
        rope = {"rope_theta": hf.get("rotary_emb_base", 10000.0), "partial_rotary_factor": hf.get("rotary_pct", 0.25),
                **(hf.get("rope_parameters") or {})}
        need(not hf.get("use_parallel_residual", True), "use_parallel_residual (attention and MLP side by side) "
             "is not supported")
        need(rope["partial_rotary_factor"] == 1.0, "partial rotary embeddings (rotary_pct < 1) are not supported")
        act = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}.get(hf.get("hidden_act", "gelu"))
        need(act is not None, f"hidden_act {hf.get('hidden_act')!r} is not supported (gelu, gelu_new)")
        need(hf.get("attention_bias", True), "attention without biases is not supported")
        return DecoderConfig(preset="imported", flavour="neox", vocab_size=hf["vocab_size"],
                             block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                             n_head=hf["num_attention_heads"], n_kv_head=hf["num_attention_heads"],
                             n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], pos="rope",
                             norm="layernorm", mlp=act, bias=True,
                             tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                             rope_theta=float(rope["rope_theta"]), norm_eps=hf.get("layer_norm_eps", 1e-5))
    raise ValueError(f"{source}: model_type {kind!r} is not supported (gpt2, gpt_neox, llama, mistral, qwen2)")
