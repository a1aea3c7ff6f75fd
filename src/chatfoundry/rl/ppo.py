"""PPO (Schulman et al. 2017), both objectives of the paper, on vectorized Gymnasium envs.

    repeat until `steps` environment steps:
        rollout   n_envs x n_steps with the current policy (values and log-probs kept)
        GAE       advantages and returns, bootstrapping truncated episodes from V(final obs)
        update    `epochs` passes over shuffled minibatches:
                    ppo     the clipped surrogate  -min(r A, clip(r, 1-e, 1+e) A)
                    ppo-kl  the KL-penalised one   -r A + beta KL(old || new); after the update
                            beta doubles or halves around kl_target (the paper's rule)
                  + value loss + entropy bonus, one Adam step per minibatch, gradient clipping

The implementation details that matter (Huang et al., "The 37 implementation details of PPO"):
orthogonal init, Adam eps 1e-5, advantage whitening, learning-rate (and optionally clip) annealing,
global gradient clipping, a separate critic network. The math is `chatfoundry.rl.core`, the same
functions the language model's PPO calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from chatfoundry.config import require
from chatfoundry.rl import core
from chatfoundry.rl.common import Critic, Run, VecRunner, policy_act, policy_info, prefixed


@dataclass
class ClassicPPOConfig:
    """PPO on Gymnasium (`rl train --algo ppo|ppo-kl`, section `ppo`); the language model's is
    train/ppo.py's PPOConfig. The knobs they share have the same names."""

    n_envs: int = 8  # environments stepped side by side (one vector env)
    n_steps: int = 128  # per env per rollout
    batch_size: int = 256  # minibatch
    epochs: int = 10  # passes over each rollout, in shuffled minibatches
    lr: float = 3e-4  # Adam learning rate of policy and critic (the start, when anneal_lr)
    anneal_lr: bool = True  # linearly to 0 over the run
    gamma: float = 0.99  # discount per environment step
    gae_lambda: float = 0.95  # GAE's lambda in [0, 1]: 0 one-step TD advantages, 1 Monte Carlo
    clip: float = 0.2  # ppo: the ratio's clip range
    anneal_clip: bool = False  # linearly to 0 with the learning rate (rl-zoo's lin_0.2)
    value_clip: Optional[float] = None  # how far a value may move from its rollout value (None: plain MSE, as SB3)
    ent_coef: float = 0.0  # weight of the entropy bonus in the loss (0: none)
    vf_coef: float = 1.0  # times core's 0.5 * MSE: the same loss as SB3's vf_coef 0.5 on its plain MSE
    max_grad_norm: float = 0.5  # clip the global gradient norm (policy and critic together) to this
    target_kl: Optional[float] = None  # ppo: stop the epochs early once the approximate KL passes this
    kl_target: float = 0.01  # ppo-kl: the KL per update the controller aims for
    kl_beta: float = 1.0  # ppo-kl: the penalty's initial coefficient
    kl_controller: Literal["doubling", "adaptive"] = "doubling"  # the PPO paper's rule, or Ziegler et al.'s
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # hidden layer sizes of the policy and of the critic
    activation: Literal["tanh", "relu"] = "tanh"  # between the hidden layers
    reward_scale: float = 1.0  # rewards are multiplied by this for learning (Pendulum's -16..0 per step: 0.1)
    adam_eps: float = 1e-5  # Adam's epsilon (PPO implementations' 1e-5, not torch's 1e-8)

    def validate(self) -> None:
        for name in ("n_envs", "n_steps", "batch_size", "epochs"):
            require(getattr(self, name) > 0, f"ppo.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.lr > 0, "ppo.lr", f"must be > 0, got {self.lr}")
        require(0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "ppo.gamma",
                "gamma must be in (0, 1] and gae_lambda in [0, 1]")
        require(self.clip > 0 and self.kl_target > 0 and self.kl_beta >= 0, "ppo.clip",
                "clip and kl_target must be > 0, kl_beta >= 0")
        require(len(self.hidden) > 0 and min(self.hidden) > 0, "ppo.hidden", f"must be positive sizes, got {self.hidden}")


def train(run: Run, cfg: ClassicPPOConfig, kl_penalty: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Train for run.steps environment steps; returns the weights and what rebuilds the policy."""
    torch.manual_seed(run.seed)
    generator = torch.Generator().manual_seed(run.seed)
    runner = VecRunner(run.env_id, run.env_kwargs, cfg.n_envs, cfg.n_steps, run.seed, cfg.reward_scale)
    policy, info = policy_info(runner.obs_space, runner.action_space, cfg.hidden, cfg.activation,
                               "ppo-kl" if kl_penalty else "ppo")
    critic = Critic(info["obs_size"], cfg.hidden, cfg.activation)
    params = [*policy.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, fused=True)  # one kernel per step
    beta = (core.DoublingKL(cfg.kl_beta, cfg.kl_target) if cfg.kl_controller == "doubling"
            else core.AdaptiveKL(cfg.kl_beta, cfg.kl_target))
    act = policy_act(policy, runner.obs_space, runner.action_space)

    batch = cfg.n_envs * cfg.n_steps
    n_updates = run.steps // batch
    for update in range(n_updates):
        frac = 1.0 - update / n_updates
        lr = cfg.lr * frac if cfg.anneal_lr else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        clip = cfg.clip * frac if cfg.anneal_clip else cfg.clip

        ro = runner.collect(policy, critic, generator)
        advantages, returns = core.gae(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.dones,
                                       cfg.gamma, cfg.gae_lambda, ro.mask)
        advantages = core.masked_whiten(advantages, ro.mask)

        # flatten [n_envs, T] -> [batch]: the update needs no time order
        obs, actions = ro.obs.flatten(0, 1), ro.actions.flatten(0, 1)
        logp_old, v_old, adv, ret, mask = (x.flatten() for x in (ro.logp, ro.values, advantages, returns, ro.mask))
        stats: dict[str, list[float]] = {}
        for epoch in range(cfg.epochs):
            for idx in torch.randperm(batch, generator=generator).split(cfg.batch_size):
                dist = policy(obs[idx])
                logp = policy.log_prob(dist, actions[idx])
                if kl_penalty:
                    pg_loss, s = core.kl_penalty_surrogate(logp, logp_old[idx], adv[idx], beta.value, mask[idx])
                else:
                    pg_loss, s = core.clipped_surrogate(logp, logp_old[idx], adv[idx], clip, mask[idx])
                v_loss = core.clipped_value_loss(critic(obs[idx]), v_old[idx], ret[idx], cfg.value_clip, mask[idx])
                loss = pg_loss + cfg.vf_coef * v_loss
                if cfg.ent_coef:  # else leave it out of the graph: backward is most of an update's time
                    loss = loss - cfg.ent_coef * core.masked_mean(policy.entropy(dist), mask[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                for k, v in {**s, "policy_loss": pg_loss.item(), "value_loss": v_loss.item()}.items():
                    stats.setdefault(k, []).append(v)
            if not kl_penalty and cfg.target_kl is not None and stats["approx_kl"][-1] > cfg.target_kl:
                break
        with torch.no_grad():  # how far the whole update moved the policy (the KL controller's input)
            dist = policy(obs)
            kl = core.masked_mean(core.kl_estimate(logp_old, policy.log_prob(dist, actions), "k3"), mask).item()
            extra = {"update_kl": kl, "entropy": core.masked_mean(policy.entropy(dist), mask).item()}
        if kl_penalty:
            extra["beta"] = beta.update(kl, batch)
        step = (update + 1) * batch
        run.log(step, runner.take_episodes(), lr=lr,
                explained_variance=core.explained_variance(v_old, ret, mask),
                **{k: float(np.mean(v)) for k, v in stats.items() if k != "beta"}, **extra)
        run.maybe_evaluate(step, act)
    runner.close()
    return {**prefixed("policy", policy), **prefixed("critic", critic)}, info
