"""One GPU, one short run: the figures a lent device is for, in one script of at most 8 minutes.

  train     GPT-2 124M (preset gpt2, gpt2 flavour, 50,257 tokens, 1,024 context) training steps in
            bf16 autocast (fp32 weights, fused AdamW) with torch.compile and flash SDPA (forced: the
            run stops if flash cannot serve it): tokens/s and MFU = flops_per_token x tokens/s over
            the GPU's dense bf16 peak (the datasheet's for H100 / H200 SXM, 989 TFLOP/s, else the
            measured 8192^3 bf16 matmul). Against transformers' GPT2LMHeadModel with the same weights,
            SDPA and bf16 autocast, eager (what its Trainer runs by default), in the same run, steps
            interleaved in rounds.
  decode    greedy tokens/s at batch 1 and 32 (a 64-token prompt, 128 new tokens, weights in bf16):
            our generate, eager and with the compiled decoding step, against transformers' generate.
  pipeline  `chatfoundry pipeline --device cuda`: the wall time of each stage of the default recipe.

    bash benchmarks/gpu_check.sh                                 # all three, under an 8-minute timeout
    python benchmarks/gpu_check.py --device cpu --smoke          # the code paths on a CPU, tiny sizes

Results go to benchmarks/results/gpu_check.json; each part prints its figures as it ends, so a
timeout still leaves the earlier ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, adamw_like_ours, build_pair, hf_loss, our_loss, random_batch, write_report  # noqa: E402

from chatfoundry.generation import GenerationConfig, compile_for_decoding, generate_batch  # noqa: E402
from chatfoundry.models.decoder import flops_per_token  # noqa: E402
from chatfoundry.train.loop import TrainConfig, make_optimizer  # noqa: E402

DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, SXM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: torch.device, n: int) -> float:
    """The best FLOP/s of an n x n x n bf16 matmul (2 n^3 FLOPs), of 10."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for _ in range(12):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak(device: torch.device, n: int) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    known = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    return (known, f"{name}: datasheet") if known else (bf16_peak(device, n), f"{name}: measured {n}^3 bf16 matmul")


def train(args, device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, ours, theirs = build_pair(args.preset, "gpt2", args.vocab_size, args.seq_len, 0)
    ours, theirs = ours.to(device), theirs.to(device)
    x, y = (t.to(device) for t in random_batch(args.batch_size, args.seq_len, args.vocab_size))
    tc = TrainConfig()
    flash = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    contenders = {"ours+compile": (torch.compile(ours) if args.compile else ours, our_loss,
                                   make_optimizer(ours, tc, device), flash),
                  "transformers": (theirs, hf_loss, adamw_like_ours(theirs, tc, fused=True), None)}

    def step(name):
        model, loss_fn, opt, backends = contenders[name]
        with torch.autocast(device.type, dtype=torch.bfloat16), (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = {}
    for name in contenders:  # compiles here
        sync(device)
        t = time.perf_counter()
        for _ in range(args.warmup):
            step(name)
        sync(device)
        first[name] = round(time.perf_counter() - t, 1)
    times = {n: [] for n in contenders}
    for r in range(args.rounds):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
    top, where = peak(device, args.peak_n)
    tokens = args.batch_size * args.seq_len
    out = {"preset": args.preset, "batch": [args.batch_size, args.seq_len], "flops_per_token": flops_per_token(cfg, args.seq_len),
           "peak_flops": top, "peak_from": where, "warmup_s": first, "contenders": {}}
    for name, ts in times.items():
        tok_s = tokens / min(ts)
        out["contenders"][name] = {"tokens_per_s": round(tok_s), "ms_per_step": round(min(ts) * 1e3, 2),
                                   "mfu": round(out["flops_per_token"] * tok_s / top, 4)}
    c = out["contenders"]
    out["ratio"] = round(c["ours+compile"]["tokens_per_s"] / c["transformers"]["tokens_per_s"], 3)
    print(f"[train] {args.preset}, batch {args.batch_size} x {args.seq_len}, bf16 autocast, peak {top / 1e12:.0f} "
          f"TFLOP/s ({where})")
    for name, v in c.items():
        print(f"  {name:14} {v['tokens_per_s']:>9,} tokens/s  {v['ms_per_step']:8.2f} ms/step  MFU {v['mfu']:.1%}")
    print(f"  ours / transformers: {out['ratio']:.2f}x (target >= 1.1x); ours MFU {c['ours+compile']['mfu']:.1%} "
          "(target >= 45%)", flush=True)
    return out


def decode(args, device: torch.device) -> dict:
    cfg, ours, theirs = build_pair(args.preset, "gpt2", args.vocab_size, args.prompt_len + args.new_tokens, 0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()
    # compile_for_decoding works in place: a copy, so the eager model is timed too.
    compiled = compile_for_decoding(copy.deepcopy(ours)) if args.compile else None
    g = torch.Generator().manual_seed(0)
    out = {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "dtype": str(dtype), "batches": {}}
    gen = GenerationConfig(max_new_tokens=args.new_tokens)
    for rows in args.decode_batches:
        prompts = torch.randint(0, args.vocab_size, (rows, args.prompt_len), generator=g)
        calls = {"ours": lambda m=ours: generate_batch(m, prompts.tolist(), gen).sequences,
                 "transformers": lambda: theirs.generate(prompts.to(device), max_new_tokens=args.new_tokens,
                                                         min_new_tokens=args.new_tokens, do_sample=False,
                                                         eos_token_id=None, pad_token_id=0)[:, args.prompt_len:].tolist()}
        if compiled is not None:
            calls["ours+compile"] = lambda m=compiled: generate_batch(m, prompts.tolist(), gen).sequences
        res, tokens = {}, {}
        with torch.inference_mode():
            for name, fn in calls.items():
                fn()  # warm-up (and the compile, for this batch shape)
                sync(device)
                t = time.perf_counter()
                tokens[name] = fn()
                sync(device)
                res[name] = {"tokens_per_s": round(rows * args.new_tokens / (time.perf_counter() - t), 1)}
        same = sum(a == b for ra, rb in zip(tokens["ours"], tokens["transformers"]) for a, b in zip(ra, rb))
        out["batches"][str(rows)] = {**res, "greedy_tokens_equal_share": round(same / (rows * args.new_tokens), 4)}
    print(f"[decode] {args.preset}, greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}")
    for rows, r in out["batches"].items():
        best = max(v["tokens_per_s"] for n, v in r.items() if isinstance(v, dict) and n != "transformers")
        print(f"  batch {rows:>3}: " + "  ".join(f"{n} {v['tokens_per_s']:,.0f} tok/s" for n, v in r.items()
                                               if isinstance(v, dict))
              + f"  (ours at best / transformers {best / r['transformers']['tokens_per_s']:.2f}x; greedy tokens "
              f"equal {r['greedy_tokens_equal_share']:.0%})", flush=True)
    return out


def pipeline(args, device: torch.device) -> dict:
    out_dir = Path(args.out) / "pipeline"
    cmd = [sys.executable, "-m", "chatfoundry", "pipeline", "--out", str(out_dir), "--device", device.type,
           "--overwrite", "--json", *args.pipeline_args]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=args.pipeline_timeout)
    if done.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    walls = {name: s.get("wall_s") for name, s in summary["stages"].items() if s.get("wall_s") is not None}
    out = {"wall_s": round(time.perf_counter() - t, 1), "stages_s": walls,
           "ppo_gold_gain": summary["stages"]["ppo"].get("gold_gain"), "kl_heldout": summary["stages"]["ppo"].get("kl_heldout")}
    print(f"[pipeline] {out['wall_s']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
          + f"; PPO greedy gold gain {out['ppo_gold_gain']}, held-out KL {out['kl_heldout']}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default="train,decode,pipeline", help="comma-separated: train, decode, pipeline")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round: check the code paths, e.g. on a CPU")
    p.add_argument("--no_compile", dest="compile", action="store_false", help="skip torch.compile (ours stays eager)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender (the compile happens here)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak_n", type=int, default=8192)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--decode_batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--pipeline_args", nargs=argparse.REMAINDER, default=[],
                   help="flags passed on to `chatfoundry pipeline` (last on the line)")
    p.add_argument("--pipeline_timeout", type=int, default=300)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check"))
    args = p.parse_args()
    if args.smoke:
        args.preset, args.vocab_size, args.batch_size, args.seq_len = "tiny", 2048, 4, 128
        args.warmup, args.steps, args.rounds, args.peak_n, args.prompt_len, args.new_tokens = 1, 2, 1, 512, 16, 8
        args.decode_batches = [1, 4]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (on a CPU: --device cpu --smoke)")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()}}
    os.makedirs(args.out, exist_ok=True)
    for part, fn in (("train", train), ("decode", decode), ("pipeline", pipeline)):
        if part in args.parts.split(","):
            report[part] = fn(args, device)
            write_report(report, REPO / "benchmarks" / "results" / "gpu_check.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
