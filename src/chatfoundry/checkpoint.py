"""Checkpoint folders: Hugging Face's layout, written atomically.

    run/checkpoint/
      config.json              HF field names (+ our full config under "chatfoundry")
      model.safetensors        weights; transformers loads GPT-2-, Llama- and T5-shaped ones as they are
      tokenizer.json           Hugging Face tokenizers
      tokenizer_config.json    special tokens and the chat template
      generation_config.json
      trainer_state.pt         optimizer, RNG, step, data position (tensors and plain types only)

A save writes `checkpoint.tmp/`, fsyncs it, then swaps it in with two renames. A kill at any
moment leaves either `checkpoint/` or, between the renames, `checkpoint.old/`: both complete,
and `resolve_checkpoint` finds whichever is there. Weights are never pickled; trainer state is
read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chatfoundry.errors import UserError
from chatfoundry.models import hf_encoder
from chatfoundry.models.decoder import DecoderConfig, DecoderLM
from chatfoundry.models import hf_t5
from chatfoundry.models.encoder import Encoder, EncoderClassifier, EncoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from chatfoundry.models.hf import (from_hf_config, reward_state_dict_from_hf, reward_state_dict_to_hf,
                                   reward_to_hf_config, state_dict_from_hf, state_dict_to_hf, to_hf_config)
from chatfoundry.tokenizer import load_tokenizer, save_tokenizer, special_id

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer_state.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: DecoderLM | RewardModel | EncoderLM | Encoder | EncoderClassifier | Seq2SeqLM,
                    tokenizer, trainer_state: dict[str, Any] | None = None,
                    generation: dict[str, Any] | None = None) -> Path:
    """Write the folder at `path` (replacing an older one) so that a kill never leaves it half-written.
    A RewardModel is written as transformers' `...ForSequenceClassification`; encoders as BERT's
    classes (models/hf_encoder.py)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    special = {name: special_id(tokenizer, name) for name in ("bos", "eos", "pad")}
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    encoder = isinstance(model, (EncoderLM, Encoder, EncoderClassifier))
    if encoder:
        kind = hf_encoder.kind_of(model)
        config = hf_encoder.to_hf_config(cfg, kind, special, getattr(model, "head", None))
        weights = hf_encoder.state_dict_to_hf(weights, kind)
    elif isinstance(model, RewardModel):
        config = reward_to_hf_config(cfg, special, {"offset": model.offset, **model.normalization})
        weights = reward_state_dict_to_hf(weights, cfg)
    elif isinstance(model, Seq2SeqLM):  # T5ForConditionalGeneration
        config, weights = hf_t5.to_hf_config(cfg, special), hf_t5.state_dict_to_hf(weights, cfg)
        generation = {"decoder_start_token_id": cfg.decoder_start_token_id, **(generation or {})}
    else:
        config, weights = to_hf_config(cfg, special), state_dict_to_hf(weights, cfg)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    save_tokenizer(tokenizer, tmp, model_max_length=cfg.max_position_embeddings if encoder else cfg.block_size,
                   encoder=encoder)
    if not isinstance(model, RewardModel) and not encoder:  # only a decoder LM generates
        gen = {"bos_token_id": special["bos"], "eos_token_id": special["eos"], "pad_token_id": special["pad"],
               "max_length": cfg.block_size, **(generation or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, given it or the run folder holding it; recovers from a kill mid-swap."""
    path = Path(path)
    full = path.resolve()  # "." and ".." have no name to put ".old" after
    old = full.with_name(full.name + ".old") if full.name else full  # "/" has no sibling
    for candidate in (path, path / CHECKPOINT, old, path / (CHECKPOINT + ".old")):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    raise UserError(f"{path}: not a checkpoint (no config.json and model.safetensors here or in {CHECKPOINT}/)")


def _read_config(ckpt: Path) -> tuple[dict, DecoderConfig | Seq2SeqConfig]:
    try:
        hf = json.loads((ckpt / "config.json").read_text())
        if is_encoder_config(hf):
            raise UserError("an encoder (BERT) checkpoint, not a decoder: it fills masks and embeds text "
                            "(chatfoundry fill-mask, embed, finetune-head)")
        cfg = hf_t5.from_hf_config(hf) if hf_t5.is_t5(hf) else from_hf_config(hf)
        cfg.validate()
    except (ValueError, TypeError, KeyError, json.JSONDecodeError, UserError) as e:
        raise UserError(f"{ckpt / 'config.json'}: {e}") from None
    return hf, cfg


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Load, naming missing keys and shape mismatches in one line."""
    missing = [k for k in model.state_dict() if k not in weights]
    if missing:
        raise UserError(f"{ckpt / 'model.safetensors'}: missing weights {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # shapes that disagree with config.json, or unknown keys
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"{ckpt / 'model.safetensors'}: does not match config.json: {detail}") from None


def is_encoder_config(hf: dict) -> bool:
    return hf.get("model_type") == "bert"


def is_encoder(path: str | Path) -> bool:
    return is_encoder_config(json.loads((resolve_checkpoint(path) / "config.json").read_text()))


def load_encoder(path: str | Path, device: str | torch.device = "cpu", kinds: tuple[str, ...] = ("mlm", "body", "classifier")):
    """(encoder in eval mode, tokenizer) from a BERT-style checkpoint folder or run folder: an
    EncoderLM (BertForMaskedLM), an Encoder (BertModel) or an EncoderClassifier
    (BertForSequenceClassification), as config.json's architectures say; `kinds` are those the
    caller can use."""
    ckpt = resolve_checkpoint(path)
    try:
        hf = json.loads((ckpt / "config.json").read_text())
        if not is_encoder_config(hf):
            raise UserError("a decoder checkpoint, not an encoder (BERT): "
                            "train one with chatfoundry pretrain --objective mlm")
        cfg = hf_encoder.from_hf_config(hf)
        cfg.validate()
    except (ValueError, TypeError, KeyError, json.JSONDecodeError, UserError) as e:
        raise UserError(f"{ckpt / 'config.json'}: {e}") from None
    kind = hf_encoder.kind_from_hf(hf)
    if kind not in kinds:
        need = " or ".join(hf_encoder.ARCHITECTURES[k] for k in kinds)
        raise UserError(f"{ckpt}: a {hf_encoder.ARCHITECTURES[kind]} checkpoint; this needs a {need}")
    num_labels = hf_encoder.num_labels_of(hf)
    model = hf_encoder.build(cfg, kind, num_labels)
    weights = hf_encoder.state_dict_from_hf(load_file(ckpt / "model.safetensors"), cfg, kind, num_labels)
    _load_weights(model, weights, ckpt)
    if kind == "classifier":
        model.head = dict(hf.get("chatfoundry_head") or {"task": "regress" if num_labels == 1 else "classify",
                                                          "labels": [hf["id2label"][str(i)] for i in range(num_labels)]
                                                          if "id2label" in hf else []})
    return model.to(device).eval(), load_tokenizer(ckpt)


def is_reward_model(path: str | Path) -> bool:
    return "chatfoundry_reward" in json.loads((resolve_checkpoint(path) / "config.json").read_text())


def load_model(path: str | Path, device: str | torch.device = "cpu",
               seq2seq: bool = False) -> tuple[DecoderLM | Seq2SeqLM, Any]:
    """(language model in eval mode, tokenizer) from a checkpoint folder or run folder. The
    config says which family: a decoder LM, or with `seq2seq` (callers that handle both) also
    an encoder-decoder (T5)."""
    ckpt = resolve_checkpoint(path)
    hf, cfg = _read_config(ckpt)
    if "chatfoundry_reward" in hf:
        raise UserError(f"{ckpt}: a reward model, not a language model (it scores text: chatfoundry score)")
    if isinstance(cfg, Seq2SeqConfig):
        if not seq2seq:
            raise UserError(f"{ckpt}: an encoder-decoder (T5) checkpoint; this command takes a decoder-only "
                            "language model (T5 checkpoints: chatfoundry generate, finetune-seq2seq, convert)")
        model = Seq2SeqLM(cfg)
        weights = hf_t5.state_dict_from_hf(load_file(ckpt / "model.safetensors"), cfg)
    else:
        model = DecoderLM(cfg)
        weights = state_dict_from_hf(load_file(ckpt / "model.safetensors"), cfg)
    _load_weights(model, weights, ckpt)
    return model.to(device).eval(), load_tokenizer(ckpt)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """(reward model in eval mode, tokenizer) from a checkpoint written by `chatfoundry rm`."""
    ckpt = resolve_checkpoint(path)
    hf, cfg = _read_config(ckpt)
    reward = hf.get("chatfoundry_reward")
    if not isinstance(reward, dict):
        raise UserError(f"{ckpt}: a language model, not a reward model (train one: chatfoundry rm --init {path})")
    model = RewardModel(cfg)
    _load_weights(model, reward_state_dict_from_hf(load_file(ckpt / "model.safetensors"), cfg), ckpt)
    model.offset = float(reward.get("offset", 0.0))
    model.normalization = {k: v for k, v in reward.items() if k != "offset"}
    return model.to(device).eval(), load_tokenizer(ckpt)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    state_file = ckpt / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"{ckpt}: no {TRAINER_STATE} to resume from")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def model_config(path: str | Path) -> DecoderConfig | Seq2SeqConfig:
    hf = json.loads((resolve_checkpoint(path) / "config.json").read_text())
    return hf_t5.from_hf_config(hf) if hf_t5.is_t5(hf) else from_hf_config(hf)
