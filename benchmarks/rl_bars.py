"""The classic-RL bars of issue 7, measured: each algorithm x 3 seeds through `rl train`.

    python benchmarks/rl_bars.py                          # every bar, seeds 0-2
    python benchmarks/rl_bars.py --only ppo-cartpole dqn-cartpole --seeds 1

A bar is met when the final policy's evaluation return (greedy actions; 20 episodes, 1,000 for
FrozenLake's success rate) reaches the threshold in every seed, within the step budget. Each
run also evaluates every `eval_every` steps, which gives the first step at which it was solved.
Runs go to `--runs` (default benchmarks/results/rl_bars/), the summary to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from chatfoundry.rl.train import run, with_preset

REPO = Path(__file__).resolve().parent.parent

# name: (algo, env, steps, threshold, eval_every, eval_episodes, extra config fields)
BARS = {
    "ppo-cartpole": ("ppo", "CartPole-v1", 100_000, 475, 10_240, 20, {}),
    "ppo-kl-cartpole": ("ppo-kl", "CartPole-v1", 100_000, 475, 10_240, 20, {}),
    "trpo-cartpole": ("trpo", "CartPole-v1", 100_000, 475, 10_240, 20, {}),
    "dqn-cartpole": ("dqn", "CartPole-v1", 50_000, 475, 5_000, 20, {}),
    "reinforce-cartpole": ("reinforce", "CartPole-v1", 300_000, 475, 30_000, 20, {}),
    "qlearning-frozenlake": ("qlearning", "FrozenLake-v1", 500_000, 0.7, 100_000, 1000, {}),
    "ppo-acrobot": ("ppo", "Acrobot-v1", 500_000, -100, 49_152, 20, {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(BARS), default=list(BARS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--runs", default=str(REPO / "benchmarks/results/rl_bars"))
    p.add_argument("--out", default=str(REPO / "benchmarks/results/rl_bars.json"))
    args = p.parse_args()
    torch.set_num_threads(1)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}  # --only refreshes some bars, keeps the rest
    results["load_avg_1m_at_start"] = os.getloadavg()[0]
    for name in args.only:
        algo, env, steps, threshold, eval_every, eval_episodes, extra = BARS[name]
        rows = []
        for seed in range(args.seeds):
            cfg = with_preset([("bar", {"algo": algo, "env": env, "steps": steps, "seed": seed,
                                        "out": f"{args.runs}/{name}/seed{seed}", "eval_every": eval_every,
                                        "eval_episodes": eval_episodes, "progress": False, **extra})])
            t0 = time.perf_counter()
            s = run(cfg, overwrite=True, log=lambda _: None)
            rows.append({k: s[k] for k in ("seed", "eval_return", "eval_return_std", "first_solved_step",
                                           "last_train_return", "train_time_s", "steps_per_s")}
                        | {"solved": s["eval_return"] >= threshold, "wall_s": round(time.perf_counter() - t0, 1)})
            print(f"{name:22} seed {seed}: eval return {s['eval_return']:8.3f} (>= {threshold}: "
                  f"{'yes' if rows[-1]['solved'] else 'NO'}), first solved at {s['first_solved_step']}, "
                  f"{s['train_time_s']:.0f} s training", flush=True)
        met = all(r["solved"] for r in rows)
        results[name] = {"algo": algo, "env": env, "steps": steps, "threshold": threshold, "seeds": rows,
                         "mean_eval_return": float(np.mean([r["eval_return"] for r in rows])),
                         "met": met, "solved_seeds": sum(r["solved"] for r in rows)}
        print(f"{name}: {results[name]['solved_seeds']}/{len(rows)} seeds solved -> {'met' if met else 'NOT met'}",
              flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
