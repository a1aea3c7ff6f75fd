"""Calibration and hallucination: does a model know what it does not know?

GPT-4's report shows its pretrained model calibrated on multiple choice (ECE 0.007) and the model
after PPO not (ECE 0.074). The world has ground truth and made-up countries, so each stage's
checkpoint can be measured rather than shown:

    chatfoundry calibrate --base runs/demo/pretrain --ckpt runs/demo/sft runs/demo/ppo --out runs/calibration

Multiple choice.  Held-out questions of the world: facts with four options (the answer and three
rival values of the field), arithmetic with four (the answer and three near misses), compare with
two; the right option sits at each position equally often. The model's probability of each option
is read and renormalised over the options:
  form option (the default): each option said as the answer in the house style ("The capital of
      Peru is Quito."), scored as the model's whole reply in its chat template (--ckpt), or as the
      quiz answer in the form of its pretraining corpus, "Question: ...\\nAnswer: ..." (--base):
      how likely the model is to give that answer when asked.
  form letter: GPT-4's way, the options lettered A, B, ... under the question and the probability
      of the letter. The model must have learned that format (an imported model may have); the
      built-in corpus has no lettered quizzes, so its models answer it near chance.
A prediction is the most probable option; its probability is the model's confidence.

Metrics.  Accuracy; ECE over `bins` equal-width bins of confidence (Guo et al. 2017; a bin holds
its lower edge, the top bin 1.0); adaptive ECE over equal-mass bins (Nixon et al. 2019); the
Brier score (the squared distance of the probability vector from the one-hot answer, summed over
the options); NLL; mean confidence; and a bootstrap 95% interval for ECE.

Temperature scaling (Guo et al. 2017).  One scalar T, fitted on the validation split by NLL of
softmax(log p / T), then applied on the test split: the standard fix beside the problem.

Hallucination.  The model's own greedy answers (`eval`'s, or the quiz form's for a base model) to
held-out questions about real countries and about made-up ones: the share answered right, the
share answered with confidence but wrong (neither right nor an admission of ignorance: for a
made-up country, any stated value) and the share that abstains.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import world
from chatfoundry.errors import UserError
from chatfoundry.eval.world import chat_answers, quiz_answers
from chatfoundry.metrics import plot_bars
from chatfoundry.scoring import row_logprobs
from chatfoundry.tokenizer import chat_stop_ids, encode_batch_ids, encode_chat, special_id
from chatfoundry.train import stage

FAMILIES = ("facts", "compare", "arithmetic")  # the world's families with a value to choose
LETTERS = "ABCD"
GPT4 = {"pretrained": 0.007, "after PPO": 0.074}  # GPT-4 technical report, figure 8 (MMLU subset)


@dataclass
class CalibrateConfig(stage.StageConfig):
    out: str = "runs/calibrate"  # output folder: calibration.json, metrics.jsonl, reliability.png, hallucination.png
    ckpt: list[str] = field(default_factory=list)  # chat checkpoints (SFT, PPO, DPO...): asked in their chat template
    base: list[str] = field(default_factory=list)  # base checkpoints (pretrain): asked in the quiz form of their corpus
    names: list[str] = field(default_factory=list)  # a label per checkpoint, --base ones first (default: folder names)
    form: Literal["option", "letter"] = "option"  # option: each answer's sentence scored; letter: A/B/C/D's probability
    families: list[str] = field(default_factory=lambda: list(FAMILIES))  # multiple-choice families measured
    split: Literal["train", "val", "test"] = "test"  # the questions measured
    fit_split: Literal["train", "val", "test"] = "val"  # the questions temperature scaling is fitted on
    questions: int = 200  # per family, at most (a split may hold fewer: facts has 35 on test); the same for every seed
    reference: str = ""  # the checkpoint (by name) each other one's changes are paired against (default: the first --ckpt)
    bins: int = 10  # confidence bins of ECE, adaptive ECE and the reliability diagram
    bootstrap: int = 1000  # resamples of the questions for ECE's 95% intervals, its own and its change (0: none)
    hallucination: int = 100  # greedy answers per group (real countries' facts, made-up countries); 0: skip
    max_new_tokens: int = 32  # of each greedy answer
    batch_size: int = 64  # rows per forward pass

    def validate(self) -> None:
        require(bool(self.ckpt or self.base), "ckpt", "give a checkpoint to measure (--ckpt CHAT_DIR or --base DIR)")
        require(not self.names or len(self.names) == len(self.base) + len(self.ckpt), "names",
                f"give one per checkpoint ({len(self.base) + len(self.ckpt)}), got {len(self.names)}")
        require(bool(self.families), "families", f"give at least one of {', '.join(FAMILIES)}")
        for f in self.families:
            require(f in FAMILIES, "families", f"{f!r} is not one of {', '.join(FAMILIES)}")
        require(self.split != self.fit_split, "fit_split", f"must differ from split ({self.split})")
        for name in ("questions", "bins", "max_new_tokens", "batch_size"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("bootstrap", "hallucination"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------- the questions


@dataclass(frozen=True)
class Question:
    task: world.Task
    options: tuple[str, ...]  # values ("Lima", "Quito", ...)
    answer: int  # the right option's index


def distractors(task: world.Task, rng: random.Random) -> list[str]:
    """The wrong options: three rival values of the field (facts), three near misses (arithmetic),
    the other thing or number (compare)."""
    if task.family == "facts":
        return rng.sample(task.options, 3)
    if task.family == "arithmetic":
        near = [str(int(task.answer) + d) for d in (-3, -2, -1, 1, 2, 3, 10) if int(task.answer) + d >= 0]
        return rng.sample(near, 3)
    return [next(o for o in task.options if o != task.answer)]


def questions(split: str, families, n: int, seed: int = 0) -> dict[str, list[Question]]:
    """Up to `n` multiple-choice questions per family from a split; within a family the right
    option takes each position in turn, so no letter is right more often than another."""
    rng = random.Random(f"{seed}:{split}:choices")
    out = {}
    for family in families:
        out[family] = []
        for i, task in enumerate(world.tasks(split, family, n, seed)):
            wrong = distractors(task, rng)
            at = i % (len(wrong) + 1)
            out[family].append(Question(task, tuple(wrong[:at] + [task.answer] + wrong[at:]), at))
    return out


def lettered(q: Question) -> str:
    return q.task.prompt + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q.options))


def option_rows(tok, qs: list[Question], chat: bool, form: str) -> tuple[list[list[int]], list[int]]:
    """Token rows (prompt + one option's continuation) for every option of every question, and
    where each continuation starts. Chat: the question as the user's message and the option as the
    reply (the whole reply and <|end|>; letter form: the letter alone). Base: the question and the
    option as the corpus' quizzes put them, "Question: ...\\nAnswer: ...", after the end of a document."""
    asks = [q.task.prompt if form == "option" else lettered(q) for q in qs]
    if chat:
        prompts = [encode_chat(tok, [{"role": "user", "content": a}]) for a in asks]
    else:
        eos = special_id(tok, "eos")
        prompts = [([eos] if eos is not None else []) + ids
                   for ids in encode_batch_ids(tok, [f"Question: {a}\nAnswer:" for a in asks])]
    said = [world.restate(q.task, o) if form == "option" else LETTERS[i] for q in qs for i, o in enumerate(q.options)]
    conts = encode_batch_ids(tok, said if chat else [" " + s for s in said], ["assistant"] * len(said) if chat else None)
    end = [special_id(tok, "end")] if chat and form == "option" else []
    rows, starts, k = [], [], 0
    for q, prompt in zip(qs, prompts):
        for _ in q.options:
            rows.append(prompt + conts[k] + end)
            starts.append(len(prompt))
            k += 1
    return rows, starts


def option_logprobs(model, tok, qs: list[Question], chat: bool, form: str, batch_size: int = 64) -> np.ndarray:
    """(questions, 4) log-probabilities of the options renormalised over each question's options;
    -inf past a question's last option (compare has two)."""
    rows, starts = option_rows(tok, qs, chat, form)
    block = model.config.block_size
    if (longest := max(map(len, rows))) > block:
        raise UserError(f"a question and its option take {longest} tokens, more than the model's block_size {block}")
    flat = iter(row_logprobs(model, rows, starts, special_id(tok, "pad") or 0, batch_size))
    out = np.full((len(qs), len(LETTERS)), -np.inf)
    for i, q in enumerate(qs):
        lp = np.array([next(flat) for _ in q.options])
        out[i, :len(lp)] = lp - np.logaddexp.reduce(lp)
    return out


# ---------------------------------------------------------------- the metrics


def probabilities(logp: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logp / T) per row; -inf entries (no such option) get 0."""
    z = logp / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """Expected calibration error: sum over equal-width bins of |accuracy - confidence| weighted by
    the bin's share of the questions."""
    which = np.minimum(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="right") - 1, bins - 1)
    return float(sum(abs(correct[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def adaptive_ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """ECE over `bins` bins of (nearly) equal counts, by confidence."""
    groups = np.array_split(np.argsort(conf, kind="stable"), bins)
    return float(sum(abs(correct[g].mean() - conf[g].mean()) * len(g) / len(conf) for g in groups if len(g)))


def brier(probs: np.ndarray, answers: np.ndarray) -> float:
    """Mean over questions of the summed squared error of the probabilities against the one-hot answer."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(answers)), answers] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int) -> list[dict]:
    """Per equal-width bin: its edges, count, mean confidence and accuracy (None when empty)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.minimum(np.searchsorted(edges, conf, side="right") - 1, bins - 1)
    return [{"lo": round(float(edges[b]), 4), "hi": round(float(edges[b + 1]), 4), "n": int((which == b).sum()),
             "confidence": round(float(conf[which == b].mean()), 4) if (which == b).any() else None,
             "accuracy": round(float(correct[which == b].mean()), 4) if (which == b).any() else None}
            for b in range(bins)]


def metrics(probs: np.ndarray, answers: np.ndarray, bins: int) -> dict:
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == answers).astype(float)
    nll = -np.log(np.maximum(probs[np.arange(len(answers)), answers], 1e-300))
    return {"n": len(answers), "accuracy": round(float(correct.mean()), 4), "ece": round(ece(conf, correct, bins), 4),
            "ece_adaptive": round(adaptive_ece(conf, correct, bins), 4), "brier": round(brier(probs, answers), 4),
            "nll": round(float(nll.mean()), 4), "mean_confidence": round(float(conf.mean()), 4)}


def ece_interval(probs: np.ndarray, answers: np.ndarray, bins: int, resamples: int, seed: int) -> list[float]:
    """The 2.5th and 97.5th percentiles of ECE over bootstrap resamples of the questions."""
    conf, correct = probs.max(1), (probs.argmax(1) == answers).astype(float)
    rng = np.random.default_rng(seed)
    draws = [ece(conf[i], correct[i], bins) for i in rng.integers(0, len(conf), (resamples, len(conf)))]
    return [round(float(np.percentile(draws, 2.5)), 4), round(float(np.percentile(draws, 97.5)), 4)]


def fit_temperature(logp: np.ndarray, answers: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logp / T): golden-section search on log(1/T) (the NLL
    is convex in 1/T, so it has one minimum)."""
    def nll(log_beta: float) -> float:
        p = probabilities(logp, math.exp(-log_beta))
        return float(-np.log(np.maximum(p[np.arange(len(answers)), answers], 1e-300)).mean())

    lo, hi, g = -6.0, 6.0, (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return round(math.exp(-(lo + hi) / 2), 4)


# ---------------------------------------------------------------- hallucination


def hallucination(model, tok, chat: bool, split: str, n: int, seed: int, max_new_tokens: int,
                  batch_size: int) -> dict:
    """Greedy answers to `n` held-out questions about real countries (facts) and `n` about made-up
    ones: {"answerable": {n, correct, confident_wrong, abstain}, "made_up": {...}, "answers"}."""
    groups = {"answerable": world.tasks(split, "facts", n, seed), "made_up": world.tasks(split, "unanswerable", n, seed)}
    asked = [t for g in groups.values() for t in g]
    if chat:
        replies = chat_answers(model, tok, [[{"role": "user", "content": t.prompt}] for t in asked], max_new_tokens,
                               batch_size)
    else:  # the quiz form, zero-shot
        replies, _ = quiz_answers(model, tok, asked, 0, seed, max_new_tokens, batch_size)
    scores = [world.score(t, r) for t, r in zip(asked, replies)]
    out, k = {}, 0
    for name, tasks in groups.items():
        mine = scores[k:k + len(tasks)]
        k += len(tasks)
        share = (lambda xs: round(sum(xs) / len(mine), 4)) if mine else (lambda xs: 0.0)
        out[name] = {"n": len(mine), "correct": share([s.correct for s in mine]),
                     "confident_wrong": share([not s.correct and not s.abstained for s in mine]),
                     "abstain": share([s.abstained for s in mine])}
    out["answers"] = [{"family": t.family, "prompt": t.prompt, "response": r, "correct": s.correct,
                       "abstained": s.abstained} for t, r, s in zip(asked, replies, scores)]
    return out


# ---------------------------------------------------------------- the run


def fitting(qs: list[Question], cfg: CalibrateConfig) -> list[Question]:
    """The questions whose every option fits every checkpoint's context (the same set for all of
    them, so their changes stay paired)."""
    from chatfoundry.tokenizer import load_tokenizer

    keep = [True] * len(qs)
    for i, path in enumerate(cfg.base + cfg.ckpt):
        tok, block = load_tokenizer(ckpt.resolve_checkpoint(path)), ckpt.model_config(path).block_size
        rows = iter(option_rows(tok, qs, i >= len(cfg.base), cfg.form)[0])
        keep = [k and max(len(next(rows)) for _ in q.options) <= block for k, q in zip(keep, qs)]
    return [q for q, k in zip(qs, keep) if k]


def is_pretrain_run(path: str) -> bool:
    """Whether the checkpoint is a `pretrain` run's (its run folder's config.yaml names a pretraining objective)."""
    folder = ckpt.resolve_checkpoint(path)
    saved = (folder.parent if folder.name == ckpt.CHECKPOINT else folder) / "config.yaml"
    try:
        return saved.is_file() and (yaml.safe_load(saved.read_text()) or {}).get("objective") in ("clm", "mlm", "span")
    except yaml.YAMLError:
        return False


def default_names(paths: list[str]) -> list[str]:
    """Each checkpoint's run folder name ("ppo" for runs/demo/ppo), or its whole path where taken."""
    names: list[str] = []
    for path in paths:
        p = Path(path)
        name = p.parent.name if p.name == ckpt.CHECKPOINT else p.name
        names.append(name if name and name not in names else str(path))
    return names


def run(cfg: CalibrateConfig, overwrite: bool = False, log=print) -> dict:
    """Measure every checkpoint as configured; returns the summary that `--json` prints."""
    cfg.validate()
    with stage.start("calibrate", cfg, False, overwrite, log, one_process=True) as r:
        measured = questions(cfg.split, cfg.families, cfg.questions)
        fit = questions(cfg.fit_split, cfg.families, cfg.questions)
        for split, qs in ((cfg.split, measured), (cfg.fit_split, fit)):
            for family, mine in qs.items():
                qs[family] = fitting(mine, cfg)
                if len(qs[family]) < len(mine):
                    log(f"calibrate: {len(mine) - len(qs[family])} {family} questions of the {split} split are left out: "
                        "with an option they take more tokens than a model's context")
                mine = qs[family]
                require(len(mine) >= cfg.bins, "bins", f"the {split} split has {len(mine)} {family} questions, fewer "
                        f"than {cfg.bins} bins: ask for fewer --bins or more --questions")
        for path in cfg.ckpt:
            if is_pretrain_run(path):
                raise UserError(f"{path}: a pretrained base model (its run is pretrain's), not a chat model: "
                                "pass it as --base to ask it in the quiz form of its corpus")
        paths = cfg.base + cfg.ckpt
        names = cfg.names or default_names(paths)
        require(not cfg.reference or cfg.reference in names, "reference",
                f"{cfg.reference!r} names no checkpoint ({', '.join(names)})")
        models = [(name, path, i >= len(cfg.base)) for i, (name, path) in enumerate(zip(names, paths))]
        return _run(r, models, measured, fit)


def _measure(cfg: CalibrateConfig, path: str, chat: bool, measured: dict, fit: dict, device) -> tuple[dict, dict]:
    """(the checkpoint's report, its per-question results for the paired changes)."""
    model, tok = ckpt.load_model(path, device)
    if chat and (not chat_stop_ids(tok) or special_id(tok, "end") is None):
        raise UserError(f"{path}: the tokenizer lacks the chat tokens <|end|> and <|eos|>; --ckpt needs a chat model")
    qs = [q for family in cfg.families for q in measured[family]]
    fs = [q for family in cfg.families for q in fit[family]]
    logp = option_logprobs(model, tok, qs, chat, cfg.form, cfg.batch_size)
    answers = np.array([q.answer for q in qs])
    temperature = fit_temperature(option_logprobs(model, tok, fs, chat, cfg.form, cfg.batch_size),
                                  np.array([q.answer for q in fs]))
    probs, scaled = probabilities(logp), probabilities(logp, temperature)
    report = {"ckpt": path, "form": "chat" if chat else "quiz", **metrics(probs, answers, cfg.bins)}
    if cfg.bootstrap:
        report["ece_ci"] = ece_interval(probs, answers, cfg.bins, cfg.bootstrap, cfg.seed)
    report["temperature"] = temperature
    report["scaled"] = metrics(scaled, answers, cfg.bins)
    families = np.array([q.task.family for q in qs])
    report["families"] = {f: metrics(probs[families == f], answers[families == f], cfg.bins) for f in cfg.families}
    conf, correct = probs.max(1), (probs.argmax(1) == answers).astype(float)
    report["bins"] = reliability(conf, correct, cfg.bins)
    report["bins_scaled"] = reliability(scaled.max(1), (scaled.argmax(1) == answers).astype(float), cfg.bins)
    raw = {"probs": probs, "answers": answers}
    if cfg.hallucination:
        report["hallucination"] = hallucination(model, tok, chat, cfg.split, cfg.hallucination, 0,
                                                cfg.max_new_tokens, cfg.batch_size)
        rows = report["hallucination"]["answers"]
        for group, family in (("answerable", "facts"), ("made_up", "unanswerable")):
            mine = [a for a in rows if a["family"] == family]
            raw[f"{group}_confident_wrong"] = np.array([not a["correct"] and not a["abstained"] for a in mine], float)
            raw[f"{group}_abstain"] = np.array([a["abstained"] for a in mine], float)
    return report, raw


def paired(d: np.ndarray) -> dict:
    """The mean of paired differences and its standard error."""
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"change": round(float(d.mean()), 4), "se": round(se, 4)}


def changes(mine: dict, ref: dict, bins: int, resamples: int, seed: int) -> dict:
    """A checkpoint's changes from the reference on the same questions: ECE (with a paired bootstrap
    95% interval: both checkpoints on each resample), the Brier score and the hallucination shares
    (means of per-question differences, with their standard errors)."""
    def conf_correct(raw):
        return raw["probs"].max(1), (raw["probs"].argmax(1) == raw["answers"]).astype(float)

    (ca, ka), (cb, kb) = conf_correct(mine), conf_correct(ref)
    out = {"ece": {"change": round(ece(ca, ka, bins) - ece(cb, kb, bins), 4)}}
    if resamples:
        draws = [ece(ca[i], ka[i], bins) - ece(cb[i], kb[i], bins)
                 for i in np.random.default_rng(seed).integers(0, len(ca), (resamples, len(ca)))]
        out["ece"]["ci"] = [round(float(np.percentile(draws, q)), 4) for q in (2.5, 97.5)]

    def per_question_brier(raw):
        onehot = np.eye(raw["probs"].shape[1])[raw["answers"]]
        return ((raw["probs"] - onehot) ** 2).sum(1)

    out["brier"] = paired(per_question_brier(mine) - per_question_brier(ref))
    for key in ("answerable_confident_wrong", "answerable_abstain", "made_up_confident_wrong", "made_up_abstain"):
        if key in mine and key in ref:
            out[key] = paired(mine[key] - ref[key])
    return out


def _run(r: stage.Run, models: list[tuple[str, str, bool]], measured: dict, fit: dict) -> dict:
    cfg, out, log = r.cfg, r.out, r.log
    reports, raws = [], {}
    for name, path, chat in models:
        report, raws[name] = _measure(cfg, path, chat, measured, fit, r.rt.device)
        reports.append({"name": name, **report})
        log(f"{name}: " + format_row(reports[-1]))
    reference = cfg.reference or next((name for name, _, chat in models if chat), models[0][0])
    for rep in reports:
        if rep["name"] != reference:
            rep["change"] = {"vs": reference, **changes(raws[rep["name"]], raws[reference], cfg.bins, cfg.bootstrap,
                                                        cfg.seed)}
    r.prepare(("calibration.json", "metrics.jsonl", "reliability.png", "hallucination.png"))
    log_ = r.metrics()
    for rep in reports:
        log_.write({"checkpoint": rep["name"], **{k: v for k, v in rep.items() if not isinstance(v, (dict, list))},
                    "ece_scaled": rep["scaled"]["ece"],
                    **{f"{g}_{k}": v for g, h in rep.get("hallucination", {}).items() if isinstance(h, dict)
                       for k, v in h.items() if k != "n"}})
    figure = plot_reliability(reports, out / "reliability.png", f"{', '.join(cfg.families)} on the {cfg.split} split")
    summary = {"out": str(out), "form": cfg.form, "split": cfg.split, "bins": cfg.bins, "reference": reference,
               "checkpoints": [_summary(rep) for rep in reports], "figure": str(figure)}
    if cfg.hallucination:
        plot_hallucination(reports, out / "hallucination.png")
        summary["hallucination_figure"] = str(out / "hallucination.png")
    (out / "calibration.json").write_text(json.dumps({**summary, "checkpoints": reports}, indent=1))
    log(format_table(summary))
    summary["wall_s"] = r.wall_s()
    return summary


def _summary(rep: dict) -> dict:
    """A checkpoint's report without the per-bin rows and the answers (calibration.json has them)."""
    out = {k: v for k, v in rep.items() if k not in ("bins", "bins_scaled")}
    if "hallucination" in rep:
        out["hallucination"] = {k: v for k, v in rep["hallucination"].items() if k != "answers"}
    return out


# ---------------------------------------------------------------- the report


def format_row(rep: dict) -> str:
    ci = f" [{rep['ece_ci'][0]:.3f}, {rep['ece_ci'][1]:.3f}]" if "ece_ci" in rep else ""
    return (f"accuracy {rep['accuracy']:.3f}, ECE {rep['ece']:.3f}{ci}, adaptive ECE {rep['ece_adaptive']:.3f}, "
            f"Brier {rep['brier']:.3f}, confidence {rep['mean_confidence']:.3f}; T {rep['temperature']:.2f} -> "
            f"ECE {rep['scaled']['ece']:.3f}")


def format_table(summary: dict) -> str:
    """Markdown tables: calibration per checkpoint, then hallucination where it was measured; a
    checkpoint's changes from the reference, paired on the same questions, in brackets."""
    ref = summary["reference"]
    lines = [f"| checkpoint | asked as | accuracy | ECE (95% CI) | ECE change vs {ref} (95% CI) | adaptive ECE | Brier "
             "| confidence | T | ECE at T |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rep in summary["checkpoints"]:
        ci = f" [{rep['ece_ci'][0]:.3f}, {rep['ece_ci'][1]:.3f}]" if "ece_ci" in rep else ""
        change = rep.get("change", {}).get("ece")
        delta = (f"{change['change']:+.3f}" + (f" [{change['ci'][0]:+.3f}, {change['ci'][1]:+.3f}]" if "ci" in change
                                                else "")) if change else ""
        lines.append(f"| {rep['name']} | {rep['form']} | {rep['accuracy']:.3f} | {rep['ece']:.3f}{ci} | {delta} | "
                     f"{rep['ece_adaptive']:.3f} | {rep['brier']:.3f} | {rep['mean_confidence']:.3f} | "
                     f"{rep['temperature']:.2f} | {rep['scaled']['ece']:.3f} |")
    hal = [rep for rep in summary["checkpoints"] if "hallucination" in rep]
    if hal:
        def cell(rep, group, key):
            c = rep.get("change", {}).get(f"{group}_{key}")
            return f"{rep['hallucination'][group][key]:.2f}" + (f" ({c['change']:+.2f} ± {c['se']:.2f})" if c else "")

        lines += ["", f"Greedy answers; in brackets the change from {ref} on the same questions, ± its paired SE.", "",
                  "| checkpoint | real countries: right | confidently wrong | abstains | made-up countries: "
                  "states a value | abstains |", "| --- | --- | --- | --- | --- | --- |"]
        for rep in hal:
            lines.append(f"| {rep['name']} | {rep['hallucination']['answerable']['correct']:.2f} | "
                         f"{cell(rep, 'answerable', 'confident_wrong')} | {cell(rep, 'answerable', 'abstain')} | "
                         f"{cell(rep, 'made_up', 'confident_wrong')} | {cell(rep, 'made_up', 'abstain')} |")
    return "\n".join(lines)


def plot_reliability(reports: list[dict], path: Path, title: str) -> Path:
    """Reliability diagrams, every checkpoint overlaid: as asked, after temperature scaling, and the
    questions per bin."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=100)
    width = 1.0 / len(reports[0]["bins"])
    for j, rep in enumerate(reports):
        for ax, key, ece_ in ((axes[0], "bins", rep["ece"]), (axes[1], "bins_scaled", rep["scaled"]["ece"])):
            pts = [(b["confidence"], b["accuracy"]) for b in rep[key] if b["n"]]
            ax.plot(*zip(*pts), marker="o", label=f"{rep['name']} (ECE {ece_:.3f})")
        axes[2].bar([b["lo"] + width * (j + 0.5) / len(reports) for b in rep["bins"]], [b["n"] for b in rep["bins"]],
                    width / len(reports), label=rep["name"])
    for ax, name in ((axes[0], "as asked"), (axes[1], "temperature-scaled (T fitted on validation)")):
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean in bin)", ylabel="accuracy in bin",
               title=f"Reliability, {name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].set(xlim=(0, 1), xlabel="confidence", ylabel="questions", title="Questions per bin (as asked)")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_hallucination(reports: list[dict], path: Path) -> Path:
    names = [rep["name"] for rep in reports]
    h = [rep["hallucination"] for rep in reports]
    return plot_bars(names, {"real: confidently wrong": [x["answerable"]["confident_wrong"] for x in h],
                             "real: abstains": [x["answerable"]["abstain"] for x in h],
                             "made-up: states a value": [x["made_up"]["confident_wrong"] for x in h],
                             "made-up: abstains": [x["made_up"]["abstain"] for x in h]},
                     path, ["questions about real countries", "questions about made-up countries"], panels=2)
