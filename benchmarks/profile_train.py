"""Where does a CPU training step of our DecoderLM spend its time? Probes behind train_throughput.py.

Sections (pick with --sections, default all):

  phases     forward+loss / backward / clip / optimizer.step / zero_grad, ours and transformers
  ops        torch.profiler over a few steps of ours: top ops by self CPU time, and by category
  optim      AdamW.step variants on the model's parameters: for-loop (torch's CPU default),
             foreach=True, fused=True; clip_grad_norm_ foreach on/off; results checked equal
  attention  one layer's attention core, forward+backward: SDPA vs the explicit softmax(QK^T)V,
             and for grouped-query heads repeat_interleave vs SDPA's enable_gqa
  compile    ours eager vs torch.compile, whole train steps, interleaved

    python benchmarks/profile_train.py --flavour llama
    python benchmarks/profile_train.py --sections optim,attention --batch_size 2 --seq_len 64   # quick

Timings are the fastest of --repeats (load only adds time); run on an idle machine for figures
worth quoting.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, adamw_like_ours, build_pair, hf_loss, machine_info, make_step, our_loss,  # noqa: E402
                     random_batch)

from chatfoundry.models.decoder import PRESETS  # noqa: E402
from chatfoundry.train.loop import TrainConfig, make_optimizer  # noqa: E402

SECTIONS = ("phases", "ops", "optim", "attention", "compile")

CATEGORIES = [  # first match wins; keys of 4+ characters match inside the op name, shorter ones exactly
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("gelu / silu", ("gelu", "silu")),
    ("norms", ("layer_norm", "rms_norm")),
    ("embedding", ("embedding",)),
    ("optimizer / clip", ("_foreach", "_fused_adam", "addcdiv", "addcmul", "lerp", "sqrt", "norm", "clamp",
                          "mul_", "add_", "div", "zero_")),
    ("reductions (bias grads, loss)", ("sum", "mean")),
    ("copies / layout", ("copy_", "clone", "contiguous", "cat", "repeat_interleave", "index", "transpose", "view",
                         "reshape", "expand", "t", "permute", "_unsafe_view", "as_strided", "empty", "fill_",
                         "zeros_like", "ones_like")),
]


def category(op: str) -> str:
    name = op.removeprefix("aten::")
    for cat, keys in CATEGORIES:
        if any(name == k or (len(k) >= 4 and k in name) for k in keys):
            return cat
    return "other"


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Fastest of `repeats` calls: background load only ever adds time."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def ms(s: float) -> str:
    return f"{s * 1e3:8.2f} ms"


# ---------------------------------------------------------------- sections


def phases(args, cfg, ours, theirs, x, y) -> dict:
    """Each part of a train step (fastest of the repeats), ours and transformers, steps interleaved."""
    tc = TrainConfig()
    opt_o = make_optimizer(ours, tc, torch.device("cpu"))
    opt_h = adamw_like_ours(theirs, tc, fused=False)
    parts = ("forward+loss", "backward", "clip", "optimizer.step", "zero_grad")
    rec = {"ours": {p: [] for p in parts}, "transformers": {p: [] for p in parts}}
    runs = {"ours": (ours, opt_o, our_loss), "transformers": (theirs, opt_h, hf_loss)}
    for i in range(args.warmup + args.repeats):
        for name, (model, opt, loss_fn) in runs.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            t0 = time.perf_counter()
            loss = loss_fn(model, x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            t5 = time.perf_counter()
            if i >= args.warmup:
                for p, d in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    rec[name][p].append(d)
    out = {n: {p: min(v) for p, v in r.items()} for n, r in rec.items()}
    print(f"  {'part':16} {'ours':>11} {'share':>6} {'transformers':>14} {'share':>6}")
    tot = {n: sum(v.values()) for n, v in out.items()}
    for p in parts:
        print(f"  {p:16} {ms(out['ours'][p])} {out['ours'][p] / tot['ours']:6.1%} "
              f"{ms(out['transformers'][p]):>14} {out['transformers'][p] / tot['transformers']:6.1%}")
    print(f"  {'total':16} {ms(tot['ours'])} {'':6} {ms(tot['transformers']):>14}")
    return out


def ops(args, cfg, ours, theirs, x, y) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(ours)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    step = make_step(model, opt, our_loss, x, y)
    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(f"  top {args.top} ops by self CPU time over {args.profile_steps} steps (total {total / 1e3:.1f} ms):")
    for e in top:
        print(f"    {e.key[:52]:52} {e.self_cpu_time_total / 1e3 / args.profile_steps:9.2f} ms/step "
              f"{e.self_cpu_time_total / total:6.1%}  x{e.count // args.profile_steps}")
    cats: dict[str, float] = {}
    for e in events:
        cat = category(e.key)
        cats[cat] = cats.get(cat, 0.0) + e.self_cpu_time_total
    print("  by category:")
    for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"    {c:32} {t / 1e3 / args.profile_steps:9.2f} ms/step {t / total:6.1%}")
    return {"total_ms_per_step": total / 1e3 / args.profile_steps,
            "top": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.profile_steps,
                     "calls_per_step": e.count / args.profile_steps} for e in top],
            "categories_ms_per_step": {c: t / 1e3 / args.profile_steps for c, t in cats.items()}}


def optim(args, cfg, ours, theirs, x, y) -> dict:
    """AdamW.step and clip_grad_norm_ variants on our parameters with real gradients."""
    tc = TrainConfig()
    model = copy.deepcopy(ours)
    our_loss(model, x, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    variants = {"for-loop (torch CPU default, ours)": {}, "foreach=True": {"foreach": True},
                "fused=True": {"fused": True}}
    out, after = {}, {}
    print(f"  {len(list(model.parameters()))} parameter tensors, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M values")
    for name, kw in variants.items():
        m = copy.deepcopy(model)
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
        try:
            opt = adamw_like_ours(m, tc, **kw)
            opt.step()  # state allocation happens here: not timed
        except (RuntimeError, ValueError) as e:
            print(f"  AdamW {name:34} unavailable: {e}")
            continue
        out[name] = best_time(opt.step, args.repeats * 4, warmup=1)
        m2 = copy.deepcopy(model)  # one step from the same start, to compare the results
        for n, p in m2.named_parameters():
            p.grad = grads[n].clone()
        o2 = adamw_like_ours(m2, tc, **kw)
        o2.step()
        after[name] = [p.detach().clone() for p in m2.parameters()]
        print(f"  AdamW {name:34} {ms(out[name])}")
    base = next(iter(after.values()))
    for name, ps in after.items():
        diff = max((a - b).abs().max().item() for a, b in zip(base, ps))
        print(f"    {name:40} max |param diff| vs default after one step: {diff:.1e}")
    params = list(model.parameters())
    for foreach in (False, True):
        t = best_time(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach), args.repeats * 4)
        out[f"clip_grad_norm_ foreach={foreach}"] = t
        print(f"  clip_grad_norm_ foreach={foreach!s:5}            {ms(t)}")
    d = make_optimizer(model, tc, torch.device("cpu")).defaults
    print(f"  make_optimizer on CPU: fused={d['fused']}, foreach={d['foreach']} (None: torch picks; on CPU the for-loop)")
    return out


def attention(args, cfg, ours, theirs, x, y) -> dict:
    """One layer's attention core at the benchmark's shapes, forward + backward."""
    B, T, H, KV, d = args.batch_size, x.shape[1], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, d, generator=g, requires_grad=True)
    k = torch.randn(B, KV, T, d, generator=g, requires_grad=True)
    v = torch.randn(B, KV, T, d, generator=g, requires_grad=True)
    dy = torch.randn(B, H, T, d, generator=g)
    rep = H // KV
    mask = torch.ones(T, T, dtype=torch.bool).tril()

    def expand(t):
        return t.repeat_interleave(rep, dim=1) if rep > 1 else t

    def sdpa():
        return F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)

    def explicit():
        att = (q @ expand(k).transpose(-2, -1)) / d**0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return att @ expand(v)

    variants = {"sdpa + repeat_interleave (ours)": sdpa, "explicit softmax(QK^T)V": explicit}
    if rep > 1:
        variants["sdpa enable_gqa=True"] = sdpa_gqa
    ref = explicit().detach()
    out = {}
    print(f"  shapes: B={B} H={H} kv={KV} T={T} d={d}; x{cfg.n_layer} layers per step")
    for name, fn in variants.items():
        err = (fn().detach() - ref).abs().max().item()

        def fwd_bwd(fn=fn):
            for t in (q, k, v):
                t.grad = None
            fn().backward(dy)

        out[name] = {"fwd_ms": best_time(lambda fn=fn: fn(), args.repeats * 4) * 1e3,
                     "fwd_bwd_ms": best_time(fwd_bwd, args.repeats * 4) * 1e3, "max_err_vs_explicit": err}
        print(f"  {name:34} forward {out[name]['fwd_ms']:7.2f} ms, forward+backward {out[name]['fwd_bwd_ms']:7.2f} ms "
              f"(max err {err:.1e})")
    return out


def compiled(args, cfg, ours, theirs, x, y) -> dict:
    tc = TrainConfig()
    eager = copy.deepcopy(ours)
    comp = copy.deepcopy(ours)
    steps = {"eager": make_step(eager, make_optimizer(eager, tc, torch.device("cpu")), our_loss, x, y)}
    cm = torch.compile(comp)
    steps["torch.compile"] = make_step(cm, make_optimizer(comp, tc, torch.device("cpu")), our_loss, x, y)
    t = time.perf_counter()
    steps["torch.compile"]()
    compile_s = time.perf_counter() - t
    for s in steps.values():
        for _ in range(args.warmup):
            s()
    rec = {n: [] for n in steps}
    for r in range(args.repeats):
        for n in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t = time.perf_counter()
            steps[n]()
            rec[n].append(time.perf_counter() - t)
    out = {n: min(v) for n, v in rec.items()}
    print(f"  first compiled step (compilation) {compile_s:.1f} s")
    for n, v in out.items():
        print(f"  {n:16} {ms(v)} per step")
    print(f"  speed-up {out['eager'] / out['torch.compile']:.2f}x")
    return {"compile_s": compile_s, "ms_per_step": {n: v * 1e3 for n, v in out.items()}}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="mini", choices=list(PRESETS))
    p.add_argument("--flavour", default="gpt2", choices=("gpt2", "llama"))
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=0, help="default: the preset's block_size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (the fastest counts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile_steps", type=int, default=3, help="steps under torch.profiler (section ops)")
    p.add_argument("--top", type=int, default=15, help="ops listed (section ops)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_train.json"))
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]!r}; one of {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    seq_len = args.seq_len or PRESETS[args.preset][3]
    cfg, ours, theirs = build_pair(args.preset, args.flavour, args.vocab_size, seq_len)
    x, y = random_batch(args.batch_size, seq_len, cfg.vocab_size)
    info = machine_info(args.threads)
    print(f"{args.preset}/{args.flavour}, batch {args.batch_size} x {seq_len}, {args.threads} threads, "
          f"torch {info['torch']}, {info['cpu_model']}")
    funcs = {"phases": phases, "ops": ops, "optim": optim, "attention": attention, "compile": compiled}
    report = {"machine": info, "settings": vars(args)}
    for s in sections:
        print(f"\n[{s}]")
        report[s] = funcs[s](args, cfg, ours, theirs, x, y)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
