"""TRPO (Schulman et al. 2015): the largest policy step whose KL from the old policy stays under
`max_kl`, found along the natural gradient.

    repeat until `steps` environment steps:
        rollout, GAE (as PPO: `chatfoundry.rl.core`)
        g  = gradient of the surrogate  L(theta) = mean(pi_theta(a|s) / pi_old(a|s) * A)
        x  = F^-1 g by conjugate gradient; F v is a Fisher-vector product: the gradient of
             (grad KL(old || theta) . v), plus damping * v so F stays well conditioned
        full step = sqrt(2 max_kl / x.F x) x   (the step whose quadratic KL model equals max_kl)
        backtracking line search: shrink the step until the true KL <= max_kl *and* the
             surrogate improved; if no shrink passes, keep the old policy
        critic: a separate network, a few epochs of Adam on the returns
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from chatfoundry.config import require
from chatfoundry.rl import core
from chatfoundry.rl.common import Critic, Policy, Run, VecRunner, policy_act, policy_info, prefixed


@dataclass
class TRPOConfig:
    n_envs: int = 8  # environments stepped side by side (one vector env)
    n_steps: int = 256  # per env per rollout
    gamma: float = 0.99  # discount per environment step
    gae_lambda: float = 0.95  # GAE's lambda in [0, 1]: 0 one-step TD advantages, 1 Monte Carlo
    max_kl: float = 0.01  # the trust region: mean KL(old || new) per update
    damping: float = 0.1  # added to F's diagonal
    cg_iters: int = 10  # conjugate-gradient iterations for the step direction F^-1 g
    backtrack_iters: int = 10  # line-search tries before the update is dropped (old policy kept)
    backtrack_coef: float = 0.8  # each backtrack shrinks the step by this
    critic_lr: float = 1e-3  # Adam learning rate of the critic
    critic_epochs: int = 10  # critic passes over each rollout
    critic_batch_size: int = 256  # critic minibatch (env steps)
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # hidden layer sizes of the policy and of the critic
    activation: Literal["tanh", "relu"] = "tanh"  # between the hidden layers
    reward_scale: float = 1.0  # rewards are multiplied by this for learning (logged returns stay unscaled)

    def validate(self) -> None:
        for name in ("n_envs", "n_steps", "cg_iters", "backtrack_iters", "critic_epochs", "critic_batch_size"):
            require(getattr(self, name) > 0, f"trpo.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.max_kl > 0, "trpo.max_kl", f"must be > 0, got {self.max_kl}")
        require(self.damping >= 0, "trpo.damping", f"must be >= 0, got {self.damping}")
        require(0 < self.backtrack_coef < 1, "trpo.backtrack_coef", f"must be in (0, 1), got {self.backtrack_coef}")
        require(0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "trpo.gamma",
                "gamma must be in (0, 1] and gae_lambda in [0, 1]")


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
                       tol: float = 1e-10) -> torch.Tensor:
    """Solve A x = b for a symmetric positive-definite A known only through matvec(v) = A v."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # residual b - A x, search direction
    rr = r @ r
    for _ in range(iters):
        if rr < tol:
            break
        Ap = matvec(p)
        alpha = rr / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def trpo_step(policy: Policy, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
              logp_old: torch.Tensor, mask: torch.Tensor | None, cfg: TRPOConfig) -> dict[str, float]:
    """One natural-gradient step of the policy within the trust region (in place); its stats."""
    params = [p for p in policy.parameters()]
    with torch.no_grad():
        old_dist = policy(obs)

    def surrogate() -> torch.Tensor:
        ratio = torch.exp(policy.log_prob(policy(obs), actions) - logp_old)
        return core.masked_mean(ratio * advantages, mask)

    def mean_kl() -> torch.Tensor:
        return core.masked_mean(policy.kl(old_dist, policy(obs)), mask)

    def fisher_vector(v: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(mean_kl(), params, create_graph=True)
        grad_v = parameters_to_vector(grads) @ v
        return parameters_to_vector(torch.autograd.grad(grad_v, params)) + cfg.damping * v

    surr_old = surrogate()
    g = parameters_to_vector(torch.autograd.grad(surr_old, params))
    stats = {"surrogate_gain": 0.0, "kl": 0.0, "backtracks": cfg.backtrack_iters, "accepted": 0.0}
    if not torch.isfinite(g).all() or g.abs().max() == 0:
        return stats
    direction = conjugate_gradient(fisher_vector, g, cfg.cg_iters)
    dFd = direction @ fisher_vector(direction)
    full_step = torch.sqrt(2 * cfg.max_kl / dFd.clamp(min=1e-12)) * direction
    old = parameters_to_vector(params).detach()
    with torch.no_grad():
        for i in range(cfg.backtrack_iters):
            vector_to_parameters(old + cfg.backtrack_coef**i * full_step, params)
            gain, kl = (surrogate() - surr_old).item(), mean_kl().item()
            if kl <= cfg.max_kl and gain > 0:
                return {"surrogate_gain": gain, "kl": kl, "backtracks": i, "accepted": 1.0}
        vector_to_parameters(old, params)  # no step passed both checks: keep the old policy
    return stats


def train(run: Run, cfg: TRPOConfig) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(run.seed)
    generator = torch.Generator().manual_seed(run.seed)
    runner = VecRunner(run.env_id, run.env_kwargs, cfg.n_envs, cfg.n_steps, run.seed, cfg.reward_scale)
    policy, info = policy_info(runner.obs_space, runner.action_space, cfg.hidden, cfg.activation, "trpo")
    critic = Critic(info["obs_size"], cfg.hidden, cfg.activation)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
    act = policy_act(policy, runner.obs_space, runner.action_space)

    batch = cfg.n_envs * cfg.n_steps
    for update in range(run.steps // batch):
        ro = runner.collect(policy, critic, generator)
        advantages, returns = core.gae(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.dones,
                                       cfg.gamma, cfg.gae_lambda, ro.mask)
        advantages = core.masked_whiten(advantages, ro.mask)
        obs, actions = ro.obs.flatten(0, 1), ro.actions.flatten(0, 1)
        logp_old, adv, ret, mask = (x.flatten() for x in (ro.logp, advantages, returns, ro.mask))

        stats = trpo_step(policy, obs, actions, adv, logp_old, mask, cfg)

        for _ in range(cfg.critic_epochs):
            for idx in torch.randperm(batch, generator=generator).split(cfg.critic_batch_size):
                v_loss = core.clipped_value_loss(critic(obs[idx]), None, ret[idx], None, mask[idx])
                critic_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                critic_opt.step()
        step = (update + 1) * batch
        run.log(step, runner.take_episodes(), value_loss=v_loss.item(),
                explained_variance=core.explained_variance(ro.values.flatten(), ret, mask), **stats)
        run.maybe_evaluate(step, act)
    runner.close()
    return {**prefixed("policy", policy), **prefixed("critic", critic)}, info
