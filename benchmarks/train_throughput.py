"""Training throughput on CPU: chatfoundry's DecoderLM against the identical transformers model.

For each flavour (gpt2, llama) the script builds our model from a preset and the transformers
model (GPT2LMHeadModel / LlamaForCausalLM, SDPA attention) from `to_hf_config`, loads our weights
into it with `state_dict_to_hf` and checks that both give the same loss on the same batch: the
two contenders compute the same function. Both then train on that batch with the same AdamW
(our `make_optimizer`; a torch AdamW with the same hyperparameters and decay split for transformers)
and the same thread count. One train step = forward with loss + backward + clip_grad_norm_(1.0)
+ optimizer.step + zero_grad, as the shared training loop does it.

Rounds of `--steps` steps alternate between the contenders (and alternate who goes first), so
background load hits both alike; a contender's figure is its best round (`--stat median` for the
median). Reported: tokens/s, ms/step, achieved FLOP/s = flops_per_token(cfg, seq_len) x tokens/s,
and that as a fraction of this machine's fp32 matmul peak (large square matmuls, same threads,
measured before and after the models, the better counts) — the model FLOP utilisation (MFU).
For context it also times the step's weight matmuls alone at the step's shapes (forward and both
backward products, nothing else): the FLOP/s a step could reach if attention, norms, activations,
loss and optimizer were free. `--dtype bf16` runs both contenders under CPU bf16 autocast and
measures the peak with bf16 matmuls instead.

Targets (from the issue): ours >= 1.1x transformers' tokens/s per flavour; ours >= 80% of the
measured matmul peak for the ~7M (mini) model on CPU.

    python benchmarks/train_throughput.py                        # mini preset, both flavours
    python benchmarks/train_throughput.py --compile              # also ours under torch.compile
    python benchmarks/train_throughput.py --dtype bf16           # both under bf16 autocast
    python benchmarks/train_throughput.py --batch_size 2 --seq_len 64 --steps 2 --rounds 1  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, adamw_like_ours, autocast_loss, build_pair, gemm_ceiling, hf_loss,  # noqa: E402
                     machine_info, make_step, matmul_peak, our_loss, random_batch, write_report)

from chatfoundry.models.decoder import PRESETS, flops_per_token, num_params  # noqa: E402
from chatfoundry.train.loop import TrainConfig, make_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_RATIO = 1.1
TARGET_MFU = 0.8
LOSS_TOL = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Figures are only meaningful on an otherwise idle machine.")
    p.add_argument("--preset", default="mini", choices=list(PRESETS), help="model size preset (default: mini, ~7M)")
    p.add_argument("--flavours", default="gpt2,llama", help="comma-separated flavours (default: gpt2,llama)")
    p.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default: the preset's block_size)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (default: 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per contender (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (default: 2)")
    p.add_argument("--stat", choices=("best", "median"), default="best",
                   help="which round a contender's figure comes from (default: best, the least disturbed)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads for everything, peak included (default: {torch.get_num_threads()})")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default), or bf16 autocast for both contenders (as pretrain --dtype bf16); "
                        "the peak and the GEMM ceiling are then measured with bf16 matmuls")
    p.add_argument("--hf_adamw", choices=("ours", "fused", "foreach", "for-loop"), default="ours",
                   help="AdamW implementation for transformers: 'ours' (default) copies make_optimizer's fused/foreach "
                        "flags, so only the models differ; 'fused' is what transformers' Trainer picks on torch >= 2.8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"),
                   help="JSON results path (default: benchmarks/results/train_throughput.json)")
    args = p.parse_args(argv)
    for name in ("vocab_size", "batch_size", "steps", "rounds", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0 or args.seq_len < 0:
        p.error("--warmup and --seq_len must be >= 0")
    return args


def time_rounds(contenders: dict, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each round, contenders interleaved (the order alternates every round)."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step = contenders[name]
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t) / steps)
    return times


def bench_flavour(args, flavour: str) -> dict:
    seq_len = args.seq_len or PRESETS[args.preset][3]
    cfg, ours, theirs = build_pair(args.preset, flavour, args.vocab_size, seq_len, args.seed)
    x, y = random_batch(args.batch_size, seq_len, cfg.vocab_size, args.seed)
    tokens = args.batch_size * seq_len
    fpt = flops_per_token(cfg, seq_len)

    with torch.no_grad():
        l_ours, l_hf = our_loss(ours, x, y).item(), hf_loss(theirs, x, y).item()
    if abs(l_ours - l_hf) > LOSS_TOL:
        raise SystemExit(f"{flavour}: initial losses differ: ours {l_ours:.6f} vs transformers {l_hf:.6f}; "
                         "the models do not compute the same function, timings would not compare")

    tc = TrainConfig()
    compiled_model = copy.deepcopy(ours) if args.compile else None  # before any step: same start
    opt_ours = make_optimizer(ours, tc, torch.device("cpu"))
    # By default the very AdamW make_optimizer builds (fused / foreach flags included), on transformers' parameters.
    impl = {"ours": {"fused": opt_ours.defaults.get("fused"), "foreach": opt_ours.defaults.get("foreach")},
            "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[args.hf_adamw]
    opt_hf = adamw_like_ours(theirs, tc, **impl)
    ours_fn, hf_fn = autocast_loss(our_loss, args.dtype), autocast_loss(hf_loss, args.dtype)
    contenders = {"ours": make_step(ours, opt_ours, ours_fn, x, y),
                  "transformers": make_step(theirs, opt_hf, hf_fn, x, y)}
    compile_s = None
    if compiled_model is not None:
        cm = torch.compile(compiled_model)
        opt_c = make_optimizer(compiled_model, tc, torch.device("cpu"))
        contenders["ours+compile"] = make_step(cm, opt_c, ours_fn, x, y)
        t = time.perf_counter()
        contenders["ours+compile"]()  # compiles forward and backward
        compile_s = time.perf_counter() - t

    for name, step in contenders.items():
        for _ in range(args.warmup):
            step()
    times = time_rounds(contenders, args.steps, args.rounds)

    with torch.no_grad():  # after the same number of identical steps the two should still agree closely
        drift = abs(our_loss(ours, x, y).item() - hf_loss(theirs, x, y).item())
    ceiling = gemm_ceiling(cfg, tokens, dtype=DTYPES[args.dtype])

    rows = {}
    for name, ts in times.items():
        s = min(ts) if args.stat == "best" else statistics.median(ts)
        tps = tokens / s
        rows[name] = {"ms_per_step": s * 1e3, "tokens_per_s": tps, "flops": fpt * tps,
                      "round_ms": [t * 1e3 for t in ts], "median_ms_per_step": statistics.median(ts) * 1e3}
    ratio = rows["ours"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    out = {"flavour": flavour, "params": num_params(ours), "flops_per_token": fpt, "seq_len": seq_len,
           "batch_size": args.batch_size, "tokens_per_step": tokens, "initial_loss": {"ours": l_ours, "transformers": l_hf},
           "loss_drift_after_training": drift, "contenders": rows, "gemm_ceiling": ceiling,
           "adamw": {"ours": {k: opt_ours.defaults.get(k) for k in ("fused", "foreach")},
                     "transformers": {k: opt_hf.defaults.get(k) for k in ("fused", "foreach")}},
           "ratio_ours_over_transformers": ratio, "target_ratio_met": ratio >= TARGET_RATIO}
    if compile_s is not None:
        out["compile_s"] = compile_s
        out["ratio_compiled_over_transformers"] = rows["ours+compile"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    return out


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_flavour(r: dict, preset: str) -> None:
    print(f"\n{preset} / {r['flavour']}: {r['params'] / 1e6:.2f}M params, {r['flops_per_token'] / 1e6:.1f} MFLOP/token, "
          f"batch {r['batch_size']} x {r['seq_len']}; initial loss ours {r['initial_loss']['ours']:.6f} = "
          f"transformers {r['initial_loss']['transformers']:.6f}; drift after training {r['loss_drift_after_training']:.1e}")
    print(f"  AdamW: ours {r['adamw']['ours']}, transformers {r['adamw']['transformers']}")
    print(f"  {'contender':20} {'tokens/s':>9} {'ms/step':>9} {'GFLOP/s':>8} {'MFU':>6}   rounds (ms/step)")
    for name, c in r["contenders"].items():
        print(f"  {name:20} {c['tokens_per_s']:9.0f} {c['ms_per_step']:9.1f} {c['flops'] / 1e9:8.2f} "
              f"{c['mfu']:6.1%}   {' '.join(f'{t:.0f}' for t in c['round_ms'])}")
    ceil = r["gemm_ceiling"]
    print(f"  {'weight GEMMs alone':20} {'':9} {ceil['ms']:9.1f} {ceil['flops'] / 1e9:8.2f} {ceil['mfu']:6.1%}"
          "   (the step's matmuls at its shapes, nothing else)")
    print(f"  ours / transformers: {r['ratio_ours_over_transformers']:.2f}x  "
          f"(target >= {TARGET_RATIO}x: {met(r['target_ratio_met'])})")
    print(f"  ours MFU: {r['contenders']['ours']['mfu']:.1%}  (target >= {TARGET_MFU:.0%} of measured peak: "
          f"{met(r['target_mfu_met'])})")
    if "compile_s" in r:
        print(f"  ours+compile / transformers: {r['ratio_compiled_over_transformers']:.2f}x "
              f"(compilation took {r['compile_s']:.1f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    flavours = [f.strip() for f in args.flavours.split(",") if f.strip()]
    info = machine_info(args.threads)
    print(f"torch {info['torch']}, transformers {info['transformers']}, {args.threads} threads, {info['cpu_model']}")
    if info.get("load_avg_1m_at_start", 0) > 0.5:
        print(f"note: 1-minute load average is {info['load_avg_1m_at_start']:.2f}; figures are noisy unless the machine is idle")

    # The peak is measured before and after the models (the better of the two counts), so a burst of
    # background load during one measurement does not inflate every MFU.
    peaks = [matmul_peak(dtype=DTYPES[args.dtype])]
    print(f"{args.dtype} matmul peak (first measurement): {peaks[0]['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for flavour in flavours:
        print(f"timing {args.preset} / {flavour} ...", flush=True)
        results.append(bench_flavour(args, flavour))
    peaks.append(matmul_peak(dtype=DTYPES[args.dtype]))
    peak = max(peaks, key=lambda p: p["peak_flops"])
    sizes = ", ".join(f"{n}: {f / 1e9:.1f}" for n, f in peak["sizes"].items())
    print(f"{args.dtype} matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s, best of {len(peaks)} measurements "
          f"({', '.join(format(p['peak_flops'] / 1e9, '.1f') for p in peaks)}); GFLOP/s by size {sizes}")

    over = False
    for r in results:
        for c in r["contenders"].values():
            c["mfu"] = c["flops"] / peak["peak_flops"]
            over |= c["mfu"] > 1
        r["gemm_ceiling"]["mfu"] = r["gemm_ceiling"]["flops"] / peak["peak_flops"]
        r["target_mfu_met"] = r["contenders"]["ours"]["mfu"] >= TARGET_MFU
        print_flavour(r, args.preset)
    if over:
        print("\nwarning: an MFU above 100% means the peak was measured under background load; rerun on an idle machine")

    report = {"benchmark": "train_throughput", "machine": info, "matmul_peak": peak,
              "matmul_peak_measurements": [p["peak_flops"] for p in peaks],
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "targets": {"ratio_ours_over_transformers": TARGET_RATIO, "mfu": TARGET_MFU},
              "results": results}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
