"""Best-of-n: n samples per prompt from the SFT model, scored by a reward, the best one kept. It is
an alignment method with no training (the policy "answer with the reward's favourite of n", at a
KL to SFT of at most log n - (n - 1) / n) and the data of rejection sampling: its winners are SFT
data, its scored samples comparisons.

    train prompts (data/tasks.py) -> n samples each (train/rollout.py) -> the reward's scores
      -> samples.jsonl: each prompt's n responses ranked by the reward, with their scores (a
         ranking file: `rm` and `dpo` read it; ties share a rank)
      -> best.jsonl: each prompt with its best response as a chat (`sft --data best.jsonl`)
      -> eval.json: held-out prompts, best-of-k for k = 1, 2, 4, ..., n from the same samples:
         the gold reward of the reward's pick where the prompts have a verifier (and its paired
         gain over one sample), else the reward of the pick
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from chatfoundry.config import require
from chatfoundry.data import tasks, world
from chatfoundry.data.formats import write_jsonl
from chatfoundry.errors import UserError
from chatfoundry.eval.policy import PolicyEvalConfig, Settings, best_of_n, sampled_answers
from chatfoundry.metrics import plot_curves
from chatfoundry.train import stage
from chatfoundry.train.rollout import RolloutConfig, load_chat_model, load_reward, rollout


@dataclass
class BestOfNConfig(stage.StageConfig):
    init: str = ""  # the SFT checkpoint (or run folder) that samples
    out: str = "runs/best_of_n"  # output folder: samples.jsonl, best.jsonl, eval.json, metrics.jsonl, best_of_n.png, config.yaml
    # The reward that picks: rm:PATH (a reward model), verifier (the prompts' own) or python:MODULE:FUNC
    reward: str = ""
    prompts: str = "world"  # the task source: world, world:FAMILY,... or a JSONL prompt file
    heldout: float = 0.1  # a prompt file: the share held out for the evaluation (by a stable hash)
    eval_prompts: str = ""  # a prompt file: the held-out prompts instead, from this file
    n: int = 16  # samples per prompt
    train_prompts: int = 1000  # train prompts to sample and keep the best of (0: the evaluation only)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(batch_size=32))  # batch_size: prompts per batch
    eval: PolicyEvalConfig = field(default_factory=lambda: PolicyEvalConfig(best_of=[], temperatures=[]))

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to sample from (--init DIR)")
        tasks.check_reward_spec(self.reward)
        require(self.n >= 2, "n", f"must be >= 2, got {self.n}")
        require(self.train_prompts >= 0, "train_prompts", f"must be >= 0, got {self.train_prompts}")


def dense_ranks(scores: list[float]) -> list[int]:
    """0 for the highest score, ties sharing a rank, no gaps."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def run(cfg: BestOfNConfig, overwrite: bool = False, log=print) -> dict:
    """Sample, score and keep the best as configured; returns the summary that `--json` prints."""
    with stage.start("best-of-n", cfg, False, overwrite, log, one_process=True) as r:
        source = tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts)
        model, tok = load_chat_model(cfg.init, r.rt.device, "best-of-n")
        reward = load_reward(cfg.reward, source, tok, model, cfg.init, r.rt.device)
        return _run(r, source, model.requires_grad_(False), reward, tok)


def _run(r: stage.Run, source: tasks.Source, model, reward, tok) -> dict:
    cfg, out, log = r.cfg, r.out, r.log
    torch.manual_seed(cfg.seed)
    prompts = source.prompts("train", cfg.train_prompts, cfg.seed) if cfg.train_prompts else []
    rows, best = [], []
    per_batch = max(1, cfg.rollout.batch_size)
    batches = range(0, len(prompts), per_batch)
    for b in tqdm(batches, desc="best-of-n", unit="batch", disable=not prompts, dynamic_ncols=True):
        part = prompts[b:b + per_batch]
        ro = rollout(model, model, None, reward, tok, [p for p in part for _ in range(cfg.n)], cfg.rollout,
                     seed=cfg.seed * 1_000_003 + b, chunk=64)
        scores = ro.scores.view(len(part), cfg.n).tolist()
        for i, p in enumerate(part):
            texts, s = ro.texts[i * cfg.n:(i + 1) * cfg.n], scores[i]
            kept = [j for j in range(cfg.n) if texts[j]]  # an empty reply is no response to rank
            if len({texts[j] for j in kept}) < 2 or len({s[j] for j in kept}) < 2:
                continue  # nothing to rank: every sample alike, or scored alike
            order = sorted(kept, key=lambda j: -s[j])
            record = {"prompt": [dict(m) for m in p.messages], "responses": [texts[j] for j in order],
                      "ranks": dense_ranks([s[j] for j in order]), "scores": [round(s[j], 6) for j in order]}
            rows.append(record)
            best.append({"messages": [dict(m) for m in p.messages] + [{"role": "assistant", "content": texts[order[0]]}]})
    if prompts and not rows:
        raise UserError(f"train_prompts: none of the {len(prompts)} prompts got samples the reward tells apart")
    r.prepare(("samples.jsonl", "best.jsonl", "eval.json", "best_of_n.png", "metrics.jsonl"))
    metrics = r.metrics()
    if prompts:
        write_jsonl(out / "samples.jsonl", rows)
        write_jsonl(out / "best.jsonl", best)
    summary = {"out": str(out), "n": cfg.n, "reward": cfg.reward, "train_prompts": len(prompts), "kept": len(rows)}
    if prompts:
        log(f"best-of-{cfg.n}: {len(rows):,} of {len(prompts):,} train prompts ranked (samples.jsonl) and their best "
            f"responses as chats (best.jsonl)")
    if cfg.eval.per_family:
        report = evaluate(model, reward, tok, cfg, source)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        summary.update({k: v for k, v in report.items() if k != "curve"})
        summary["curve"] = report["curve"]
        plot_curves(report["curve"], out / "best_of_n.png",
                    {"gold_reward": "gold reward of the pick", "reward": "reward of the pick"},
                    title=f"Best-of-k by {cfg.reward}", ylabel="held-out mean", x="kl")
        for c in report["curve"]:
            log(f"  best-of-{c['k']}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("k", "parts")))
            metrics.write({"step": c["k"], **{k: v for k, v in c.items() if k != "parts"}})  # the curve's x is k
    summary["wall_s"] = r.wall_s()
    return summary


def evaluate(model, reward, tok, cfg: BestOfNConfig, source: tasks.Source) -> dict:
    """Held-out prompts, n samples each: for k = 1, 2, 4, ..., n, the pick of each disjoint group
    of k by the reward, averaged over the groups. With a verifier: its gold reward and the paired
    gain over one sample (the mean over all n) with its SE; always: the reward of the pick."""
    if isinstance(source, tasks.WorldSource):
        prompts = [tasks.world_prompt(t) for f in source.families
                   for t in world.tasks("test", f, cfg.eval.per_family, 0)]
    else:
        prompts = source.held_out()
    settings = Settings(PolicyEvalConfig(per_family=cfg.eval.per_family, max_new_tokens=cfg.eval.max_new_tokens,
                                         samples=cfg.n, best_of=[], temperatures=[], batch_size=cfg.eval.batch_size),
                        cfg.rollout, 64, "best_of_n")
    sampled = sampled_answers(model, model, reward, tok, prompts, cfg.rollout, settings)
    ks = [k for k in (2 ** i for i in range(int(math.log2(cfg.n)) + 1)) if k <= cfg.n]
    P, n = sampled.rm.shape
    curve = []
    for k in ks:
        groups = sampled.rm[:, :n // k * k].reshape(P, n // k, k)
        entry = {"k": k, "kl": round(math.log(k) - (k - 1) / k, 4), "reward": round(float(groups.max(-1).mean()), 4)}
        if sampled.scores is not None:
            golds, chosen = best_of_n(sampled, k)
            gain = golds - sampled.gold.mean(1)
            se = float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else 0.0
            entry.update(gold_reward=round(float(golds.mean()), 4), gold_gain=round(float(gain.mean()), 4),
                         gold_gain_se=round(se, 4), parts=world.score_summary(chosen)["parts"])
        curve.append(entry)
    return {"heldout_prompts": P, "samples": n, "curve": curve}
