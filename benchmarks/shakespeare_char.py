"""nanoGPT's published CPU reference, reproduced through the real `chatfoundry pretrain` CLI.

nanoGPT's README trains a character-level model on tiny Shakespeare on a CPU:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(lr 1e-3 decaying to 1e-4, 100 warmup iterations, beta2 0.99, weight decay 0.1, grad clip 1.0,
90/10 train/val split, evaluation every 250 iterations) and reports a validation loss of 1.88
"in about 3 minutes". This script runs the same recipe with `python -m chatfoundry pretrain
--tokenizer.kind char ... --json` for each flavour and reports the final validation loss, wall
time and training tokens/s, and whether the validation loss reaches nanoGPT's 1.88.

Differences that remain, by design: our char tokenizer adds chatfoundry's 10 special tokens to the
65 characters (75 ids; the extra rows are never targets, so the loss is comparable); the GPT-2
flavour has biases (nanoGPT's config uses bias=False); the llama flavour of the same size uses
grouped-query attention with the preset's n_kv_head = n_head / 2 = 2 (change with --llama_kv_heads);
we log every 10 steps, not every step; each evaluation also writes one 60-token sample.

    python benchmarks/shakespeare_char.py                 # full run: 2000 iterations per flavour
    python benchmarks/shakespeare_char.py --iters 50      # quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_VAL_LOSS = 1.88

# nanoGPT's CPU configuration (see the module docstring).
NANOGPT = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12, "iters": 2000,
           "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1,
           "grad_clip": 1.0, "dropout": 0.0, "eval_every": 250, "eval_batches": 20, "val_fraction": 0.1}


def pretrain_command(data: Path, flavour: str, iters: int, out: Path, args) -> list[str]:
    c = NANOGPT
    cmd = [sys.executable, "-m", "chatfoundry", "pretrain", "--data", str(data), "--tokenizer.kind", "char",
           "--data.val_fraction", str(c["val_fraction"]),
           "--model.preset", "tiny", "--model.flavour", flavour,
           "--model.n_layer", str(c["n_layer"]), "--model.n_head", str(c["n_head"]), "--model.n_embd", str(c["n_embd"]),
           "--model.block_size", str(c["block_size"]), "--model.dropout", str(c["dropout"]),
           "--train.steps", str(iters), "--train.batch_size", str(c["batch_size"]),
           "--train.block_size", str(c["block_size"]),
           "--train.lr", str(c["lr"]), "--train.min_lr_ratio", str(c["min_lr"] / c["lr"]),
           "--train.warmup_steps", str(min(c["warmup"], iters)),
           "--train.beta1", str(c["beta1"]), "--train.beta2", str(c["beta2"]),
           "--train.weight_decay", str(c["weight_decay"]), "--train.max_grad_norm", str(c["grad_clip"]),
           "--train.eval_every", str(min(c["eval_every"], iters)), "--train.eval_batches", str(c["eval_batches"]),
           "--train.save_every", str(iters),  # one checkpoint, at the end
           "--train.log_every", "10",
           "--sample.num_samples", "1", "--sample.max_new_tokens", "300",  # past the 64-token context the window slides
           "--device", "cpu", "--seed", str(args.seed), "--out", str(out), "--overwrite", "--json"]
    if flavour == "llama" and args.llama_kv_heads:
        cmd += ["--model.n_kv_head", str(args.llama_kv_heads)]
    if args.compile:
        cmd += ["--compile", "true"]
    return cmd


def training_tokens_per_s(metrics: Path) -> float | None:
    """Median of the logged windows' tokens/s, the first step's (warm-up) left out."""
    rates = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "tokens_per_s" in rec and rec.get("step", 0) > 1:
            rates.append(rec["tokens_per_s"])
    return statistics.median(rates) if rates else None


def run_flavour(data: Path, flavour: str, args) -> dict:
    out = Path(args.out) / flavour
    cmd = pretrain_command(data, flavour, args.iters, out, args)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"\n[{flavour}] {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + (proc.stderr or "")[-4000:])
        raise SystemExit(f"shakespeare_char: chatfoundry pretrain ({flavour}) failed with status {proc.returncode}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = args.iters * NANOGPT["batch_size"] * NANOGPT["block_size"]
    val = summary["val_loss"]
    return {"flavour": flavour, "iters": args.iters, "params": summary["params"], "val_loss": val,
            "train_loss": summary["train_loss"], "wall_s": wall, "train_s": summary["train_s"],
            "tokens_per_s": training_tokens_per_s(out / "metrics.jsonl"),
            "tokens_per_s_incl_eval": tokens / summary["train_s"],
            "meets_nanogpt": val is not None and val <= NANOGPT_VAL_LOSS, "out": str(out),
            "sample": (summary.get("samples") or [""])[0], "command": cmd[1:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--flavours", default="gpt2,llama", help="comma-separated (default: gpt2,llama)")
    p.add_argument("--iters", type=int, default=NANOGPT["iters"], help="training iterations (default: 2000, nanoGPT's)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"tiny Shakespeare text (default: {DEFAULT_DATA})")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shakespeare"),
                   help="folder for the runs and results.json (default: benchmarks/results/shakespeare)")
    p.add_argument("--llama_kv_heads", type=int, default=0, help="llama n_kv_head (default 0: the preset's, n_head/2 = 2)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="pass --compile true (nanoGPT's CPU reference does not)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--verbose", action="store_true", help="show the runs' progress bars and logs")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")
    args = p.parse_args(argv)
    if args.iters <= 0:
        p.error("--iters must be > 0")
    data = Path(args.data)
    if not data.is_file():
        reason = f"{data} not found (the tiny Shakespeare corpus; pass --data FILE)"
        print(f"skipped: {reason}")
        if args.json:
            print(json.dumps({"skipped": reason}))
        return 0
    flavours = [f.strip() for f in args.flavours.split(",") if f.strip()]
    results = [run_flavour(data, f, args) for f in flavours]

    print(f"\ntiny Shakespeare, char level, nanoGPT CPU config, {args.iters} iterations"
          + ("" if args.iters == NANOGPT["iters"] else f" (nanoGPT's figure is for {NANOGPT['iters']})"))
    print(f"{'flavour':8} {'params':>8} {'val loss':>9} {'train loss':>10} {'wall s':>7} {'train s':>8} "
          f"{'tokens/s':>9}  val loss <= {NANOGPT_VAL_LOSS}")
    for r in results:
        tps = f"{r['tokens_per_s']:9.0f}" if r["tokens_per_s"] else f"{'-':>9}"
        print(f"{r['flavour']:8} {r['params']:8,} {r['val_loss']:9.4f} {r['train_loss']:10.4f} {r['wall_s']:7.1f} "
              f"{r['train_s']:8.1f} {tps}  {'met' if r['meets_nanogpt'] else 'NOT met'}")
    for r in results:
        print(f"\n--- {r['flavour']} sample ---\n{r['sample']}")

    import torch

    report = {"benchmark": "shakespeare_char", "nanogpt_config": NANOGPT, "nanogpt_val_loss": NANOGPT_VAL_LOSS,
              "iters": args.iters, "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
              "data": str(data), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out / 'results.json'}")
    if args.json:
        print(json.dumps({"iters": args.iters, "results": [{k: r[k] for k in ("flavour", "val_loss", "wall_s",
                          "tokens_per_s", "meets_nanogpt")} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
