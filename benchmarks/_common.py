"""Helpers the benchmark scripts share: machine facts, the matmul peak, ours and the transformers twin.

Not part of the package: run the scripts from the repository root (`python benchmarks/...`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from chatfoundry.models.decoder import DecoderConfig, DecoderLM
from chatfoundry.models.hf import state_dict_to_hf, to_hf_config
from chatfoundry.train.loop import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import os

    info = {"torch": torch.__version__, "threads": threads, "cpu_model": cpu_model(),
            "cpus_online": os.cpu_count(), "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["load_avg_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 10, budget_s: float = 30.0,
                dtype: torch.dtype = torch.float32) -> dict:
    """Square matmul FLOP/s at each size (best of `repeats`); peak = the best of all sizes.

    Uses the current torch.get_num_threads(). 2*n^3 FLOPs per n x n @ n x n product.
    """
    per_size = {}
    start = time.perf_counter()
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: thread pool, page faults
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() - start > budget_s:
                break
        per_size[n] = 2 * n**3 / best
    return {"sizes": {str(n): f for n, f in per_size.items()}, "peak_flops": max(per_size.values())}


def build_pair(preset: str, flavour: str, vocab_size: int, seq_len: int, seed: int = 0):
    """Our DecoderLM and the transformers model computing the same function (same weights).

    Dropout is 0 in both; transformers uses its SDPA attention.
    """
    import transformers

    cfg = DecoderConfig.from_preset(preset, flavour)
    cfg.vocab_size = vocab_size
    cfg.dropout = 0.0
    if seq_len > cfg.block_size:
        raise SystemExit(f"--seq_len {seq_len} exceeds the {preset} preset's block_size {cfg.block_size}")
    cfg.validate()
    torch.manual_seed(seed)
    ours = DecoderLM(cfg)
    hf = to_hf_config(cfg)
    hf.pop("chatfoundry")
    arch = hf.pop("architectures")[0]
    model_type = hf.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **hf)
    hf_cfg._attn_implementation = "sdpa"
    theirs = getattr(transformers, arch)(hf_cfg)
    theirs.loss_type = "ForCausalLM"  # what it falls back to anyway, minus a warning per model
    result = theirs.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise RuntimeError(f"weight conversion mismatch: {result}")
    theirs.tie_weights()
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    return cfg, ours, theirs


def our_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    # `shift_labels`: the targets are already shifted (as ours), so transformers scores every position.
    return model(input_ids=x, labels=y, shift_labels=y).loss


def autocast_loss(loss_fn, dtype: str):
    """loss_fn under CPU bf16 autocast (matmuls in bf16, weights and optimizer fp32), or as it is."""
    if dtype == "fp32":
        return loss_fn

    def wrapped(model, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(model, x, y)

    return wrapped


def adamw_like_ours(model: torch.nn.Module, tc: TrainConfig, **kw) -> torch.optim.AdamW:
    """torch AdamW with make_optimizer's hyperparameters and decay split (matrices decayed, 1-D not)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), **kw)


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def make_step(model, optimizer, loss_fn, x, y, clip: float = 1.0):
    """One training step as the shared loop does it: loss, backward, clip, step, zero_grad."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> torch.Tensor:
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def gemm_ceiling(cfg, tokens: int, repeats: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """FLOP/s of the model's own weight matmuls, timed alone at the step's shapes.

    For every nn.Linear of a layer (and the LM head) at M = tokens rows: the forward product
    X W^T and the backward pair dX = dY W, dW = dY^T X (6 FLOPs per weight per token, as
    flops_per_token counts them). Attention scores, norms, activations and the optimizer are
    left out, so this is the most a train step could reach if everything else were free: the
    shape-limited ceiling on MFU, usually below the square-matmul peak.
    """
    d, f, kv = cfg.n_embd, cfg.ffn_dim, cfg.n_kv_head * cfg.head_dim
    # (in, out) of each Linear in a layer: q, k, v, o; up (and gate for SwiGLU), down.
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f)] + ([(d, f)] if cfg.mlp == "swiglu" else []) + [(f, d)]
    g = torch.Generator().manual_seed(0)
    mats = {}
    for i, o in set(shapes + [(d, cfg.vocab_size)]):
        mats[(i, o)] = (torch.randn(tokens, i, generator=g).to(dtype), torch.randn(o, i, generator=g).to(dtype),
                        torch.randn(tokens, o, generator=g).to(dtype))

    def run_all():
        for layer_shapes, times in ((shapes, cfg.n_layer), ([(d, cfg.vocab_size)], 1)):
            for _ in range(times):
                for key in layer_shapes:
                    x, w, dy = mats[key]
                    torch.mm(x, w.t())  # forward
                    torch.mm(dy, w)  # grad of the input
                    torch.mm(dy.t(), x)  # grad of the weight

    run_all()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run_all()
        best = min(best, time.perf_counter() - t)
    weights = cfg.n_layer * sum(i * o for i, o in shapes) + d * cfg.vocab_size
    flops = 6 * weights * tokens
    return {"flops": flops / best, "ms": best * 1e3, "matmul_flops_per_step": flops}


def write_report(report: dict, path: str | Path) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out}")
