"""Tabular Q-learning (Watkins 1989) with epsilon-greedy exploration.

    for each environment step:
        a = random with probability epsilon, else argmax_a Q[s, a]   (ties broken at random)
        Q[s, a] += lr * (r + gamma * (1 - terminated) * max_a' Q[s', a'] - Q[s, a])

A time-limit truncation is not terminal: its target keeps the max_a' Q[s', a'] of the final state.
epsilon and the learning rate fall linearly over the run (a decaying step size is what lets the
table settle in a stochastic environment such as slippery FrozenLake).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from chatfoundry.config import require
from chatfoundry.rl.common import Run, make_env


@dataclass
class QLearningConfig:
    lr: float = 0.1  # step size of the table update, in (0, 1], at the start of the run
    lr_end: float = 0.01  # the learning rate at the end of the run (linear decay)
    gamma: float = 0.99  # discount per environment step
    eps_start: float = 1.0  # probability of a random action at the start
    eps_end: float = 0.05  # probability of a random action once exploration_fraction has passed
    exploration_fraction: float = 0.5  # share of the run over which epsilon falls
    log_every: int = 1000  # env steps between metrics records

    def validate(self) -> None:
        require(0 < self.lr <= 1 and 0 <= self.lr_end <= self.lr, "qlearning.lr", "need 0 <= lr_end <= lr <= 1")
        require(0 < self.gamma <= 1, "qlearning.gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 <= self.eps_end <= self.eps_start <= 1, "qlearning.eps_start", "need 0 <= eps_end <= eps_start <= 1")
        require(0 < self.exploration_fraction <= 1, "qlearning.exploration_fraction", "must be in (0, 1]")
        require(self.log_every > 0, "qlearning.log_every", f"must be > 0, got {self.log_every}")


def greedy(q: np.ndarray, state: int, rng: np.random.Generator) -> int:
    """argmax with random tie-breaking: an all-zero row (unvisited state) must not always pick action 0."""
    row = q[state]
    return int(rng.choice(np.flatnonzero(row == row.max())))


def table_act(q: np.ndarray):
    """Greedy actions for a batch of states (evaluation and play); ties go to the lowest action."""
    return lambda obs: q[np.asarray(obs, dtype=np.int64)].argmax(-1)


def load_act(info: dict, tensors: dict[str, torch.Tensor], obs_space: gym.Space):
    return table_act(tensors["q"].numpy())


def train(run: Run, cfg: QLearningConfig) -> tuple[dict[str, torch.Tensor], dict]:
    rng = np.random.default_rng(run.seed)
    env = make_env(run.env_id, run.env_kwargs)
    n_states, n_actions = int(env.observation_space.n), int(env.action_space.n)
    q = np.zeros((n_states, n_actions))
    act = table_act(q)

    state, _ = env.reset(seed=run.seed)
    ep_return, ep_length, episodes = 0.0, 0, []
    explore_steps = cfg.exploration_fraction * run.steps
    for step in range(1, run.steps + 1):
        progress = (step - 1) / run.steps
        eps = max(cfg.eps_end, cfg.eps_start + (cfg.eps_end - cfg.eps_start) * (step - 1) / explore_steps)
        lr = cfg.lr + (cfg.lr_end - cfg.lr) * progress
        action = int(rng.integers(n_actions)) if rng.random() < eps else greedy(q, state, rng)
        next_state, reward, term, trunc, _ = env.step(action)
        target = reward + (0.0 if term else cfg.gamma * q[next_state].max())
        q[state, action] += lr * (target - q[state, action])
        ep_return, ep_length = ep_return + float(reward), ep_length + 1
        state = next_state
        if term or trunc:
            episodes.append((ep_return, ep_length))
            ep_return, ep_length = 0.0, 0
            state, _ = env.reset()
        if step % cfg.log_every == 0 or step == run.steps:
            run.log(step, episodes, epsilon=eps, lr=lr)
            episodes = []
        run.maybe_evaluate(step, act)
    env.close()
    return {"q": torch.from_numpy(q)}, {"n_states": n_states, "n_actions": n_actions}
