"""LoRA adapters through `peft`: a low-rank update B @ A (scaled by alpha / r) beside chosen
projections, the base weights frozen (Hu et al. 2021).

`peft` injects its LoRA layers into our model (`inject_adapter_in_model`); the model stays a
`DecoderLM`, so every stage's code runs on it unchanged. A run saves only the adapter, in peft's
own format and under transformers' names for the base's architecture, beside a pointer to the
base checkpoint, so

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)

loads it. Where transformers fuses q, k and v into one projection (GPT-2, GPT-NeoX), three rank-r
updates are one rank-3r update of the fused one: A stacks the three A's, B places each B in its
own block of columns (rows laid out as the fused weight's), `rank_pattern` and `alpha_pattern`
keeping alpha / r. Our loader maps the names back; `merge` folds the update into the weights.

Prompt tuning (Lester et al. 2021) trains n virtual tokens' input embeddings before every sequence,
the whole model frozen. peft's prompt learning wraps a transformers model (it feeds
`inputs_embeds`), so the few lines it takes live in our model (`DecoderLM.prompt`); the run saves
peft's format (PROMPT_TUNING, `prompt_embeddings`), which PeftModel loads the same way.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chatfoundry.config import require
from chatfoundry.errors import UserError
from chatfoundry.models.decoder import DecoderConfig, DecoderLM
from chatfoundry.models.hf import _gpt2_key, _neox_fuse, _neox_key, hf_architecture

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass
class LoraConfig:
    r: int = 8  # the rank of each update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input, in training only
    # the layers that get an adapter, by name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    # down_proj, lm_head); empty: every attention and MLP projection the model has, and lm_head
    targets: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class PromptConfig:
    tokens: int = 20  # virtual tokens: learned input embeddings before every sequence (the context loses as many)

    def validate(self) -> None:
        require(self.tokens > 0, "prompt.tokens", f"must be > 0, got {self.tokens}")


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("peft: LoRA needs the peft package: pip install 'chatfoundry[peft]'") from None
    return peft


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def add_lora(model: DecoderLM, cfg: LoraConfig) -> DecoderLM:
    """`model` with LoRA on `cfg.targets` (in place), only the adapters trainable. A target that
    names no layer of the model is a UserError naming it.

    The default adapts the output layer too: on the tiny models, whose (tied) embedding holds a
    quarter of the weights, LoRA on the projections alone left SFT's validation loss at 1.47 after
    100 steps where full finetuning reached 0.46; with lm_head, 0.68 (docs/sft.md)."""
    peft = _peft()
    have = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
                  & set(PROJECTIONS))
    targets = list(cfg.targets) or have
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise UserError(f"lora.targets: {', '.join(unknown)} matches no layer of this model "
                        f"(it has {', '.join(have)})")
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             bias="none")
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    model.lora_config = cfg  # what save_adapter writes
    return model


def rl_lora() -> LoraConfig:
    """An RL stage's LoRA: no dropout, as TRL turns dropout off in its RL trainers, so that the
    update's log-probabilities are the very function that sampled (PPO's first ratio is 1)."""
    return LoraConfig(dropout=0.0)


def describe(model: nn.Module) -> str:
    """Where the adapters sit and how many parameters train, in one line."""
    n, total = trainable(model)
    what = f"LoRA r {model.lora_config.r} on {', '.join(targets(model))}" if has_lora(model) else \
        f"prompt tuning, {model.prompt.shape[0]} virtual tokens"
    return f"{what}: {n:,} of {total:,} parameters trainable ({n / total:.2%}), the base frozen"


def add_prompt(model: DecoderLM, cfg: PromptConfig) -> DecoderLM:
    """`model` with a soft prompt of `cfg.tokens` virtual tokens (in place), only the prompt
    trainable; `config.block_size` becomes what the real tokens have left. The prompt starts as
    the embeddings of randomly drawn vocabulary tokens (Lester et al.'s sampled-vocabulary init):
    at the embeddings' scale, where peft's random init, N(0, 1), is ~50x larger than any of them."""
    require(cfg.tokens < model.config.block_size, "prompt.tokens",
            f"{cfg.tokens} virtual tokens leave no room in the model's context of {model.config.block_size}")
    rows = torch.randint(model.config.vocab_size, (cfg.tokens,))
    model.requires_grad_(False)
    model.prompt = nn.Parameter(model.embed_tokens.weight.detach()[rows].clone())
    model.config = replace(model.config, block_size=model.config.block_size - cfg.tokens)
    return model


def attach(model: DecoderLM, spec: LoraConfig | PromptConfig) -> DecoderLM:
    """`model` with new adapters as `spec` says: LoRA layers, or a soft prompt."""
    return add_lora(model, spec) if isinstance(spec, LoraConfig) else add_prompt(model, spec)


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` carries LoRA adapters or a soft prompt (a run then saves only those)."""
    return has_lora(model) or getattr(model, "prompt", None) is not None


def targets(model: nn.Module) -> list[str]:
    """The names of the layers that carry an adapter ("q_proj", ..., "lm_head")."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _lora_layers(model)})


def has_lora(model: nn.Module) -> bool:
    return hasattr(model, "lora_config")


def base_of(model: DecoderLM) -> DecoderLM:
    """The base under a LoRA model as a plain `DecoderLM` holding the very same weight tensors: the
    model with its adapters off (an RL stage's frozen reference), one copy of the weights in memory.
    A model rather than a switch (TRL's `disable_adapter()`), so every caller of the reference
    (scoring, KV-cache decoding, the evaluation) runs unchanged; the base never trains, so sharing
    its tensors is exact."""
    base = copy.deepcopy(model, {id(p): p for p in model.parameters()})  # modules copied, parameters shared
    for name, layer in _lora_layers(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.get_base_layer())
    del base.lora_config
    return base.requires_grad_(False)


def merge(model: DecoderLM) -> DecoderLM:
    """Fold each update into its base weight and drop the adapters: a plain DecoderLM again (with
    its output layer untied from the embedding when that layer had an adapter)."""
    for name, layer in _lora_layers(model):
        if name == "lm_head" and model.config.tie_embeddings:  # the update is the output layer's alone: untie
            base = layer.get_base_layer()
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
            model.config.tie_embeddings = False
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.lora_config
    return model


def trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------- our names <-> transformers'


def _ours(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted module's (A, B) under our module names ("layers.0.self_attn.q_proj")."""
    return {name: (layer.lora_A["default"].weight, layer.lora_B["default"].weight) for name, layer in _lora_layers(model)}


def _hf_module(name: str, cfg: DecoderConfig) -> str:
    """transformers' name of one of our modules ("layers.0.self_attn.o_proj", "lm_head"). The output
    layer is `lm_head` in every architecture since transformers 5 (GPT-NeoX's was `embed_out`)."""
    arch = hf_architecture(cfg)
    if name == "lm_head":
        return name
    if arch in ("llama", "qwen2"):
        return "model." + name
    return {"gpt_neox": _neox_key, "gpt2": _gpt2_key}[arch](name + ".weight").removesuffix(".weight")


def _fused_name(layer: str, cfg: DecoderConfig) -> str:
    """transformers' fused q, k, v projection of our "layers.N"."""
    n = layer.rsplit(".", 1)[1]
    return f"gpt_neox.layers.{n}.attention.query_key_value" if hf_architecture(cfg) == "gpt_neox" \
        else f"transformer.h.{n}.attn.c_attn"


def _key(module: str, part: str) -> str:
    """peft's saved name of a module's lora_A or lora_B weight."""
    return f"base_model.model.{module}.lora_{part}.weight"


def to_hf(model: DecoderLM) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """The adapter under transformers' module names: (peft state dict, module -> rank where it is
    not r, the adapted modules)."""
    cfg, r = model.config, model.lora_config.r
    arch = hf_architecture(cfg)
    fused = arch in ("gpt_neox", "gpt2")
    state, ranks, modules = {}, {}, []

    def put(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        state[_key(module, "A")], state[_key(module, "B")] = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        modules.append(module)

    ours = _ours(model)
    for name, (a, b) in ours.items():
        if not (fused and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")):
            put(_hf_module(name, cfg), a, b)
    if fused:
        for layer in sorted({n.rsplit(".self_attn.", 1)[0] for n in ours if ".self_attn." in n
                             and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")}):
            parts = [ours.get(f"{layer}.self_attn.{p}_proj") for p in "qkv"]
            sizes = [cfg.n_embd, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
            a = torch.cat([p[0] if p else torch.zeros(r, cfg.n_embd) for p in parts])  # (3r, d)
            blocks = [torch.zeros(n, 3 * r) for n in sizes]
            for j, p in enumerate(parts):
                if p:
                    blocks[j][:, j * r:(j + 1) * r] = p[1]
            b = _neox_fuse(blocks, cfg.n_head) if arch == "gpt_neox" else torch.cat(blocks)
            module = _fused_name(layer, cfg)
            put(module, a, b)
            ranks[module] = 3 * r
    return state, ranks, modules


def from_hf(model: DecoderLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf`: our LoRA parameters (`model`'s names) from a saved adapter state."""
    cfg, r = model.config, model.lora_config.r
    arch = hf_architecture(cfg)
    out = {}
    for name, _ in _ours(model).items():
        short = name.rsplit(".", 1)[-1]
        if arch in ("gpt_neox", "gpt2") and short in ("q_proj", "k_proj", "v_proj"):
            module = _fused_name(name.rsplit(".self_attn.", 1)[0], cfg)
            j = "qkv".index(short[0])
            a, b = state[_key(module, "A")], state[_key(module, "B")]
            if arch == "gpt_neox":
                rows = [p.flatten(0, 1) for p in b.unflatten(0, (cfg.n_head, 3, -1)).unbind(1)]
            else:
                rows = b.split(cfg.n_embd)
            a_j, b_j = a[j * r:(j + 1) * r], rows[j][:, j * r:(j + 1) * r]
        else:
            module = _hf_module(name, cfg)
            a_j, b_j = state[_key(module, "A")], state[_key(module, "B")]
        out[f"{name}.lora_A.default.weight"], out[f"{name}.lora_B.default.weight"] = a_j, b_j
    return out


# ---------------------------------------------------------------- the adapter checkpoint


def save_adapter(folder: Path, model: DecoderLM, base: Path) -> None:
    """adapter_config.json and adapter_model.safetensors in peft's format, into `folder`."""
    peft = _peft()
    if model.prompt is not None:
        n, dim = model.prompt.shape
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=dim, num_transformer_submodules=1,
                                num_attention_heads=model.config.n_head, num_layers=model.config.n_layer,
                                base_model_name_or_path=str(Path(base).resolve())).save_pretrained(str(folder))
        save_file({"prompt_embeddings": model.prompt.detach().cpu().contiguous()}, folder / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        return
    state, ranks, modules = to_hf(model)
    lora = model.lora_config
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules,
                             rank_pattern=ranks, alpha_pattern={m: lora.alpha * k / lora.r for m, k in ranks.items()},
                             fan_in_fan_out=hf_architecture(model.config) == "gpt2", bias="none",
                             task_type="CAUSAL_LM", base_model_name_or_path=str(Path(base).resolve()))
    config.save_pretrained(str(folder))
    save_file(state, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def read_adapter_config(folder: Path) -> tuple[Path, LoraConfig | PromptConfig]:
    """(the base checkpoint, our LoraConfig or PromptConfig) from an adapter folder's adapter_config.json."""
    try:
        raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / ADAPTER_CONFIG}: not readable JSON ({e})") from None
    if raw.get("peft_type") not in ("LORA", "PROMPT_TUNING"):
        raise UserError(f"{folder / ADAPTER_CONFIG}: a {raw.get('peft_type')} adapter; chatfoundry loads LoRA and "
                        "prompt-tuning ones")
    try:
        if raw["peft_type"] == "PROMPT_TUNING":
            return Path(raw["base_model_name_or_path"]), PromptConfig(tokens=int(raw["num_virtual_tokens"]))
        modules = raw["target_modules"]
        targets = sorted({ours for m in (modules if isinstance(modules, list) else [modules]) for ours in _ours_of(m)})
        lora = LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                          targets=targets)
        return Path(raw["base_model_name_or_path"]), lora
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / ADAPTER_CONFIG}: not a LoRA adapter config peft wrote ({e})") from None


def _ours_of(module: str) -> list[str]:
    """Our projections behind one of transformers' module names (a fused qkv stands for three)."""
    last = module.rsplit(".", 1)[-1]
    if last in ("query_key_value", "c_attn"):
        return ["q_proj", "k_proj", "v_proj"]
    if module.endswith(("attention.dense", "attn.c_proj")):
        return ["o_proj"]
    if last in ("dense_h_to_4h", "c_fc"):
        return ["up_proj"]
    if module.endswith(("dense_4h_to_h", "mlp.c_proj")):
        return ["down_proj"]
    if last == "embed_out":
        return ["lm_head"]
    return [last]


def load_adapter(folder: Path, base_model: DecoderLM, config: LoraConfig | PromptConfig | None = None) -> DecoderLM:
    """`base_model` with the adapter saved in `folder`, unmerged; `config` (a resumed run's) says
    which projections carry one, else the adapter's config does."""
    config = config or read_adapter_config(folder)[1]
    state = load_file(folder / ADAPTER_WEIGHTS)
    if isinstance(config, PromptConfig):
        model = add_prompt(base_model, config)
        prompt = state.get("prompt_embeddings")
        if prompt is None or prompt.shape != model.prompt.shape:
            raise UserError(f"{folder / ADAPTER_WEIGHTS}: no prompt_embeddings of shape {tuple(model.prompt.shape)}: "
                            "the prompt was trained on another base")
        with torch.no_grad():
            model.prompt.copy_(prompt)
        return model
    model = add_lora(base_model, config)
    try:
        ours = from_hf(model, state)
    except KeyError as e:
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: no weights for {e.args[0]}: the adapter does not match "
                        "its base model") from None
    current = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    bad = [k for k in current if ours[k].shape != current[k].shape]
    if bad:
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: {bad[0]} has shape {tuple(ours[bad[0]].shape)}, its base "
                        f"model wants {tuple(current[bad[0]].shape)}: the adapter was trained on another base")
    model.load_state_dict(ours, strict=False)
    return model
