"""`chatfoundry convert`: Hugging Face folders in and out.

In: a local transformers folder (config.json; model.safetensors, sharded safetensors with their
index, or pytorch_model.bin read with weights_only=True; tokenizer.json) of a GPT-2, GPT-NeoX
(sequential block, full rotary), Llama, Mistral, Qwen2 or T5 (T5ForConditionalGeneration) model, or
a BERT (BertForMaskedLM, BertModel, BertForSequenceClassification), becomes one of our checkpoints
(the command takes a Hub model named ORG/NAME too: hub.py fetches its folder).
Out: our checkpoint written for transformers; GPT-2-, GPT-NeoX-, Llama- and T5-shaped models already
are, so the export checks the shape and leaves the trainer state behind.

An import keeps the source's special token ids (bos, eos, pad): from its config.json, else its
generation_config.json, else the tokens its tokenizer_config.json names. The tokens keep those
roles in our folder (tokenizer_config.json's eos_token..., see tokenizer.set_special_names), so
generation stops at the source's end-of-sequence token and T5 inputs end with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatfoundry.checkpoint import (check_layer_counts, is_encoder, is_encoder_config, is_reward_model, load_encoder, load_model,
                                   load_reward_model, read_json, read_weights, save_checkpoint)
from chatfoundry.errors import UserError
from chatfoundry.models import hf_encoder, hf_t5
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.hf import check_types, config_from_hf, hf_architecture, state_dict_from_hf
from chatfoundry.models.seq2seq import Seq2SeqLM
from chatfoundry.tokenizer import load_tokenizer, set_special_names, special_id



def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        return read_weights(src / "model.safetensors")
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: weight_map: expected an object of weight names to shard files")
        shards = sorted(set(weight_map.values()))
        return {k: v for shard in shards for k, v in read_weights(src / shard).items()}
    if (src / "pytorch_model.bin").is_file():
        try:
            weights = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, garbage or refused by weights_only: one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{src / 'pytorch_model.bin'}: cannot be read ({reason[:200]})") from None
        if not isinstance(weights, dict):
            raise UserError(f"{src / 'pytorch_model.bin'}: holds a {type(weights).__name__}, not a state dict")
        return weights
    raise UserError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _config(hf: dict, src: Path, read):
    """Our config from a transformers config.json by `read`; UserError naming the file and field."""
    where = src / "config.json"
    try:
        cfg = read(hf, str(where))
        check_types(cfg)
        cfg.validate()
    except KeyError as e:
        raise UserError(f"{where}: missing field {e}") from None
    except (ValueError, TypeError) as e:
        message = str(e)
        raise UserError(message if message.startswith(str(where)) else f"{where}: {message}") from None
    return cfg


def _keep_special_ids(src: Path, hf: dict, tokenizer) -> dict[str, int | None]:
    """Name the source's bos/eos/pad tokens as those roles in `tokenizer` (config.json's ids, else
    generation_config.json's; the first of a list; load_tokenizer already took the names its
    tokenizer_config.json gives). Returns the ids the import keeps."""
    gen = src / "generation_config.json"
    sources = [hf] + ([read_json(gen)] if gen.is_file() else [])
    names = {}
    for role in ("bos", "eos", "pad"):
        for config in sources:
            value = config.get(f"{role}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int) and not isinstance(value, bool) and tokenizer.id_to_token(value) is not None:
                names[role] = tokenizer.id_to_token(value)
                break
    set_special_names(tokenizer, names)
    return {role: special_id(tokenizer, role) for role in ("bos", "eos", "pad")}


def from_hf(src: str | Path, out: str | Path) -> dict:
    """Import a transformers folder as our checkpoint at `out`; returns a summary."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (a Hugging Face model folder is expected)")
    hf = read_json(src / "config.json")
    if is_encoder_config(hf):
        return _encoder_from_hf(src, out, hf)
    t5 = hf_t5.is_t5(hf)
    cfg = _config(hf, src, hf_t5.config_from_hf if t5 else config_from_hf)
    tokenizer = load_tokenizer(src)
    special = _keep_special_ids(src, hf, tokenizer)
    weights = _hf_weights(src)
    check_layer_counts(cfg, weights, src / "config.json", "its weights")
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
            "params": sum(p.numel() for p in model.parameters()), "special_ids": special}


def _encoder_from_hf(src: Path, out: str | Path, hf: dict) -> dict:
    """A BERT folder: BertForMaskedLM, BertModel or BertForSequenceClassification, by its architectures."""
    cfg = _config(hf, src, hf_encoder.config_from_hf)
    tokenizer = load_tokenizer(src)
    special = _keep_special_ids(src, hf, tokenizer)
    weights = _hf_weights(src)
    check_layer_counts(cfg, weights, src / "config.json", "its weights")
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
            "params": sum(p.numel() for p in model.parameters()), "special_ids": special}


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
