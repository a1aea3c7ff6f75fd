"""REINFORCE with a learned baseline (Williams 1992): Monte Carlo policy gradient.

    repeat until `steps` environment steps:
        play n_envs whole episodes in parallel with the current policy
        G_t = r_t + gamma r_{t+1} + ...   (the episode's discounted return from t on)
        A_t = G_t - V(s_t)                (the baseline cuts variance, not the expectation)
        policy: one Adam step on -mean(log pi(a_t|s_t) * whitened A_t)
        critic: a few Adam steps of 0.5 (V(s_t) - G_t)^2

The episodes go into [n_envs, T_max] tensors padded with mask 0 (short episodes end early),
which is exactly the language model's padded batch: G - V comes from the same `core.gae`, with
lam = 1. An episode truncated by the time limit (or by the step budget) bootstraps its return
from V(final observation); a terminated one does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from chatfoundry.config import require
from chatfoundry.rl import core
from chatfoundry.rl.common import (Critic, Policy, Run, env_action, make_env, obs_tensor, policy_act, policy_info,
                                   prefixed)


@dataclass
class ReinforceConfig:
    n_envs: int = 8  # episodes per update, played side by side
    gamma: float = 0.99  # discount per environment step
    lr: float = 1e-3  # Adam learning rate of the policy (one step per update)
    critic_lr: float = 1e-3  # Adam learning rate of the critic (the baseline)
    critic_epochs: int = 5  # critic Adam steps per update, each on all its episodes
    ent_coef: float = 0.0  # weight of the entropy bonus in the policy loss (0: none)
    max_grad_norm: float = 1.0  # clip the policy's gradient norm to this
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # hidden layer sizes of the policy and of the critic
    activation: Literal["tanh", "relu"] = "tanh"  # between the hidden layers
    reward_scale: float = 1.0  # rewards are multiplied by this for learning (logged returns stay unscaled)

    def validate(self) -> None:
        for name in ("n_envs", "critic_epochs"):
            require(getattr(self, name) > 0, f"reinforce.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.lr > 0 and self.critic_lr > 0, "reinforce.lr", "lr and critic_lr must be > 0")
        require(0 < self.gamma <= 1, "reinforce.gamma", f"must be in (0, 1], got {self.gamma}")


@dataclass
class Episodes:
    """n episodes padded to the longest: obs [n, T, d], actions / rewards / mask [n, T]."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    terminated: torch.Tensor  # [n, T]: 1 at the last step of an episode that terminated
    final_obs: torch.Tensor  # [n, d]: the observation each episode ended on
    finished: list[tuple[float, int]]  # (return, length) of the episodes that ended (not cut by the budget)
    steps: int


@torch.no_grad()  # not inference_mode: the episodes feed the update's autograd graph
def play_episodes(envs: list, policy: Policy, generator: torch.Generator, max_steps: int,
                  reward_scale: float = 1.0) -> Episodes:
    """One episode per env, all stepped together; after `max_steps` steps in all, the episodes
    still running are cut there (a truncation)."""
    space, action_space = envs[0].observation_space, envs[0].action_space
    obs = [obs_tensor(np.asarray([env.reset()[0]]), space)[0] for env in envs]
    trajectories = [{"obs": [], "actions": [], "rewards": []} for _ in envs]
    terminated, ended, final_obs, steps = [False] * len(envs), [False] * len(envs), list(obs), 0
    running = list(range(len(envs)))
    while running and steps < max_steps:
        running = running[: max_steps - steps]  # the budget ends mid-batch: cut the rest
        batch = torch.stack([obs[i] for i in running])
        actions = policy.sample(policy(batch), generator)
        still = []
        for i, a, a_env in zip(running, actions, env_action(actions, action_space)):
            next_obs, reward, term, trunc, _ = envs[i].step(a_env)
            traj = trajectories[i]
            traj["obs"].append(obs[i]), traj["actions"].append(a), traj["rewards"].append(float(reward))
            obs[i] = final_obs[i] = obs_tensor(np.asarray([next_obs]), space)[0]
            terminated[i], ended[i] = bool(term), bool(term or trunc)
            if not ended[i]:
                still.append(i)
        steps += len(running)
        running = still

    n, T = len(envs), max(len(t["rewards"]) for t in trajectories)
    ep_obs = torch.zeros(n, T, obs[0].shape[-1])
    actions = torch.zeros(n, T, *trajectories[0]["actions"][0].shape, dtype=trajectories[0]["actions"][0].dtype)
    rewards, mask, term = torch.zeros(n, T), torch.zeros(n, T), torch.zeros(n, T)
    for i, traj in enumerate(trajectories):
        k = len(traj["rewards"])
        if k == 0:
            continue
        ep_obs[i, :k], actions[i, :k] = torch.stack(traj["obs"]), torch.stack(traj["actions"])
        rewards[i, :k], mask[i, :k] = torch.tensor(traj["rewards"]) * reward_scale, 1.0
        term[i, k - 1] = float(terminated[i])
    finished = [(sum(t["rewards"]), len(t["rewards"])) for t, done in zip(trajectories, ended) if done]
    return Episodes(ep_obs, actions, rewards, mask, term, torch.stack(final_obs), finished, steps)


def returns_and_advantages(ep: Episodes, values: torch.Tensor, final_values: torch.Tensor,
                           gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """G_t - V(s_t) and G_t through core.gae with lam = 1: the next value is V(s_{t+1}) inside an
    episode and V(final observation) at its last step (used only if it did not terminate)."""
    length = ep.mask.sum(1).long()
    last = torch.zeros_like(ep.mask)
    rows = torch.nonzero(length > 0).squeeze(1)
    last[rows, length[rows] - 1] = 1.0
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    next_values = next_values * (1 - last) + final_values.unsqueeze(1) * last
    return core.gae(ep.rewards, values, next_values, ep.terminated, last, gamma, 1.0, ep.mask)


def train(run: Run, cfg: ReinforceConfig) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(run.seed)
    generator = torch.Generator().manual_seed(run.seed)
    envs = [make_env(run.env_id, run.env_kwargs) for _ in range(cfg.n_envs)]
    for i, env in enumerate(envs):  # seed each env once; later resets continue its own random stream
        env.reset(seed=run.seed + i)
        env.action_space.seed(run.seed + i)
    policy, info = policy_info(envs[0].observation_space, envs[0].action_space, cfg.hidden, cfg.activation,
                               "reinforce")
    critic = Critic(info["obs_size"], cfg.hidden, cfg.activation)
    policy_opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
    act = policy_act(policy, envs[0].observation_space, envs[0].action_space)

    step = 0
    while step < run.steps:
        ep = play_episodes(envs, policy, generator, run.steps - step, cfg.reward_scale)
        step += ep.steps
        with torch.no_grad():
            advantages, returns = returns_and_advantages(ep, critic(ep.obs), critic(ep.final_obs), cfg.gamma)
        advantages = core.masked_whiten(advantages, ep.mask)

        dist = policy(ep.obs)
        entropy = core.masked_mean(policy.entropy(dist), ep.mask)
        pg_loss = -core.masked_mean(policy.log_prob(dist, ep.actions) * advantages, ep.mask)
        policy_opt.zero_grad(set_to_none=True)
        (pg_loss - cfg.ent_coef * entropy).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        policy_opt.step()
        for _ in range(cfg.critic_epochs):
            v_loss = core.clipped_value_loss(critic(ep.obs), None, returns, None, ep.mask)
            critic_opt.zero_grad(set_to_none=True)
            v_loss.backward()
            critic_opt.step()

        run.log(step, ep.finished, policy_loss=pg_loss.item(), value_loss=v_loss.item(), entropy=entropy.item())
        run.maybe_evaluate(step, act)
    for env in envs:
        env.close()
    return {**prefixed("policy", policy), **prefixed("critic", critic)}, info
