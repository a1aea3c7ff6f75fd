"""Hugging Face names for the encoder-decoder: T5ForConditionalGeneration's config.json and weights.

Our block holds self-attention, cross-attention (decoder) and the MLP, each with its norm;
transformers numbers them as sub-layers of `block.{i}.layer.{j}`. The relative position bias
lives on our stack (it is shared by every layer); transformers keeps it in block 0's
self-attention. Conversion is renaming, nothing else:

    encoder.layers.{i}.self_attn.q_proj   encoder.block.{i}.layer.0.SelfAttention.q
    encoder.layers.{i}.mlp_norm           encoder.block.{i}.layer.1.layer_norm
    decoder.layers.{i}.cross_attn.k_proj  decoder.block.{i}.layer.1.EncDecAttention.k
    decoder.layers.{i}.mlp.gate_proj      decoder.block.{i}.layer.2.DenseReluDense.wi_0  (gated; wi_1: up)
    decoder.relative_attention_bias       decoder.block.0.layer.0.SelfAttention.relative_attention_bias
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from chatfoundry.models.hf import our_config
from chatfoundry.models.seq2seq import Seq2SeqConfig, Seq2SeqLM


def is_t5(hf: dict) -> bool:
    return hf.get("model_type") == "t5"


def to_hf_config(cfg: Seq2SeqConfig, special: dict[str, int | None] | None = None) -> dict:
    special = special or {}
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "feed_forward_proj": cfg.feed_forward_proj, "dropout_rate": cfg.dropout_rate,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "is_encoder_decoder": True,
            # transformers >= 5 always shares the head's weight unless the file holds a different
            # one, and reads the d_model ** -0.5 rescaling from this flag; older ones from the next.
            "scale_decoder_outputs": cfg.tie_word_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
            "decoder_start_token_id": cfg.decoder_start_token_id, "pad_token_id": special.get("pad"),
            "eos_token_id": special.get("eos"), "bos_token_id": special.get("bos"),
            "torch_dtype": "float32", "chatfoundry": asdict(cfg)}


def from_hf_config(hf: dict) -> Seq2SeqConfig:
    """Our config from a config.json we wrote (the `chatfoundry` entry) or, failing that, from
    transformers' T5 fields."""
    return our_config(hf, Seq2SeqConfig) or config_from_hf(hf)


def config_from_hf(hf: dict, source: str = "config.json") -> Seq2SeqConfig:
    """Our config for a transformers T5 config.json (v1.0 relu or v1.1 gated-gelu)."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ValueError(f"{source}: feed_forward_proj {proj!r} is not supported (relu, gated-gelu)")
    # The rescaling goes with tying in T5 v1.0; transformers 5 writes it down as its own flag.
    scaled = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
    start = hf.get("decoder_start_token_id")
    start = hf.get("pad_token_id") or 0 if start is None else start
    return Seq2SeqConfig(preset="imported", vocab_size=hf["vocab_size"], block_size=hf.get("n_positions") or 512,
                         d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"], num_layers=hf["num_layers"],
                         num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
                         num_heads=hf["num_heads"],
                         relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                         relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                         feed_forward_proj=proj, tie_word_embeddings=scaled,
                         layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), decoder_start_token_id=int(start))


def _sublayers(cfg: Seq2SeqConfig, decoder: bool) -> dict[str, str]:
    """Our name inside a block -> transformers' name inside `block.{i}`."""
    mlp = 2 if decoder else 1
    names = {"self_attn_norm.weight": "layer.0.layer_norm.weight",
             "mlp_norm.weight": f"layer.{mlp}.layer_norm.weight",
             "mlp.down_proj.weight": f"layer.{mlp}.DenseReluDense.wo.weight"}
    if cfg.feed_forward_proj == "gated-gelu":
        names["mlp.gate_proj.weight"] = f"layer.{mlp}.DenseReluDense.wi_0.weight"
        names["mlp.up_proj.weight"] = f"layer.{mlp}.DenseReluDense.wi_1.weight"
    else:
        names["mlp.up_proj.weight"] = f"layer.{mlp}.DenseReluDense.wi.weight"
    for p in "qkvo":
        names[f"self_attn.{p}_proj.weight"] = f"layer.0.SelfAttention.{p}.weight"
        if decoder:
            names[f"cross_attn.{p}_proj.weight"] = f"layer.1.EncDecAttention.{p}.weight"
    if decoder:
        names["cross_attn_norm.weight"] = "layer.1.layer_norm.weight"
    return names


def hf_name(name: str, cfg: Seq2SeqConfig) -> str:
    stack, rest = name.split(".", 1) if name.startswith(("encoder.", "decoder.")) else ("", name)
    if not stack:  # shared.weight, lm_head.weight
        return name
    if rest == "relative_attention_bias.weight":
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if rest == "final_norm.weight":
        return f"{stack}.final_layer_norm.weight"
    _, i, inner = rest.split(".", 2)  # layers.{i}.inner
    return f"{stack}.block.{i}.{_sublayers(cfg, stack == 'decoder')[inner]}"


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names; a tied head is left out, as transformers does."""
    return {hf_name(k, cfg): v.contiguous() for k, v in sd.items()
            if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_to_hf`. Keys we do not know (the stacks' own copies of the shared
    embedding) are dropped; the head comes from the embedding when tied or absent."""
    ours_by_hf = {hf_name(k, cfg): k for k in param_names(cfg)}
    sd = {ours_by_hf[k]: v for k, v in hf_sd.items() if k in ours_by_hf}
    if "shared.weight" not in sd:  # some exports keep only the stacks' copies
        for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if k in hf_sd:
                sd["shared.weight"] = hf_sd[k]
                break
    if "shared.weight" in sd and (cfg.tie_word_embeddings or "lm_head.weight" not in sd):
        sd["lm_head.weight"] = sd["shared.weight"]
    return sd


def param_names(cfg: Seq2SeqConfig) -> list[str]:
    """Our weight names for cfg, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return list(Seq2SeqLM(cfg).state_dict())
