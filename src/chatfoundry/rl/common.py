"""What the classic-RL algorithms share: environments, networks, on-policy rollouts, evaluation,
saving and the run record (metrics, progress, timing).

Gymnasium's two ways an episode ends, the way we treat them everywhere:
- `terminated`: the MDP reached a terminal state (the pole fell, the goal was reached). Nothing
  follows, so targets use no value of the next state.
- `truncated`: a time limit cut the episode. The state still had a future, so targets bootstrap
  from the value of the final observation, V(s') or max_a Q(s', a).
Vector environments use gymnasium 1.x's default autoreset (NEXT_STEP): the step that ends an
episode returns the *final* observation; the next `step` call resets that env and ignores its
action. We keep that reset step in the buffers with mask 0, which the core's masked functions skip.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file

from chatfoundry.errors import UserError
from chatfoundry.metrics import MetricsLog

DEFAULT_TIME_LIMIT = 1000  # for environments registered without one (CliffWalking), so no episode loops forever
AGENT_FILE, WEIGHTS_FILE = "agent.json", "model.safetensors"


# ---------------------------------------------------------------- environments


def resolve_env_id(name: str) -> str:
    """A registered id as given; a name without version, or with one this gymnasium does not
    register (Taxi-v3 became Taxi-v4), resolves to the newest registered version."""
    if name in gym.registry:
        return name
    base = name.rsplit("-v", 1)[0]
    versions = sorted((spec.version or 0, key) for key, spec in gym.registry.items()
                      if key.rsplit("-v", 1)[0] == base)
    if versions:
        return versions[-1][1]
    import difflib

    hint = difflib.get_close_matches(name, list(gym.registry), n=1)
    raise UserError(f"--env: {name!r} is not a registered gymnasium environment"
                    + (f" (did you mean {hint[0]}?)" if hint else ""))


def parse_env_kwargs(items: list[str]) -> dict[str, Any]:
    """["is_slippery=false", "map_name=8x8"] -> {"is_slippery": False, "map_name": "8x8"}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"env_kwargs: expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _time_limit(env_id: str) -> dict[str, Any]:
    return {} if gym.spec(env_id).max_episode_steps else {"max_episode_steps": DEFAULT_TIME_LIMIT}


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None, **kwargs) -> gym.Env:
    try:
        return gym.make(env_id, **_time_limit(env_id), **(env_kwargs or {}), **kwargs)
    except TypeError as e:  # an unknown keyword of the environment's constructor
        raise UserError(f"env_kwargs: {env_id} does not accept them ({e})") from None


def make_vec_env(env_id: str, n: int, env_kwargs: dict[str, Any] | None = None) -> gym.vector.VectorEnv:
    """n copies in one vector env: the environment's own vectorized version when it has one
    (CartPole: numpy over all copies, ~2x faster than stepping copies in a loop), else SyncVectorEnv
    (for small classic-control envs on 2 cores, faster than subprocesses)."""
    kwargs = {**_time_limit(env_id), **(env_kwargs or {})}
    native = gym.spec(env_id).vector_entry_point is not None and not env_kwargs and "max_episode_steps" not in kwargs
    try:
        return gym.make_vec(env_id, num_envs=n, vectorization_mode="vector_entry_point" if native else "sync", **kwargs)
    except TypeError as e:
        raise UserError(f"env_kwargs: {env_id} does not accept them ({e})") from None


def obs_size(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)  # one-hot
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return int(space.shape[0])
    raise UserError(f"observation space {space} is not supported (a flat Box or Discrete)")


def obs_tensor(obs: np.ndarray, space: gym.Space) -> torch.Tensor:
    """A batch of observations as float32 [B, obs_size]; Discrete states become one-hot rows."""
    if isinstance(space, gym.spaces.Discrete):
        return nn.functional.one_hot(torch.as_tensor(obs, dtype=torch.long) - int(space.start), int(space.n)).float()
    return torch.as_tensor(obs, dtype=torch.float32)


# ---------------------------------------------------------------- networks


def mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh, out_gain: float = 1.0) -> nn.Sequential:
    """Linear layers with `activation` between them; orthogonal init (gain sqrt 2 on hidden layers,
    `out_gain` on the last), zero biases: the PPO implementation detail that SB3 and CleanRL share."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear] if last else [linear, activation()]
    return nn.Sequential(*layers)


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
LOG_2PI = math.log(2 * math.pi)


class Policy(nn.Module):
    """A stochastic MLP policy: categorical over Discrete actions, diagonal Gaussian (mean from the
    net, a learned state-independent log-std) over Box actions.

    `forward(obs)` returns the distribution as one tensor, so it can be stored, detached and
    compared: log-probabilities [B, n] (categorical) or [mean, log_std] [B, 2 * dim] (Gaussian).
    Written out instead of torch.distributions: the rollout calls these every step.
    """

    def __init__(self, obs_dim: int, action_dim: int, continuous: bool, hidden: list[int], activation: str = "tanh"):
        super().__init__()
        self.continuous, self.action_dim = continuous, action_dim
        self.net = mlp([obs_dim, *hidden, action_dim], ACTIVATIONS[activation], out_gain=0.01)
        if continuous:
            self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.net(obs)
        if self.continuous:
            return torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return out.log_softmax(-1)

    def _split(self, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dist[..., : self.action_dim], dist[..., self.action_dim:]

    def sample(self, dist: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.continuous:
            mean, log_std = self._split(dist)
            return mean + log_std.exp() * torch.randn(mean.shape, generator=generator)
        # Gumbel-max: argmax(log p + Gumbel noise) is a sample of p; -log(Exp(1)) is Gumbel.
        # A third of torch.multinomial's time at a rollout's batch size
        return (dist - torch.empty_like(dist).exponential_(generator=generator).log()).argmax(-1)

    def mode(self, dist: torch.Tensor) -> torch.Tensor:
        return self._split(dist)[0] if self.continuous else dist.argmax(-1)

    def log_prob(self, dist: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            mean, log_std = self._split(dist)
            z = (action - mean) * torch.exp(-log_std)
            return (-0.5 * z**2 - log_std - 0.5 * LOG_2PI).sum(-1)
        return dist.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, dist: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            return (self._split(dist)[1] + 0.5 * (1 + LOG_2PI)).sum(-1)
        return -(dist.exp() * dist).sum(-1)

    def kl(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Exact KL(old || new) per state (TRPO's constraint)."""
        if self.continuous:
            (m0, s0), (m1, s1) = self._split(old), self._split(new)
            return (s1 - s0 + (torch.exp(2 * s0) + (m0 - m1) ** 2) / (2 * torch.exp(2 * s1)) - 0.5).sum(-1)
        return (old.exp() * (old - new)).sum(-1)


class Critic(nn.Module):
    """V(s): an MLP with one output."""

    def __init__(self, obs_dim: int, hidden: list[int], activation: str = "tanh"):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, 1], ACTIVATIONS[activation], out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


def action_spec(space: gym.Space, algo: str) -> tuple[int, bool]:
    """(action_dim, continuous) of a policy-gradient agent's action space."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n), False
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return int(space.shape[0]), True
    raise UserError(f"--algo {algo}: action space {space} is not supported (Discrete or a flat Box)")


def env_action(action: torch.Tensor, space: gym.Space) -> np.ndarray:
    """The policy's action as the env takes it: Gaussian samples are clipped to the Box's bounds
    (the buffer keeps the unclipped sample, whose log-probability the policy computed)."""
    a = action.numpy()
    return np.clip(a, space.low, space.high) if isinstance(space, gym.spaces.Box) else a


def policy_info(obs_space: gym.Space, action_space: gym.Space, hidden: list[int], activation: str,
                algo: str) -> tuple[Policy, dict[str, Any]]:
    """A fresh policy for these spaces, and the JSON-able facts that rebuild it (see load_policy)."""
    action_dim, continuous = action_spec(action_space, algo)
    info = {"obs_size": obs_size(obs_space), "action_dim": action_dim, "continuous": continuous,
            "hidden": list(hidden), "activation": activation}
    return load_policy(info), info


def load_policy(info: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Policy:
    policy = Policy(info["obs_size"], info["action_dim"], info["continuous"], info["hidden"], info["activation"])
    if tensors is not None:
        policy.load_state_dict(unprefixed("policy", tensors))
    return policy


# ---------------------------------------------------------------- on-policy rollouts


@dataclass
class Rollout:
    """n_steps of n_envs, time on the last dimension: [n_envs, T] (obs [n_envs, T, obs_size])."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    dones: torch.Tensor
    mask: torch.Tensor  # 0 on the reset steps of NEXT_STEP autoreset
    next_values: torch.Tensor  # V(s_{t+1}); V(final observation) where an episode ended


class VecRunner:
    """Steps a vector env with a policy and a critic, n_steps at a time, across updates."""

    def __init__(self, env_id: str, env_kwargs: dict, n_envs: int, n_steps: int, seed: int, reward_scale: float = 1.0):
        self.envs = make_vec_env(env_id, n_envs, env_kwargs)
        self.obs_space, self.action_space = self.envs.single_observation_space, self.envs.single_action_space
        self.n_envs, self.n_steps, self.reward_scale = n_envs, n_steps, reward_scale
        self.envs.action_space.seed(seed)
        obs, _ = self.envs.reset(seed=seed)
        self.obs = obs_tensor(obs, self.obs_space)
        self.prev_done = np.zeros(n_envs, dtype=bool)
        self.ep_return, self.ep_length = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []  # (return, length) of episodes since the last take_episodes()

    @torch.no_grad()  # not inference_mode: the buffers are inputs of the update's autograd graph
    def collect(self, policy: Policy, critic: Critic, generator: torch.Generator) -> Rollout:
        obs, actions, rewards, terminated, dones, mask = [], [], [], [], [], []
        for _ in range(self.n_steps):  # the per-step work is only what sampling needs
            action = policy.sample(policy(self.obs), generator)
            next_obs, reward, term, trunc, _ = self.envs.step(env_action(action, self.action_space))
            obs.append(self.obs), actions.append(action), rewards.append(reward), terminated.append(term)
            dones.append(term | trunc), mask.append(~self.prev_done)  # an env done last step just resets now
            self._track(reward, term | trunc)
            self.obs, self.prev_done = obs_tensor(next_obs, self.obs_space), term | trunc

        def stack(xs: list) -> torch.Tensor:  # T x [n_envs] -> [n_envs, T]
            return torch.from_numpy(np.stack(xs, axis=1).astype(np.float32))

        obs, actions = torch.stack(obs, dim=1), torch.stack(actions, dim=1)
        # log-probs and values in one batched pass each, after the loop: the same numbers the
        # update computes, so the first minibatch's ratio is exactly 1
        logp = policy.log_prob(policy(obs), actions)
        values = critic(torch.cat([obs, self.obs.unsqueeze(1)], dim=1))
        # V(s_{t+1}) is the next step's value (after an episode's end, the final observation's)
        return Rollout(obs, actions, logp, values[:, :-1], stack(rewards) * self.reward_scale, stack(terminated),
                       stack(dones), stack(mask), values[:, 1:])

    def _track(self, reward: np.ndarray, done: np.ndarray) -> None:
        self.ep_return += reward
        self.ep_length += ~self.prev_done  # the reset step is no environment step of the episode
        for i in np.flatnonzero(done):
            self.finished.append((float(self.ep_return[i]), int(self.ep_length[i])))
            self.ep_return[i], self.ep_length[i] = 0.0, 0

    def take_episodes(self) -> list[tuple[float, int]]:
        out, self.finished = self.finished, []
        return out

    def close(self) -> None:
        self.envs.close()


# ---------------------------------------------------------------- evaluation


def evaluate(env_id: str, env_kwargs: dict, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int,
             max_envs: int = 16) -> list[float]:
    """Returns of `episodes` episodes (reset seeds seed, seed + 1, ...), run `max_envs` at a time.

    Every env plays exactly one episode, so short episodes are not over-counted (as they are when
    one keeps whichever episodes finish first). `act` maps a batch of observations to actions.
    """
    returns: list[float] = []
    for start in range(0, episodes, max_envs):
        n = min(max_envs, episodes - start)
        envs = make_vec_env(env_id, n, env_kwargs)
        obs, _ = envs.reset(seed=seed + start)
        total, running = np.zeros(n), np.ones(n, dtype=bool)
        while running.any():
            obs, reward, term, trunc, _ = envs.step(act(obs))
            total += reward * running
            running &= ~(term | trunc)
        envs.close()
        returns += total.tolist()
    return returns


def policy_act(policy: Policy, obs_space: gym.Space, action_space: gym.Space, deterministic: bool = True,
               seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy act() for evaluate(): the policy's mode (or a sample when not deterministic)."""
    generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def act(obs: np.ndarray) -> np.ndarray:
        dist = policy(obs_tensor(obs, obs_space))
        return env_action(policy.mode(dist) if deterministic else policy.sample(dist, generator), action_space)

    return act


# ---------------------------------------------------------------- saving and loading


def save_agent(out: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """The agent as model.safetensors (weights) + agent.json (what rebuilds it: algo, env, sizes)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    (out / AGENT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_agent_files(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / AGENT_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder}: no trained agent here (expected {AGENT_FILE} and {WEIGHTS_FILE})")
    return json.loads((folder / AGENT_FILE).read_text()), load_file(str(folder / WEIGHTS_FILE))


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------- the run record


class Run:
    """What an algorithm reports to while it trains: metrics.jsonl, the progress bar, and the
    training clock (which stops while evaluations run, so curves against wall time compare
    algorithms, not evaluation schedules)."""

    def __init__(self, env_id: str, env_kwargs: dict, steps: int, seed: int, out: Path | None,
                 eval_every: int = 0, eval_episodes: int = 10, progress: bool = True, tensorboard: bool = False):
        from tqdm.auto import tqdm

        self.env_id, self.env_kwargs, self.steps, self.seed = env_id, env_kwargs, steps, seed
        self.eval_every, self.eval_episodes, self.next_eval = eval_every, eval_episodes, eval_every or steps + 1
        self.metrics = MetricsLog(Path(out or ".") / "metrics.jsonl", enabled=out is not None,
                                  tensorboard=tensorboard)
        self.records: list[dict[str, Any]] = []
        self.bar = tqdm(total=steps, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
        self.returns: list[float] = []  # every training episode's return, for the bar
        self.train_time, self._t = 0.0, time.perf_counter()
        self.step = 0

    def elapsed(self) -> float:
        return self.train_time + time.perf_counter() - self._t

    def log(self, step: int, episodes: list[tuple[float, int]] = (), **metrics: float) -> None:
        """Record training metrics at env step `step`, with the episodes finished since the last call."""
        record: dict[str, Any] = {"step": step, "time": round(self.elapsed(), 4)}
        if episodes:
            rets = [r for r, _ in episodes]
            self.returns += rets
            record.update(episode_return=float(np.mean(rets)), episode_length=float(np.mean([n for _, n in episodes])),
                          episodes=len(episodes))
        record.update({k: float(v) for k, v in metrics.items()})
        self.metrics.write(record)
        self.records.append(record)
        self.bar.update(step - self.step)
        self.step = step
        if self.returns:
            self.bar.set_postfix(ret=f"{np.mean(self.returns[-20:]):.1f}", refresh=False)

    def maybe_evaluate(self, step: int, act: Callable[[np.ndarray], np.ndarray]) -> None:
        """Every eval_every steps: evaluation episodes with the current policy, off the training clock."""
        if step < self.next_eval:
            return
        while self.next_eval <= step:
            self.next_eval += self.eval_every
        self.train_time += time.perf_counter() - self._t
        returns = evaluate(self.env_id, self.env_kwargs, act, self.eval_episodes, seed=10_000 + self.seed)
        record = {"step": step, "time": round(self.train_time, 4), "eval_return": float(np.mean(returns))}
        self.metrics.write(record)
        self.records.append(record)
        self._t = time.perf_counter()

    def close(self) -> float:
        """Stop the clock; the training wall time in seconds."""
        self.train_time += time.perf_counter() - self._t
        self._t = time.perf_counter()
        self.bar.close()
        self.metrics.close()
        return self.train_time
