"""Stage 4, RLHF with PPO: make the SFT model write what the reward model prefers, without
drifting far from what it was (InstructGPT; Ziegler et al. 2019; Stiennon et al. 2020).

    four models: the policy (actor, trained) and the frozen reference, both initialised from SFT;
      the critic (value model, trained) and the frozen reward model (RM), the critic initialised
      from the RM (its head too, or zeroed)
    prompts: a task source (data/tasks.py): the built-in world, or your JSONL prompt file
    the reward (`--reward`): a reward model (rm:PATH), the source's verifier, or a Python function
    each iteration:
      rollout  train-split prompts -> the policy samples one response each (KV cache, batched,
               temperature 1 and no top-k/top-p by default: PPO's ratio needs the distribution
               actually sampled from); a response stops at <|end|> or <|eos|>
      score    one forward each, no grad: log pi (the sampled distribution), log pi_ref, V, RM
      reward   per response token t:  r_t = -beta * KL_t  (KL_t = log pi - log pi_ref, "k1")
               plus, at the last token, the RM's score (minus a penalty if the response never ended)
      GAE      over response tokens only (gamma 1, lambda 0.95): an episode is one response
      update   `epochs` passes of minibatches: PPO's clipped surrogate (or the KL-penalty
               objective), the clipped value loss, optionally + gamma * the pretraining loss
               (PPO-ptx); an epoch stops early when the approximate KL to the rollout policy
               passes `target_kl`
      beta     fixed, or Ziegler et al.'s controller toward `kl.target` nats per response
    -> run/checkpoint/ (a chat model: `chatfoundry chat --ckpt run`), run/critic/, metrics.jsonl,
       ppo.png (rewards and KL per iteration) and eval.json: the reward (and on the world the
       gold reward) of greedy and sampled answers to held-out prompts, before (SFT) and after PPO.

The advantage, whitening, surrogate, value-loss and KL-controller math is `chatfoundry.rl.core`,
the same functions CartPole's PPO calls.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import builtin, tasks, world
from chatfoundry.errors import UserError
from chatfoundry.eval.world import chat_answers, evaluate_world
from chatfoundry.generation import GenerationConfig, generate_batch, top_k_filter, top_p_filter
from chatfoundry.metrics import MetricsLog, read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.rl import core
from chatfoundry.scoring import score_texts
from chatfoundry.tokenizer import chat_stop_ids, encode_batch_ids, encode_chat, special_id, tokenizer_hash
from chatfoundry.train.loop import Epochs, pack
from chatfoundry.train.stage import Run, StageConfig, runtime, start

CRITIC = "critic"


@dataclass
class RolloutConfig:
    batch_size: int = 64  # prompts, and so responses, per iteration
    max_new_tokens: int = 32  # tokens a response may take; one cut there loses no_eos_penalty
    # The policy's own distribution by default. Other values sample a warped distribution, and
    # then the ratio's log-probabilities are taken under that same warped distribution.
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    no_eos_penalty: float = 1.0  # subtracted from the score of a response cut at max_new_tokens
    pool: int = 2000  # train prompts to sample rollouts from (the world: families in SFT's proportions)

    def validate(self) -> None:
        for name in ("batch_size", "max_new_tokens", "pool"):
            require(getattr(self, name) > 0, f"rollout.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        require(self.top_k >= 0, "rollout.top_k", f"must be >= 0 (0: off), got {self.top_k}")
        require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.no_eos_penalty >= 0, "rollout.no_eos_penalty", f"must be >= 0, got {self.no_eos_penalty}")


@dataclass
class KLConfig:
    """The KL-to-reference term of the reward, -beta * KL per token."""

    coef: float = 0.5  # beta, the KL penalty's coefficient (the starting one when adaptive)
    # adaptive: Ziegler et al.'s proportional controller steers beta so the rollouts' KL holds at
    # `target`; it holds beta until the KL first reaches the target (no wind-up: a fixed-horizon
    # controller that lowered beta while the policy had not moved yet let the KL run to 5.7 nats).
    control: Literal["fixed", "adaptive"] = "adaptive"
    # Nats per response: the adaptive controller's aim, below the budget because the KL it holds
    # swings about it (0.6 to 1.8 nats around a target of 1 on the default world).
    target: float = 0.7
    budget: float = 1.0  # nats per response the run may spend: reported (kl_within_budget), held out
    # Responses per full step: beta moves at most 20% x batch / horizon an iteration. One batch
    # (64) lets a 40-iteration run react; Ziegler et al. used 10,000 over far longer runs.
    horizon: float = 64
    estimator: Literal["k1", "k3"] = "k1"  # per-token estimate in the reward (k3: >= 0, lower variance)

    def validate(self) -> None:
        require(self.coef >= 0, "kl.coef", f"must be >= 0, got {self.coef}")
        require(self.target > 0, "kl.target", f"must be > 0, got {self.target}")
        require(self.budget > 0, "kl.budget", f"must be > 0, got {self.budget}")
        require(self.horizon > 0, "kl.horizon", f"must be > 0, got {self.horizon}")


@dataclass
class PPOEvalConfig:
    # Held-out prompts, answered before (SFT) and after: the world's test split, this many per
    # family; a prompt file's held-out prompts, all of them. 0: no evaluation.
    per_family: int = 100
    max_new_tokens: int = 48  # as SFT's eval, so the numbers compare
    # Sampled answers per prompt (the policy PPO trains; temperature as in training): gold and RM
    # reward, the paired gain over SFT and the held-out KL. More samples, a smaller standard error.
    samples: int = 4  # 0: greedy answers only
    # The SFT model sampled at these temperatures too, with no reward model: a sharper policy gains
    # gold reward by itself, so this is what PPO's sampled gain has to beat at a like KL. The two
    # default ones bracket a KL of 0.5-1.1 nats, where PPO's runs land (0.8 gave ~0.2: no comparison).
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.4])
    # Best-of-n by the RM over SFT's samples (drawn in groups of `samples`): the baseline an RL
    # method should approach, at KL log n - (n - 1) / n. Empty: none.
    best_of: list[int] = field(default_factory=lambda: [4, 16])
    batch_size: int = 128  # held-out prompts decoded together (each with its `samples` rows)

    def validate(self) -> None:
        require(self.per_family >= 0, "eval.per_family", f"must be >= 0, got {self.per_family}")
        require(self.samples >= 0, "eval.samples", f"must be >= 0, got {self.samples}")
        require(all(t > 0 for t in self.temperatures), "eval.temperatures", f"must be > 0, got {self.temperatures}")
        require(all(b >= 2 for b in self.best_of), "eval.best_of", f"must be >= 2, got {self.best_of}")
        require(self.max_new_tokens > 0, "eval.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        require(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class PPOConfig(StageConfig):
    init: str = ""  # the SFT checkpoint (or run folder): the policy's start and the frozen reference
    # The reward: rm:PATH (a reward model), verifier (the prompts' own: the world's gold reward) or
    # python:MODULE:FUNC (FUNC(prompt: str, response: str, **fields) -> float); see data/tasks.py
    reward: str = ""
    prompts: str = "world"  # the task source: world, world:FAMILY,... or a JSONL prompt file
    heldout: float = 0.1  # a prompt file: the share held out for the evaluation (by a stable hash)
    eval_prompts: str = ""  # a prompt file: the held-out prompts instead, from this file
    out: str = "runs/ppo"  # the run folder: checkpoint/, critic/, metrics.jsonl, ppo.png, eval.json
    # Torch threads on CPU for training. One: its minibatches are so small that a second thread
    # mostly waits, and on a busy 2-core machine two threads spin against each other (measured
    # ~40x slower). The held-out evaluation, 512 rows a batch, uses torch's default (1.5x faster).
    threads: int = 1  # 0: torch's default
    iterations: int = 40  # rollout + update rounds
    critic_head: Literal["rm", "zero"] = "rm"  # the value head starts as the RM's head, or at zero
    save_every: int = 0  # iterations between checkpoints (for --resume); 0: at the end only
    # The update: the names are classic RL's (rl/ppo.py) wherever the knob is the same.
    objective: Literal["clip", "kl_penalty"] = "clip"  # PPO-clip's surrogate, or the PPO paper's KL-penalty one
    epochs: int = 4  # passes over each rollout batch
    minibatch_size: int = 16  # responses per optimizer step
    lr: float = 3e-5  # the policy's learning rate (AdamW)
    critic_lr: float = 1e-4  # the value model's (a separate network: its own rate, no vf_coef needed)
    clip: float = 0.2  # PPO-clip's epsilon: how far the probability ratio may move from 1
    value_clip: float | None = 0.2  # how far a value may move from its rollout value; None: unclipped
    # kl_penalty objective (PPO paper): -r A + beta_pen * KL(old || new), beta_pen doubled or
    # halved around penalty_target (per-token KL) after each iteration.
    penalty_beta: float = 1.0
    penalty_target: float = 0.01  # kl_penalty: the per-token KL(old || new) an update aims for
    gamma: float = 1.0  # discount over a response's tokens (1: a response is one episode, undiscounted)
    gae_lambda: float = 0.95  # GAE's lambda: 0 one-step TD, 1 Monte Carlo returns
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch's tokens
    whiten_rewards: bool = False  # rescale per-token rewards to unit variance (mean kept), as TRL's option
    reward_clip: float = 0.0  # clip the reward's score to [-c, c]; 0: off
    target_kl: float | None = 0.05  # stop an iteration's epochs once the mean approx-KL passes this; None: off
    max_grad_norm: float = 1.0  # gradient clipping, per network; 0: off
    ptx_coef: float = 0.0  # PPO-ptx: + ptx_coef * pretraining loss per step (InstructGPT's gamma)
    ptx_batch_size: int = 8  # pretraining rows per step when ptx_coef > 0
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to start from (--init DIR)")
        require(self.reward == "verifier" or self.reward.startswith(("rm:", "python:")), "reward",
                f"give rm:PATH, verifier or python:MODULE:FUNC, got {self.reward!r}")
        require(bool(self.prompts), "prompts", "give the task source: world, world:FAMILY,... or a JSONL file")
        require(self.iterations > 0, "iterations", f"must be > 0, got {self.iterations}")
        require(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        for name in ("epochs", "minibatch_size", "ptx_batch_size"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("lr", "critic_lr", "clip", "penalty_beta", "penalty_target"):
            require(0 < getattr(self, name) < math.inf, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("reward_clip", "max_grad_norm", "ptx_coef"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("value_clip", "target_kl"):
            require(getattr(self, name) is None or getattr(self, name) > 0, name,
                    f"must be > 0, or none for off; got {getattr(self, name)}")
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        require(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        require(self.rollout.batch_size % self.minibatch_size == 0, "minibatch_size",
                f"{self.minibatch_size} does not divide rollout.batch_size {self.rollout.batch_size}")


# ---------------------------------------------------------------- a batch of responses as tensors


@dataclass
class Batch:
    """B responses to B prompts. Rows are prompt + response, right-padded to one width (so no
    attention mask is needed: causal attention never looks right). Response token t of row b
    sits at column start[b] + t and is predicted from column start[b] + t - 1. A `select`ed
    part is packed instead (`segments` set, `pos` into the flattened idx)."""

    idx: torch.Tensor  # (B, L) prompt + response token ids; packed: (lines, width)
    pos: torch.Tensor  # (B, R) column of the state before each response token (start - 1 + t); packed: in idx.flatten()
    tokens: torch.Tensor  # (B, R) response token ids (pad beyond each row's length)
    mask: torch.Tensor  # (B, R) float, 1 on real response tokens
    rm_idx: torch.Tensor  # (B, L') prompt + response content + <|end|>: the chat the RM reads
    rm_last: torch.Tensor  # (B,) the column of that <|end|>
    ended: torch.Tensor  # (B,) bool, the response stopped by itself
    segments: torch.Tensor | None = None  # packed: which row each column of idx belongs to

    def __len__(self) -> int:
        return self.tokens.shape[0]


def make_batch(prompts: list[list[int]], responses: list[list[int]], stop_ids: list[int], end_id: int,
               pad_id: int, device) -> Batch:
    R = max(len(r) for r in responses)
    rows = [p + r for p, r in zip(prompts, responses)]
    L = max(len(x) for x in rows)
    ended = [bool(r) and r[-1] in stop_ids for r in responses]
    # The RM reads the response as a finished chat turn: its content, then <|end|> (an <|eos|>
    # stop becomes <|end|>; a cut response gets one appended), as `scoring.encode_responses` does.
    rm_rows = [p + (r[:-1] if e else r) + [end_id] for p, r, e in zip(prompts, responses, ended)]
    Lr = max(len(x) for x in rm_rows)
    t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    # Past a response's end the position stays on the state before its last token: masked out,
    # and no column beyond what the row's real tokens need.
    pos = [[min(len(p) - 1 + j, len(x) - 2) for j in range(R)] for p, x in zip(prompts, rows)]
    return Batch(idx=t([x + [pad_id] * (L - len(x)) for x in rows]), pos=t(pos),
                 tokens=t([r + [pad_id] * (R - len(r)) for r in responses]),
                 mask=t([[1.0] * len(r) + [0.0] * (R - len(r)) for r in responses], torch.float32),
                 rm_idx=t([x + [pad_id] * (Lr - len(x)) for x in rm_rows]), rm_last=t([len(x) - 1 for x in rm_rows]),
                 ended=t(ended, torch.bool))


def select(batch: Batch, rows) -> Batch:
    """The rows' sub-batch for the policy and critic, packed: rows go first fit, longest first,
    into lines as wide as the longest, each row attending only to itself with its positions from
    0 (`segments`), so each gets what it would alone. Rows are short and their lengths vary, so
    padding them to one width wasted a quarter or more of every PPO step."""
    part = Batch(*(getattr(batch, f)[rows] for f in Batch.__dataclass_fields__ if f != "segments"))
    lengths = (part.pos.max(1).values + 1).tolist()  # the columns its states read (not the last token)
    idx, segments, starts = pack([part.idx[i, :n].tolist() for i, n in enumerate(lengths)], max(lengths), 0)
    part.pos = part.pos + torch.tensor(starts, device=part.pos.device)[:, None]
    part.idx, part.segments = idx.to(part.pos.device), segments.to(part.pos.device)
    return part


def warp(logits: torch.Tensor, cfg: RolloutConfig) -> torch.Tensor:
    """The logits of the distribution the rollout sampled from (temperature, top-k, top-p, in
    generation's order); the raw logits when those are off."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits.reshape(-1, logits.shape[-1]), cfg.top_p).view_as(logits)
    return logits


def response_logits(model: DecoderLM, batch: Batch) -> torch.Tensor:
    """(N, V) the next-token logits before each real response token (N = batch.mask.sum(), row
    after row; `spread` puts per-token results back in (B, R)). The vocabulary projection and
    the softmaxes after it run on those positions only: most of a batch's R columns are padding
    (mean response ~11 tokens of 32), and the prompt's would be thrown away."""
    batch = batch if batch.segments is not None else select(batch, slice(None))
    h = model.hidden_states(batch.idx, segments=batch.segments).flatten(0, 1)[batch.pos[batch.mask.bool()]]
    return model.lm_head(h).float()


def spread(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values of the real response tokens -> (B, R), zero at padding (differentiable)."""
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask.bool(), x)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def values_of(critic: RewardModel, batch: Batch) -> torch.Tensor:
    """(B, R) V(state before each response token): the critic's output at those positions."""
    batch = batch if batch.segments is not None else select(batch, slice(None))
    return critic(batch.idx, segments=batch.segments).flatten()[batch.pos]


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    batch: Batch
    texts: list[str]
    logp: torch.Tensor  # (B, R) log pi_old under the sampled distribution: the ratio's denominator
    logp_raw: torch.Tensor  # (B, R) log pi_old, the model's own distribution (for the KL)
    logp_ref: torch.Tensor  # (B, R) log pi_ref
    values: torch.Tensor | None  # (B, R)
    scores: torch.Tensor  # (B,) the reward model's score (raw, before clip and penalty)
    entropy: torch.Tensor  # (B, R) the policy's entropy at each response token


@torch.no_grad()  # not inference_mode: the minibatches reuse these tensors under autograd
def rollout(policy: DecoderLM, ref: DecoderLM, critic: RewardModel | None, reward, tok,
            prompts: list[tasks.Prompt], cfg: RolloutConfig, seed: int, chunk: int,
            max_new_tokens: int | None = None) -> Rollout:
    """Sample one response per prompt and score everything in one batched pass per model.

    The forwards run in chunks of `chunk` rows on the full width: the same shapes the first
    epoch's minibatches use, so the first minibatch's ratio is exactly 1.
    """
    stop = chat_stop_ids(tok)
    prompt_ids = [encode_chat(tok, list(p.messages)) for p in prompts]
    gen = GenerationConfig(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=True,
                           temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                           eos_token_id=stop, seed=seed)
    was_training = policy.training
    policy.eval()
    responses = generate_batch(policy, prompt_ids, gen).sequences
    device = policy.embed_tokens.weight.device
    batch = make_batch(prompt_ids, responses, stop, special_id(tok, "end"), special_id(tok, "pad") or 0, device)
    texts = tok.decode_batch(responses, skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("logp", "logp_raw", "logp_ref", "values", "entropy")}
    for start in range(0, len(batch), chunk):
        part = select(batch, slice(start, start + chunk))
        real = part.mask.bool()
        tokens = part.tokens[real]
        logits = response_logits(policy, part)
        raw = torch.log_softmax(logits, dim=-1)
        out["logp_raw"].append(spread(raw.gather(-1, tokens[:, None]).squeeze(-1), real))
        out["entropy"].append(spread(-(raw.exp() * raw).sum(-1), real))
        sampled = warp(logits, cfg)
        out["logp"].append(spread(token_logprobs(sampled, tokens), real) if sampled is not logits
                           else out["logp_raw"][-1])
        # The evaluation samples the reference itself: its log-probabilities are the policy's.
        ref_logp = out["logp_raw"][-1] if ref is policy else spread(token_logprobs(response_logits(ref, part), tokens),
                                                                    real)
        out["logp_ref"].append(ref_logp)
        if critic is not None:
            out["values"].append(values_of(critic, part))
    if isinstance(reward, RewardModel):
        scores = reward.rewards(batch.rm_idx, batch.rm_last)
    else:
        scores = torch.tensor(reward(prompts, texts), dtype=torch.float32, device=device)
    policy.train(was_training)
    cat = {k: torch.cat(v) * batch.mask if v else None for k, v in out.items()}
    return Rollout(batch, texts, cat["logp"], cat["logp_raw"], cat["logp_ref"], cat["values"], scores.float(),
                   cat["entropy"])


def per_token_rewards(ro: Rollout, beta: float, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards (B, R), per-token KL estimate (B, R), the scores actually given (B,)).

    r_t = -beta * KL_t at every response token, plus the (clipped, penalised) score at the last.
    """
    mask = ro.batch.mask
    kl = core.kl_estimate(ro.logp_raw, ro.logp_ref, cfg.kl.estimator) * mask
    scores = ro.scores
    if cfg.reward_clip:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = scores - cfg.rollout.no_eos_penalty * (~ro.batch.ended).float()
    rewards = -beta * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(last)), last] += scores
    if cfg.whiten_rewards:
        rewards = core.masked_whiten(rewards, mask, shift_mean=False)
    return rewards, kl, scores


# ---------------------------------------------------------------- PPO-ptx: pretraining rows


class PretrainRows:
    """An endless stream of (block + 1)-token rows of the built-in corpus, for the ptx loss."""

    def __init__(self, tok, block: int, seed: int):
        self.tok, self.block, self.buffer = tok, block, []
        self.docs = builtin.generate_documents(seed)
        self.eos = special_id(tok, "eos")
        self.drawn = 0  # rows handed out: resume skips as many

    def next(self, n: int) -> torch.Tensor:
        while len(self.buffer) < n * (self.block + 1):
            texts = [next(self.docs) for _ in range(32)]
            for ids in encode_batch_ids(self.tok, texts):
                self.buffer += ids + ([self.eos] if self.eos is not None else [])
        take, self.buffer = self.buffer[:n * (self.block + 1)], self.buffer[n * (self.block + 1):]
        self.drawn += n
        return torch.tensor(take).view(n, self.block + 1)


# ---------------------------------------------------------------- one PPO update


def ppo_update(policy: DecoderLM, critic: RewardModel, optimizer: torch.optim.Optimizer, ro: Rollout,
               advantages: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig, penalty_beta: float,
               generator: torch.Generator, ptx: PretrainRows | None = None) -> dict[str, float]:
    """`epochs` passes of minibatches over one rollout batch; returns the means of the stats."""
    B, mb = len(ro.batch), cfg.minibatch_size
    stats: dict[str, list[float]] = {}
    policy.train()
    critic.train()
    device = advantages.device
    epochs_run = 0
    for epoch in range(cfg.epochs):
        # Epoch 0 keeps the rollout's order (already random prompts): its minibatches are the
        # chunks `rollout` scored, so the first one's ratio is exactly 1 (tested).
        order = torch.arange(B) if epoch == 0 else torch.randperm(B, generator=generator)
        epoch_kl = []
        for start in range(0, B, mb):
            rows = order[start:start + mb].to(device)
            part = select(ro.batch, rows)
            mask = part.mask
            logits = response_logits(policy, part)
            logp = spread(token_logprobs(warp(logits, cfg.rollout), part.tokens[mask.bool()]), mask)
            adv = advantages[rows]
            if cfg.objective == "clip":
                pg_loss, s = core.clipped_surrogate(logp, ro.logp[rows], adv, cfg.clip, mask)
            else:
                pg_loss, s = core.kl_penalty_surrogate(logp, ro.logp[rows], adv, penalty_beta, mask)
                s["penalty_kl"] = s.pop("kl")  # KL(old || new) of this step, not the KL to the reference
                s["clip_fraction"] = core.masked_mean((((logp - ro.logp[rows]).exp() - 1).abs() > cfg.clip)
                                                      .float(), mask).item()
            v_new = values_of(critic, part)
            v_loss = core.clipped_value_loss(v_new, ro.values[rows], returns[rows], cfg.value_clip, mask)
            loss = pg_loss + v_loss  # separate networks: each gets its own gradient, at its own rate
            if ptx is not None and cfg.ptx_coef:
                rows_ptx = ptx.next(cfg.ptx_batch_size).to(device)
                _, ptx_loss = policy(rows_ptx[:, :-1], targets=rows_ptx[:, 1:])
                loss = loss + cfg.ptx_coef * ptx_loss
                s["ptx_loss"] = ptx_loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
            optimizer.step()
            s.update(policy_loss=pg_loss.item(), value_loss=v_loss.item())
            if epoch == 0 and start == 0:
                s["ratio_first"] = s["ratio"]
            for k, v in s.items():
                stats.setdefault(k, []).append(v)
            epoch_kl.append(s["approx_kl"])
        epochs_run += 1
        # Early stop (Spinning Up, CleanRL's target_kl): the policy moved far enough from the one
        # that sampled this batch; more epochs would optimise a stale surrogate.
        if cfg.target_kl and float(np.mean(epoch_kl)) > cfg.target_kl:
            break
    out = {k: float(np.mean(v)) for k, v in stats.items() if k not in ("ratio_first", "beta")}
    out["ratio_first"] = stats["ratio_first"][0]
    out["epochs"] = epochs_run
    return out


# ---------------------------------------------------------------- the stage


def _reward(cfg: PPOConfig, source: tasks.Source, tok, ref: DecoderLM, device):
    """The frozen reward: a reward model checked against the policy's tokenizer and context, the
    source's verifier, or a Python function (a batch `tasks.Reward`)."""
    if cfg.reward == "verifier":
        return tasks.verifier_reward(source)
    if cfg.reward.startswith("python:"):
        return tasks.python_reward(cfg.reward)
    path = cfg.reward.removeprefix("rm:")
    reward, rm_tok = ckpt.load_reward_model(path, device)
    if tokenizer_hash(rm_tok) != tokenizer_hash(tok):
        raise UserError(f"{path}: the reward model's tokenizer differs from the policy's ({cfg.init}); "
                        "train the RM from this SFT model")
    if reward.config.block_size < ref.config.block_size:
        raise UserError(f"{path}: the reward model's context ({reward.config.block_size}) is shorter than "
                        f"the policy's ({ref.config.block_size})")
    return reward.requires_grad_(False)


def _load(cfg: PPOConfig, source: tasks.Source, resume: bool, out: Path, device):
    """(policy, reference, critic, reward, tokenizer), checked against each other."""
    ref, tok = ckpt.load_model(cfg.init, device)
    if not chat_stop_ids(tok) or special_id(tok, "end") is None:
        raise UserError(f"{cfg.init}: the tokenizer lacks the chat tokens <|end|> and <|eos|>; PPO needs a chat model")
    reward = _reward(cfg, source, tok, ref, device)
    ref.requires_grad_(False)
    if resume:
        policy, _ = ckpt.load_model(out, device)
        critic, _ = ckpt.load_reward_model(out / CRITIC, device)
    else:
        policy = copy.deepcopy(ref)
        if isinstance(reward, RewardModel):
            critic = copy.deepcopy(reward)  # the RM already reads these chats: a good start for V
        else:
            critic = RewardModel.from_lm(ref)  # a verifier or function has no body to copy: the policy's
        if cfg.critic_head == "zero" or not isinstance(reward, RewardModel):
            nn.init.zeros_(critic.score.weight)
            critic.offset = 0.0
    policy.requires_grad_(True)
    critic.requires_grad_(True)
    return policy, ref, critic, reward, tok


def run(cfg: PPOConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """PPO as configured; returns the summary that `--json` prints."""
    with start("ppo", cfg, resume, overwrite, log, one_process=True) as r:
        source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
        return _run(r, source, *_load(cfg, source, resume, r.out, r.rt.device))


def evaluate_run(cfg: PPOConfig, log=print) -> dict:
    """Score a finished run's policy (in `out`) against the reference again, with the `eval`
    settings given now: more samples per prompt give a smaller standard error than the run's own
    evaluation. Trains nothing and writes nothing; returns the summary that `--json` prints."""
    t0 = time.perf_counter()
    require(cfg.eval.per_family > 0, "eval.per_family", "must be > 0 to evaluate")
    source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
    with runtime("ppo", cfg.device, one_process=True) as rt:
        ref, tok = ckpt.load_model(cfg.init, rt.device)
        policy, policy_tok = ckpt.load_model(cfg.out, rt.device)
        if tokenizer_hash(policy_tok) != tokenizer_hash(tok):
            raise UserError(f"{cfg.out}: the policy's tokenizer differs from the reference's ({cfg.init})")
        report = evaluate(policy, ref, _reward(cfg, source, tok, ref, rt.device), tok, cfg, source)
    log(format_eval(report))
    summary = {"out": cfg.out, **{k: v for k, v in report.items() if k != "answers"}}
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary


def _run(r: Run, source: tasks.Source, policy, ref, critic, reward, tok) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    default_threads = torch.get_num_threads()
    if cfg.threads and rt.device.type == "cpu":
        torch.set_num_threads(cfg.threads)  # for training; the evaluation takes the default back
    torch.manual_seed(cfg.seed)
    block = policy.config.block_size
    # Prompts whose chat and longest response fit the context (and the RM's appended <|end|>).
    pool = [p for p in source.prompts("train", cfg.rollout.pool, cfg.seed)
            if len(encode_chat(tok, list(p.messages))) + cfg.rollout.max_new_tokens < block]
    if not pool:
        raise UserError(f"rollout.max_new_tokens: {cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {block}")
    order = Epochs(len(pool), cfg.seed)
    optimizer = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": cfg.lr},
                                   {"params": list(critic.parameters()), "lr": cfg.critic_lr}],
                                  betas=(0.9, 0.95), weight_decay=0.0, eps=1e-6,
                                  fused=rt.device.type in ("cuda", "cpu"))
    kl_ctl = core.AdaptiveKL(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon, hold=True) \
        if cfg.kl.control == "adaptive" else core.FixedKL(cfg.kl.coef)
    penalty = core.DoublingKL(cfg.penalty_beta, cfg.penalty_target)
    ptx = PretrainRows(tok, min(block, 128), cfg.seed + 1) if cfg.ptx_coef else None
    start = 0
    if resume:
        state = ckpt.load_trainer_state(out)
        require(cfg.iterations >= int(state["iteration"]), "iterations",
                f"{cfg.iterations} is below the checkpoint's iteration {state['iteration']}")
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["order"])
        kl_ctl.value, penalty.value = float(state["kl_coef"]), float(state["penalty_beta"])
        if isinstance(kl_ctl, core.AdaptiveKL):
            kl_ctl.reached = bool(state.get("kl_reached", False))
        start = int(state["iteration"])
        if ptx is not None and state["ptx_rows"]:
            ptx.next(int(state["ptx_rows"]))

    r.prepare(("metrics.jsonl", "ppo.png", "eval.json", CRITIC))
    if not resume and r.overwrite:
        import shutil

        shutil.rmtree(out / CRITIC, ignore_errors=True)
    metrics = MetricsLog(out / "metrics.jsonl", start if resume else None)
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"ppo: policy and reference from {cfg.init} ({n_params:,} parameters), reward {cfg.reward}; "
        f"{cfg.iterations} iterations of {cfg.rollout.batch_size} responses (<= {cfg.rollout.max_new_tokens} tokens) "
        f"from {len(pool):,} train prompts ({source.name}); {cfg.objective} objective, {cfg.epochs} epochs "
        f"of {cfg.minibatch_size}; "
        f"KL coef {cfg.kl.coef} ({cfg.kl.control}, target {cfg.kl.target} nats); device {rt.device}")

    def save(iteration: int):
        state = {"iteration": iteration, "optimizer": optimizer.state_dict(), "order": order.state(),
                 "kl_coef": kl_ctl.value, "kl_reached": getattr(kl_ctl, "reached", False),
                 "penalty_beta": penalty.value,
                 "ptx_rows": ptx.drawn if ptx is not None else 0}
        ckpt.save_checkpoint(out / CRITIC, critic, tok)
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, policy, tok, state,
                             generation={"eos_token_id": chat_stop_ids(tok)})

    first = last = None
    bar = tqdm(total=cfg.iterations, initial=start, desc="ppo", unit="iter", dynamic_ncols=True, mininterval=1.0)
    for it in range(start, cfg.iterations):
        t_start = time.perf_counter()
        prompts = [pool[order.next()] for _ in range(cfg.rollout.batch_size)]
        ro = rollout(policy, ref, critic, reward, tok, prompts, cfg.rollout, seed=cfg.seed * 1_000_003 + it,
                     chunk=cfg.minibatch_size)
        t_rollout = time.perf_counter()
        beta = kl_ctl.value
        rewards, kl, scores = per_token_rewards(ro, beta, cfg)
        mask = ro.batch.mask
        advantages, returns = core.sequence_gae(rewards, ro.values, mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + it)
        stats = ppo_update(policy, critic, optimizer, ro, advantages, returns, cfg, penalty.value, g, ptx)
        t_update = time.perf_counter()
        # KL per response (sum over its tokens): what the controller steers and the budget bounds.
        kl_seq = kl.sum(1).mean().item()
        kl_ctl.update(kl_seq, len(ro.batch))
        if cfg.objective == "kl_penalty":
            penalty.update(stats["approx_kl"])
        record = {"step": it + 1, "rm_reward": ro.scores.mean().item(), "kl": kl_seq, "kl_coef": beta,
                  "entropy": core.masked_mean(ro.entropy, mask).item(),
                  "response_length": mask.sum(1).mean().item(), "ended": ro.batch.ended.float().mean().item(),
                  "score": scores.mean().item(),
                  "explained_variance": core.explained_variance(ro.values, returns, mask), **stats,
                  "rollout_s": t_rollout - t_start, "update_s": t_update - t_rollout}
        if cfg.objective == "kl_penalty":
            record["penalty_beta"] = penalty.value
        if source.has_verifier:  # hidden from PPO: measured, never rewarded (unless --reward verifier)
            record["gold_reward"] = float(np.mean([source.verify(p, r) for p, r in zip(prompts, ro.texts)]))
        metrics.write(record)
        first = first or record
        last = record
        bar.update(1)
        bar.set_postfix(reward=f"{record['rm_reward']:.3f}", **({"gold": f"{record['gold_reward']:.3f}"}
                                                               if "gold_reward" in record else {}), kl=f"{kl_seq:.2f}")
        if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
            save(it + 1)
    bar.close()
    save(cfg.iterations)
    train_s = time.perf_counter() - r.t0

    records = read_metrics(out / "metrics.jsonl")
    plot_ppo(records, out / "ppo.png", cfg.kl)
    tail = records[-max(1, len(records) // 5):]  # the last fifth of the run
    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "iterations": cfg.iterations,
               "objective": cfg.objective, "train_s": round(train_s, 2),
               "train_rm_reward": {"first": first and round(first["rm_reward"], 4),
                                   "last_fifth": round(float(np.mean([r["rm_reward"] for r in tail])), 4)},
               "train_kl": round(float(np.mean([r["kl"] for r in tail])), 4), "kl_coef": round(kl_ctl.value, 6),
               "kl_budget": cfg.kl.budget}
    if source.has_verifier:
        summary["train_gold_reward"] = {"first": first and round(first["gold_reward"], 4),
                                        "last_fifth": round(float(np.mean([r["gold_reward"] for r in tail])), 4)}
    if last is not None:
        summary["kl"] = summary["train_kl"]
    if cfg.eval.per_family:
        torch.set_num_threads(default_threads)  # it decodes 512 rows at a time: the threads pay here
        report = evaluate(policy, ref, reward, tok, cfg, source)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        summary.update({k: v for k, v in report.items()
                        if k not in ("answers", "families", "sft_families", "sampled_families")})
        if "families" in report:
            summary["families"] = {f: {"gold_reward": report["families"][f]["gold_reward"],
                                       "sft_gold_reward": report["sft_families"][f]["gold_reward"]}
                                   for f in report["families"]}
        log(format_eval(report))
    # Held out where it was measured (the answers the report scores), else the training rollouts'.
    summary["kl_within_budget"] = summary.get("kl_heldout", summary.get("kl", 0.0)) <= cfg.kl.budget
    summary["wall_s"] = r.wall_s()
    return summary


# ---------------------------------------------------------------- held-out evaluation


def _mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def _wins(a, b) -> float:
    """Share of prompts where a beats b, ties counting half."""
    a, b = np.asarray(a), np.asarray(b)
    return float(((a > b) + 0.5 * (a == b)).mean())


def _rm_scores(reward, tok, prompts: list[tasks.Prompt], responses: list[str]) -> list[float]:
    if isinstance(reward, RewardModel):
        return score_texts(reward, tok, [list(p.messages) for p in prompts], responses)
    return reward(prompts, responses)


@dataclass
class Sampled:
    """Answers sampled to each held-out prompt: (P, m) arrays, m = groups x eval.samples."""

    gold: np.ndarray  # gold reward
    rm: np.ndarray  # reward model score
    kl: np.ndarray  # log p_sampled - log pi_ref summed over the response: an unbiased KL estimate
    scores: np.ndarray | None  # world.Score of each answer (objects), for the gold reward's parts; None: no world


def _sampled(model: DecoderLM, ref: DecoderLM, reward, tok, prompts: list[tasks.Prompt], rollout_cfg:
             RolloutConfig, cfg: PPOConfig, groups: int = 1) -> Sampled:
    """`groups` x `eval.samples` answers to each prompt, drawn as `rollout_cfg` says. Every model
    draws group g with the same seeds (common random numbers: where two agree they sample alike,
    so the paired difference is less noisy); more groups add samples for best-of-n."""
    n, P = cfg.eval.samples, len(prompts)
    cols: dict[str, list[list]] = {k: [[] for _ in range(P)] for k in ("rm", "kl", "scores")}
    for g in range(groups):
        for start in range(0, P, cfg.eval.batch_size):
            part = [p for p in prompts[start:start + cfg.eval.batch_size] for _ in range(n)]
            ro = rollout(model, ref, None, reward, tok, part, rollout_cfg, seed=10_000 + start + 7_919_003 * g,
                         chunk=cfg.minibatch_size, max_new_tokens=cfg.eval.max_new_tokens)
            kls = ((ro.logp - ro.logp_ref) * ro.batch.mask).sum(1).tolist()
            for i, (text, rm, kl) in enumerate(zip(ro.texts, ro.scores.tolist(), kls)):
                j = start + i // n
                if prompts[j].task is not None:
                    cols["scores"][j].append(world.score(prompts[j].task, text))
                cols["rm"][j].append(rm)
                cols["kl"][j].append(kl)
    rm, kl = np.asarray(cols["rm"]), np.asarray(cols["kl"])
    if not cols["scores"][0]:
        return Sampled(np.full(rm.shape, np.nan), rm, kl, None)
    scores = np.empty((P, groups * n), dtype=object)
    scores[:] = [[*row] for row in cols["scores"]]
    gold = np.vectorize(lambda sc: sc.reward, otypes=[float])(scores)
    return Sampled(gold, rm, kl, scores)


def best_of_n(sampled: Sampled, n: int) -> tuple[np.ndarray, list]:
    """Best-of-n by the reward model: per prompt, the gold reward of the RM's favourite among n
    samples, averaged over the disjoint groups of n the samples hold; and the chosen answers' Scores."""
    P, m = sampled.gold.shape
    groups = sampled.rm[:, :m // n * n].reshape(P, m // n, n)
    pick = groups.argmax(-1)  # (P, groups)
    chosen = sampled.scores[:, :m // n * n].reshape(P, m // n, n)[np.arange(P)[:, None], np.arange(m // n), pick]
    return np.vectorize(lambda sc: sc.reward, otypes=[float])(chosen).mean(1), list(chosen.flatten())


def evaluate(policy: DecoderLM, ref: DecoderLM, reward, tok, cfg: PPOConfig, source: tasks.Source) -> dict:
    """The held-out prompts answered by the PPO policy and by SFT (the reference), before and
    after. Whatever the reward: `heldout_prompts`, `reward_heldout_sft` and `reward_heldout_ppo`
    (the mean reward of greedy answers) and, with samples, `kl_heldout`. The world adds its gold
    reward (`evaluate_world_prompts`)."""
    if isinstance(source, tasks.WorldSource):
        report = evaluate_world_prompts(policy, ref, reward, tok, cfg, source.families)
    else:
        report = evaluate_prompts(policy, ref, reward, tok, cfg, source.held_out())
    report.update(heldout_prompts=report["prompts"], reward_heldout_sft=report["sft_rm_reward"],
                  reward_heldout_ppo=report["rm_reward"])
    return report


def evaluate_prompts(policy: DecoderLM, ref: DecoderLM, reward, tok, cfg: PPOConfig,
                     prompts: list[tasks.Prompt]) -> dict:
    """A prompt file's held-out prompts, scored by the reward alone (there is no gold): greedy
    answers' reward before and after (paired), the win rate by it, and sampled answers' reward
    with the KL to the reference."""
    policy.eval()
    greedy = {}
    for name, model in (("ppo", policy), ("sft", ref)):
        responses = chat_answers(model, tok, [list(p.messages) for p in prompts], cfg.eval.max_new_tokens,
                                 cfg.eval.batch_size)
        greedy[name] = {"responses": responses, "rm": _rm_scores(reward, tok, prompts, responses)}
    g, s = greedy["ppo"]["rm"], greedy["sft"]["rm"]
    dm, dse = _mean_se(np.asarray(g) - np.asarray(s))
    report = {"prompts": len(prompts), "decoding": "greedy", "rm_reward": round(float(np.mean(g)), 4),
              "sft_rm_reward": round(float(np.mean(s)), 4), "reward_gain": round(dm, 4),
              "reward_gain_se": round(dse, 4),
              "win_rate_rm": round(_wins(g, s), 4)}
    if cfg.eval.samples:
        sampled = {name: _sampled(model, ref, reward, tok, prompts, cfg.rollout, cfg)
                   for name, model in (("ppo", policy), ("sft", ref))}
        dm, dse = _mean_se(sampled["ppo"].rm.mean(1) - sampled["sft"].rm.mean(1))
        report.update({"samples": cfg.eval.samples, "rm_reward_sampled": round(float(sampled["ppo"].rm.mean()), 4),
                       "sft_rm_reward_sampled": round(float(sampled["sft"].rm.mean()), 4),
                       "reward_gain_sampled": round(dm, 4), "reward_gain_sampled_se": round(dse, 4),
                       "kl_heldout": round(float(sampled["ppo"].kl.mean()), 4)})
    report["answers"] = [{"prompt": list(p.messages), "response": a, "sft_response": b, "rm": r1, "sft_rm": r2}
                         for p, a, b, r1, r2 in zip(prompts, greedy["ppo"]["responses"], greedy["sft"]["responses"],
                                                    g, s)]
    return report


def evaluate_world_prompts(policy: DecoderLM, ref: DecoderLM, reward, tok, cfg: PPOConfig,
                           families: tuple[str, ...] = world.FAMILIES) -> dict:
    """The world's held-out test prompts, answered by the PPO policy and by SFT (the reference).

    Greedy answers (as `chat` and `eval` give): gold reward (mean and standard error; the
    difference's standard error is paired, the same prompts), RM reward, win rates. Sampled
    answers (`eval.samples` per prompt, temperature as in training: the policy PPO optimises):
    gold and RM reward, the paired gain over SFT, and the KL to the reference (`_sampled`: sum
    over tokens of log p - log pi_ref on the sampled distribution's own samples). Best-of-n by the
    RM from SFT's samples (`eval.best_of`), at the analytic KL log n - (n - 1) / n: what an RL
    method should approach. Then SFT sampled cooler (`eval.temperatures`): the gain and KL that
    sharpening alone gives, with no RM. Each carries the gold reward's parts.
    """
    policy.eval()
    questions = [t for f in families for t in world.tasks("test", f, cfg.eval.per_family, 0)]
    prompts = [tasks.world_prompt(t) for t in questions]
    greedy = {}
    for name, model in (("ppo", policy), ("sft", ref)):
        rep = evaluate_world(model, tok, "test", cfg.eval.per_family, families, seed=0,
                             max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        responses = [a["response"] for a in rep["answers"]]
        greedy[name] = {"report": rep, "gold": [a["gold_reward"] for a in rep["answers"]],
                        "rm": _rm_scores(reward, tok, prompts, responses)}
    g, s = greedy["ppo"], greedy["sft"]
    diff = np.asarray(g["gold"]) - np.asarray(s["gold"])
    gm, gse = _mean_se(g["gold"])
    sm, sse = _mean_se(s["gold"])
    dm, dse = _mean_se(diff)
    report = {"prompts": len(questions), "decoding": "greedy",
              "gold_reward": round(gm, 4), "gold_reward_se": round(gse, 4),
              "sft_gold_reward": round(sm, 4), "sft_gold_reward_se": round(sse, 4),
              "gold_gain": round(dm, 4), "gold_gain_se": round(dse, 4),
              "gold_gain_in_se": round(dm / dse, 2) if dse > 0 else None,
              "rm_reward": round(float(np.mean(g["rm"])), 4), "sft_rm_reward": round(float(np.mean(s["rm"])), 4),
              "win_rate_rm": round(_wins(g["rm"], s["rm"]), 4), "win_rate_gold": round(_wins(g["gold"], s["gold"]), 4),
              "parts": g["report"]["overall"]["parts"], "sft_parts": s["report"]["overall"]["parts"],
              "families": g["report"]["families"], "sft_families": s["report"]["families"]}
    if cfg.eval.samples:
        n = cfg.eval.samples
        groups = max([1] + [math.ceil(b / n) for b in cfg.eval.best_of])
        sampled = {"ppo": _sampled(policy, ref, reward, tok, prompts, cfg.rollout, cfg),
                   "sft": _sampled(ref, ref, reward, tok, prompts, cfg.rollout, cfg, groups)}
        paired = sampled["sft"].gold[:, :n]  # the SFT samples drawn with PPO's seeds
        for name, prefix in (("ppo", ""), ("sft", "sft_")):
            x = sampled[name]
            m, se = _mean_se(x.gold[:, :n].mean(1))
            report[f"{prefix}gold_reward_sampled"], report[f"{prefix}gold_reward_sampled_se"] = round(m, 4), round(se, 4)
            report[f"{prefix}rm_reward_sampled"] = round(float(x.rm[:, :n].mean()), 4)
            summary = world.score_summary(list(x.scores[:, :n].flatten()))
            report[f"{prefix}parts_sampled"] = summary["parts"]
            report[f"{prefix}exact_match_sampled"] = summary["exact_match"]
        report["kl_heldout"] = round(float(sampled["ppo"].kl.mean()), 4)
        # Exact match of sampled answers (what a verifiable reward counts), paired per prompt.
        right = {name: np.vectorize(lambda sc: float(sc.correct), otypes=[float])(x.scores[:, :n]).mean(1)
                 for name, x in sampled.items()}
        em, em_se = _mean_se(right["ppo"] - right["sft"])
        report["exact_match_sampled_gain"], report["exact_match_sampled_gain_se"] = round(em, 4), round(em_se, 4)
        gain = lambda golds: _mean_se(golds - paired.mean(1))  # noqa: E731  (paired, per prompt)
        dm, dse = gain(sampled["ppo"].gold.mean(1))
        report.update({"samples": n, "gold_gain_sampled": round(dm, 4),
                       "gold_gain_sampled_se": round(dse, 4), "gold_gain_sampled_in_se": round(dm / dse, 2) if dse > 0 else None})
        of = np.array([t.family for t in questions])
        report["sampled_families"] = {f: {"sft_gold_reward": round(float(paired[of == f].mean()), 4),
                                          "gold_reward": round(float(sampled["ppo"].gold[of == f].mean()), 4)}
                                      for f in families if (of == f).any()}
        # Best-of-n against one SFT sample's expected gold: the mean over all of SFT's samples.
        everything = sampled["sft"].gold.mean(1)
        report["best_of_n"] = []
        for b in cfg.eval.best_of:
            golds, chosen = best_of_n(sampled["sft"], b)
            bm, bse = _mean_se(golds - everything)
            report["best_of_n"].append({"n": b, "gold_reward": round(float(golds.mean()), 4), "gold_gain": round(bm, 4),
                                        "gold_gain_se": round(bse, 4), "kl": round(math.log(b) - (b - 1) / b, 4),
                                        "parts": world.score_summary(chosen)["parts"]})
        report["sft_tempered"] = []
        for t in cfg.eval.temperatures:
            x = _sampled(ref, ref, reward, tok, prompts, replace(cfg.rollout, temperature=t), cfg)
            dm, dse = gain(x.gold.mean(1))
            report["sft_tempered"].append({"temperature": t, "gold_reward_sampled": round(float(x.gold.mean()), 4),
                                           "gold_gain_sampled": round(dm, 4), "gold_gain_sampled_se": round(dse, 4),
                                           "rm_reward_sampled": round(float(x.rm.mean()), 4),
                                           "kl_heldout": round(float(x.kl.mean()), 4),
                                           "parts": world.score_summary(list(x.scores.flatten()))["parts"]})
    report["answers"] = [{**a, "sft_response": b["response"], "sft_gold_reward": b["gold_reward"], "rm": r1, "sft_rm": r2}
                         for a, b, r1, r2 in zip(g["report"]["answers"], s["report"]["answers"], g["rm"], s["rm"])]
    return report


def format_eval(report: dict) -> str:
    if "gold_reward" not in report:  # a prompt file: the reward is all there is
        lines = [f"held-out prompts ({report['prompts']}, greedy): reward SFT {report['sft_rm_reward']:+.3f} -> PPO "
                 f"{report['rm_reward']:+.3f} (gain {report['reward_gain']:+.3f} +- {report['reward_gain_se']:.3f}, "
                 f"paired SE); PPO wins {report['win_rate_rm']:.0%} of prompts by the reward"]
        if "kl_heldout" in report:
            lines.append(f"sampled ({report['samples']} per prompt): reward SFT {report['sft_rm_reward_sampled']:+.3f} "
                         f"-> PPO {report['rm_reward_sampled']:+.3f} (gain {report['reward_gain_sampled']:+.3f} +- "
                         f"{report['reward_gain_sampled_se']:.3f}); KL to SFT {report['kl_heldout']:.3f} nats per response")
        return "\n".join(lines)
    lines = [f"held-out test prompts ({report['prompts']}, greedy): gold reward SFT {report['sft_gold_reward']:.3f} -> "
             f"PPO {report['gold_reward']:.3f} (gain {report['gold_gain']:+.3f} +- {report['gold_gain_se']:.3f}, paired "
             f"SE); RM reward {report['sft_rm_reward']:+.3f} -> {report['rm_reward']:+.3f}; win rate vs SFT "
             f"{report['win_rate_rm']:.2f} by RM, {report['win_rate_gold']:.2f} by gold"]
    if "gold_reward_sampled" in report:
        lines.append(f"sampled ({report['samples']} per prompt): gold reward SFT "
                     f"{report['sft_gold_reward_sampled']:.3f} -> PPO {report['gold_reward_sampled']:.3f} (gain {report['gold_gain_sampled']:+.3f} +- "
                     f"{report['gold_gain_sampled_se']:.3f}, paired SE); RM {report['sft_rm_reward_sampled']:+.3f} -> "
                     f"{report['rm_reward_sampled']:+.3f}; KL to SFT {report['kl_heldout']:.3f} nats per response")
    for b in report.get("best_of_n", []):
        lines.append(f"  best-of-{b['n']} of SFT's samples by the reward model: gold gain {b['gold_gain']:+.3f} +- "
                     f"{b['gold_gain_se']:.3f} at {b['kl']:.3f} nats")
    for t in report.get("sft_tempered", []):
        lines.append(f"  SFT itself at temperature {t['temperature']:g}, no reward model: gold gain "
                     f"{t['gold_gain_sampled']:+.3f} +- {t['gold_gain_sampled_se']:.3f} at {t['kl_heldout']:.3f} nats")
    lines.append(f"{'family':<14}{'SFT gold':>10}{'PPO gold':>10}")
    for f, s in report["families"].items():
        lines.append(f"{f:<14}{report['sft_families'][f]['gold_reward']:>10.3f}{s['gold_reward']:>10.3f}")
    return "\n".join(lines)


def plot_ppo(records: list[dict], path: Path, kl: KLConfig) -> None:
    """Rewards (RM and gold, per iteration's rollouts) and the KL to the reference with its budget."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    a.plot(steps, [r["rm_reward"] for r in records], label="the reward")
    if all("gold_reward" in r for r in records):
        a.plot(steps, [r["gold_reward"] for r in records], label="gold reward (the verifier's)")
    a.set_xlabel("iteration")
    a.set_ylabel("mean reward of the batch's responses")
    a.set_title("Rewards of the rollouts")
    a.grid(alpha=0.3)
    a.legend()
    b.plot(steps, [r["kl"] for r in records], label="KL(policy || reference)")
    b.axhline(kl.budget, color="grey", linestyle="--", label="budget")
    if kl.control == "adaptive":
        b.axhline(kl.target, color="tab:green", linestyle=":", label="the controller's target")
    b.set_xlabel("iteration")
    b.set_ylabel("nats per response")
    b.set_title("KL to the SFT model, and the KL coefficient beta")
    b.grid(alpha=0.3)
    c = b.twinx()  # the controller's trajectory (flat when beta is fixed)
    c.plot(steps, [r["kl_coef"] for r in records], color="tab:red", alpha=0.7, label="beta (right axis)")
    c.set_ylabel("beta", color="tab:red")
    c.set_ylim(bottom=0)
    handles = [h for axis in (b, c) for h in axis.get_legend_handles_labels()[0]]
    b.legend(handles, [h.get_label() for h in handles])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
