"""Stage 3a, comparisons: sample K responses per prompt from the SFT model and have a labeler rank them.

    prompts: a task source's train split (to learn from) and its held-out split (`--prompts`: the
      built-in world, whose held-out split is val, or your JSONL prompt file; data/tasks.py)
      -> K samples each from the policy at temperature 1 (its own distribution, as PPO will see it)
      -> distinct, non-empty responses only (for the world's train split, plus a few written
         alternatives standing in for other models); a labeler gives each a utility
      -> ranks: best 0, utilities no further apart than `tie` share a rank (a prompt whose K responses are
         all alike, or all tied, teaches nothing and is dropped)
      -> out/train.jsonl and out/val.jsonl in the rankings format that `chatfoundry rm` reads,
         label.png and metrics.jsonl (per family: prompts kept, and where the source has a
         verifier the samples' gold reward and how often the labels agree with it)

Labelers (`--labeler`):
    simulated            a simulated human (AlpacaFarm's idea): the source's verifier (the world's
                         gold reward) plus Gaussian noise. The gold reward never reaches the reward
                         model: only ranks are written (and, for the held-out file, the gold reward
                         of each response, which `rm` uses to report, never to train).
    rm:PATH              a second model judges: a reward-model checkpoint scores each response
                         (RLAIF with a model in the loop).
    python:MODULE:FUNC   FUNC(prompt: str, response: str, **fields) -> float (higher is better),
                         as `ppo --reward python:...`: an AI judge, an API, a heuristic.
A user's own rankings or pairs need no labeling: give the JSONL files to `chatfoundry rm --data`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import tasks, world
from chatfoundry.data.formats import Comparison, comparison_to_record, write_jsonl
from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate_batch
from chatfoundry.metrics import plot_bars, read_metrics
from chatfoundry.scoring import score_texts
from chatfoundry.tokenizer import chat_stop_ids, encode_chat
from chatfoundry.train import stage


@dataclass
class LabelConfig(stage.StageConfig):
    init: str = ""  # the SFT checkpoint (or run folder) that writes the responses
    out: str = "runs/label"  # output folder: train.jsonl, val.jsonl, config.yaml, metrics.jsonl, label.png
    k: int = 4  # responses per prompt sampled from the policy (InstructGPT: 4 to 9)
    # Train split: this many more responses per prompt from "other models", the world's written
    # alternatives (right, wrong, off-topic or abstaining, in any style: world.alternatives), as
    # InstructGPT's labelers ranked several models' outputs together. The held-out split is the
    # policy's samples only.
    alternatives: int = 2
    prompts: str = "world"  # the task source: world, world:FAMILY,... or a JSONL prompt file (data/tasks.py)
    heldout: float = 0.1  # a prompt file: the share held out (by a stable hash of each prompt)
    eval_prompts: str = ""  # a prompt file: the held-out prompts instead, from this file
    train_prompts: int = 2000  # train-split prompts (the world: families in SFT's proportions)
    val_prompts: int = 400  # held-out prompts (the world: its val split)
    temperature: float = 1.0  # the policy's sampling temperature (1: its own distribution, as PPO samples it)
    max_new_tokens: int = 48  # longest response, in tokens
    batch_size: int = 256  # generated rows per forward pass
    labeler: str = "simulated"  # simulated | rm:PATH | python:MODULE:FUNC
    noise: float = 0.02  # simulated: std of the Gaussian noise on the gold reward (a style step is 0.1)
    tie: float = 0.05  # utilities no further apart than this share a rank

    def validate(self) -> None:
        require(bool(self.init), "init", "give the SFT checkpoint to sample from (--init DIR)")
        require(2 <= self.k <= 16, "k", f"must be in [2, 16], got {self.k}")
        require(bool(self.prompts), "prompts", "give the task source: world, world:FAMILY,... or a JSONL file")
        require(self.train_prompts > 0, "train_prompts", f"must be > 0, got {self.train_prompts}")
        require(self.val_prompts >= 0, "val_prompts", f"must be >= 0, got {self.val_prompts}")
        require(self.alternatives >= 0, "alternatives", f"must be >= 0, got {self.alternatives}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
        require(self.tie >= 0, "tie", f"must be >= 0, got {self.tie}")
        require(self.labeler == "simulated" or self.labeler.startswith(("rm:", "python:")), "labeler",
                f"must be simulated, rm:PATH or python:MODULE:FUNC, got {self.labeler!r}")


# A labeler: (prompt, distinct responses) -> one utility per response, higher better.
Labeler = Callable[[tasks.Prompt, list[str]], list[float]]


def simulated_labeler(source: tasks.Source, noise: float, seed: int) -> Labeler:
    """A noisy human: the source's verifier plus N(0, noise^2), drawn once per response."""
    source.require_verifier("labeler: simulated needs a verifier, and the prompts {name} have none; give "
                            "--labeler rm:PATH or python:MODULE:FUNC")
    rng = random.Random(seed)

    def label(prompt: tasks.Prompt, responses: list[str]) -> list[float]:
        return [source.verify(prompt, r) + rng.gauss(0.0, noise) for r in responses]

    return label


def reward_model_labeler(path: str, device: str) -> Labeler:
    """A reward-model checkpoint as the judge (RLAIF)."""
    model, tokenizer = ckpt.load_reward_model(path, device)

    def label(prompt: tasks.Prompt, responses: list[str]) -> list[float]:
        return score_texts(model, tokenizer, [list(prompt.messages)] * len(responses), responses)

    return label


def callable_labeler(spec: str) -> Labeler:
    """python:MODULE:FUNC: FUNC(prompt text, response, **fields) -> float, per response."""
    reward = tasks.python_reward(spec, "labeler")
    return lambda prompt, responses: reward([prompt] * len(responses), responses)


def make_labeler(cfg: LabelConfig, source: tasks.Source, device: str) -> Labeler:
    if cfg.labeler == "simulated":
        return simulated_labeler(source, cfg.noise, cfg.seed)
    if cfg.labeler.startswith("rm:"):
        return reward_model_labeler(cfg.labeler.removeprefix("rm:"), device)
    return callable_labeler(cfg.labeler)


def ranks_from(utilities: Sequence[float], tie: float) -> list[int]:
    """0 for the best; walking down the sorted utilities, a gap larger than `tie` starts a new rank
    (equal utilities always tie)."""
    order = sorted(range(len(utilities)), key=lambda i: -utilities[i])
    ranks = [0] * len(utilities)
    for prev, i in zip(order, order[1:]):
        ranks[i] = ranks[prev] + (utilities[prev] - utilities[i] > tie)
    return ranks


# ---------------------------------------------------------------- sampling


def sample_responses(model, tokenizer, prompts: list[list[dict]], k: int, cfg: LabelConfig,
                     desc: str) -> list[list[str]]:
    """K sampled replies per prompt, batched over prompts of similar length."""
    ids = [encode_chat(tokenizer, p) for p in prompts]
    rows = sorted((i for i in range(len(prompts)) for _ in range(k)), key=lambda i: len(ids[i]))
    out: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(rows), desc=desc, unit="sample", dynamic_ncols=True, mininterval=1.0) as bar:
        for b, start in enumerate(range(0, len(rows), cfg.batch_size)):
            chunk = rows[start:start + cfg.batch_size]
            gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                                   eos_token_id=chat_stop_ids(tokenizer), seed=cfg.seed * 7919 + b)
            result = generate_batch(model, [ids[i] for i in chunk], gen)
            for i, seq in zip(chunk, result.sequences):
                out[i].append(tokenizer.decode(seq, skip_special_tokens=True).strip())
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------- the stage


def label_split(model, tokenizer, source: tasks.Source, prompts: list[tasks.Prompt], labeler: Labeler,
                cfg: LabelConfig, held_out: bool, desc: str) -> tuple[list[dict], dict[str, dict]]:
    """(ranking records, per-family statistics) for the prompts. The gold statistics (and the
    held-out file's gold rewards) come from the source's verifier, where it has one."""
    samples = sample_responses(model, tokenizer, [list(p.messages) for p in prompts], cfg.k, cfg, desc)
    rng = random.Random(f"{cfg.seed}:alternatives")
    verify = source.verify if source.has_verifier else None
    records, stats = [], {f: {"prompts": 0, "kept": 0, "gold": 0.0, "samples": 0, "agree": 0, "pairs": 0}
                          for f in source.families or ("all",)}
    for prompt, responses in zip(prompts, samples):
        s = stats[prompt.family or "all"]
        s["prompts"] += 1
        if verify:
            s["gold"] += sum(verify(prompt, r) for r in responses)
            s["samples"] += len(responses)
        distinct = [r for r in dict.fromkeys(responses) if r]
        if cfg.alternatives and not held_out and prompt.task is not None:
            distinct += world.alternatives(prompt.task, rng, cfg.alternatives, exclude=distinct)
        if len(distinct) < 2:
            continue
        ranks = ranks_from(labeler(prompt, distinct), cfg.tie)
        if len(set(ranks)) < 2:
            continue
        order = sorted(range(len(distinct)), key=lambda i: ranks[i])
        ranked = [ranks[i] for i in order]
        record = comparison_to_record(Comparison(prompt.messages, tuple(distinct[i] for i in order), tuple(ranked)))
        if prompt.family:
            record["family"] = prompt.family
        if verify:
            gold = [verify(prompt, distinct[i]) for i in order]
            # How often the labeler's preference agrees with the gold reward, where the gold differs.
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    if ranked[a] < ranked[b] and gold[a] != gold[b]:
                        s["pairs"] += 1
                        s["agree"] += gold[a] > gold[b]
            if held_out:
                record["gold_reward"] = gold  # for `rm`'s report only; never trained on
        records.append(record)
        s["kept"] += 1
    return records, stats


def run(cfg: LabelConfig, overwrite: bool = False, log=print) -> dict:
    """Sample and label as configured; returns the summary that `--json` prints."""
    with stage.start("label", cfg, False, overwrite, log, one_process=True) as r:
        return _run(r, tasks.source(cfg.prompts, cfg.heldout, cfg.eval_prompts))


def _run(r: stage.Run, source: tasks.Source) -> dict:
    cfg, rt, out, log = r.cfg, r.rt, r.out, r.log
    model, tokenizer = ckpt.load_model(cfg.init, rt.device)
    if not chat_stop_ids(tokenizer):
        raise UserError(f"{cfg.init}: the tokenizer has no <|end|> or <|eos|> token to stop a reply")
    labeler = make_labeler(cfg, source, str(rt.device))
    torch.manual_seed(cfg.seed)
    r.prepare(("train.jsonl", "val.jsonl", "metrics.jsonl", "label.png"))

    summary: dict = {"out": str(out), "k": cfg.k, "labeler": cfg.labeler, "prompts": source.name, "splits": {}}
    metrics = r.metrics()
    splits = [("train", cfg.train_prompts, False), ("val", cfg.val_prompts, True)]
    for split, n, held_out in splits:
        if not n:
            continue
        prompts = source.prompts(split, n, cfg.seed)
        if isinstance(source, tasks.WorldSource):
            got = Counter(p.family for p in prompts)
            short = [f for f, m in tasks.family_counts(n, source.families).items() if got[f] < m]
            if short:  # more prompts only repeat questions; say so rather than label fewer silently
                log(f"label {split}: the world's {split} split gave too few distinct {', '.join(short)} questions, "
                    f"so {len(prompts):,} prompts, not {n:,}")
        records, stats = label_split(model, tokenizer, source, prompts, labeler, cfg, held_out, f"label {split}")
        if not records:  # the reward model could neither train nor be scored on this split
            raise UserError(f"{'val_prompts' if held_out else 'train_prompts'}: none of the {len(prompts)} {split} "
                            f"prompts got two responses the labeler tells apart; give more prompts or a larger k")
        write_jsonl(out / f"{split}.jsonl", records)
        for family, s in stats.items():
            metrics.write({"split": split, "family": family, **_finish(s)})
        total = _finish({key: sum(s[key] for s in stats.values()) for key in next(iter(stats.values()))})
        summary["splits"][split] = {"comparisons": len(records), **total,
                                    "pairs_ranked": sum(_pair_count(r["ranks"]) for r in records)}
        gold = (f" (samples' mean gold reward {total['sft_gold_reward']:.3f}; the labels agree with the gold reward "
                f"on {total['label_gold_agreement']:.1%} of the pairs they order whose gold rewards differ)"
                if source.has_verifier else "")
        log(f"label {split}: {len(records):,} comparisons from {total['prompts']:,} prompts{gold}")
    _plot(out, [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"], source.has_verifier)
    summary["wall_s"] = r.wall_s()
    return summary


def _finish(s: dict) -> dict:
    out = {"prompts": s["prompts"], "kept": s["kept"]}
    if s["samples"]:  # scored by a verifier
        out.update(sft_gold_reward=round(s["gold"] / s["samples"], 4),
                   label_gold_agreement=round(s["agree"] / s["pairs"], 4) if s["pairs"] else 0.0)
    return out


def _pair_count(ranks: list[int]) -> int:
    return sum(a < b for i, a in enumerate(ranks) for b in ranks[i + 1:])


def _plot(out: Path, rows: list[dict], gold: bool) -> None:
    """Per family: the share of prompts kept and (with a verifier) the SFT samples' mean gold reward."""
    if rows:
        series = {"prompts kept (responses differ)": [r["kept"] / max(r["prompts"], 1) for r in rows]}
        if gold:
            series["SFT samples' gold reward"] = [r["sft_gold_reward"] for r in rows]
        plot_bars([r["family"] for r in rows], series, out / "label.png", "Comparison data (train split)")
