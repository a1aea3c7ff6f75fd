"""Direct preference optimisation (DPO, Rafailov et al. 2023): the chat model learns from the
comparisons themselves, with no reward model and no sampling. For a prompt x with a chosen reply
y_w and a rejected one y_l, and h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]:

    sigmoid (DPO):  loss = -log sigmoid(beta * h)
    ipo (Azar et al. 2023):  loss = (h' - 1 / (2 beta))^2, h' from per-token mean log-ratios

beta * (log pi - log ref) is the implicit reward; the reference is the frozen SFT model.

    comparisons: a `chatfoundry label` folder (train.jsonl, held-out val.jsonl) or JSONL files of
      preferences (prompt, chosen, rejected) or rankings (prompt, K responses, ranks)
      -> pairs: every two responses of different rank, or the best against the worst
      -> each reply as the chat it ends (prompt, reply, <|end|>); its tokens are scored
      -> the reference's log-probabilities, once, before training
      -> AdamW with warmup and cosine (train/loop.py) on the pairs, shuffled, in epochs
      -> run/checkpoint/, metrics.jsonl, loss.png, rewards.png, eval.json: held-out pairs'
         accuracy by the implicit reward (against the labels, and the gold reward where the
         folder has it) and its margins; greedy and sampled answers to the held-out prompts
         against SFT (eval/policy.py): the gold reward where the prompts have a verifier, the KL
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from chatfoundry import adapters, checkpoint as ckpt
from chatfoundry.adapters import LoraConfig
from chatfoundry.config import require
from chatfoundry.data import tasks
from chatfoundry.data.formats import Comparison, load_comparison_splits, pairs as ranked_pairs
from chatfoundry.errors import UserError
from chatfoundry.eval.policy import PolicyEvalConfig, Settings, evaluate, format_eval, summary_of
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.scoring import encode_responses
from chatfoundry.tokenizer import chat_stop_ids, special_id
from chatfoundry.train import stage
from chatfoundry.train.loop import Epochs, TrainConfig, fit, make_optimizer, pack, resume_step, trainer_state
from chatfoundry.train.rollout import RolloutConfig, memory_mb, policy_and_reference


@dataclass
class DPODataConfig:
    # A `chatfoundry label` folder (train.jsonl + val.jsonl), or JSONL files of preferences or rankings.
    files: list[str] = field(default_factory=list)
    val_fraction: float = 0.1  # held out from the files when no val.jsonl comes with them
    # A ranking of K responses as pairs: every two of different rank (all), or its best against its
    # worst (best_vs_worst: one pair per prompt, the clearest).
    pairs: Literal["all", "best_vs_worst"] = "all"

    def validate(self) -> None:
        require(bool(self.files), "data.files", "give the comparisons: a label folder or JSONL files (--data)")
        require(0 < self.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")


def _dpo_train() -> TrainConfig:
    # Batch = pairs per step. About one epoch of the default label run's ~9,000 pairs.
    return TrainConfig(steps=300, batch_size=32, lr=1e-4, warmup_steps=20, eval_every=100, eval_batches=8,
                       save_every=300, weight_decay=0.0)


def _dpo_eval() -> PolicyEvalConfig:
    # No reward model here: no best-of-n. The sharpening baselines are PPO's (and align-compare's).
    return PolicyEvalConfig(best_of=[], temperatures=[])


@dataclass
class DPOConfig(stage.StageConfig):
    init: str = ""  # the SFT checkpoint (or run folder): the policy's start and the frozen reference
    out: str = "runs/dpo"  # run folder: checkpoint/, config.yaml, metrics.jsonl, loss.png, rewards.png, eval.json
    dtype: str = "fp32"  # fp32 or bf16 (autocast)
    # The KL's weight: how far the policy may move from the reference (Rafailov et al.: 0.1 to 0.5;
    # 0.5 on the built-in world, where 0.1 traded the answers' content for their style).
    beta: float = 0.5
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's logistic loss, or IPO's squared one
    # + this x the chosen replies' negative log-likelihood per token (RPO, Pang et al. 2024; TRL's
    # loss_type [sigmoid, sft]): keeps the chosen replies likely while their margin grows. 0: plain DPO.
    nll_coef: float = 1.0
    # The held-out prompts the report answers: the world, world:FAMILY,... or a JSONL prompt file.
    prompts: str = "world"
    heldout: float = 0.1  # a prompt file: the share held out for the report (by a stable hash)
    eval_prompts: str = ""  # a prompt file: the held-out prompts instead, from this file
    # lora: train low-rank adapters on the policy, init frozen; the reference is then init itself in
    # the very same tensors (one copy of the weights, not two). The checkpoint is the adapter alone.
    peft: Literal["none", "lora"] = "none"
    lora: LoraConfig = field(default_factory=adapters.rl_lora)
    merge: bool = False  # with --peft lora: also write the policy with its adapter folded in, in OUT/merged
    data: DPODataConfig = field(default_factory=DPODataConfig)
    train: TrainConfig = field(default_factory=_dpo_train)
    eval: PolicyEvalConfig = field(default_factory=_dpo_eval)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to start from (--init DIR)")
        require(self.dtype in ("fp32", "bf16"), "dtype", f"must be fp32 or bf16, got {self.dtype!r}")
        require(0 < self.beta < math.inf, "beta", f"must be > 0, got {self.beta}")
        require(self.nll_coef >= 0, "nll_coef", f"must be >= 0, got {self.nll_coef}")
        require(bool(self.prompts), "prompts", "give the held-out prompts: world, world:FAMILY,... or a JSONL file")
        require(not self.merge or self.peft == "lora", "merge", "merges a LoRA adapter: give --peft lora")
        micro = self.train.micro_batch_size or self.train.batch_size
        require(self.train.batch_size % micro == 0, "train.micro_batch_size",
                f"{micro} does not divide train.batch_size {self.train.batch_size}")


# ---------------------------------------------------------------- pairs as token rows


@dataclass
class Pairs:
    """Chosen and rejected replies as token rows (chat + reply + <|end|>), where each reply starts,
    and the reference's log-probability of each reply (sum over its tokens)."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    chosen_start: list[int]
    rejected_start: list[int]
    ref_chosen: torch.Tensor | None = None  # (N,)
    ref_rejected: torch.Tensor | None = None
    gold: list[tuple[float, float] | None] = field(default_factory=list)  # (chosen, rejected) gold rewards

    def __len__(self) -> int:
        return len(self.chosen)


def make_pairs(tokenizer, comparisons: list[Comparison], block: int, which: str = "all",
               extras: list[dict] | None = None) -> tuple[Pairs, int]:
    """The comparisons' pairs, encoded; `extras` carry gold rewards (best-first, as the responses)."""
    prompts, chosen, rejected, gold = [], [], [], []
    for n, c in enumerate(comparisons):
        found = ranked_pairs(c)
        if which == "best_vs_worst":
            best, worst = min(c.ranks), max(c.ranks)
            found = [(c.ranks.index(best), len(c.ranks) - 1 - c.ranks[::-1].index(worst))]
        g = (extras[n] if extras else {}).get("gold")
        for w, l in found:
            prompts.append(c.prompt)
            chosen.append(c.responses[w])
            rejected.append(c.responses[l])
            gold.append((g[w], g[l]) if g else None)
    rows, starts, cut = encode_responses(tokenizer, prompts + prompts, chosen + rejected, block)
    n = len(chosen)
    return Pairs(rows[:n], rows[n:], starts[:n], starts[n:], gold=gold), cut


def reply_logps(model: DecoderLM, rows: list[list[int]], starts: list[int], pad_id: int,
                mean: bool = False) -> torch.Tensor:
    """(N,) each reply's log-probability under `model`: the sum over its tokens (and <|end|>) of
    log p(token | all before), or the per-token mean. The rows are packed first fit into lines
    as wide as the longest (each attends only to itself), and the vocabulary projection runs on
    the reply's positions only: a prompt's logits would be thrown away."""
    device = model.embed_tokens.weight.device
    idx, segments, at = pack(rows, max(len(r) for r in rows), pad_id)
    pos, targets, owner = [], [], []
    for i, (row, start, first) in enumerate(zip(rows, starts, at)):
        for c in range(max(start, 1), len(row)):  # token c is predicted from column c - 1
            pos.append(first + c - 1)
            targets.append(row[c])
            owner.append(i)
    h = model.hidden_states(idx.to(device), segments=segments.to(device)).flatten(0, 1)
    pos_t, targets_t, owner_t = (torch.tensor(x, device=device) for x in (pos, targets, owner))
    logp = torch.log_softmax(model.lm_head(h[pos_t]).float(), dim=-1).gather(-1, targets_t[:, None]).squeeze(-1)
    total = torch.zeros(len(rows), device=device).index_add(0, owner_t, logp)
    if mean:
        total = total / torch.bincount(owner_t, minlength=len(rows)).clamp(min=1)
    return total


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, kind: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and the implicit rewards beta * (log pi - log ref) of both replies. For IPO
    the log-probabilities given are per-token means (TRL's normalisation, agreed with its authors)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, {"chosen": beta * (chosen - ref_chosen).detach(), "rejected": beta * (rejected - ref_rejected).detach()}


def batch_loss(model: DecoderLM, p: Pairs, rows: list[int], beta: float, kind: str = "sigmoid",
               nll_coef: float = 0.0, pad_id: int = 0) -> torch.Tensor:
    """The mean loss of pairs `rows` (the reference's log-probabilities already in `p`), plus
    nll_coef x the chosen replies' negative log-likelihood per token."""
    chosen, starts = [p.chosen[i] for i in rows], [p.chosen_start[i] for i in rows]
    c = reply_logps(model, chosen, starts, pad_id)
    r = reply_logps(model, [p.rejected[i] for i in rows], [p.rejected_start[i] for i in rows], pad_id, kind == "ipo")
    lengths = torch.tensor([len(x) - max(st, 1) for x, st in zip(chosen, starts)], device=c.device)
    losses, _ = dpo_loss(c / lengths if kind == "ipo" else c, r, p.ref_chosen[rows].to(c.device),
                         p.ref_rejected[rows].to(c.device), beta, kind)
    loss = losses.mean()
    if nll_coef:
        loss = loss - nll_coef * c.sum() / lengths.sum()
    return loss


@torch.no_grad()
def reference_logps(ref: DecoderLM, p: Pairs, pad_id: int, mean: bool, batch_size: int = 64) -> None:
    """The frozen reference's log-probabilities of every reply, once (they never change)."""
    ref.eval()
    for side in ("chosen", "rejected"):
        rows, starts = getattr(p, side), getattr(p, f"{side}_start")
        parts = [reply_logps(ref, rows[i:i + batch_size], starts[i:i + batch_size], pad_id, mean).cpu()
                 for i in range(0, len(rows), batch_size)]
        setattr(p, f"ref_{side}", torch.cat(parts) if parts else torch.zeros(0))


@torch.no_grad()
def pair_report(model: DecoderLM, p: Pairs, cfg: DPOConfig, pad_id: int, batch_size: int = 64) -> dict:
    """Held-out pairs: the loss, how often the implicit reward prefers the chosen reply (and, where
    gold rewards are known, the better one by gold), and the rewards' means and margin."""
    mean = cfg.loss == "ipo"
    losses, rc, rr = [], [], []
    for i in range(0, len(p), batch_size):
        sl = slice(i, i + batch_size)
        c = reply_logps(model, p.chosen[sl], p.chosen_start[sl], pad_id, mean).cpu()
        r = reply_logps(model, p.rejected[sl], p.rejected_start[sl], pad_id, mean).cpu()
        loss, rewards = dpo_loss(c, r, p.ref_chosen[sl], p.ref_rejected[sl], cfg.beta, cfg.loss)
        losses += loss.tolist()
        rc += rewards["chosen"].tolist()
        rr += rewards["rejected"].tolist()
    rc, rr = np.asarray(rc), np.asarray(rr)
    report = {"pairs": len(p), "loss": round(float(np.mean(losses)), 4),
              "accuracy": round(float(np.mean(rc > rr)), 4),
              "reward_chosen": round(float(rc.mean()), 4), "reward_rejected": round(float(rr.mean()), 4),
              "reward_margin": round(float((rc - rr).mean()), 4)}
    known = [(i, g) for i, g in enumerate(p.gold) if g is not None and g[0] != g[1]]
    if known:  # the better reply by gold, whichever the label chose
        hits = [(rc[i] > rr[i]) == (g[0] > g[1]) for i, g in known]
        report.update(gold_accuracy=round(float(np.mean(hits)), 4), gold_pairs=len(known))
    return report


# ---------------------------------------------------------------- the stage


def run(cfg: DPOConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """DPO as configured; returns the summary that `--json` prints."""
    with stage.start("dpo", cfg, resume, overwrite, log, dtype=cfg.dtype, one_process=True) as r:
        source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts) if cfg.eval.per_family else None
        train, val, extras, described = load_comparison_splits(cfg.data.files, cfg.data.val_fraction, cfg.seed)
        policy, ref, tokenizer, base = policy_and_reference(cfg, r.out, resume, r.rt.device, "DPO")
        return _run(r, policy, ref, tokenizer, base, source, train, val, extras, described)


def _run(r: stage.Run, policy: DecoderLM, ref: DecoderLM, tokenizer, base, source, train, val, extras,
         described) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    torch.manual_seed(cfg.seed)
    block = policy.config.block_size
    pad_id = special_id(tokenizer, "pad") or 0
    mean = cfg.loss == "ipo"
    pairs, cut = make_pairs(tokenizer, train, block, cfg.data.pairs)
    val_pairs, _ = make_pairs(tokenizer, val, block, cfg.data.pairs, extras)
    if not len(pairs):
        raise UserError(f"data.files: no pair to learn from in {described}")
    t = time.perf_counter()
    reference_logps(ref, pairs, pad_id, mean)
    reference_logps(ref, val_pairs, pad_id, mean)
    ref_s = time.perf_counter() - t
    order = Epochs(len(pairs), cfg.seed)
    policy.train()
    optimizer = make_optimizer(policy, cfg.train, rt.device)
    start_step = resume_step(out, optimizer, cfg.train, order, resume)

    r.prepare(("metrics.jsonl", "loss.png", "rewards.png", "eval.json", "merged"))
    epochs = cfg.train.steps * cfg.train.batch_size / len(pairs)
    log(f"dpo: {len(pairs):,} pairs ({cfg.data.pairs}) from {described}"
        + (f" ({cut} replies cut to the context of {block})" if cut else "") + f", {len(val_pairs):,} held out; "
        f"{cfg.loss} loss, beta {cfg.beta}; {cfg.train.steps} steps of {cfg.train.batch_size} pairs = {epochs:.1f} "
        f"epochs; the reference's log-probabilities in {ref_s:.1f} s; device {rt.device}")
    if base is not None:
        log(f"dpo: {adapters.describe(policy)}; the reference is that base, in the same tensors")
    metrics = r.metrics(start_step)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size

    def micro_batches():
        step = [order.next() for _ in range(cfg.train.batch_size)]
        return [step[i:i + micro] for i in range(0, len(step), micro)]

    def loss_fn(m, rows):
        return batch_loss(m, pairs, rows, cfg.beta, cfg.loss, cfg.nll_coef, pad_id)

    latest: dict[int, dict] = {}  # step -> the held-out pairs' report, kept for the end

    def evaluate_step(step: int):
        if not len(val_pairs):
            return {}
        rep = latest.setdefault(step, pair_report(policy, val_pairs, cfg, pad_id))
        return {"val_loss": rep["loss"], "val_accuracy": rep["accuracy"], "val_margin": rep["reward_margin"]}

    def save(step: int):
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, policy, tokenizer, trainer_state(step, optimizer, order=order.state()),
                             generation={"eos_token_id": chat_stop_ids(tokenizer)}, adapter_of=base)

    sample = range(min(len(pairs), 500))
    tokens_per_step = sum(len(pairs.chosen[i]) + len(pairs.rejected[i]) for i in sample) * cfg.train.batch_size // len(sample)
    train_start = time.perf_counter()
    last = fit(policy, optimizer, rt, cfg.train, micro_batches=micro_batches, loss_fn=loss_fn, evaluate=evaluate_step,
               save=save, log=metrics, tokens_per_step=tokens_per_step, start_step=start_step, desc="dpo")
    train_s = time.perf_counter() - train_start

    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "steps": cfg.train.steps,
               "pairs": len(pairs), "train_loss": last.get("loss"), "train_s": round(train_s, 2),
               "reference_s": round(ref_s, 2)}
    summary["memory_mb"] = memory_mb((policy, ref), optimizer)
    if base is not None:
        summary.update(ckpt.adapter_outputs(out, policy, tokenizer, cfg.merge))
    policy.eval()
    plot_curves(read_metrics(out / "metrics.jsonl"), out / "loss.png", {"loss": "train loss", "val_loss": "held-out loss"},
                title=f"DPO ({cfg.loss}, beta {cfg.beta})", ylabel="loss")
    plot_curves(read_metrics(out / "metrics.jsonl"), out / "rewards.png",
                {"val_accuracy": "held-out accuracy (implicit reward)", "val_margin": "held-out reward margin"},
                title="Held-out pairs", ylabel="accuracy / nats")
    report: dict = {}
    if len(val_pairs):
        # The loop evaluates at its last step; a run resumed when already done did not.
        report["heldout_pairs"] = latest.get(cfg.train.steps) or pair_report(policy, val_pairs, cfg, pad_id)
        summary.update({f"heldout_{k}": v for k, v in report["heldout_pairs"].items()})
        log("dpo held-out pairs: " + ", ".join(f"{k} {v}" for k, v in report["heldout_pairs"].items()))
    if source is not None:
        answers = evaluate(policy, ref, None, tokenizer, Settings(cfg.eval, RolloutConfig(), 64, "dpo"), source)
        report.update(answers)
        summary.update(summary_of(answers))
        log(format_eval(answers, "DPO"))
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    summary["wall_s"] = r.wall_s()
    return summary
