"""Hugging Face names for our encoder: BERT's config.json and weight keys.

Our three encoder modules are transformers' three BERT classes, weight for weight:

    EncoderLM          BertForMaskedLM                 body under "bert.", head under "cls.predictions."
    Encoder (pooler)   BertModel                       body at the top level
    EncoderClassifier  BertForSequenceClassification   body under "bert.", head "classifier"

Converting is renaming: q/k/v are separate projections on both sides, and BERT's post-norm
block has exactly our two LayerNorms. Our full config rides along under the `chatfoundry` key.
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from chatfoundry.models.hf import our_config
from chatfoundry.models.encoder import Encoder, EncoderClassifier, EncoderConfig, EncoderLM

ARCHITECTURES = {"mlm": "BertForMaskedLM", "body": "BertModel", "classifier": "BertForSequenceClassification"}
KIND_OF_ARCHITECTURE = {v: k for k, v in ARCHITECTURES.items()}

# Ours -> theirs, for the body; `{i}` is the layer index.
_BODY = {
    "embed_tokens": "embeddings.word_embeddings",
    "embed_positions": "embeddings.position_embeddings",
    "embed_types": "embeddings.token_type_embeddings",
    "embed_norm": "embeddings.LayerNorm",
    "layers.{i}.self_attn.q_proj": "encoder.layer.{i}.attention.self.query",
    "layers.{i}.self_attn.k_proj": "encoder.layer.{i}.attention.self.key",
    "layers.{i}.self_attn.v_proj": "encoder.layer.{i}.attention.self.value",
    "layers.{i}.self_attn.o_proj": "encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attn_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "layers.{i}.mlp.up_proj": "encoder.layer.{i}.intermediate.dense",
    "layers.{i}.mlp.down_proj": "encoder.layer.{i}.output.dense",
    "layers.{i}.mlp_norm": "encoder.layer.{i}.output.LayerNorm",
    "pooler": "pooler.dense",
}
_HEADS = {
    "mlm": {"head_dense": "cls.predictions.transform.dense", "head_norm": "cls.predictions.transform.LayerNorm",
            "lm_head.bias": "cls.predictions.bias"},
    "body": {},
    "classifier": {"classifier": "classifier"},
}
_PREFIX = {"mlm": "bert.", "body": "", "classifier": "bert."}


def kind_of(model) -> str:
    if isinstance(model, EncoderLM):
        return "mlm"
    if isinstance(model, EncoderClassifier):
        return "classifier"
    return "body"


def _rename(name: str, table: dict[str, str]) -> str | None:
    """`name` (a parameter, e.g. "layers.3.mlp.up_proj.weight") through `table`; None if no entry fits."""
    layer = re.match(r"layers\.(\d+)\.", name)
    i = layer.group(1) if layer else None
    for ours, theirs in table.items():
        ours = ours.format(i=i)
        if name == ours or name.startswith(ours + "."):
            return theirs.format(i=i) + name[len(ours):]
    return None


def _hf_key(name: str, kind: str) -> str | None:
    """transformers' key for one of our weight names; None for the tied output matrix."""
    if kind == "body":
        return _rename(name, _BODY)
    if name.startswith("body."):
        return _PREFIX[kind] + _rename(name.removeprefix("body."), _BODY)
    if name == "lm_head.weight":
        return None  # tied to the token embedding: transformers leaves it out too
    return _rename(name, _HEADS[kind])


def state_dict_to_hf(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        key = _hf_key(k, kind)
        if key is not None:
            out[key] = v.contiguous()
    return out


def param_names(cfg: EncoderConfig, kind: str, num_labels: int = 2) -> list[str]:
    """Our weight names for a model of `kind`, from a model built on the meta device."""
    with torch.device("meta"):
        return list(build(cfg, kind, num_labels).state_dict())


def build(cfg: EncoderConfig, kind: str, num_labels: int = 2):
    if kind == "mlm":
        return EncoderLM(cfg)
    if kind == "classifier":
        return EncoderClassifier(cfg, num_labels)
    return Encoder(cfg, pooler=True)


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: EncoderConfig, kind: str,
                       num_labels: int = 2) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_to_hf`: weights transformers does not name for us (such as old
    checkpoints' position_ids buffers) are dropped; the tied output matrix is restored."""
    ours_by_hf = {_hf_key(k, kind): k for k in param_names(cfg, kind, num_labels)}
    sd = {ours_by_hf[k]: v for k, v in hf_sd.items() if k in ours_by_hf}
    if kind == "mlm" and "body.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["body.embed_tokens.weight"]
    return sd


# ---------------------------------------------------------------- config.json


def to_hf_config(cfg: EncoderConfig, kind: str, special: dict[str, int | None] | None = None,
                 head: dict | None = None) -> dict:
    """BertConfig's fields; a classifier adds num_labels (through id2label) and problem_type, and
    its own description (task, labels, target scaling) under `chatfoundry_head`."""
    special = special or {}
    hf = {"architectures": [ARCHITECTURES[kind]], "model_type": "bert", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.ffn_dim,
          "hidden_act": cfg.hidden_act, "hidden_dropout_prob": cfg.hidden_dropout_prob,
          "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
          "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
          "layer_norm_eps": cfg.layer_norm_eps, "initializer_range": cfg.initializer_range, "position_embedding_type": "absolute",
          "tie_word_embeddings": True, "pad_token_id": special.get("pad"), "torch_dtype": "float32"}
    if kind == "classifier":
        head = head or {}
        labels = head.get("labels") or ["value"]
        hf.update(id2label={str(i): name for i, name in enumerate(labels)},
                  label2id={name: i for i, name in enumerate(labels)},
                  problem_type="regression" if head.get("task") == "regress" else "single_label_classification",
                  classifier_dropout=head.get("dropout", 0.1), chatfoundry_head=head)
    return {**hf, "chatfoundry": asdict(cfg)}


def from_hf_config(hf: dict) -> EncoderConfig:
    """Our config from a config.json we wrote (the `chatfoundry` entry), else from BERT's fields."""
    return our_config(hf, EncoderConfig) or config_from_hf(hf)


def config_from_hf(hf: dict, source: str = "config.json") -> EncoderConfig:
    """Our config for a transformers BERT config.json (absolute positions, GELU)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{source}: {what}")

    need(hf.get("model_type") == "bert", f"model_type {hf.get('model_type')!r} is not bert")
    need(hf.get("position_embedding_type", "absolute") == "absolute",
         f"position_embedding_type {hf.get('position_embedding_type')!r} is not supported (absolute only)")
    act = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}.get(hf.get("hidden_act", "gelu"))
    need(act is not None, f"hidden_act {hf.get('hidden_act')!r} is not supported (gelu, gelu_new)")
    need(not hf.get("is_decoder", False), "is_decoder: a BERT decoder is not an encoder")
    return EncoderConfig(preset="imported", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                         num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                         intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
                         type_vocab_size=hf.get("type_vocab_size", 2), hidden_act=act,
                         layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                         hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
                         attention_probs_dropout_prob=hf.get("attention_probs_dropout_prob", 0.1),
                         initializer_range=hf.get("initializer_range", 0.02))


def kind_from_hf(hf: dict, weights: dict[str, torch.Tensor] | None = None) -> str:
    """mlm, body or classifier: from `architectures`, else from the weights' names."""
    for arch in hf.get("architectures") or []:
        if arch in KIND_OF_ARCHITECTURE:
            return KIND_OF_ARCHITECTURE[arch]
    keys = weights or {}
    if any(k.startswith("cls.predictions.") for k in keys):
        return "mlm"
    if "classifier.weight" in keys:
        return "classifier"
    return "body"


def num_labels_of(hf: dict) -> int:
    return len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
