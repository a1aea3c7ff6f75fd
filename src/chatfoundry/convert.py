"""`chatfoundry convert`: Hugging Face folders in and out.

In: a local transformers folder (config.json; model.safetensors, sharded safetensors with their
index, or pytorch_model.bin read with weights_only=True; tokenizer.json) of a GPT-2, GPT-NeoX
(sequential block, full rotary), Llama, Mistral, Qwen2 or T5 (T5ForConditionalGeneration) model, or
a BERT (BertForMaskedLM, BertModel, BertForSequenceClassification), becomes one of our checkpoints.
Out: our checkpoint written for transformers; GPT-2-, GPT-NeoX-, Llama- and T5-shaped models already
are, so the export checks the shape and leaves the trainer state behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from chatfoundry.checkpoint import (is_encoder, is_encoder_config, is_reward_model, load_encoder, load_model,
                                   load_reward_model, save_checkpoint)
from chatfoundry.errors import UserError
from chatfoundry.models import hf_encoder, hf_t5
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.hf import config_from_hf, hf_architecture, state_dict_from_hf
from chatfoundry.models.seq2seq import Seq2SeqLM
from chatfoundry.tokenizer import load_tokenizer


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(src / shard).items()}
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def from_hf(src: str | Path, out: str | Path) -> dict:
    """Import a transformers folder as our checkpoint at `out`; returns a summary."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (a Hugging Face model folder is expected)")
    try:
        hf = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    if is_encoder_config(hf):
        return _encoder_from_hf(src, out, hf)
    try:
        t5 = hf_t5.is_t5(hf)
        cfg = (hf_t5.config_from_hf if t5 else config_from_hf)(hf, str(src / "config.json"))
        cfg.validate()
    except (ValueError, KeyError) as e:
        raise UserError(str(e) if isinstance(e, ValueError) else f"{src / 'config.json'}: missing field {e}") from None
    tokenizer = load_tokenizer(src)
    weights = _hf_weights(src)
    family = Seq2SeqLM if t5 else DecoderLM
    with torch.device("meta"):
        expected = set(family(cfg).state_dict())
    ours = (hf_t5.state_dict_from_hf if t5 else state_dict_from_hf)(weights, cfg)
    missing = sorted(expected - set(ours))
    if missing:
        raise UserError(f"{src}: weights missing for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    model = family(cfg)
    try:
        model.load_state_dict({k: ours[k] for k in expected})
    except RuntimeError as e:
        raise UserError(f"{src}: weights do not match config.json ({str(e).splitlines()[-1].strip()})") from None
    save_checkpoint(Path(out), model, tokenizer)
    return {"out": str(out), "architecture": "t5" if t5 else hf_architecture(cfg),
            "params": sum(p.numel() for p in model.parameters())}


def _encoder_from_hf(src: Path, out: str | Path, hf: dict) -> dict:
    """A BERT folder: BertForMaskedLM, BertModel or BertForSequenceClassification, by its architectures."""
    try:
        cfg = hf_encoder.config_from_hf(hf, str(src / "config.json"))
        cfg.validate()
    except (ValueError, KeyError) as e:
        raise UserError(str(e) if isinstance(e, ValueError) else f"{src / 'config.json'}: missing field {e}") from None
    tokenizer = load_tokenizer(src)
    weights = _hf_weights(src)
    kind, num_labels = hf_encoder.kind_from_hf(hf, weights), hf_encoder.num_labels_of(hf)
    model = hf_encoder.build(cfg, kind, num_labels)
    ours = hf_encoder.state_dict_from_hf(weights, cfg, kind, num_labels)
    missing = [k for k in model.state_dict() if k not in ours]
    if missing:
        raise UserError(f"{src}: weights missing for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise UserError(f"{src}: weights do not match config.json ({str(e).splitlines()[-1].strip()})") from None
    if kind == "classifier":
        labels = [str((hf.get("id2label") or {}).get(str(i), f"LABEL_{i}")) for i in range(num_labels)]
        model.head = {"task": "regress" if hf.get("problem_type") == "regression" or num_labels == 1 else "classify",
                      "labels": labels, "dropout": hf.get("classifier_dropout") or 0.1}
    save_checkpoint(Path(out), model, tokenizer)
    return {"out": str(out), "architecture": hf_encoder.ARCHITECTURES[kind],
            "params": sum(p.numel() for p in model.parameters())}


def to_hf(src: str | Path, out: str | Path) -> dict:
    """Write our checkpoint at `src` as a folder transformers loads with from_pretrained; a reward
    model becomes `...ForSequenceClassification` (num_labels 1), an encoder its BERT class."""
    if is_encoder(src):
        model, tokenizer = load_encoder(src)
        save_checkpoint(Path(out), model, tokenizer)  # already BERT's layout: the trainer state stays behind
        return {"out": str(out), "architecture": hf_encoder.ARCHITECTURES[hf_encoder.kind_of(model)]}
    if is_reward_model(src):
        return _reward_to_hf(src, out)
    model, tokenizer = load_model(src, seq2seq=True)
    if isinstance(model, Seq2SeqLM):  # every one of ours is T5-shaped
        save_checkpoint(Path(out), model, tokenizer)
        return {"out": str(out), "architecture": "t5"}
    arch = hf_architecture(model.config)
    if arch is None:
        c = model.config
        raise UserError(f"{src}: no transformers architecture has this model's choices (pos={c.pos}, "
                        f"norm={c.norm}, mlp={c.mlp}, bias={c.bias}); GPT-2, GPT-NeoX and Llama shapes export")
    save_checkpoint(Path(out), model, tokenizer)
    return {"out": str(out), "architecture": arch}


def _reward_to_hf(src: str | Path, out: str | Path) -> dict:
    model, tokenizer = load_reward_model(src)
    arch = hf_architecture(model.config)
    if arch is None:
        raise UserError(f"{src}: no transformers architecture has this reward model's body; "
                        "GPT-2, GPT-NeoX and Llama shapes export")
    model.fold_offset()  # transformers' `score` has no bias: the normalisation goes into the final norm
    save_checkpoint(Path(out), model, tokenizer)
    result = {"out": str(out), "architecture": arch, "reward_model": True}
    if model.offset:  # an RMSNorm body has no bias to fold it into
        result["offset"] = model.offset
        result["note"] = (f"transformers' logits are this model's rewards minus its offset {model.offset:.4f} "
                          "(config.json: chatfoundry_reward.offset); add it back")
    return result
