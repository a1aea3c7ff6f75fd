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

Loading trusts nothing in the folder: a config.json that is not an object or has a field of the
wrong type, a model.safetensors that is truncated, empty or not one, or a trainer_state.pt that
cannot be read is one UserError naming the file (and field). The sizes config.json asks for are
checked against the shapes model.safetensors' header declares, on a model built on the meta
device, before anything is allocated.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from chatfoundry import adapters
from chatfoundry.errors import UserError
from chatfoundry.models import hf_encoder
from chatfoundry.models.decoder import DecoderConfig, DecoderLM
from chatfoundry.models import hf_t5
from chatfoundry.models.encoder import Encoder, EncoderClassifier, EncoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from chatfoundry.models.hf import (check_types, from_hf_config, reward_state_dict_from_hf, reward_state_dict_to_hf,
                                   reward_to_hf_config, state_dict_from_hf, state_dict_to_hf, to_hf_config)
from chatfoundry.tokenizer import chat_stop_ids, load_tokenizer, save_tokenizer, special_id

CHECKPOINT = "checkpoint"
SHARDS = "sharded"  # in a checkpoint saved under FSDP: every process's shards of the model and optimizer
TRAINER_STATE = "trainer_state.pt"
MAX_CONTEXT = 1 << 20  # the longest block_size loaded: rotary tables and caches grow with it, no weight says it
_LAYER_FIELDS = ("n_layer", "num_layers", "num_decoder_layers", "num_hidden_layers")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: DecoderLM | RewardModel | EncoderLM | Encoder | EncoderClassifier | Seq2SeqLM,
                    tokenizer, trainer_state: dict[str, Any] | None = None,
                    generation: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None,
                    shards: Path | None = None, adapter_of: Path | None = None) -> Path:
    """Write the folder at `path` (replacing an older one) so that a kill never leaves it half-written.
    A RewardModel is written as transformers' `...ForSequenceClassification`; encoders as BERT's
    classes (models/hf_encoder.py). An FSDP-sharded model gives its whole `weights` (gathered) and
    the folder of its `shards` (torch.distributed.checkpoint's), moved in as `sharded/`. A model
    with LoRA adapters and `adapter_of` (its base checkpoint) is written as the adapter alone, in
    peft's format (adapters.py), with the tokenizer and the generation config."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    special = {name: special_id(tokenizer, name) for name in ("bos", "eos", "pad")}
    encoder = isinstance(model, (EncoderLM, Encoder, EncoderClassifier))
    if adapter_of is not None:  # a LoRA run: the adapter alone
        adapters.save_adapter(tmp, model, adapter_of)
    else:
        weights = {k: v.detach().cpu() for k, v in (model.state_dict() if weights is None else weights).items()}
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
    if shards is not None:
        for f in Path(shards).iterdir():
            _fsync(f)
        os.replace(shards, tmp / SHARDS)
    _fsync(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, given it or the run folder holding it; recovers from a kill mid-swap.
    (A Hub name, hf:ORG/NAME, is resolved before: hub.resolve, where a command or stage reads it.)"""
    path = Path(path)
    full = path.resolve()  # "." and ".." have no name to put ".old" after
    old = full.with_name(full.name + ".old") if full.name else full  # "/" has no sibling
    for candidate in (path, path / CHECKPOINT, old, path / (CHECKPOINT + ".old")):
        if ((candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file()) \
                or adapters.is_adapter(candidate):
            return candidate
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    raise UserError(f"{path}: not a checkpoint (no config.json and model.safetensors here or in {CHECKPOINT}/)")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; UserError naming the file if it is unreadable, not JSON or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_config(ckpt: Path) -> tuple[dict, DecoderConfig | Seq2SeqConfig]:
    hf = read_json(ckpt / "config.json")
    try:
        if is_encoder_config(hf):
            raise UserError("an encoder (BERT) checkpoint, not a decoder: it fills masks and embeds text "
                            "(chatfoundry fill-mask, embed, finetune-head)")
        cfg = hf_t5.from_hf_config(hf) if hf_t5.is_t5(hf) else from_hf_config(hf)
        check_types(cfg)
        cfg.validate()
    except (ValueError, TypeError, KeyError, UserError) as e:
        raise UserError(f"{ckpt / 'config.json'}: {e}") from None
    if cfg.block_size > MAX_CONTEXT:
        raise UserError(f"{ckpt / 'config.json'}: block_size {cfg.block_size:,} is over {MAX_CONTEXT:,}, the longest "
                        "context chatfoundry loads")
    return hf, cfg


def _weight_shapes(file: Path) -> dict[str, list[int]]:
    """The tensor shapes a safetensors file's header declares, read without loading the tensors;
    UserError if the file is not a whole safetensors file (safetensors checks the header against
    the file's length)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a valid safetensors file ({str(e).strip() or type(e).__name__})") from None


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{file}: not a valid safetensors file ({str(e).strip() or type(e).__name__})") from None


def check_layer_counts(cfg, weight_names, config: Path, weights: str) -> None:
    """UserError if a layer count of `cfg` is more than the layers the weights number (".3." in a
    name): checked before a model is built, even on the meta device, as modules cost time."""
    layers = 1 + max((int(i) for key in weight_names for i in re.findall(r"\.(\d+)\.", key)), default=-1)
    for name in _LAYER_FIELDS:
        count = getattr(cfg, name, None)
        if count is not None and count > layers:
            raise UserError(f"{config}: {name} is {count:,} but {weights} holds {layers} layers")


def _load(ckpt: Path, cfg, build: Callable[[], torch.nn.Module],
          from_hf: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> torch.nn.Module:
    """`build()` with the weights of ckpt/model.safetensors, which `from_hf` renames to ours.
    First the sizes: config.json's layer counts against the layers the file holds, then its every
    shape, on a model built on the meta device, against the file's header; only then the model."""
    file = ckpt / "model.safetensors"
    shapes = _weight_shapes(file)
    check_layer_counts(cfg, shapes, ckpt / "config.json", file.name)
    with torch.device("meta"):
        _load_weights(build(), from_hf({k: torch.empty(shape) for k, shape in shapes.items()}), ckpt)
    model = build()
    _load_weights(model, from_hf(read_weights(file)), ckpt)
    return model


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
    return is_encoder_config(read_json(resolve_checkpoint(path) / "config.json"))


def load_encoder(path: str | Path, device: str | torch.device = "cpu", kinds: tuple[str, ...] = ("mlm", "body", "classifier")):
    """(encoder in eval mode, tokenizer) from a BERT-style checkpoint folder or run folder: an
    EncoderLM (BertForMaskedLM), an Encoder (BertModel) or an EncoderClassifier
    (BertForSequenceClassification), as config.json's architectures say; `kinds` are those the
    caller can use."""
    ckpt = resolve_checkpoint(path)
    hf = read_json(ckpt / "config.json")
    try:
        if not is_encoder_config(hf):
            raise UserError("a decoder checkpoint, not an encoder (BERT): "
                            "train one with chatfoundry pretrain --objective mlm")
        cfg = hf_encoder.from_hf_config(hf)
        check_types(cfg)
        cfg.validate()
        num_labels = hf_encoder.num_labels_of(hf)
    except (ValueError, TypeError, KeyError, UserError) as e:
        raise UserError(f"{ckpt / 'config.json'}: {e}") from None
    kind = hf_encoder.kind_from_hf(hf)
    if kind not in kinds:
        need = " or ".join(hf_encoder.ARCHITECTURES[k] for k in kinds)
        raise UserError(f"{ckpt}: a {hf_encoder.ARCHITECTURES[kind]} checkpoint; this needs a {need}")
    model = _load(ckpt, cfg, lambda: hf_encoder.build(cfg, kind, num_labels),
                  lambda w: hf_encoder.state_dict_from_hf(w, cfg, kind, num_labels))
    if kind == "classifier":
        model.head = dict(hf.get("chatfoundry_head") or {"task": "regress" if num_labels == 1 else "classify",
                                                          "labels": [hf["id2label"][str(i)] for i in range(num_labels)]
                                                          if "id2label" in hf else []})
    return model.to(device).eval(), load_tokenizer(ckpt)


def is_reward_model(path: str | Path) -> bool:
    return "chatfoundry_reward" in read_json(resolve_checkpoint(path) / "config.json")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               seq2seq: bool = False) -> tuple[DecoderLM | Seq2SeqLM, Any]:
    """(language model in eval mode, tokenizer) from a checkpoint folder or run folder. The
    config says which family: a decoder LM, or with `seq2seq` (callers that handle both) also
    an encoder-decoder (T5)."""
    ckpt = resolve_checkpoint(path)
    if adapters.is_adapter(ckpt):  # its base with the adapter: LoRA merged in, a soft prompt attached
        model = adapters.load_adapter(ckpt, load_model(adapter_base(ckpt))[0])
        model = adapters.merge(model) if adapters.has_lora(model) else model
        return model.to(device).eval(), load_tokenizer(ckpt)
    hf, cfg = _read_config(ckpt)
    if "chatfoundry_reward" in hf:
        raise UserError(f"{ckpt}: a reward model, not a language model (it scores text: chatfoundry score)")
    if isinstance(cfg, Seq2SeqConfig):
        if not seq2seq:
            raise UserError(f"{ckpt}: an encoder-decoder (T5) checkpoint; this command takes a decoder-only "
                            "language model (T5 checkpoints: chatfoundry generate, finetune-seq2seq, convert)")
        model = _load(ckpt, cfg, lambda: Seq2SeqLM(cfg), lambda w: hf_t5.state_dict_from_hf(w, cfg))
    else:
        model = _load(ckpt, cfg, lambda: DecoderLM(cfg), lambda w: state_dict_from_hf(w, cfg))
    return model.to(device).eval(), load_tokenizer(ckpt)


def adapter_base(ckpt: Path) -> Path:
    """The base checkpoint an adapter folder names (adapter_config.json's base_model_name_or_path)."""
    base, _ = adapters.read_adapter_config(ckpt)
    if not base.exists():
        raise UserError(f"{ckpt / adapters.ADAPTER_CONFIG}: its base model {base} is not there (moved or deleted?)")
    return base


def plain_base(init: str) -> Path:
    """The checkpoint a LoRA or prompt-tuning run trains on and names as its base: a plain one, not
    an adapter."""
    base = resolve_checkpoint(init)
    if adapters.is_adapter(base):
        raise UserError(f"init: {init} is an adapter; put a new one on a plain checkpoint "
                        "(--merge writes a LoRA run's merged model to OUT/merged)")
    return base


def load_adapted(init: str, out: Path, resume: bool, spec: adapters.LoraConfig | adapters.PromptConfig, seed: int,
                 device: str | torch.device = "cpu") -> tuple[DecoderLM, Any, Path]:
    """(model with adapters, tokenizer, base) of a LoRA or prompt-tuning run: new adapters as `spec`
    says on `init`, a plain checkpoint; or, resumed, the run's own adapter on the base it names."""
    adapter = resolve_checkpoint(out) if resume else None
    base = adapter_base(adapter) if resume else plain_base(init)
    model, tokenizer = load_model(base, device)
    torch.manual_seed(seed)  # LoRA's A (B starts at 0) and a soft prompt's first tokens are drawn
    model = adapters.load_adapter(adapter, model, spec) if resume else adapters.attach(model, spec)
    return model, tokenizer, base


def adapter_outputs(out: Path, model: DecoderLM, tokenizer, merge: bool) -> dict:
    """An adapter run's summary fields: its trainable and total parameters, and with `merge` the
    folder OUT/merged, where the model is written as a plain checkpoint, LoRA folded in."""
    n, total = adapters.trainable(model)
    if not merge:
        return {"trainable_params": n, "params": total}
    merged = save_checkpoint(out / "merged", adapters.merge(copy.deepcopy(model)), tokenizer,
                             generation={"eos_token_id": chat_stop_ids(tokenizer)})
    return {"trainable_params": n, "params": total, "merged": str(merged)}


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """(reward model in eval mode, tokenizer) from a checkpoint written by `chatfoundry rm`."""
    ckpt = resolve_checkpoint(path)
    hf, cfg = _read_config(ckpt)
    reward = hf.get("chatfoundry_reward")
    if not isinstance(reward, dict):
        raise UserError(f"{ckpt}: a language model, not a reward model (train one: chatfoundry rm --init {path})")
    model = _load(ckpt, cfg, lambda: RewardModel(cfg), lambda w: reward_state_dict_from_hf(w, cfg))
    model.offset = float(reward.get("offset", 0.0))
    model.normalization = {k: v for k, v in reward.items() if k != "offset"}
    return model.to(device).eval(), load_tokenizer(ckpt)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    state_file = ckpt / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"{ckpt}: no {TRAINER_STATE} to resume from")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, garbage, a pickle weights_only refuses: all one story
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{state_file}: cannot be read, so the run cannot resume from it ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{state_file}: holds a {type(state).__name__}, not a trainer state")
    return state


def model_config(path: str | Path) -> DecoderConfig | Seq2SeqConfig:
    """The model's config as `load_model` gives it (a soft prompt's tokens taken from the context)."""
    ckpt = resolve_checkpoint(path)
    if not adapters.is_adapter(ckpt):
        return _read_config(ckpt)[1]
    cfg, spec = _read_config(adapter_base(ckpt))[1], adapters.read_adapter_config(ckpt)[1]
    return replace(cfg, block_size=cfg.block_size - spec.tokens) if isinstance(spec, adapters.PromptConfig) else cfg
