"""DQN (Mnih et al. 2015), optionally Double DQN (van Hasselt et al. 2016), on one Gymnasium env.

    for each environment step:
        act epsilon-greedily on Q (epsilon falls linearly from eps_start to eps_end)
        store (s, a, r, s', terminated) in the replay buffer
        every train_freq steps (after learning_starts): gradient_steps minibatch updates of
            Huber(Q(s, a), r + gamma * (1 - terminated) * Q_target(s', a*))
            a* = argmax Q_target(s', .)   (DQN)  or  argmax Q(s', .)  (Double DQN)
        every target_update_interval steps: copy Q into Q_target

A truncated step (time limit) stores terminated = 0, so its target bootstraps from Q_target of
the final observation: the time limit is not part of the MDP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatfoundry.config import require
from chatfoundry.rl.common import Run, make_env, mlp, obs_size, obs_tensor, prefixed, unprefixed


@dataclass
class DQNConfig:
    lr: float = 1e-3  # Adam learning rate
    anneal_lr: bool = False  # linearly to 0 over the run: the late policy stops drifting away from a solution
    gamma: float = 0.99  # discount per environment step
    buffer_size: int = 50_000  # replay buffer: the most recent transitions kept
    batch_size: int = 64  # transitions per minibatch update
    learning_starts: int = 1000  # env steps collected before the first update
    train_freq: int = 4  # env steps between training rounds
    gradient_steps: int = 1  # minibatch updates per round
    target_update_interval: int = 500  # env steps between target-network copies
    eps_start: float = 1.0  # probability of a random action at the start
    eps_end: float = 0.05  # probability of a random action once exploration_fraction has passed
    exploration_fraction: float = 0.2  # share of the run over which epsilon falls
    double: bool = True  # Double DQN: the online net picks the next action, the target net values it
    max_grad_norm: float = 10.0  # clip the Q-network's gradient norm to this
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # hidden layer sizes of the Q-network (ReLU)

    def validate(self) -> None:
        for name in ("buffer_size", "batch_size", "train_freq", "gradient_steps", "target_update_interval"):
            require(getattr(self, name) > 0, f"dqn.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.lr > 0, "dqn.lr", f"must be > 0, got {self.lr}")
        require(0 < self.gamma <= 1, "dqn.gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 <= self.eps_end <= self.eps_start <= 1, "dqn.eps_start", "need 0 <= eps_end <= eps_start <= 1")
        require(0 < self.exploration_fraction <= 1, "dqn.exploration_fraction", "must be in (0, 1]")


def build(info: dict) -> nn.Module:
    return mlp([info["obs_size"], *info["hidden"], info["n_actions"]], nn.ReLU)


def q_act(q: nn.Module, obs_space: gym.Space):
    """Greedy actions for a batch of observations (evaluation and play)."""
    @torch.inference_mode()
    def act(obs: np.ndarray) -> np.ndarray:
        return q(obs_tensor(obs, obs_space)).argmax(-1).numpy()

    return act


def load_act(info: dict, tensors: dict[str, torch.Tensor], obs_space: gym.Space):
    q = build(info)
    q.load_state_dict(unprefixed("q", tensors))
    return q_act(q, obs_space)


class ReplayBuffer:
    """A ring of the last `size` transitions, sampled uniformly."""

    def __init__(self, size: int, obs_dim: int):
        self.obs, self.next_obs = torch.zeros(size, obs_dim), torch.zeros(size, obs_dim)
        self.actions = torch.zeros(size, dtype=torch.long)
        self.rewards, self.terminated = torch.zeros(size), torch.zeros(size)
        self.size, self.pos, self.full = size, 0, False

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.terminated[i] = (
            obs, action, reward, next_obs, terminated)
        self.pos = (i + 1) % self.size
        self.full = self.full or self.pos == 0

    def sample(self, n: int, generator: torch.Generator):
        idx = torch.randint(self.size if self.full else self.pos, (n,), generator=generator)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx]


def train(run: Run, cfg: DQNConfig) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(run.seed)
    generator, rng = torch.Generator().manual_seed(run.seed), np.random.default_rng(run.seed)
    env = make_env(run.env_id, run.env_kwargs)
    env.action_space.seed(run.seed)
    obs_space = env.observation_space
    info = {"obs_size": obs_size(obs_space), "n_actions": int(env.action_space.n), "hidden": list(cfg.hidden)}
    q = build(info)
    q_target = copy.deepcopy(q).requires_grad_(False)
    optimizer = torch.optim.Adam(q.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(cfg.buffer_size, info["obs_size"])
    act = q_act(q, obs_space)

    obs = obs_tensor(np.asarray([env.reset(seed=run.seed)[0]]), obs_space)[0]
    ep_return, ep_length, episodes, loss, q_mean = 0.0, 0, [], float("nan"), float("nan")
    explore_steps = cfg.exploration_fraction * run.steps
    for step in range(1, run.steps + 1):
        eps = max(cfg.eps_end, cfg.eps_start + (cfg.eps_end - cfg.eps_start) * (step - 1) / explore_steps)
        if rng.random() < eps:
            action = int(env.action_space.sample())
        else:
            with torch.inference_mode():
                action = int(q(obs).argmax())
        next_obs, reward, term, trunc, _ = env.step(action)
        next_obs = obs_tensor(np.asarray([next_obs]), obs_space)[0]
        buffer.add(obs, action, float(reward), next_obs, float(term))  # truncation bootstraps: terminated = 0
        ep_return, ep_length = ep_return + float(reward), ep_length + 1
        if term or trunc:
            episodes.append((ep_return, ep_length))
            ep_return, ep_length = 0.0, 0
            next_obs = obs_tensor(np.asarray([env.reset()[0]]), obs_space)[0]
        obs = next_obs

        if step > cfg.learning_starts and step % cfg.train_freq == 0:
            if cfg.anneal_lr:
                optimizer.param_groups[0]["lr"] = cfg.lr * (1 - (step - 1) / run.steps)
            for _ in range(cfg.gradient_steps):
                s, a, r, s2, done = buffer.sample(cfg.batch_size, generator)
                with torch.no_grad():
                    next_q = q_target(s2)
                    a2 = q(s2).argmax(-1, keepdim=True) if cfg.double else next_q.argmax(-1, keepdim=True)
                    target = r + cfg.gamma * (1 - done) * next_q.gather(-1, a2).squeeze(-1)
                q_sa = q(s).gather(-1, a.unsqueeze(-1)).squeeze(-1)
                loss_t = F.smooth_l1_loss(q_sa, target)  # Huber: big TD errors do not blow up the step
                optimizer.zero_grad(set_to_none=True)
                loss_t.backward()
                nn.utils.clip_grad_norm_(q.parameters(), cfg.max_grad_norm)
                optimizer.step()
            loss, q_mean = loss_t.item(), q_sa.mean().item()
        if step % cfg.target_update_interval == 0:
            q_target.load_state_dict(q.state_dict())
        if step % 1000 == 0 or step == run.steps:
            run.log(step, episodes, epsilon=eps, loss=loss, q=q_mean)
            episodes = []
        run.maybe_evaluate(step, act)
    env.close()
    return prefixed("q", q), info
