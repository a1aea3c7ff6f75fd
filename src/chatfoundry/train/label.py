"""Stage 3a, comparisons: sample K responses per prompt from the SFT model and have a labeler rank them.

    prompts: the task world's train split (to learn from) and its val split (held out)
      -> K samples each from the policy at temperature 1 (its own distribution, as PPO will see it)
      -> distinct, non-empty responses only (for the train split, plus a few written alternatives
         standing in for other models); a labeler gives each a utility
      -> ranks: best 0, utilities no further apart than `tie` share a rank (a prompt whose K responses are
         all alike, or all tied, teaches nothing and is dropped)
      -> out/train.jsonl and out/val.jsonl in the rankings format that `chatfoundry rm` reads,
         label.png and metrics.jsonl (per family: prompts kept, the samples' gold reward, how
         often the labels agree with the gold reward)

Labelers (`--labeler`):
    simulated            a simulated human (AlpacaFarm's idea): the world's gold reward plus
                         Gaussian noise. The gold reward never reaches the reward model: only
                         ranks are written (and, for the held-out file, the gold reward of each
                         response, which `rm` uses to report, never to train).
    rm:PATH              a second model judges: a reward-model checkpoint scores each response
                         (RLAIF with a model in the loop).
    python:MODULE:FUNC   any callable FUNC(prompt_messages, responses) -> list of floats
                         (higher is better): an AI judge, an API, a heuristic.
A user's own rankings or pairs need no labeling: give the JSONL files to `chatfoundry rm --data`.
"""

from __future__ import annotations

import importlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import world
from chatfoundry.data.formats import write_jsonl
from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate_batch
from chatfoundry.metrics import MetricsLog, plot_bars, read_metrics
from chatfoundry.tokenizer import chat_stop_ids, encode_chat
from chatfoundry.train.loop import setup_runtime, single_process
from chatfoundry.train.pretrain import check_output, prepare_output


@dataclass
class LabelConfig:
    policy: str = ""  # the SFT checkpoint (or run folder) that writes the responses
    out: str = "runs/label"
    seed: int = 1337
    device: str = "auto"
    k: int = 4  # responses per prompt sampled from the policy (InstructGPT: 4 to 9)
    # Train split: this many more responses per prompt from "other models", the world's written
    # alternatives (right, wrong, off-topic or abstaining, in any style: world.alternatives), as
    # InstructGPT's labelers ranked several models' outputs together. The held-out split is the
    # policy's samples only.
    alternatives: int = 2
    prompts: int = 2000  # world train-split prompts, families in SFT's proportions
    val_prompts: int = 400  # world val-split prompts, held out
    temperature: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 256  # generated rows per forward pass
    labeler: str = "simulated"  # simulated | rm:PATH | python:MODULE:FUNC
    noise: float = 0.02  # simulated: std of the Gaussian noise on the gold reward (a style step is 0.1)
    tie: float = 0.05  # utilities no further apart than this share a rank

    def validate(self) -> None:
        require(bool(self.policy), "policy", "give the SFT checkpoint to sample from (--policy DIR)")
        require(2 <= self.k <= 16, "k", f"must be in [2, 16], got {self.k}")
        require(self.prompts > 0, "prompts", f"must be > 0, got {self.prompts}")
        require(self.val_prompts >= 0, "val_prompts", f"must be >= 0, got {self.val_prompts}")
        require(self.alternatives >= 0, "alternatives", f"must be >= 0, got {self.alternatives}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
        require(self.tie >= 0, "tie", f"must be >= 0, got {self.tie}")
        require(self.labeler == "simulated" or self.labeler.startswith(("rm:", "python:")), "labeler",
                f"must be simulated, rm:PATH or python:MODULE:FUNC, got {self.labeler!r}")


# A labeler: (task, prompt messages, distinct responses) -> one utility per response, higher better.
Labeler = Callable[[world.Task, list[dict], list[str]], list[float]]


def simulated_labeler(noise: float, seed: int) -> Labeler:
    """A noisy human: the gold reward plus N(0, noise^2), drawn once per response."""
    rng = random.Random(seed)

    def label(task: world.Task, prompt: list[dict], responses: list[str]) -> list[float]:
        return [world.gold_reward(task, r) + rng.gauss(0.0, noise) for r in responses]

    return label


def reward_model_labeler(path: str, device: str) -> Labeler:
    """A reward-model checkpoint as the judge (RLAIF)."""
    from chatfoundry.train.reward import score_texts

    model, tokenizer = ckpt.load_reward_model(path, device)

    def label(task: world.Task, prompt: list[dict], responses: list[str]) -> list[float]:
        return score_texts(model, tokenizer, [prompt] * len(responses), responses)

    return label


def callable_labeler(spec: str) -> Labeler:
    """MODULE:FUNC imported; FUNC(prompt_messages, responses) -> list of floats."""
    module_name, _, name = spec.rpartition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"labeler: cannot import {spec!r} ({e})") from None

    def label(task: world.Task, prompt: list[dict], responses: list[str]) -> list[float]:
        scores = [float(s) for s in fn(prompt, list(responses))]
        if len(scores) != len(responses):
            raise UserError(f"labeler: {spec} returned {len(scores)} scores for {len(responses)} responses")
        return scores

    return label


def make_labeler(cfg: LabelConfig, device: str) -> Labeler:
    if cfg.labeler == "simulated":
        return simulated_labeler(cfg.noise, cfg.seed)
    kind, _, spec = cfg.labeler.partition(":")
    return reward_model_labeler(spec, device) if kind == "rm" else callable_labeler(spec)


def ranks_from(utilities: Sequence[float], tie: float) -> list[int]:
    """0 for the best; walking down the sorted utilities, a gap larger than `tie` starts a new rank
    (equal utilities always tie)."""
    order = sorted(range(len(utilities)), key=lambda i: -utilities[i])
    ranks = [0] * len(utilities)
    for prev, i in zip(order, order[1:]):
        ranks[i] = ranks[prev] + (utilities[prev] - utilities[i] > tie)
    return ranks


# ---------------------------------------------------------------- sampling


def family_counts(n: int) -> dict[str, int]:
    """How many of `n` prompts each family gets: SFT's proportions (world.SHARES)."""
    total = sum(world.SHARES.values())
    return {f: max(1, round(n * world.SHARES[f] / total)) for f in world.FAMILIES}


def prompt_tasks(split: str, n: int, seed: int) -> list[world.Task]:
    """About `n` tasks of the split, families in SFT's proportions; fewer where a family runs out."""
    return [t for f, m in family_counts(n).items() for t in world.tasks(split, f, m, seed)]


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


def label_split(model, tokenizer, tasks: list[world.Task], labeler: Labeler, cfg: LabelConfig, held_out: bool,
                desc: str) -> tuple[list[dict], dict[str, dict]]:
    """(ranking records, per-family statistics) for the tasks' prompts."""
    prompts = [[{"role": "user", "content": t.prompt}] for t in tasks]
    samples = sample_responses(model, tokenizer, prompts, cfg.k, cfg, desc)
    rng = random.Random(f"{cfg.seed}:alternatives")
    records, stats = [], {f: {"prompts": 0, "kept": 0, "gold": 0.0, "samples": 0, "agree": 0, "pairs": 0}
                          for f in world.FAMILIES}
    for task, prompt, responses in zip(tasks, prompts, samples):
        s = stats[task.family]
        s["prompts"] += 1
        gold_all = [world.gold_reward(task, r) for r in responses]
        s["gold"], s["samples"] = s["gold"] + sum(gold_all), s["samples"] + len(responses)
        distinct = [r for r in dict.fromkeys(responses) if r]
        if cfg.alternatives and not held_out:
            distinct += world.alternatives(task, rng, cfg.alternatives, exclude=distinct)
        if len(distinct) < 2:
            continue
        ranks = ranks_from(labeler(task, prompt, distinct), cfg.tie)
        if len(set(ranks)) < 2:
            continue
        order = sorted(range(len(distinct)), key=lambda i: ranks[i])
        gold = [world.gold_reward(task, distinct[i]) for i in order]
        ranked = [ranks[i] for i in order]
        # How often the labeler's preference agrees with the gold reward, where the gold differs.
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                if ranked[a] < ranked[b] and gold[a] != gold[b]:
                    s["pairs"] += 1
                    s["agree"] += gold[a] > gold[b]
        record = {"prompt": task.prompt, "responses": [distinct[i] for i in order], "ranks": ranked,
                  "family": task.family}
        if held_out:
            record["gold_reward"] = gold  # for `rm`'s report only; never trained on
        records.append(record)
        s["kept"] += 1
    return records, stats


def run(cfg: LabelConfig, overwrite: bool = False, log=print) -> dict:
    """Sample and label as configured; returns the summary that `--json` prints."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    check_output(out, resume=False, overwrite=overwrite)
    single_process("label")
    rt = setup_runtime(cfg.device)
    model, tokenizer = ckpt.load_model(cfg.policy, rt.device)
    if not chat_stop_ids(tokenizer):
        raise UserError(f"{cfg.policy}: the tokenizer has no <|end|> or <|eos|> token to stop a reply")
    labeler = make_labeler(cfg, str(rt.device))
    torch.manual_seed(cfg.seed)
    prepare_output(out, cfg, False, overwrite, ("train.jsonl", "val.jsonl", "metrics.jsonl", "label.png"))

    summary: dict = {"out": str(out), "k": cfg.k, "labeler": cfg.labeler, "splits": {}}
    metrics = MetricsLog(out / "metrics.jsonl")
    splits = [("train", cfg.prompts, False), ("val", cfg.val_prompts, True)]
    for split, n, held_out in splits:
        if not n:
            continue
        tasks = prompt_tasks(split, n, cfg.seed)
        got = Counter(t.family for t in tasks)
        short = [f for f, m in family_counts(n).items() if got[f] < m]
        if short:  # more prompts only repeat questions; say so rather than label fewer silently
            log(f"label {split}: the world's {split} split gave too few distinct {', '.join(short)} questions, "
                f"so {len(tasks):,} prompts, not {n:,}")
        records, stats = label_split(model, tokenizer, tasks, labeler, cfg, held_out, f"label {split}")
        if not records:  # the reward model could neither train nor be scored on this split
            raise UserError(f"{'val_prompts' if held_out else 'prompts'}: none of the {len(tasks)} {split} prompts got "
                            f"two responses the labeler tells apart; give more prompts or a larger k")
        write_jsonl(out / f"{split}.jsonl", records)
        for family, s in stats.items():
            metrics.write({"split": split, "family": family, **_finish(s)})
        total = _finish({key: sum(s[key] for s in stats.values()) for key in stats["facts"]})
        summary["splits"][split] = {"comparisons": len(records), **total,
                                    "pairs_ranked": sum(_pair_count(r["ranks"]) for r in records)}
        log(f"label {split}: {len(records):,} comparisons from {total['prompts']:,} prompts (samples' mean gold "
            f"reward {total['sft_gold_reward']:.3f}; the labels agree with the gold reward on "
            f"{total['label_gold_agreement']:.1%} of the pairs they order whose gold rewards differ)")
    _plot(out, [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"])
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary


def _finish(s: dict) -> dict:
    return {"prompts": s["prompts"], "kept": s["kept"],
            "sft_gold_reward": round(s["gold"] / s["samples"], 4) if s["samples"] else 0.0,
            "label_gold_agreement": round(s["agree"] / s["pairs"], 4) if s["pairs"] else 0.0}


def _pair_count(ranks: list[int]) -> int:
    return sum(a < b for i, a in enumerate(ranks) for b in ranks[i + 1:])


def _plot(out: Path, rows: list[dict]) -> None:
    """Per family: the share of prompts kept and the SFT samples' mean gold reward."""
    if rows:
        plot_bars([r["family"] for r in rows],
                  {"prompts kept (responses differ)": [r["kept"] / max(r["prompts"], 1) for r in rows],
                   "SFT samples' gold reward": [r["sft_gold_reward"] for r in rows]},
                  out / "label.png", "Comparison data (train split)")
