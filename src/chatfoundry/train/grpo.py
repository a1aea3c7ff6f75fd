"""GRPO and RLOO: policy gradients with a group of samples per prompt as the baseline, no critic.

Each iteration samples G responses to each of P train prompts from the policy, scores them with
the reward (a reward model, the prompts' verifier: reinforcement learning from verifiable
rewards, or a Python function) and gives each response one advantage for all its tokens:

    grpo (Shao et al. 2024):  A_i = (r_i - mean(r)) / (std(r) + 1e-4) over its group
                              (`--scale false`: no division, as Dr. GRPO, Liu et al. 2025)
    rloo (Ahmadian et al. 2024):  A_i = r_i - mean of the other G - 1 rewards

then takes PPO's clipped surrogate on the tokens (`rl/core.py`, the same as `ppo`), averaged per
token (`--norm token`), per sequence then over sequences (`sequence`, GRPO's) or summed over
tokens and divided by a constant, the batch x max_new_tokens (`constant`, Dr. GRPO's). The KL to
the frozen SFT reference is either a term of the loss, beta x k3 per token (`--kl.where loss`,
GRPO's), or taken from the reward, r_i - beta x sum of k1 over the response (`reward`).

    prompts (data/tasks.py) -> G samples each (train/rollout.py, as PPO's rollouts)
      -> rewards -> group advantages -> epochs of clipped-surrogate minibatches
      -> run/checkpoint/, metrics.jsonl, grpo.png, eval.json: greedy and sampled answers to the
         held-out prompts against SFT (eval/policy.py): reward, gold where there is a verifier,
         exact match per family, KL
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from chatfoundry import adapters, checkpoint as ckpt
from chatfoundry.adapters import LoraConfig
from chatfoundry.config import require
from chatfoundry.data import tasks
from chatfoundry.eval.policy import PolicyEvalConfig, Settings, evaluate, format_eval, summary_of
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.rl import core
from chatfoundry.tokenizer import chat_stop_ids
from chatfoundry.train import stage
from chatfoundry.train.loop import Epochs
from chatfoundry.train.rollout import (Rollout, RolloutConfig, load_reward, memory_mb, policy_and_reference, prompt_pool,
                                       response_logits, resume_iterations, rollout, select, spread, token_logprobs, warp)


@dataclass
class GRPOKLConfig:
    # beta; 0: no KL term. DeepSeekMath's 0.04 let the world's arithmetic run to 1.7 nats held out
    # (0.1: 1.3, 0.2: 1.2, 0.4: 0.7-1.02 over 3 seeds); 0.5 holds it within the 1-nat budget PPO keeps.
    coef: float = 0.5
    where: Literal["loss", "reward"] = "loss"  # beta x k3 per token in the loss (GRPO), or beta x KL off the reward

    def validate(self) -> None:
        require(self.coef >= 0, "kl.coef", f"must be >= 0, got {self.coef}")


def _grpo_rollout() -> RolloutConfig:
    return RolloutConfig(batch_size=16)  # prompts per iteration, each sampled `group` times


def _grpo_eval() -> PolicyEvalConfig:
    return PolicyEvalConfig(best_of=[], temperatures=[])  # PPO's report has the baselines


@dataclass
class GRPOConfig(stage.StageConfig):
    init: str = ""  # the SFT checkpoint (or run folder): the policy's start and the frozen reference
    out: str = "runs/grpo"  # run folder: checkpoint/, config.yaml, metrics.jsonl, grpo.png, eval.json
    # The reward: rm:PATH (a reward model), verifier (the prompts' own: the world's gold reward) or
    # python:MODULE:FUNC (FUNC(prompt: str, response: str, **fields) -> float); see data/tasks.py
    reward: str = ""
    prompts: str = "world"  # the task source: world, world:FAMILY,... or a JSONL prompt file
    heldout: float = 0.1  # a prompt file: the share held out for the evaluation (by a stable hash)
    eval_prompts: str = ""  # a prompt file: the held-out prompts instead, from this file
    group: int = 8  # G, responses sampled per prompt: the baseline's group
    advantage: Literal["grpo", "rloo"] = "grpo"  # group-normalised, or leave-one-out
    scale: bool = True  # grpo: divide by the group's std (false: Dr. GRPO)
    norm: Literal["token", "sequence", "constant"] = "sequence"  # how the per-token loss is averaged
    iterations: int = 40  # sampling + update rounds
    epochs: int = 2  # passes over each iteration's responses
    minibatch_size: int = 32  # responses per gradient step
    lr: float = 3e-5  # AdamW, the policy's
    clip: float = 0.2  # the ratio's clip range
    max_grad_norm: float = 1.0  # 0: off
    threads: int = 1  # torch CPU threads while training (the evaluation uses the default); 0: leave as is
    # lora: train low-rank adapters on the policy, init frozen; the reference is then init itself in
    # the very same tensors (one copy of the weights, not two). The checkpoint is the adapter alone.
    peft: Literal["none", "lora"] = "none"
    lora: LoraConfig = field(default_factory=adapters.rl_lora)
    merge: bool = False  # with --peft lora: also write the policy with its adapter folded in, in OUT/merged
    rollout: RolloutConfig = field(default_factory=_grpo_rollout)
    kl: GRPOKLConfig = field(default_factory=GRPOKLConfig)
    eval: PolicyEvalConfig = field(default_factory=_grpo_eval)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to start from (--init DIR)")
        tasks.check_reward_spec(self.reward)
        require(self.group >= 2, "group", f"must be >= 2: a group of {self.group} has no baseline")
        for name in ("iterations", "epochs", "minibatch_size"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("lr", "clip"):
            require(0 < getattr(self, name) < math.inf, name, f"must be > 0, got {getattr(self, name)}")
        require(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        require(not self.merge or self.peft == "lora", "merge", "merges a LoRA adapter: give --peft lora")
        require((self.rollout.batch_size * self.group) % self.minibatch_size == 0, "minibatch_size",
                f"{self.minibatch_size} does not divide rollout.batch_size x group "
                f"({self.rollout.batch_size * self.group})")


# ---------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, group: int, kind: str = "grpo", scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(B,) one advantage per response; rewards come in groups of `group` consecutive responses
    to one prompt. A group whose rewards are all equal teaches nothing: its advantages are 0."""
    r = rewards.view(-1, group)
    centred = r - r.mean(1, keepdim=True)
    if kind == "rloo":  # r_i - mean of the others = G / (G - 1) x (r_i - mean of all)
        return (centred * group / (group - 1)).flatten()
    return (centred / (r.std(1, keepdim=True) + eps) if scale else centred).flatten()


def sequence_rewards(ro: Rollout, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rewards the advantages read, each response's KL to the reference, sum of k1). A
    response cut at max_new_tokens loses `rollout.no_eos_penalty`, as in PPO."""
    kl = (core.kl_estimate(ro.logp_raw, ro.logp_ref, "k1") * ro.batch.mask).sum(1)
    rewards = ro.scores - cfg.rollout.no_eos_penalty * (~ro.batch.ended).float()
    if cfg.kl.where == "reward":
        rewards = rewards - cfg.kl.coef * kl
    return rewards, kl


def grpo_update(policy: DecoderLM, optimizer: torch.optim.Optimizer, ro: Rollout, advantages: torch.Tensor,
                cfg: GRPOConfig, generator: torch.Generator) -> dict[str, float]:
    """`epochs` passes of minibatches over one iteration's responses; the means of the stats."""
    B, mb = len(ro.batch), cfg.minibatch_size
    stats: dict[str, list[float]] = {}
    policy.train()
    device = advantages.device
    for epoch in range(cfg.epochs):
        order = torch.arange(B) if epoch == 0 else torch.randperm(B, generator=generator)
        for start in range(0, B, mb):
            rows = order[start:start + mb].to(device)
            part = select(ro.batch, rows)
            mask = part.mask
            real = mask.bool()
            logits = response_logits(policy, part)
            sampled = warp(logits, cfg.rollout)
            logp = spread(token_logprobs(sampled, part.tokens[real]), mask)
            adv = advantages[rows][:, None].expand_as(mask)
            loss, s = core.clipped_surrogate(logp, ro.logp[rows], adv, cfg.clip, mask, cfg.norm,
                                             cfg.rollout.max_new_tokens)
            if cfg.kl.where == "loss" and cfg.kl.coef:
                # The policy's own distribution, not the warped one the rollout sampled from.
                raw = logp if sampled is logits else spread(token_logprobs(logits, part.tokens[real]), mask)
                kl = core.kl_estimate(raw, ro.logp_ref[rows], "k3")  # KL(pi || ref) per token, >= 0
                loss = loss + cfg.kl.coef * core.aggregate(kl, mask, cfg.norm, cfg.rollout.max_new_tokens)
                s["kl_loss"] = core.masked_mean(kl.detach(), mask).item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            s["policy_loss"] = loss.item()
            for k, v in s.items():
                stats.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in stats.items()}


# ---------------------------------------------------------------- the stage


def run(cfg: GRPOConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """GRPO (or RLOO) as configured; returns the summary that `--json` prints."""
    with stage.start("grpo", cfg, resume, overwrite, log, one_process=True) as r:
        source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
        policy, ref, tok, base = policy_and_reference(cfg, r.out, resume, r.rt.device, "GRPO")
        reward = load_reward(cfg.reward, source, tok, ref, cfg.init, r.rt.device)
        return _run(r, source, policy, ref, reward, tok, base)


def _run(r: stage.Run, source: tasks.Source, policy: DecoderLM, ref: DecoderLM, reward, tok, base) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    default_threads = torch.get_num_threads()
    if cfg.threads and rt.device.type == "cpu":
        torch.set_num_threads(cfg.threads)  # for training; the evaluation takes the default back
    torch.manual_seed(cfg.seed)
    block = policy.config.block_size
    pool = prompt_pool(source, cfg.rollout.pool, cfg.seed, tok, cfg.rollout.max_new_tokens, block)
    order = Epochs(len(pool), cfg.seed)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-6,
                                  fused=rt.device.type in ("cuda", "cpu"))
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume:
        state = resume_iterations(out, cfg.iterations, optimizer, order)
        generator.set_state(state["generator"])
        start = int(state["iteration"])

    def sample(it: int) -> tuple[list[tasks.Prompt], Rollout]:
        prompts = [pool[order.next()] for _ in range(cfg.rollout.batch_size)]
        grouped = [p for p in prompts for _ in range(cfg.group)]
        return grouped, rollout(policy, ref, None, reward, tok, grouped, cfg.rollout, seed=cfg.seed * 100_003 + it,
                                chunk=cfg.minibatch_size)

    # The first rollout before the folder is touched: a reward that fails, fails with nothing written.
    first = sample(start) if start < cfg.iterations else None
    r.prepare(("metrics.jsonl", "grpo.png", "eval.json", "merged"))
    metrics = r.metrics(start)
    log(f"grpo: policy and reference from {cfg.init}, reward {cfg.reward}; {cfg.iterations} iterations of "
        f"{cfg.rollout.batch_size} prompts x {cfg.group} samples (<= {cfg.rollout.max_new_tokens} tokens) from "
        f"{len(pool):,} train prompts ({source.name}); {cfg.advantage} advantages"
        + (" (scaled)" if cfg.advantage == "grpo" and cfg.scale else "") + f", {cfg.norm} averaging, KL "
        f"{cfg.kl.coef} in the {cfg.kl.where}; {cfg.epochs} epochs of {cfg.minibatch_size}; device {rt.device}")
    if base is not None:
        log(f"grpo: {adapters.describe(policy)}; the reference is that base, in the same tensors")

    def save(iteration: int):
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, policy, tok,
                             {"iteration": iteration, "optimizer": optimizer.state_dict(), "order": order.state(),
                              "generator": generator.get_state()},
                             generation={"eos_token_id": chat_stop_ids(tok)}, adapter_of=base)

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=start, desc="grpo", unit="it", dynamic_ncols=True)
    for it in range(start, cfg.iterations):
        grouped, ro = first if it == start else sample(it)
        rewards, kl = sequence_rewards(ro, cfg)
        advantages = group_advantages(rewards, cfg.group, cfg.advantage, cfg.scale)
        stats = grpo_update(policy, optimizer, ro, advantages, cfg, generator)
        record = {"iteration": it + 1, "reward": ro.scores.mean().item(), "kl": kl.mean().item(),
                  "length": ro.batch.mask.sum(1).mean().item(),
                  # groups whose samples all scored alike: no signal from them
                  "flat_groups": (rewards.view(-1, cfg.group).std(1) == 0).float().mean().item(), **stats}
        if source.has_verifier:  # measured, never the learner's unless --reward verifier
            record["gold_reward"] = float(np.mean([source.verify(p, t) for p, t in zip(grouped, ro.texts)]))
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.2f}")
    bar.close()
    save(cfg.iterations)
    train_s = time.perf_counter() - t0

    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, out / "grpo.png", {"reward": "reward (samples)", "gold_reward": "gold reward (samples)",
                                             "kl": "KL to SFT (nats per response)"},
                title=f"{cfg.advantage.upper()} ({cfg.reward})", ylabel="per iteration", x="iteration")
    tail = records[-max(1, len(records) // 5):]
    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "iterations": cfg.iterations,
               "train_s": round(train_s, 2), "train_reward_last_fifth": round(float(np.mean([x["reward"] for x in tail])), 4),
               "train_kl": round(float(np.mean([x["kl"] for x in tail])), 4)}
    summary["memory_mb"] = memory_mb((policy, ref, reward), optimizer)
    if base is not None:
        summary.update(ckpt.adapter_outputs(out, policy, tok, cfg.merge))
    if cfg.eval.per_family:
        torch.set_num_threads(default_threads)
        report = evaluate(policy, ref, reward, tok, Settings(cfg.eval, cfg.rollout, cfg.minibatch_size, "grpo"), source)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        summary.update(summary_of(report))
        log(format_eval(report, "GRPO"))
    summary["wall_s"] = r.wall_s()
    return summary
