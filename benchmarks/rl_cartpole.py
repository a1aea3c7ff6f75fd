"""Our PPO against Stable-Baselines3's PPO on CartPole-v1, same hyperparameters, same run.

    python benchmarks/rl_cartpole.py                    # 3 seeds x 100k steps each
    python benchmarks/rl_cartpole.py --seeds 1 --steps 20000   # smoke run

Hyperparameters: rl-baselines3-zoo's CartPole-v1 PPO (8 envs, n_steps 32, batch 256, gae_lambda
0.8, gamma 0.98, 20 epochs, ent_coef 0, lr 1e-3 and clip 0.2 both annealed linearly to 0), 64x64
tanh actor and critic, orthogonal init, Adam eps 1e-5, max_grad_norm 0.5, advantage whitening.
Value loss: SB3's vf_coef 0.5 x MSE equals our vf_coef 1.0 x core's 0.5 x MSE.

Timing: per seed, both contenders build their envs and networks and train (construction
included), one after the other, the order alternating between seeds; torch uses `--threads`
threads for both; imports are warmed up first. steps/s = environment steps / those seconds.
Return: both final policies are evaluated by the same function (our `evaluate`, greedy actions,
`--eval_episodes` episodes on seeds 10,000 + seed ...).
Targets: ours >= 1.5x SB3's steps/s (mean over seeds) at an equal or better mean return.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from chatfoundry.rl import ppo
from chatfoundry.rl.common import Run, evaluate, load_policy, policy_act
from chatfoundry.rl.train import PRESETS

REPO = Path(__file__).resolve().parent.parent
ENV = "CartPole-v1"


def ours(seed: int, steps: int) -> tuple[float, int, Callable]:
    cfg = ppo.ClassicPPOConfig(**{k.split(".", 1)[1]: v for k, v in PRESETS[("ppo", "CartPole")].items()})
    t0 = time.perf_counter()
    run = Run(ENV, {}, steps, seed, out=None, progress=False)
    tensors, info = ppo.train(run, cfg)
    seconds = time.perf_counter() - t0
    import gymnasium as gym

    env = gym.make(ENV)
    act = policy_act(load_policy(info, tensors), env.observation_space, env.action_space)
    done_steps = steps // (cfg.n_envs * cfg.n_steps) * cfg.n_envs * cfg.n_steps
    return seconds, done_steps, act


def sb3(seed: int, steps: int) -> tuple[float, int, Callable]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    t0 = time.perf_counter()
    env = make_vec_env(ENV, n_envs=8, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                learning_rate=lambda p: 1e-3 * p, clip_range=lambda p: 0.2 * p, seed=seed, device="cpu", verbose=0)
    model.learn(steps)
    seconds = time.perf_counter() - t0
    return seconds, model.num_timesteps, lambda obs: model.predict(obs, deterministic=True)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--eval_episodes", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/rl_cartpole.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import stable_baselines3

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first optimizer imports torch._dynamo (~1.5 s)

    rows = []
    for seed in range(args.seeds):
        contenders = [("ours", ours), ("sb3", sb3)]
        if seed % 2:
            contenders.reverse()
        row = {"seed": seed}
        for name, fn in contenders:
            seconds, steps, act = fn(seed, args.steps)
            returns = evaluate(ENV, {}, act, args.eval_episodes, seed=10_000 + seed)
            row[name] = {"seconds": round(seconds, 3), "steps": steps, "steps_per_s": round(steps / seconds, 1),
                         "eval_return": float(np.mean(returns))}
            print(f"seed {seed} {name:4}: {steps:,} steps in {seconds:6.2f} s = {steps / seconds:7.0f} steps/s, "
                  f"eval return {np.mean(returns):6.1f}", flush=True)
        rows.append(row)

    mean = {name: {k: float(np.mean([r[name][k] for r in rows])) for k in ("steps_per_s", "eval_return")}
            for name in ("ours", "sb3")}
    ratio = mean["ours"]["steps_per_s"] / mean["sb3"]["steps_per_s"]
    speed_met = ratio >= 1.5
    return_met = mean["ours"]["eval_return"] >= mean["sb3"]["eval_return"]
    print(f"mean steps/s: ours {mean['ours']['steps_per_s']:.0f}, SB3 {mean['sb3']['steps_per_s']:.0f}, "
          f"ratio {ratio:.2f}x (target >= 1.5x: {'met' if speed_met else 'NOT met'})")
    print(f"mean eval return: ours {mean['ours']['eval_return']:.1f}, SB3 {mean['sb3']['eval_return']:.1f} "
          f"(target ours >= SB3: {'met' if return_met else 'NOT met'})")
    result = {"env": ENV, "steps": args.steps, "threads": args.threads, "eval_episodes": args.eval_episodes,
              "torch": torch.__version__, "stable_baselines3": stable_baselines3.__version__,
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "runs": rows, "mean": mean, "ratio": ratio,
              "targets": {"speed_1.5x": speed_met, "return_equal_or_better": return_met}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
