"""A trained policy against its reference (the SFT model) on held-out prompts: what every
alignment stage reports. Greedy answers before and after, scored by the reward (and, on the
world, by the gold reward, with paired standard errors); sampled answers with their KL to the
reference; and the baselines an RL method has to beat: best-of-n by the reward model from SFT's
samples, and SFT sampled cooler (sharpening, no reward at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from chatfoundry.config import require
from chatfoundry.data import tasks, world
from chatfoundry.eval.world import chat_answers, evaluate_world
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.scoring import score_texts
from chatfoundry.train.rollout import RolloutConfig, rollout


@dataclass
class PolicyEvalConfig:
    # Held-out prompts, answered before (SFT) and after: the world's test split, this many per
    # family; a prompt file's held-out prompts, all of them. 0: no evaluation.
    per_family: int = 100
    max_new_tokens: int = 48  # as SFT's eval, so the numbers compare
    # Sampled answers per prompt (the policy trained; temperature as in training): gold and RM
    # reward, the paired gain over SFT and the held-out KL. More samples, a smaller standard error.
    samples: int = 4  # 0: greedy answers only
    # The SFT model sampled at these temperatures too, with no reward model: a sharper policy gains
    # gold reward by itself, so this is what a method's sampled gain has to beat at a like KL. The two
    # default ones bracket a KL of 0.5-1.1 nats, where the default PPO runs land (0.8 gave ~0.2: no comparison).
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
class Settings:
    """What an evaluation reads from its stage's config."""

    eval: PolicyEvalConfig
    rollout: RolloutConfig  # how the policy samples (the sampled answers are drawn so)
    chunk: int  # rows per forward when scoring samples
    name: str = "ppo"  # the method, in the report's keys and lines


def mean_se(xs) -> tuple[float, float]:
    """The mean and its standard error."""
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def _wins(a, b) -> float:
    """Share of prompts where a beats b, ties counting half."""
    a, b = np.asarray(a), np.asarray(b)
    return float(((a > b) + 0.5 * (a == b)).mean())


def _rm_scores(reward, tok, prompts: list[tasks.Prompt], responses: list[str]) -> list[float]:
    if reward is None:
        return [0.0] * len(responses)
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


def sampled_answers(model: DecoderLM, ref: DecoderLM, reward, tok, prompts: list[tasks.Prompt],
                    rollout_cfg: RolloutConfig, cfg: Settings, groups: int = 1) -> Sampled:
    """`groups` x `eval.samples` answers to each prompt, drawn as `rollout_cfg` says. Every model
    draws group g with the same seeds (common random numbers: where two agree they sample alike,
    so the paired difference is less noisy); more groups add samples for best-of-n."""
    n, P = cfg.eval.samples, len(prompts)
    cols: dict[str, list[list]] = {k: [[] for _ in range(P)] for k in ("rm", "kl", "scores")}
    for g in range(groups):
        for start in range(0, P, cfg.eval.batch_size):
            part = [p for p in prompts[start:start + cfg.eval.batch_size] for _ in range(n)]
            ro = rollout(model, ref, None, reward, tok, part, rollout_cfg, seed=10_000 + start + 7_919_003 * g,
                         chunk=cfg.chunk, max_new_tokens=cfg.eval.max_new_tokens)
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


def evaluate(policy: DecoderLM, ref: DecoderLM, reward, tok, cfg: Settings, source: tasks.Source,
             reference: Reference | None = None) -> dict:
    """The held-out prompts answered by the trained policy and by SFT (the reference), before and
    after: `heldout_prompts` and, with samples, `kl_heldout`. A reward (a reward model or a
    function; None: none, as for DPO) adds `reward_heldout_sft` and `reward_heldout_<name>`, the
    mean reward of greedy answers, and best-of-n. The world adds its gold reward
    (`evaluate_world_prompts`, which takes SFT's side as `reference` where it was computed already)."""
    if isinstance(source, tasks.WorldSource):
        report = evaluate_world_prompts(policy, ref, reward, tok, cfg, source.families, reference)
    else:
        report = evaluate_prompts(policy, ref, reward, tok, cfg, source.held_out())
    report["heldout_prompts"] = report["prompts"]
    if reward is not None:
        report.update({"reward_heldout_sft": report["sft_rm_reward"], f"reward_heldout_{cfg.name}": report["rm_reward"]})
    return report


def evaluate_prompts(policy: DecoderLM, ref: DecoderLM, reward, tok, cfg: Settings,
                     prompts: list[tasks.Prompt]) -> dict:
    """A prompt file's held-out prompts, scored by the reward alone (there is no gold): greedy
    answers' reward before and after (paired), the win rate by it, and sampled answers' reward
    with the KL to the reference."""
    policy.eval()
    greedy = {}
    for name, model in (("policy", policy), ("sft", ref)):
        responses = chat_answers(model, tok, [list(p.messages) for p in prompts], cfg.eval.max_new_tokens,
                                 cfg.eval.batch_size)
        greedy[name] = {"responses": responses, "rm": _rm_scores(reward, tok, prompts, responses)}
    g, s = greedy["policy"]["rm"], greedy["sft"]["rm"]
    dm, dse = mean_se(np.asarray(g) - np.asarray(s))
    report = {"prompts": len(prompts), "decoding": "greedy"}
    if reward is not None:
        report.update({"rm_reward": round(float(np.mean(g)), 4), "sft_rm_reward": round(float(np.mean(s)), 4),
                       "reward_gain": round(dm, 4), "reward_gain_se": round(dse, 4), "win_rate_rm": round(_wins(g, s), 4)})
    if cfg.eval.samples:
        sampled = {name: sampled_answers(model, ref, reward, tok, prompts, cfg.rollout, cfg)
                   for name, model in (("policy", policy), ("sft", ref))}
        dm, dse = mean_se(sampled["policy"].rm.mean(1) - sampled["sft"].rm.mean(1))
        report["samples"] = cfg.eval.samples
        if reward is not None:
            report.update({"rm_reward_sampled": round(float(sampled["policy"].rm.mean()), 4),
                           "sft_rm_reward_sampled": round(float(sampled["sft"].rm.mean()), 4),
                           "reward_gain_sampled": round(dm, 4), "reward_gain_sampled_se": round(dse, 4)})
        report["kl_heldout"] = round(float(sampled["policy"].kl.mean()), 4)
    report["answers"] = [{"prompt": list(p.messages), "response": a, "sft_response": b,
                          **({"rm": r1, "sft_rm": r2} if reward is not None else {})}
                         for p, a, b, r1, r2 in zip(prompts, greedy["policy"]["responses"], greedy["sft"]["responses"],
                                                    g, s)]
    return report


@dataclass
class Reference:
    """The reference's (SFT's) side of a world evaluation: it does not depend on the policy, so a
    stage may compute it before or while it trains (PPO does, in a second process: `reference_side`
    is most of the evaluation's decoding)."""

    greedy: dict  # {"report": evaluate_world's, "gold": per prompt, "rm": per prompt}
    sampled: Sampled | None  # groups x eval.samples answers per prompt (None: eval.samples 0)
    tempered: list[Sampled]  # eval.samples answers per prompt at each of eval.temperatures


def _world_prompts(cfg: Settings, families) -> tuple[list[world.Task], list[tasks.Prompt]]:
    questions = [t for f in families for t in world.tasks("test", f, cfg.eval.per_family, 0)]
    return questions, [tasks.world_prompt(t) for t in questions]


def _greedy(model: DecoderLM, reward, tok, cfg: Settings, families, prompts: list[tasks.Prompt]) -> dict:
    rep = evaluate_world(model, tok, "test", cfg.eval.per_family, families, seed=0,
                         max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    return {"report": rep, "gold": [a["gold_reward"] for a in rep["answers"]],
            "rm": _rm_scores(reward, tok, prompts, [a["response"] for a in rep["answers"]])}


def reference_side(ref: DecoderLM, reward, tok, cfg: Settings, families: tuple[str, ...] = world.FAMILIES) -> Reference:
    """SFT's greedy answers to the world's held-out prompts, its samples (enough groups for the
    largest best-of-n) and its cooler samples, scored."""
    ref.eval()
    _, prompts = _world_prompts(cfg, families)
    greedy = _greedy(ref, reward, tok, cfg, families, prompts)
    if not cfg.eval.samples:
        return Reference(greedy, None, [])
    groups = max([1] + [math.ceil(b / cfg.eval.samples) for b in cfg.eval.best_of])
    return Reference(greedy, sampled_answers(ref, ref, reward, tok, prompts, cfg.rollout, cfg, groups),
                     [sampled_answers(ref, ref, reward, tok, prompts, replace(cfg.rollout, temperature=t), cfg)
                      for t in cfg.eval.temperatures])


def evaluate_world_prompts(policy: DecoderLM, ref: DecoderLM, reward, tok, cfg: Settings,
                           families: tuple[str, ...] = world.FAMILIES, reference: Reference | None = None) -> dict:
    """The world's held-out test prompts, answered by the trained policy and by SFT (the reference).

    Greedy answers (as `chat` and `eval` give): gold reward (mean and standard error; the
    difference's standard error is paired, the same prompts), RM reward, win rates. Sampled
    answers (`eval.samples` per prompt, temperature as in training: the policy RL optimises):
    gold and RM reward, the paired gain over SFT, and the KL to the reference (`_sampled`: sum
    over tokens of log p - log pi_ref on the sampled distribution's own samples). Best-of-n by the
    RM from SFT's samples (`eval.best_of`), at the analytic KL log n - (n - 1) / n: what an RL
    method should approach. Then SFT sampled cooler (`eval.temperatures`): the gain and KL that
    sharpening alone gives, with no RM. Each carries the gold reward's parts. SFT's side is
    `reference` when it was computed already (`reference_side`), else computed here.
    """
    policy.eval()
    questions, prompts = _world_prompts(cfg, families)
    reference = reference or reference_side(ref, reward, tok, cfg, families)
    g, s = _greedy(policy, reward, tok, cfg, families, prompts), reference.greedy
    diff = np.asarray(g["gold"]) - np.asarray(s["gold"])
    gm, gse = mean_se(g["gold"])
    sm, sse = mean_se(s["gold"])
    dm, dse = mean_se(diff)
    report = {"prompts": len(questions), "decoding": "greedy",
              "gold_reward": round(gm, 4), "gold_reward_se": round(gse, 4),
              "sft_gold_reward": round(sm, 4), "sft_gold_reward_se": round(sse, 4),
              "gold_gain": round(dm, 4), "gold_gain_se": round(dse, 4),
              "gold_gain_in_se": round(dm / dse, 2) if dse > 0 else None,
              **({"rm_reward": round(float(np.mean(g["rm"])), 4), "sft_rm_reward": round(float(np.mean(s["rm"])), 4),
                  "win_rate_rm": round(_wins(g["rm"], s["rm"]), 4)} if reward is not None else {}),
              "win_rate_gold": round(_wins(g["gold"], s["gold"]), 4),
              "parts": g["report"]["overall"]["parts"], "sft_parts": s["report"]["overall"]["parts"],
              "families": g["report"]["families"], "sft_families": s["report"]["families"]}
    if cfg.eval.samples:
        n = cfg.eval.samples
        sampled = {"policy": sampled_answers(policy, ref, reward, tok, prompts, cfg.rollout, cfg),
                   "sft": reference.sampled}
        paired = sampled["sft"].gold[:, :n]  # the SFT samples drawn with the policy's seeds
        for name, prefix in (("policy", ""), ("sft", "sft_")):
            x = sampled[name]
            m, se = mean_se(x.gold[:, :n].mean(1))
            report[f"{prefix}gold_reward_sampled"], report[f"{prefix}gold_reward_sampled_se"] = round(m, 4), round(se, 4)
            if reward is not None:
                report[f"{prefix}rm_reward_sampled"] = round(float(x.rm[:, :n].mean()), 4)
            summary = world.score_summary(list(x.scores[:, :n].flatten()))
            report[f"{prefix}parts_sampled"] = summary["parts"]
            report[f"{prefix}exact_match_sampled"] = summary["exact_match"]
        report["kl_heldout"] = round(float(sampled["policy"].kl.mean()), 4)
        # Exact match of sampled answers (what a verifiable reward counts), paired per prompt.
        right = {name: np.vectorize(lambda sc: float(sc.correct), otypes=[float])(x.scores[:, :n]).mean(1)
                 for name, x in sampled.items()}
        em, em_se = mean_se(right["policy"] - right["sft"])
        report["exact_match_sampled_gain"], report["exact_match_sampled_gain_se"] = round(em, 4), round(em_se, 4)
        # Strict: right and in the house format too (a full, concise sentence). Exact match alone is
        # lenient about the form, so a gain in gold reward from the format alone shows up here only.
        strict = {name: np.vectorize(lambda sc: float(sc.correct and sc.sentence and sc.concise),
                                     otypes=[float])(x.scores[:, :n]).mean(1) for name, x in sampled.items()}
        sm_, sse_ = mean_se(strict["policy"] - strict["sft"])
        report.update({"exact_match_strict_sampled_sft": round(float(strict["sft"].mean()), 4),
                       "exact_match_strict_sampled": round(float(strict["policy"].mean()), 4),
                       "exact_match_strict_sampled_gain": round(sm_, 4), "exact_match_strict_sampled_gain_se": round(sse_, 4)})
        gain = lambda golds: mean_se(golds - paired.mean(1))  # noqa: E731  (paired, per prompt)
        dm, dse = gain(sampled["policy"].gold.mean(1))
        report.update({"samples": n, "gold_gain_sampled": round(dm, 4),
                       "gold_gain_sampled_se": round(dse, 4), "gold_gain_sampled_in_se": round(dm / dse, 2) if dse > 0 else None})
        of = np.array([t.family for t in questions])
        report["sampled_families"] = {f: {"sft_gold_reward": round(float(paired[of == f].mean()), 4),
                                          "gold_reward": round(float(sampled["policy"].gold[of == f].mean()), 4),
                                          "exact_match_sampled_sft": round(float(right["sft"][of == f].mean()), 4),
                                          "exact_match_sampled": round(float(right["policy"][of == f].mean()), 4)}
                                      for f in families if (of == f).any()}
        # Best-of-n against one SFT sample's expected gold: the mean over all of SFT's samples.
        everything = sampled["sft"].gold.mean(1)
        report["best_of_n"] = []
        for b in cfg.eval.best_of if reward is not None else ():  # by the reward model
            golds, chosen = best_of_n(sampled["sft"], b)
            bm, bse = mean_se(golds - everything)
            report["best_of_n"].append({"n": b, "gold_reward": round(float(golds.mean()), 4), "gold_gain": round(bm, 4),
                                        "gold_gain_se": round(bse, 4), "kl": round(math.log(b) - (b - 1) / b, 4),
                                        "parts": world.score_summary(chosen)["parts"]})
        report["sft_tempered"] = []
        for t, x in zip(cfg.eval.temperatures, reference.tempered):
            dm, dse = gain(x.gold.mean(1))
            report["sft_tempered"].append({"temperature": t, "gold_reward_sampled": round(float(x.gold.mean()), 4),
                                           "gold_gain_sampled": round(dm, 4), "gold_gain_sampled_se": round(dse, 4),
                                           **({"rm_reward_sampled": round(float(x.rm.mean()), 4)}
                                              if reward is not None else {}),
                                           "kl_heldout": round(float(x.kl.mean()), 4),
                                           "parts": world.score_summary(list(x.scores.flatten()))["parts"]})
    report["answers"] = [{**a, "sft_response": b["response"], "sft_gold_reward": b["gold_reward"],
                          **({"rm": r1, "sft_rm": r2} if reward is not None else {})}
                         for a, b, r1, r2 in zip(g["report"]["answers"], s["report"]["answers"], g["rm"], s["rm"])]
    return report


def summary_of(report: dict) -> dict:
    """What `--json` prints of a report: its figures, and per family the gold reward before and
    after (with sampled exact match where it was measured); not the answers themselves."""
    out = {k: v for k, v in report.items() if k not in ("answers", "families", "sft_families", "sampled_families")}
    if "families" in report:
        out["families"] = {f: {"gold_reward": report["families"][f]["gold_reward"],
                               "sft_gold_reward": report["sft_families"][f]["gold_reward"],
                               **{k: v for k, v in report.get("sampled_families", {}).get(f, {}).items()
                                  if k.startswith("exact_match")}}
                           for f in report["families"]}
    return out


def format_eval(report: dict, name: str = "PPO") -> str:
    """The report in a few lines; the reward's figures where there is a reward."""
    scored = "sft_rm_reward" in report
    if "gold_reward" not in report:  # a prompt file: the reward is all there is
        lines = [f"held-out prompts ({report['prompts']}, greedy)" + (
            f": reward SFT {report['sft_rm_reward']:+.3f} -> {name} {report['rm_reward']:+.3f} (gain "
            f"{report['reward_gain']:+.3f} +- {report['reward_gain_se']:.3f}, paired SE); {name} wins "
            f"{report['win_rate_rm']:.0%} of prompts by the reward" if scored else ": no reward to score them by")]
        if "kl_heldout" in report:
            lines.append(f"sampled ({report['samples']} per prompt): " + (
                f"reward SFT {report['sft_rm_reward_sampled']:+.3f} -> {name} {report['rm_reward_sampled']:+.3f} (gain "
                f"{report['reward_gain_sampled']:+.3f} +- {report['reward_gain_sampled_se']:.3f}); " if scored else "")
                + f"KL to SFT {report['kl_heldout']:.3f} nats per response")
        return "\n".join(lines)
    lines = [f"held-out test prompts ({report['prompts']}, greedy): gold reward SFT {report['sft_gold_reward']:.3f} -> "
             f"{name} {report['gold_reward']:.3f} (gain {report['gold_gain']:+.3f} +- {report['gold_gain_se']:.3f}, paired "
             + (f"SE); RM reward {report['sft_rm_reward']:+.3f} -> {report['rm_reward']:+.3f}; win rate vs SFT "
                f"{report['win_rate_rm']:.2f} by RM, {report['win_rate_gold']:.2f} by gold" if scored else
                f"SE); win rate vs SFT {report['win_rate_gold']:.2f} by gold")]
    if "gold_reward_sampled" in report:
        lines.append(f"sampled ({report['samples']} per prompt): gold reward SFT "
                     f"{report['sft_gold_reward_sampled']:.3f} -> {name} {report['gold_reward_sampled']:.3f} (gain "
                     f"{report['gold_gain_sampled']:+.3f} +- {report['gold_gain_sampled_se']:.3f}, paired SE); "
                     + (f"RM {report['sft_rm_reward_sampled']:+.3f} -> {report['rm_reward_sampled']:+.3f}; " if scored else "")
                     + f"KL to SFT {report['kl_heldout']:.3f} nats per response")
    for b in report.get("best_of_n", []):
        lines.append(f"  best-of-{b['n']} of SFT's samples by the reward model: gold gain {b['gold_gain']:+.3f} +- "
                     f"{b['gold_gain_se']:.3f} at {b['kl']:.3f} nats")
    for t in report.get("sft_tempered", []):
        lines.append(f"  SFT itself at temperature {t['temperature']:g}, no reward model: gold gain "
                     f"{t['gold_gain_sampled']:+.3f} +- {t['gold_gain_sampled_se']:.3f} at {t['kl_heldout']:.3f} nats")
    lines.append(f"{'family':<14}{'SFT gold':>10}{name + ' gold':>10}")
    for f, s in report["families"].items():
        lines.append(f"{f:<14}{report['sft_families'][f]['gold_reward']:>10.3f}{s['gold_reward']:>10.3f}")
    return "\n".join(lines)
