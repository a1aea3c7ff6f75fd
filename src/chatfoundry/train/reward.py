"""Stage 3b, the reward model (RM): learn a scalar that orders responses as the labeler did.

    comparisons: a `chatfoundry label` folder (train.jsonl, held-out val.jsonl) or JSONL files of
      rankings (prompt, K responses, ranks; ties allowed) or pairs (prompt, chosen, rejected)
      -> each response as the chat it ends: prompt in the chat format, the response, <|end|>
      -> the SFT model's body with a scalar head (models/heads.py), read at that last token
      -> InstructGPT's K-wise loss: the K responses of one prompt are one batch element and
         loss = -1/P * sum over its P ranked pairs (w above l) of log sigmoid(r_w - r_l - margin * gap)
         (P = C(K, 2) without ties), so each response is seen once per epoch however many pairs
         it is in; plus an optional centring term, coefficient * mean(r^2)
      -> normalised: a bias shift so the SFT responses' mean reward is 0 (their mean and std are
         kept in config.json), as InstructGPT does before RL
      -> run/checkpoint/ (transformers' ...ForSequenceClassification), metrics.jsonl, loss.png,
         rewards.png and eval.json: pairwise accuracy on held-out comparisons (against the gold
         reward where one is known, else against the labels) and Spearman's rank correlation with
         the gold reward; beside them the same figures for the SFT model's own log-likelihood of
         each response (`loglik_baseline`), what the RM could learn to read from its start
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data.formats import Comparison, load_comparison_splits
from chatfoundry.errors import UserError
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.scoring import encode_responses, row_logprobs, score_rows
from chatfoundry.tokenizer import special_id
from chatfoundry.train import stage
from chatfoundry.train.loop import (Epochs, TrainConfig, accumulation, fit, make_optimizer, pack, resume_step,
                                    trainer_state, wrap)


@dataclass
class RMDataConfig:
    # A `chatfoundry label` folder (train.jsonl + val.jsonl), or JSONL files of rankings or pairs.
    files: list[str] = field(default_factory=list)
    val_fraction: float = 0.1  # held out from the files when no val.jsonl comes with them

    def validate(self) -> None:
        require(bool(self.files), "data.files", "give the comparisons: a label folder or JSONL files (--data)")
        require(0 < self.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class RMLossConfig:
    margin: float = 0.0  # per rank step between the two responses (Llama 2's margin, by strength)
    center: float = 0.0  # coefficient of mean(r^2), which keeps rewards near 0 (TRL's center_rewards)

    def validate(self) -> None:
        require(self.margin >= 0, "loss.margin", f"must be >= 0, got {self.margin}")
        require(self.center >= 0, "loss.center", f"must be >= 0, got {self.center}")


def _rm_train() -> TrainConfig:
    # Batch = comparisons per step. About two epochs of the default label run's comparisons.
    return TrainConfig(steps=150, batch_size=32, lr=3e-4, warmup_steps=10, eval_every=50, eval_batches=8,
                       save_every=150, weight_decay=0.0)


@dataclass
class RMConfig(stage.StageConfig):
    init: str = ""  # the SFT checkpoint (or run folder) whose body the RM starts from
    out: str = "runs/rm"  # run folder: checkpoint/, config.yaml, metrics.jsonl, loss.png, rewards.png, eval.json
    dtype: str = "fp32"  # fp32 or bf16 (autocast)
    compile: bool = False  # torch.compile the model
    normalize: bool = True  # shift so the training responses (the SFT model's samples) average 0
    data: RMDataConfig = field(default_factory=RMDataConfig)
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    train: TrainConfig = field(default_factory=_rm_train)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to start from (--init DIR)")
        require(self.dtype in ("fp32", "bf16"), "dtype", f"must be fp32 or bf16, got {self.dtype!r}")


# ---------------------------------------------------------------- comparisons as token rows


@dataclass
class Encoded:
    """One comparison: token rows of its responses (best first), their ranks, gold rewards if known."""

    rows: list[list[int]]
    ranks: list[int]
    family: str = ""
    gold: list[float] | None = None
    starts: list[int] = field(default_factory=list)  # where each row's response begins


def encode_comparisons(tokenizer, comparisons: list[Comparison], block: int,
                       extras: list[dict] | None = None) -> tuple[list[Encoded], int]:
    prompts = [c.prompt for c in comparisons for _ in c.responses]
    rows, starts, cut = encode_responses(tokenizer, prompts, [r for c in comparisons for r in c.responses], block)
    out, i = [], 0
    for n, c in enumerate(comparisons):
        extra = extras[n] if extras else {}
        j = i + len(c.responses)
        out.append(Encoded(rows[i:j], list(c.ranks), extra.get("family", ""), extra.get("gold"), starts[i:j]))
        i = j
    return out, cut


def collate(items: list[Encoded], pad_id: int, device: torch.device | str = "cpu",
            width: int = 0) -> dict[str, torch.Tensor]:
    """Every response of every comparison as token rows, and the ranked pairs between them.

    width 0: one right-padded row per response. width > 0: responses packed into rows of `width`
    tokens (first fit, longest first), `segments` marking them; a response attends only to itself
    and its positions start at 0, so its reward is the one it gets alone. The RM's responses are
    short and vary in length, so padding them wastes more than half of every step.

    idx (L, T); last (R,): each response's final token as an index into idx.flatten(); winner,
    loser (P,) response indices; gap (P,) rank difference; weight (P,): 1 / (pairs of its
    comparison), so each comparison weighs the same."""
    rows = [r for item in items for r in item.rows]
    idx, segments, starts = pack(rows, width, pad_id)
    last = [start + len(row) - 1 for start, row in zip(starts, rows)]
    winner, loser, gap, weight = [], [], [], []
    base = 0
    for item in items:
        pairs = [(i, j) for i in range(len(item.ranks)) for j in range(len(item.ranks)) if item.ranks[i] < item.ranks[j]]
        for i, j in pairs:
            winner.append(base + i)
            loser.append(base + j)
            gap.append(item.ranks[j] - item.ranks[i])
            weight.append(1.0 / len(pairs))
        base += len(item.rows)
    t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    batch = {"idx": idx.to(device), "last": t(last), "winner": t(winner), "loser": t(loser),
             "gap": t(gap, torch.float32), "weight": t(weight, torch.float32), "comparisons": t(len(items))}
    if width:
        batch["segments"] = segments.to(device)
    return batch


def comparison_loss(rewards: torch.Tensor, batch: dict[str, torch.Tensor], margin: float = 0.0,
                    center: float = 0.0) -> torch.Tensor:
    """Mean over comparisons of -1/P * sum of log sigmoid(r_w - r_l - margin * gap), + center * mean(r^2)."""
    diff = rewards[batch["winner"]] - rewards[batch["loser"]] - margin * batch["gap"]
    loss = -(F.logsigmoid(diff) * batch["weight"]).sum() / batch["comparisons"]
    if center:
        loss = loss + center * rewards.pow(2).mean()
    return loss


# ---------------------------------------------------------------- scoring and the report


def loglik_scores(lm: DecoderLM, items: list[Encoded], pad_id: int, batch_size: int = 64) -> list[float]:
    """Each response's log-likelihood under a language model, sum of log p(token | all before)
    over its tokens and <|end|>: what the model the RM starts from already knows about the
    responses, read as a reward. The held-out report scores it beside the RM."""
    return row_logprobs(lm, [r for it in items for r in it.rows], [s for it in items for s in it.starts], pad_id,
                        batch_size)


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, tied values sharing their mean rank."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, r) / counts)[inverse]

    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def evaluate(model: RewardModel | None, items: list[Encoded], pad_id: int, batch_size: int = 64,
             scores: list[float] | None = None) -> dict:
    """Held-out report: the ranking loss and pairwise accuracy against the labels and, where gold
    rewards are known, accuracy against them (pairs whose gold rewards differ), Spearman's
    correlation with them, and the gold reward best-of-K by the RM gains over a random response.
    `scores` (one per response, in order) stand in for the model's rewards."""
    if scores is None:
        scores = score_rows(model, [r for it in items for r in it.rows], pad_id, batch_size)
    label_hits, losses, gold_hits, per_family, pooled, chosen, rejected = [], [], [], {}, ([], []), [], []
    best_of = []  # gold of the RM's favourite minus the mean gold of the responses
    within = []  # Spearman with the gold reward inside each prompt whose gold rewards differ
    i = 0
    for it in items:
        s = scores[i:i + len(it.rows)]
        i += len(it.rows)
        k = len(it.rows)
        ranked = [(a, b) for a in range(k) for b in range(k) if it.ranks[a] < it.ranks[b]]
        label_hits += [s[a] > s[b] for a, b in ranked]
        losses.append(float(np.mean([np.logaddexp(0.0, s[b] - s[a]) for a, b in ranked])))  # -log sigmoid(s_a - s_b)
        if it.gold is not None:
            pooled[0].extend(s)
            pooled[1].extend(it.gold)
            best_of.append(it.gold[int(np.argmax(s))] - float(np.mean(it.gold)))
            if len(set(it.gold)) > 1:
                within.append(spearman(s, it.gold))
            for a in range(k):
                for b in range(k):
                    if it.gold[a] > it.gold[b]:
                        gold_hits.append(s[a] > s[b])
                        per_family.setdefault(it.family, []).append(s[a] > s[b])
                        chosen.append(s[a])
                        rejected.append(s[b])
        else:
            chosen += [s[a] for a, _ in ranked]
            rejected += [s[b] for _, b in ranked]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    report = {"comparisons": len(items), "loss": mean(losses), "label_accuracy": mean(label_hits),
              "label_pairs": len(label_hits)}
    if gold_hits:
        report.update(pairwise_accuracy=mean(gold_hits), gold_pairs=len(gold_hits),
                      spearman_gold=round(spearman(*pooled), 4),
                      # A Bradley-Terry reward is defined up to a shift per prompt: within a prompt
                      # is where rankings can teach it to agree with the gold reward.
                      spearman_within=mean(within), spearman_within_prompts=len(within),
                      # Best-of-K by the RM: the gold it gains by picking, as rejection sampling would.
                      best_of_k_gold_gain=mean(best_of),
                      family_accuracy={f: mean(h) for f, h in sorted(per_family.items())})
    else:
        report["pairwise_accuracy"] = report["label_accuracy"]
    report["_plot"] = {"chosen": chosen, "rejected": rejected, "rm": pooled[0], "gold": pooled[1]}
    return report


def plot_rewards(report: dict, out: Path) -> None:
    """Held-out rewards of the better and the worse response of each pair; RM against gold."""
    import matplotlib.pyplot as plt

    data = report["_plot"]
    panels = 2 if data["gold"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    lo, hi = min(data["chosen"] + data["rejected"] + [0]), max(data["chosen"] + data["rejected"] + [0])
    bins = np.linspace(lo, hi, 40)
    better = "better by gold reward" if data["gold"] else "chosen"
    ax.hist(data["chosen"], bins, alpha=0.6, label=better)
    ax.hist(data["rejected"], bins, alpha=0.6, label="worse" if data["gold"] else "rejected")
    ax.set_xlabel("reward model score")
    ax.set_ylabel("responses in held-out pairs")
    ax.set_title(f"pairwise accuracy {report['pairwise_accuracy']:.3f}")
    ax.legend()
    if data["gold"]:
        ax = axes[0][1]
        jitter = np.random.default_rng(0).uniform(-0.015, 0.015, len(data["gold"]))
        ax.scatter(np.asarray(data["gold"]) + jitter, data["rm"], s=4, alpha=0.3)
        ax.set_xlabel("gold reward (hidden from the RM)")
        ax.set_ylabel("reward model score")
        ax.set_title(f"Spearman {report['spearman_gold']:.3f} pooled, {report['spearman_within']:.3f} within a prompt")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the stage


def run(cfg: RMConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train the reward model as configured; returns the summary that `--json` prints."""
    with stage.start("rm", cfg, resume, overwrite, log, dtype=cfg.dtype) as r:
        if resume:
            model, tokenizer = ckpt.load_reward_model(r.out)
            model.offset, model.normalization = 0.0, {}  # trained on raw scores; normalised again at the end
        else:
            lm, tokenizer = ckpt.load_model(cfg.init)
            torch.manual_seed(cfg.seed)  # the head's initial weights
            model = RewardModel.from_lm(lm)
            del lm  # the held-out baseline reads it again at the end, not held through training
        return _run(r, model, tokenizer, *load_comparison_splits(cfg.data.files, cfg.data.val_fraction, cfg.seed))


def _run(r: stage.Run, model, tokenizer, train, val, extras, source) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    torch.manual_seed(cfg.seed)
    block = model.config.block_size
    items, cut = encode_comparisons(tokenizer, train, block)
    val_items, _ = encode_comparisons(tokenizer, val, block, extras)
    pad_id = special_id(tokenizer, "pad") or 0
    micro, accum = accumulation(cfg.train, rt)
    order = Epochs(len(items), cfg.seed)
    model = model.to(rt.device).train()
    optimizer = make_optimizer(model, cfg.train, rt.device)
    start_step = resume_step(out, optimizer, cfg.train, order, resume)

    if rt.is_main:
        r.prepare(("metrics.jsonl", "loss.png", "rewards.png", "eval.json"))
        pairs = sum(a < b for it in items for a in it.ranks for b in it.ranks)
        epochs = cfg.train.steps * cfg.train.batch_size / len(items)
        log(f"rm: {len(items):,} comparisons from {source} (~{pairs:,.0f} ranked pairs"
            + (f", {cut} responses cut to the context of {block}" if cut else "") + f"), {len(val_items):,} held out; "
            f"{cfg.train.steps} steps of {cfg.train.batch_size} comparisons = {epochs:.1f} epochs; device {rt.device}")
    metrics = r.metrics(start_step)

    train_model = wrap(model, rt, cfg.compile)

    def micro_batches():
        step = [items[order.next()] for _ in range(cfg.train.batch_size)]
        mine = step[rt.rank * micro * accum:(rt.rank + 1) * micro * accum]
        return [collate(mine[i * micro:(i + 1) * micro], pad_id, rt.device, width=block) for i in range(accum)]

    def loss_fn(m, batch):
        rewards = m(batch["idx"], segments=batch.get("segments")).flatten()[batch["last"]]
        return comparison_loss(rewards, batch, cfg.loss.margin, cfg.loss.center)

    def evaluate_step(step: int):
        if not val_items:
            return {}
        report = evaluate(model, val_items, pad_id)
        return {"val_loss": report["loss"], "val_accuracy": report["pairwise_accuracy"]}

    def save(step: int):
        if rt.is_main:
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, model, tokenizer,
                                 trainer_state(step, optimizer, order=order.state()))
        rt.barrier()

    tokens_per_step = sum(len(r) for it in items[:500] for r in it.rows) * cfg.train.batch_size // min(len(items), 500)
    train_start = time.perf_counter()
    last = fit(train_model, optimizer, rt, cfg.train, micro_batches=micro_batches, loss_fn=loss_fn,
               evaluate=evaluate_step, save=save, log=metrics, tokens_per_step=tokens_per_step,
               start_step=start_step, desc="rm")
    train_s = time.perf_counter() - train_start

    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "steps": cfg.train.steps,
               "comparisons": len(items), "train_loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "train_s": round(train_s, 2)}
    if rt.is_main:
        model.eval()
        if cfg.normalize:
            # Mean 0 over the responses the RM was trained on: the SFT model's own samples after
            # `chatfoundry label`, so PPO starts from rewards centred on the SFT policy.
            raw = score_rows(model, [r for it in items for r in it.rows], pad_id)
            mean, std = float(np.mean(raw)), float(np.std(raw))
            model.offset = -mean
            model.normalization = {"mean": round(mean, 6), "std": round(std, 6), "responses": len(raw)}
            summary["normalization"] = model.normalization
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, model, tokenizer, ckpt.load_trainer_state(out))
        plot_curves(read_metrics(out / "metrics.jsonl"), out / "loss.png",
                    {"loss": "train loss", "val_loss": "held-out loss"}, title="Reward model (K-wise ranking loss)",
                    ylabel="-log sigmoid(r_w - r_l)")
        if val_items:
            report = evaluate(model, val_items, pad_id)
            plot_rewards(report, out / "rewards.png")
            report.pop("_plot")
            # The same pairs ordered by the init model's own log-likelihood of each response: how
            # much of what that model knows about them the RM has learned to read.
            try:
                lm = ckpt.load_model(cfg.init, rt.device)[0]
                baseline = evaluate(None, val_items, pad_id, scores=loglik_scores(lm, val_items, pad_id))
                report["loglik_baseline"] = {k: baseline[k] for k in ("pairwise_accuracy", "spearman_gold",
                                                                      "spearman_within", "best_of_k_gold_gain",
                                                                      "family_accuracy")
                                             if k in baseline}
            except UserError as e:  # a resumed run whose init has gone: the RM itself is done
                log(f"rm held out: no log-likelihood baseline, the init model is not there ({e})")
            (out / "eval.json").write_text(json.dumps(report, indent=1))
            summary.update({k: v for k, v in report.items() if k != "comparisons"})
            log("rm held out: " + ", ".join(f"{k} {v}" for k, v in report.items() if not isinstance(v, dict)))
            if "loglik_baseline" in report:
                log(f"rm held out, the {cfg.init} model's log-likelihood as the reward: "
                    + ", ".join(f"{k} {v}" for k, v in report["loglik_baseline"].items() if not isinstance(v, dict)))
    summary["wall_s"] = r.wall_s()
    return summary
