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
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from chatfoundry import adapters, checkpoint as ckpt
from chatfoundry.adapters import LoraConfig
from chatfoundry.config import require
from chatfoundry.data import builtin, tasks
from chatfoundry.errors import UserError
from chatfoundry.eval.policy import (PolicyEvalConfig, Reference, Settings, evaluate, format_eval, reference_side,
                                     summary_of)
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.rl import core
from chatfoundry.tokenizer import chat_stop_ids, encode_batch_ids, special_id, tokenizer_hash
from chatfoundry.train import stage
from chatfoundry.train.loop import Epochs
from chatfoundry.train.rollout import (Rollout, RolloutConfig, load_reward, memory_mb, policy_and_reference, prompt_pool,
                                       response_logits, resume_iterations, rollout, select, spread, token_logprobs, values_of,
                                       warp)

CRITIC = "critic"


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
class PPOConfig(stage.StageConfig):
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
    # CPU, one training thread and a core to spare: SFT's side of the held-out evaluation (its greedy
    # answers, samples for best-of-n, cooler samples: most of the evaluation's decoding; it does not
    # depend on the policy) runs in a second process while PPO trains, instead of after it.
    eval_beside: bool = True
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
    # lora: train low-rank adapters on the policy, init frozen; the reference is then init itself in
    # the very same tensors (one copy of the weights, not two). The critic stays a whole network.
    peft: Literal["none", "lora"] = "none"
    lora: LoraConfig = field(default_factory=adapters.rl_lora)
    merge: bool = False  # with --peft lora: also write the policy with its adapter folded in, in OUT/merged
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    eval: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to start from (--init DIR)")
        tasks.check_reward_spec(self.reward)
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
        require(not self.merge or self.peft == "lora", "merge", "merges a LoRA adapter: give --peft lora")


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


def _load(cfg: PPOConfig, source: tasks.Source, resume: bool, out: Path, device):
    """(policy, reference, critic, reward, tokenizer, LoRA base or None), checked against each other."""
    policy, ref, tok, base = policy_and_reference(cfg, out, resume, device, "PPO")
    reward = load_reward(cfg.reward, source, tok, ref, cfg.init, device)
    if resume:
        critic, _ = ckpt.load_reward_model(out / CRITIC, device)
    else:
        if isinstance(reward, RewardModel):
            critic = copy.deepcopy(reward)  # the RM already reads these chats: a good start for V
        else:
            critic = RewardModel.from_lm(ref)  # a verifier or function has no body to copy: the policy's
        if cfg.critic_head == "zero" or not isinstance(reward, RewardModel):
            nn.init.zeros_(critic.score.weight)
            critic.offset = 0.0
    critic.requires_grad_(True)
    return policy, ref, critic, reward, tok, base


def run(cfg: PPOConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """PPO as configured; returns the summary that `--json` prints."""
    with stage.start("ppo", cfg, resume, overwrite, log, one_process=True) as r:
        source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
        return _run(r, source, *_load(cfg, source, resume, r.out, r.rt.device))


def _settings(cfg: PPOConfig) -> Settings:
    """The held-out evaluation's settings: scored in chunks of a minibatch, as the rollouts are."""
    return Settings(cfg.eval, cfg.rollout, cfg.minibatch_size, "ppo")


def evaluate_run(cfg: PPOConfig, log=print) -> dict:
    """Score a finished run's policy (in `out`) against the reference again, with the `eval`
    settings given now: more samples per prompt give a smaller standard error than the run's own
    evaluation. Trains nothing and writes nothing; returns the summary that `--json` prints."""
    t0 = time.perf_counter()
    require(cfg.eval.per_family > 0, "eval.per_family", "must be > 0 to evaluate")
    source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
    with stage.runtime("ppo", cfg.device, one_process=True) as rt:
        ref, tok = ckpt.load_model(cfg.init, rt.device)
        policy, policy_tok = ckpt.load_model(cfg.out, rt.device)
        if tokenizer_hash(policy_tok) != tokenizer_hash(tok):
            raise UserError(f"{cfg.out}: the policy's tokenizer differs from the reference's ({cfg.init})")
        report = evaluate(policy, ref, load_reward(cfg.reward, source, tok, ref, cfg.init, rt.device), tok,
                          _settings(cfg), source)
    log(format_eval(report))
    summary = {"out": cfg.out, **{k: v for k, v in report.items() if k != "answers"}}
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary


def _reference_job(cfg: PPOConfig) -> Reference:
    """In the second process: SFT's side of the held-out evaluation, on one thread."""
    torch.set_num_threads(1)
    source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
    ref, tok = ckpt.load_model(cfg.init, "cpu")
    return reference_side(ref, load_reward(cfg.reward, source, tok, ref, cfg.init, "cpu"), tok, _settings(cfg),
                          source.families)


def _reference_beside(cfg: PPOConfig, rt, source: tasks.Source) -> tuple[ProcessPoolExecutor | None, Future | None]:
    """Start `_reference_job` in a second process where a core would otherwise idle while PPO trains."""
    if not (cfg.eval_beside and cfg.eval.per_family and isinstance(source, tasks.WorldSource)
            and rt.device.type == "cpu" and cfg.threads == 1 and torch.get_num_threads() >= 2):
        return None, None
    # spawn, not fork: a forked child of a process whose OpenMP pool is running can hang in it.
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return pool, pool.submit(_reference_job, cfg)


def _run(r: stage.Run, source: tasks.Source, policy, ref, critic, reward, tok, base) -> dict:
    pool, beside = _reference_beside(r.cfg, r.rt, source)
    if beside is not None:
        r.log("ppo: SFT's side of the held-out evaluation runs in a second process while PPO trains")
    try:
        return _train(r, source, policy, ref, critic, reward, tok, base, beside)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _train(r: stage.Run, source: tasks.Source, policy, ref, critic, reward, tok, base, beside: Future | None) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    default_threads = torch.get_num_threads()
    if cfg.threads and rt.device.type == "cpu":
        torch.set_num_threads(cfg.threads)  # for training; the evaluation takes the default back
    torch.manual_seed(cfg.seed)
    block = policy.config.block_size
    pool = prompt_pool(source, cfg.rollout.pool, cfg.seed, tok, cfg.rollout.max_new_tokens, block)
    order = Epochs(len(pool), cfg.seed)
    optimizer = torch.optim.AdamW([{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
                                   {"params": list(critic.parameters()), "lr": cfg.critic_lr}],
                                  betas=(0.9, 0.95), weight_decay=0.0, eps=1e-6,
                                  fused=rt.device.type in ("cuda", "cpu"))
    kl_ctl = core.AdaptiveKL(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon, hold=True) \
        if cfg.kl.control == "adaptive" else core.FixedKL(cfg.kl.coef)
    penalty = core.DoublingKL(cfg.penalty_beta, cfg.penalty_target)
    ptx = PretrainRows(tok, min(block, 128), cfg.seed + 1) if cfg.ptx_coef else None
    start = 0
    if resume:
        state = resume_iterations(out, cfg.iterations, optimizer, order)
        kl_ctl.value, penalty.value = float(state["kl_coef"]), float(state["penalty_beta"])
        if isinstance(kl_ctl, core.AdaptiveKL):
            kl_ctl.reached = bool(state.get("kl_reached", False))
        start = int(state["iteration"])
        if ptx is not None and state["ptx_rows"]:
            ptx.next(int(state["ptx_rows"]))

    r.prepare(("metrics.jsonl", "ppo.png", "eval.json", CRITIC, "merged"))  # an overwritten run's critic/ goes too
    metrics = r.metrics(start)
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"ppo: policy and reference from {cfg.init} ({n_params:,} parameters), reward {cfg.reward}; "
        f"{cfg.iterations} iterations of {cfg.rollout.batch_size} responses (<= {cfg.rollout.max_new_tokens} tokens) "
        f"from {len(pool):,} train prompts ({source.name}); {cfg.objective} objective, {cfg.epochs} epochs "
        f"of {cfg.minibatch_size}; "
        f"KL coef {cfg.kl.coef} ({cfg.kl.control}, target {cfg.kl.target} nats); device {rt.device}")
    if base is not None:
        log(f"ppo: {adapters.describe(policy)}; the reference is that base, in the same tensors")

    def save(iteration: int):
        state = {"iteration": iteration, "optimizer": optimizer.state_dict(), "order": order.state(),
                 "kl_coef": kl_ctl.value, "kl_reached": getattr(kl_ctl, "reached", False),
                 "penalty_beta": penalty.value,
                 "ptx_rows": ptx.drawn if ptx is not None else 0}
        ckpt.save_checkpoint(out / CRITIC, critic, tok)
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, policy, tok, state,
                             generation={"eos_token_id": chat_stop_ids(tok)}, adapter_of=base)

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
    summary["memory_mb"] = memory_mb((policy, ref, critic, reward), optimizer)
    if base is not None:
        summary.update(ckpt.adapter_outputs(out, policy, tok, cfg.merge))
    if source.has_verifier:
        summary["train_gold_reward"] = {"first": first and round(first["gold_reward"], 4),
                                        "last_fifth": round(float(np.mean([r["gold_reward"] for r in tail])), 4)}
    if last is not None:
        summary["kl"] = summary["train_kl"]
    if cfg.eval.per_family:
        torch.set_num_threads(default_threads)  # it decodes 512 rows at a time: the threads pay here
        report = evaluate(policy, ref, reward, tok, _settings(cfg), source, beside and beside.result())
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        summary.update(summary_of(report))
        log(format_eval(report))
    # Held out where it was measured (the answers the report scores), else the training rollouts'.
    summary["kl_within_budget"] = summary.get("kl_heldout", summary.get("kl", 0.0)) <= cfg.kl.budget
    summary["wall_s"] = r.wall_s()
    return summary


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
