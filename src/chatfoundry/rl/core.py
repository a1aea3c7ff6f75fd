"""The policy-gradient math shared by classic RL (CartPole, ...) and the language model's PPO.

Every function takes torch tensors with **time on the last dimension** (`[..., T]`: a vector
env's rollout as `[n_envs, T]`, a batch of LM responses as `[B, T]`) and an optional `mask`
(1 = a real step, 0 = padding). Padding gets zero advantage, passes nothing to its neighbours
and is left out of every mean, so a padded LM batch and a gym rollout go through the same code.

    advantages, returns = gae(rewards, values, next_values, terminated, done, gamma, lam, mask)
    advantages = masked_whiten(advantages, mask)
    loss, stats = clipped_surrogate(logp_new, logp_old, advantages, clip=0.2, mask=mask)
    loss = loss + vf_coef * clipped_value_loss(v_new, v_old, returns, clip=None, mask=mask)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    """Mean of x over the real steps (all of them when mask is None)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance over the real steps; unbiased (n - 1 in the denominator) by default, as TRL."""
    if mask is None:
        return x.var(unbiased=unbiased) if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    mask = mask.to(x.dtype)
    n = mask.sum()
    centered = (x - masked_mean(x, mask)) * mask
    var = (centered**2).sum() / n.clamp(min=1)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the real steps; padding comes out as 0.

    shift_mean=False keeps the mean and only rescales (TRL's option for rewards).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor | None = None) -> float:
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


# ---------------------------------------------------------------- advantages


def gae(rewards: Tensor, values: Tensor, next_values: Tensor, terminated: Tensor, done: Tensor,
        gamma: float, lam: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016). All inputs are [..., T].

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
        returns = A + V   (the critic's target)

    values[t] is V(s_t); next_values[t] is V(s_{t+1}), the state the step led to. Gymnasium
    ends an episode in one of two ways, and they differ here:
    - terminated (the MDP reached a terminal state: the pole fell, the response ended): no future
      reward, so V(s_{t+1}) is not used;
    - truncated (a time limit cut it): the future still existed, so we bootstrap from
      next_values[t] = V(final observation). Pass done = terminated | truncated.
    done stops the recursion at an episode's end. The last step of a rollout that did not end
    needs next_values = V(observation after the rollout), which bootstraps the cut the same way.

    mask (1 real, 0 padding): padded steps get advantage 0 and return 0, and give nothing to the
    step before them (as if the episode were cut there).

    The language model (one episode per row, right-padded, the episode ends at the last real
    token) is `sequence_gae(rewards, values, mask, gamma, lam)`.
    """
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    carry = gamma * lam * (1.0 - done.to(rewards.dtype))
    deltas = (rewards + gamma * next_values * not_terminated - values) * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        last = deltas[..., t] + carry[..., t] * last
        last = last * mask[..., t]  # padding holds 0, so it also passes 0 back
        advantages[..., t] = last
    return advantages, (advantages + values) * mask


def sequence_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                 lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE for one episode per row that ends (terminates) at the row's last real step.

    The LM case: rewards, values and mask are [B, T] over response tokens, right-padded;
    rewards hold the per-token KL penalty plus the reward model's score at the last token:

        rewards = -beta * kl_estimate(logp, logp_ref) * mask
        rewards[torch.arange(B), mask.sum(1) - 1] += scores
        advantages, returns = sequence_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    """
    mask = mask.to(rewards.dtype)
    next_mask = torch.cat([mask[..., 1:], torch.zeros_like(mask[..., :1])], dim=-1)
    last = mask * (1 - next_mask)  # the last real step of each row
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    return gae(rewards, values, next_values, terminated=last, done=last, gamma=gamma, lam=lam, mask=mask)


# ---------------------------------------------------------------- KL


def kl_estimate(logp: Tensor, logp_ref: Tensor, kind: Literal["k1", "k2", "k3"] = "k1") -> Tensor:
    """Per-step estimate of KL(p || ref) from actions sampled from p (Schulman's k1/k2/k3).

    k1 = log p/ref (unbiased, can be negative), k2 = (log p/ref)^2 / 2 (low variance, biased),
    k3 = (ref/p - 1) - log(ref/p) (unbiased and >= 0). For PPO's KL(old || new) on the old
    policy's samples: kl_estimate(logp_old, logp_new, "k3") = (r - 1) - log r with r = new/old.
    """
    log_ratio = logp - logp_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2 or k3)")


# ---------------------------------------------------------------- policy and value losses


def aggregate(per_step: Tensor, mask: Tensor | None, how: Literal["token", "sequence", "constant"] = "token",
              horizon: int | None = None) -> Tensor:
    """A (B, T) per-step loss as one number: the mean over every real step (`token`: PPO's, and
    DAPO's), the mean of each sequence's mean (`sequence`: GRPO's), or the sum over real steps
    divided by B x `horizon` (`constant`: Dr. GRPO's, which weighs no sequence by its length)."""
    if how == "token" or mask is None:
        return masked_mean(per_step, mask)
    if how == "sequence":
        return masked_mean(per_step, mask, dim=1).mean()
    return (per_step * mask).sum() / (mask.shape[0] * (horizon or mask.shape[1]))


def clipped_surrogate(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip: float,
                      mask: Tensor | None = None, how: Literal["token", "sequence", "constant"] = "token",
                      horizon: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip's loss: -mean(min(r A, clip(r, 1 - clip, 1 + clip) A)), r = pi_new / pi_old, the
    mean taken as `aggregate` says.

    stats: clip_fraction (share of steps where the clip bit), approx_kl (k3, KL(old || new)) and
    ratio (mean r; exactly 1 before the first update of a batch).
    """
    log_ratio = logp_new - logp_old
    ratio = log_ratio.exp()
    loss = -aggregate(torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages), mask, how, horizon)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(((ratio - 1).abs() > clip).to(ratio.dtype), mask).item(),
                 "approx_kl": masked_mean(kl_estimate(logp_old, logp_new, "k3"), mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def kl_penalty_surrogate(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, beta: float,
                         mask: Tensor | None = None, kind: Literal["k1", "k2", "k3"] = "k3"
                         ) -> tuple[Tensor, dict[str, float]]:
    """PPO's adaptive-KL objective as a loss: mean(-r A + beta * KL(old || new)), r = pi_new / pi_old.

    The KL is estimated per step on the old policy's actions (k3 by default: unbiased and >= 0,
    so the penalty never rewards moving away). stats as `clipped_surrogate`, plus kl (the mean
    penalty estimate) and beta.
    """
    log_ratio = logp_new - logp_old
    ratio = log_ratio.exp()
    kl = kl_estimate(logp_old, logp_new, kind)
    loss = masked_mean(-ratio * advantages + beta * kl, mask)
    with torch.no_grad():
        stats = {"approx_kl": masked_mean(kl_estimate(logp_old, logp_new, "k3"), mask).item(),
                 "kl": masked_mean(kl, mask).item(), "ratio": masked_mean(ratio, mask).item(), "beta": beta}
    return loss, stats


def clipped_value_loss(v_new: Tensor, v_old: Tensor | None, returns: Tensor, clip: float | None = None,
                       mask: Tensor | None = None) -> Tensor:
    """0.5 * mean squared error of the critic against the returns (the 1/2 as TRL and CleanRL).

    v_old (the values at rollout time) is only read when clipping.

    With clip, PPO's pessimistic version: the new value may move at most `clip` from the value
    at rollout time, and the worse of the clipped and unclipped errors counts.
    """
    err = (v_new - returns) ** 2
    if clip is not None:
        v_clipped = v_old + (v_new - v_old).clamp(-clip, clip)
        err = torch.max(err, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


# ---------------------------------------------------------------- KL coefficient controllers


@dataclass
class FixedKL:
    """A constant KL coefficient."""

    value: float

    def update(self, observed_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKL:
    """Ziegler et al. (2019): a proportional controller steering the observed KL to `target`.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)

    `hold`: beta does not fall until the KL has reached the target once (anti-windup). A policy
    starts at the reference, so its KL is small at first because it has not moved yet, not
    because the penalty is too firm; lowering beta then only lets the KL overshoot later.
    """

    value: float
    target: float
    horizon: float = 10_000
    hold: bool = False
    reached: bool = False  # the KL has been at or past the target

    def update(self, observed_kl: float, n_steps: int) -> float:
        self.reached = self.reached or observed_kl >= self.target
        error = min(max(observed_kl / self.target - 1, -0.2), 0.2)
        if error < 0 and self.hold and not self.reached:
            return self.value
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


@dataclass
class DoublingKL:
    """The PPO paper's rule: halve beta when KL < target / 1.5, double it when KL > target * 1.5."""

    value: float
    target: float

    def update(self, observed_kl: float, n_steps: int = 0) -> float:
        if observed_kl < self.target / 1.5:
            self.value /= 2
        elif observed_kl > self.target * 1.5:
            self.value *= 2
        return self.value
