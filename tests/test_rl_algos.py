"""The classic RL algorithms: TRPO's pieces, PPO's first minibatch, a quick learning test per
algorithm (with a threshold), determinism and save/load round trips."""

from __future__ import annotations

import argparse
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from chatfoundry.rl import core
from chatfoundry.rl.common import Policy, VecRunner, evaluate, policy_info
from chatfoundry.rl.train import load_act, resolve, run
from chatfoundry.rl.trpo import TRPOConfig, conjugate_gradient, trpo_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class IdentityEnv(gym.Env):
    """Stable-Baselines3's identity test: reward 1 for repeating the observed symbol (of 4); 20 steps."""

    observation_space = gym.spaces.Discrete(4)
    action_space = gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = int(self.np_random.integers(4))
        return self.state, {}

    def step(self, action):
        reward = float(action == self.state)
        self.state = int(self.np_random.integers(4))
        return self.state, reward, False, False, {}


class IdentityBoxEnv(gym.Env):
    """The continuous twin: observe x in [-1, 1], reward 1 - (a - x)^2; 20 steps."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-1, 1, size=1).astype(np.float32)
        return self.x, {}

    def step(self, action):
        reward = 1.0 - float((np.asarray(action) - self.x)[0] ** 2)
        self.x = self.np_random.uniform(-1, 1, size=1).astype(np.float32)
        return self.x, reward, False, False, {}


for _name, _cls in (("Identity", IdentityEnv), ("IdentityBox", IdentityBoxEnv)):
    if f"chatfoundry-test/{_name}-v0" not in gym.registry:
        gym.register(f"chatfoundry-test/{_name}-v0", entry_point=_cls, max_episode_steps=20)


def train(tmp_path, algo, env, steps, seed=0, **fields):
    """`rl train` from Python: the same resolution (presets included) and run as the CLI."""
    out = tmp_path / f"{algo}-{seed}-{len(list(tmp_path.iterdir()))}"
    ns = argparse.Namespace(algo=algo, env=env, steps=steps, seed=seed, out=str(out), progress="false",
                            **{k: str(v) for k, v in fields.items()})
    return run(resolve(ns), log=lambda _: None)


# ---------------------------------------------------------------- TRPO's pieces


def test_conjugate_gradient_solves_a_known_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, dtype=torch.float64, generator=g)
    a = m @ m.T + 8 * torch.eye(8, dtype=torch.float64)  # symmetric positive definite
    b = torch.randn(8, dtype=torch.float64, generator=g)
    x = conjugate_gradient(lambda v: a @ v, b, iters=8)  # exact in n steps in exact arithmetic
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("continuous", [False, True])
def test_trpo_accepted_step_respects_max_kl_and_improves_the_surrogate(continuous):
    torch.manual_seed(0)
    policy = Policy(obs_dim=4, action_dim=3, continuous=continuous, hidden=[32, 32])
    obs = torch.randn(512, 4)
    with torch.no_grad():
        old = policy(obs)
        actions = policy.sample(old, torch.Generator().manual_seed(1))
        logp_old = policy.log_prob(old, actions)
    advantages = core.masked_whiten(torch.randn(512) + obs[:, 0] * (actions.float().sum(-1) if continuous else actions))
    cfg = TRPOConfig(max_kl=0.01)
    stats = trpo_step(policy, obs, actions, advantages, logp_old, None, cfg)
    with torch.no_grad():
        kl = policy.kl(old, policy(obs)).mean().item()
        gain = (torch.exp(policy.log_prob(policy(obs), actions) - logp_old) * advantages).mean().item()
    assert stats["accepted"] == 1.0
    assert 0 < kl <= cfg.max_kl
    assert kl > cfg.max_kl * cfg.backtrack_coef ** 4  # a real step, not a vanishing one
    assert gain > 0 and stats["surrogate_gain"] == pytest.approx(gain, rel=1e-4)


# ---------------------------------------------------------------- PPO's first minibatch


def test_ppo_ratio_is_exactly_one_on_the_first_minibatch():
    torch.manual_seed(0)
    runner = VecRunner("CartPole-v1", {}, n_envs=4, n_steps=64, seed=0)
    policy, _ = policy_info(runner.obs_space, runner.action_space, [64, 64], "tanh", "ppo")
    from chatfoundry.rl.common import Critic

    ro = runner.collect(policy, Critic(4, [64, 64]), torch.Generator().manual_seed(0))
    idx = torch.randperm(4 * 64)[:64]
    obs, actions, logp_old = ro.obs.flatten(0, 1)[idx], ro.actions.flatten()[idx], ro.logp.flatten()[idx]
    logp = policy.log_prob(policy(obs), actions)
    _, stats = core.clipped_surrogate(logp, logp_old, torch.randn(64), clip=0.2)
    torch.testing.assert_close(torch.exp(logp - logp_old), torch.ones(64), rtol=0, atol=1e-6)
    assert stats["clip_fraction"] == 0.0 and stats["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ro.mask.min() == 0 or ro.dones.sum() == 0  # the reset step after an episode's end is masked


# ---------------------------------------------------------------- quick learning tests


def test_qlearning_solves_non_slippery_frozenlake(tmp_path):
    s = train(tmp_path, "qlearning", "FrozenLake-v1", 4000, env_kwargs="is_slippery=false", eval_episodes=20)
    assert s["eval_return"] == 1.0  # reaches the goal every time


@pytest.mark.parametrize("algo", ["dqn", "reinforce", "trpo", "ppo", "ppo-kl"])
def test_learns_the_identity_env(tmp_path, algo):
    fields = {"dqn": {"dqn.learning_starts": 200, "dqn.target_update_interval": 100, "dqn.hidden": "32",
                      "dqn.exploration_fraction": 0.3},
              "reinforce": {"reinforce.lr": 3e-3},
              "trpo": {"trpo.n_envs": 4, "trpo.n_steps": 64, "trpo.max_kl": 0.05},
              "ppo": {"ppo.n_envs": 4, "ppo.n_steps": 64, "ppo.batch_size": 64, "ppo.epochs": 4, "ppo.lr": 3e-3},
              "ppo-kl": {"ppo.n_envs": 4, "ppo.n_steps": 64, "ppo.batch_size": 64, "ppo.epochs": 4, "ppo.lr": 3e-3},
              }[algo]
    s = train(tmp_path, algo, "chatfoundry-test/Identity-v0", 3000, eval_episodes=10, **fields)
    assert s["eval_return"] >= 18  # of 20; a random policy gets 5


@pytest.mark.parametrize("algo", ["ppo", "trpo", "reinforce"])
def test_gaussian_policy_learns_the_continuous_identity_env(tmp_path, algo):
    steps, fields = {  # gamma 0.5: the env has no temporal structure, so short horizons learn it fastest
        "ppo": (4000, {"ppo.n_envs": 4, "ppo.n_steps": 64, "ppo.batch_size": 64, "ppo.epochs": 4, "ppo.lr": 3e-3,
                       "ppo.gamma": 0.5}),
        "trpo": (4000, {"trpo.n_envs": 4, "trpo.n_steps": 64, "trpo.max_kl": 0.05, "trpo.gamma": 0.5}),
        "reinforce": (12000, {"reinforce.lr": 1e-2, "reinforce.gamma": 0.5})}[algo]  # one update per 8 episodes
    s = train(tmp_path, algo, "chatfoundry-test/IdentityBox-v0", steps, eval_episodes=10, **fields)
    assert s["eval_return"] >= 17  # of 20; the untrained mean action (0) gets 20 x (1 - E[x^2]) = 13.3


def test_ppo_balances_cartpole_a_little_in_a_few_thousand_steps(tmp_path):
    s = train(tmp_path, "ppo", "CartPole-v1", 8192)
    assert s["eval_return"] >= 100 and s["last_train_return"] > 40  # untrained: ~10-20


# ---------------------------------------------------------------- determinism and saving


@pytest.mark.parametrize("algo", ["ppo", "dqn", "reinforce", "qlearning"])
def test_same_seed_same_run(tmp_path, algo):
    env = "FrozenLake-v1" if algo == "qlearning" else "CartPole-v1"
    fields = {"dqn": {"dqn.learning_starts": 100, "dqn.train_freq": 4, "dqn.gradient_steps": 1,
                      "dqn.buffer_size": 2000}}.get(algo, {})
    a, b = (train(tmp_path, algo, env, 1024, seed=3, eval_episodes=10, **fields) for _ in range(2))
    c = train(tmp_path, algo, env, 1024, seed=4, eval_episodes=10, **fields)
    metrics = [[{k: v for k, v in r.items() if k != "time"} for r in map(json.loads, open(f"{s['out']}/metrics.jsonl"))]
               for s in (a, b, c)]
    weights = [open(f"{s['out']}/model.safetensors", "rb").read() for s in (a, b, c)]
    assert metrics[0] == metrics[1] and weights[0] == weights[1]
    assert a["eval_return"] == b["eval_return"]
    assert weights[0] != weights[2]


def test_a_saved_agent_acts_as_it_did_in_training(tmp_path):
    s = train(tmp_path, "ppo", "CartPole-v1", 2048)
    meta, act = load_act(s["out"])
    assert meta["algo"] == "ppo" and meta["env"] == "CartPole-v1"
    returns = evaluate("CartPole-v1", {}, act, s["eval_episodes"], seed=10_000)  # the run's own evaluation seeds
    assert np.mean(returns) == s["eval_return"]
