"""`chatfoundry rl train`: one algorithm, one environment, one seed -> a saved, evaluated agent.

    run folder: config.yaml (resolved), metrics.jsonl, returns.png, losses.png,
                agent.json + model.safetensors (the agent), eval.json (final evaluation)

Hyperparameters: each algorithm's dataclass defaults < the preset for this algorithm and
environment (PRESETS, tuned settings in the spirit of rl-baselines3-zoo) < --config YAML < flags.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import gymnasium as gym
import numpy as np
import torch

from chatfoundry.config import build_config, cli_overrides, load_yaml, require, to_dict
from chatfoundry.errors import UserError
from chatfoundry.metrics import plot_curves, summary_writer_class
from chatfoundry.rl import dqn, ppo, qlearning, reinforce, trpo
from chatfoundry.rl.common import (AGENT_FILE, WEIGHTS_FILE, Run, evaluate, load_agent_files, load_policy, make_env,
                                   parse_env_kwargs, policy_act, resolve_env_id, save_agent)

ALGOS = ("qlearning", "dqn", "reinforce", "trpo", "ppo", "ppo-kl")
Algo = Literal["qlearning", "dqn", "reinforce", "trpo", "ppo", "ppo-kl"]


@dataclass
class RLConfig:
    algo: Algo = "ppo"  # qlearning (tabular), dqn, reinforce, trpo, ppo (clipped objective) or ppo-kl (KL penalty)
    env: str = "CartPole-v1"  # gymnasium id; without a version (or one not registered) the newest registered one
    env_kwargs: list[str] = field(default_factory=list)  # KEY=VALUE for gym.make, e.g. is_slippery=false
    steps: int = 100_000  # environment steps
    seed: int = 0  # seeds torch, the environments and exploration; evaluation resets from 10000 + seed
    out: str = "runs/rl"  # run folder: config.yaml, metrics.jsonl, plots, the saved agent, eval.json
    eval_episodes: int = 10  # with the final policy, greedy / mean action
    eval_every: int = 0  # env steps between evaluations during training (0: only the final one)
    threads: int = 1  # torch threads: small MLPs run fastest on one
    progress: bool = True  # show a progress bar (with the recent mean episode return) while training
    log: Literal["jsonl", "tensorboard"] = "jsonl"  # tensorboard: TensorBoard event files beside metrics.jsonl too
    ppo: ppo.ClassicPPOConfig = field(default_factory=ppo.ClassicPPOConfig)  # ppo and ppo-kl
    trpo: trpo.TRPOConfig = field(default_factory=trpo.TRPOConfig)
    reinforce: reinforce.ReinforceConfig = field(default_factory=reinforce.ReinforceConfig)
    dqn: dqn.DQNConfig = field(default_factory=dqn.DQNConfig)
    qlearning: qlearning.QLearningConfig = field(default_factory=qlearning.QLearningConfig)

    def validate(self) -> None:
        require(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        require(self.eval_episodes > 0, "eval_episodes", f"must be > 0, got {self.eval_episodes}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.threads > 0, "threads", f"must be > 0, got {self.threads}")

    def section(self) -> Any:
        """The chosen algorithm's hyperparameters (ppo-kl shares ppo's)."""
        return getattr(self, "ppo" if self.algo == "ppo-kl" else self.algo)


_RL_ZOO_CARTPOLE_PPO = {"ppo.n_envs": 8, "ppo.n_steps": 32, "ppo.batch_size": 256, "ppo.gae_lambda": 0.8,
                        "ppo.gamma": 0.98, "ppo.epochs": 20, "ppo.lr": 1e-3, "ppo.anneal_clip": True}

# Per (algorithm, environment name without version): the settings that solve it in the bars' budgets
# (rl-baselines3-zoo's where it has them; DQN adds learning-rate annealing, TRPO's defaults need none).
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("ppo", "CartPole"): _RL_ZOO_CARTPOLE_PPO,
    ("ppo-kl", "CartPole"): {**_RL_ZOO_CARTPOLE_PPO, "ppo.anneal_clip": False, "ppo.kl_target": 0.01},
    ("reinforce", "CartPole"): {"reinforce.n_envs": 8, "reinforce.lr": 2e-3},
    ("dqn", "CartPole"): {"dqn.lr": 2.3e-3, "dqn.batch_size": 64, "dqn.buffer_size": 100_000,
                          "dqn.learning_starts": 1000, "dqn.train_freq": 256, "dqn.gradient_steps": 128,
                          "dqn.target_update_interval": 10, "dqn.exploration_fraction": 0.16, "dqn.eps_end": 0.04,
                          "dqn.anneal_lr": True},
    ("dqn", "Acrobot"): {"dqn.lr": 6.3e-4, "dqn.batch_size": 128, "dqn.buffer_size": 50_000, "dqn.learning_starts": 0,
                         "dqn.train_freq": 4, "dqn.gradient_steps": 4, "dqn.target_update_interval": 250,
                         "dqn.exploration_fraction": 0.12, "dqn.eps_end": 0.1},
    ("ppo", "Acrobot"): {"ppo.n_envs": 16, "ppo.n_steps": 256, "ppo.batch_size": 1024, "ppo.epochs": 4,
                         "ppo.gae_lambda": 0.94, "ppo.lr": 1e-3},
    ("ppo", "Pendulum"): {"ppo.n_envs": 4, "ppo.n_steps": 1024, "ppo.batch_size": 64, "ppo.epochs": 10,
                          "ppo.gamma": 0.9, "ppo.lr": 1e-3, "ppo.reward_scale": 0.1},
    ("qlearning", "FrozenLake"): {"qlearning.gamma": 0.99, "qlearning.lr": 0.1, "qlearning.lr_end": 0.0,
                                  "qlearning.exploration_fraction": 0.5, "eval_episodes": 1000},
    ("qlearning", "Taxi"): {"qlearning.lr": 0.5, "qlearning.lr_end": 0.05, "eval_episodes": 100},
    ("qlearning", "CliffWalking"): {"qlearning.lr": 0.5, "qlearning.lr_end": 0.05},
}


def env_name(env_id: str) -> str:
    return env_id.rsplit("-v", 1)[0]


def resolve(args, base: dict[str, Any] | None = None) -> RLConfig:
    """The config of `rl train`'s flags: defaults < preset < base < --config YAML < flags."""
    layers = [("saved config", base)] if base else []
    if getattr(args, "config", None):
        layers.append((str(args.config), load_yaml(args.config)))
    layers.append(("command line", cli_overrides(args, RLConfig)))
    return with_preset(layers)


def with_preset(layers: list[tuple[str, dict[str, Any]]]) -> RLConfig:
    """Build the config from (source, {dotted: value}) layers over the preset of its algorithm and
    environment (which any layer may name, so the layers are read once to find them)."""
    first = build_config(RLConfig, layers)
    preset = PRESETS.get((first.algo, env_name(resolve_env_id(first.env))), {})
    return build_config(RLConfig, [("preset", preset), *layers])


def check_fits(algo: str, env_id: str, obs_space: gym.Space, action_space: gym.Space) -> None:
    """The algorithm can act in this environment, or one line saying which algorithm can."""
    def kind(space: gym.Space) -> str:
        return type(space).__name__ + (f" {space.shape}" if isinstance(space, gym.spaces.Box) else "")

    discrete = gym.spaces.Discrete
    flat_box = isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1
    if algo == "qlearning" and not (isinstance(obs_space, discrete) and isinstance(action_space, discrete)):
        raise UserError(f"--algo qlearning: needs Discrete observations and actions (a table); {env_id} has "
                        f"{kind(obs_space)} observations and {kind(action_space)} actions: use dqn or ppo")
    if algo != "qlearning" and not (flat_box or isinstance(obs_space, discrete)):
        raise UserError(f"--algo {algo}: {env_id}'s observations ({kind(obs_space)}) are neither a flat Box nor Discrete")
    if algo in ("qlearning", "dqn") and not isinstance(action_space, discrete):
        raise UserError(f"--algo {algo}: needs Discrete actions; {env_id} has {kind(action_space)} actions: "
                        "use ppo, ppo-kl, trpo or reinforce")
    if not isinstance(action_space, discrete) and not (isinstance(action_space, gym.spaces.Box)
                                                       and len(action_space.shape) == 1):
        raise UserError(f"--algo {algo}: {env_id}'s actions ({kind(action_space)}) are neither Discrete nor a flat Box")


def load_act(folder: str | Path, deterministic: bool = True) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
    """A saved agent's metadata (agent.json) and its act(batch of observations) -> actions."""
    meta, tensors = load_agent_files(folder)
    env = make_env(meta["env"], meta["env_kwargs"])
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    if meta["algo"] == "qlearning":
        return meta, qlearning.load_act(meta["model"], tensors, obs_space)
    if meta["algo"] == "dqn":
        return meta, dqn.load_act(meta["model"], tensors, obs_space)
    return meta, policy_act(load_policy(meta["model"], tensors), obs_space, action_space, deterministic)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if any((out / name).exists() for name in ("config.yaml", AGENT_FILE, WEIGHTS_FILE)) and not overwrite:
        raise UserError(f"{out}: already holds a run; pass --overwrite to replace it")


def run(cfg: RLConfig, overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, save, reload and evaluate one agent; the summary that --json prints."""
    env_id, env_kwargs = resolve_env_id(cfg.env), parse_env_kwargs(cfg.env_kwargs)
    if env_id != cfg.env:
        log(f"{cfg.env}: using {env_id}, the version this gymnasium ({gym.__version__}) registers")
    probe = make_env(env_id, env_kwargs)
    check_fits(cfg.algo, env_id, probe.observation_space, probe.action_space)
    probe.close()
    section = cfg.section()
    if cfg.algo in ("ppo", "ppo-kl", "trpo"):
        batch = section.n_envs * section.n_steps
        require(cfg.steps >= batch, "steps", f"{cfg.algo} needs at least n_envs x n_steps = {batch} steps, got {cfg.steps}")
    out = Path(cfg.out)
    _check_output(out, overwrite)
    if cfg.log == "tensorboard":
        summary_writer_class()

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "eval.json", "returns.png", "losses.png", AGENT_FILE, WEIGHTS_FILE):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "play", ignore_errors=True)
    saved = {k: v for k, v in to_dict(cfg).items() if not isinstance(v, dict)}
    saved[cfg.algo.replace("ppo-kl", "ppo")] = dataclasses.asdict(section)
    save_config_dict(saved, out / "config.yaml")

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        record = Run(env_id, env_kwargs, cfg.steps, cfg.seed, out, cfg.eval_every, cfg.eval_episodes, cfg.progress,
                     tensorboard=cfg.log == "tensorboard")
        if cfg.algo in ("ppo", "ppo-kl"):
            tensors, model = ppo.train(record, section, kl_penalty=cfg.algo == "ppo-kl")
        else:
            tensors, model = {"qlearning": qlearning, "dqn": dqn, "reinforce": reinforce, "trpo": trpo}[cfg.algo].train(
                record, section)
        train_time = record.close()
        save_agent(out, tensors, {"algo": cfg.algo, "env": env_id, "env_kwargs": env_kwargs, "seed": cfg.seed,
                                  "steps": cfg.steps, "model": model})
        _, act = load_act(out)  # evaluate what was saved: the round trip is part of every run
        returns = evaluate(env_id, env_kwargs, act, cfg.eval_episodes, seed=10_000 + cfg.seed)
    finally:
        torch.set_num_threads(threads)

    threshold = gym.spec(env_id).reward_threshold
    evals = [r for r in record.records if "eval_return" in r]
    solved_at = next((r["step"] for r in evals if threshold is not None and r["eval_return"] >= threshold), None)
    train_returns = [r["episode_return"] for r in record.records if "episode_return" in r]
    summary = {"algo": cfg.algo, "env": env_id, "seed": cfg.seed, "steps": cfg.steps,
               "eval_return": float(np.mean(returns)), "eval_return_std": float(np.std(returns)),
               "eval_episodes": cfg.eval_episodes, "reward_threshold": threshold,
               "solved": None if threshold is None else bool(np.mean(returns) >= threshold),
               "first_solved_step": solved_at, "last_train_return": train_returns[-1] if train_returns else None,
               "train_time_s": round(train_time, 3), "steps_per_s": round(cfg.steps / train_time, 1), "out": str(out)}
    (out / "eval.json").write_text(json.dumps({**summary, "returns": returns}, indent=2) + "\n")
    _plots(record.records, out, f"{cfg.algo} on {env_id} (seed {cfg.seed})")
    log(f"{cfg.algo} on {env_id}: evaluation return {summary['eval_return']:.2f} +- {summary['eval_return_std']:.2f} "
        f"over {cfg.eval_episodes} episodes; {cfg.steps:,} steps in {train_time:.1f} s "
        f"({summary['steps_per_s']:,.0f} steps/s); agent saved in {out}")
    return summary


def save_config_dict(tree: dict[str, Any], path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")


def _plots(records: list[dict], out: Path, title: str) -> None:
    plot_curves(records, out / "returns.png", {"episode_return": "training episodes", "eval_return": "evaluation"},
                title, "return")
    losses = {k: k.replace("_", " ") for k in ("policy_loss", "value_loss", "loss", "approx_kl", "kl", "entropy")
              if any(k in r for r in records)}
    if losses:  # tabular Q-learning has none
        plot_curves(records, out / "losses.png", losses, title, "value")

