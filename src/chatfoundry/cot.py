"""`chatfoundry cot`: chain of thought, measured. Does a model answer multi-step questions better
when it was taught to write the steps, and does that grow with size?

    corpus     the arithmetic table (corpus.py's documents, operands 0..12) and, for `multistep_share`
               of the documents, multi-step questions of the world's train split (world.py,
               MULTISTEP) answered in the quiz form: directly ("Answer: 3 + 4 * 2 is 11.") or, for
               `worked_share` of them, worked after "Let's think step by step." (out/corpus.jsonl)
    per size and seed, each step an ordinary run in its own folder (out/SIZE/seedS/):
      pretrain       on that corpus, the size a model preset
      zero-shot      the base model asked the held-out questions in the quiz form, with "Answer:"
                     alone and with "Answer: Let's think step by step." (Kojima et al. 2022)
      sft_direct     SFT from the base on the same train questions, answered directly ...
      sft_worked     ... or worked: each step an equation, then the answer (Wei et al. 2022)
      eval           each model's greedy answers to the held-out questions (test split: their
                     computations never appear in the corpus or SFT): exact match of the final
                     number, and for worked answers whether every step checks

Every step of every question is a line of the table the corpus states, so a worked answer is a
chain of things the model knows, while a direct one must compose them in one forward pass.
A finished run is skipped, so an interrupted comparison resumes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require, save_config
from chatfoundry.data import corpus, world
from chatfoundry.data.formats import write_jsonl
from chatfoundry.errors import UserError
from chatfoundry.eval.policy import mean_se
from chatfoundry.eval.world import chat_answers, greedy_texts
from chatfoundry.metrics import MetricsLog
from chatfoundry.models.decoder import PRESETS, DecoderConfig
from chatfoundry.tokenizer import (SPECIAL_TOKENS, encode_batch_ids, encode_chat, load_tokenizer, save_tokenizer,
                                   special_id, train_tokenizer)
from chatfoundry.train import pretrain, sft
from chatfoundry.train.stage import SUMMARY, run_once, setup_runtime, single_process

TRIGGER = "Let's think step by step."  # Kojima et al.'s zero-shot chain-of-thought prompt


@dataclass
class CotConfig:
    out: str = "runs/cot"  # holds corpus.jsonl, tokenizer/, SIZE/seedS/ (the runs), cot.json and cot.png
    sizes: list[str] = field(default_factory=lambda: ["micro", "tiny"])  # model presets (`chatfoundry presets`)
    seeds: list[int] = field(default_factory=lambda: [1337, 1, 2])  # each size's runs repeat per seed
    flavour: Literal["gpt2", "neox", "llama"] = "neox"  # the models' block (pretrain's default)
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda or cuda:N
    corpus_chars: int = 2_000_000  # size of the pretraining corpus
    multistep_share: float = 0.5  # of the corpus's documents, the share that are multi-step quizzes
    worked_share: float = 0.3  # of their answers, the share worked after "Let's think step by step."
    vocab_size: int = 1024  # the BPE tokenizer every run shares (digits one by one)
    pretrain_steps: int = 1600  # each base model's optimizer steps
    pretrain_batch: int = 16  # sequences per pretraining step
    pretrain_lr: float = 3e-3  # peak learning rate of pretraining (warmup, then cosine)
    sft_questions: int = 4000  # SFT conversations, one train-split question each, the same for both arms
    sft_steps: int = 800  # each SFT run's optimizer steps (batches of 32)
    sft_lr: float = 1e-3  # peak learning rate of SFT
    test_questions: int = 300  # held-out (test split) multi-step questions each model answers
    max_new_tokens: int = 64  # longest answer, in tokens (a three-step worked answer takes about 40)

    def validate(self) -> None:
        require(bool(self.sizes), "sizes", "give at least one model preset")
        for size in self.sizes:
            require(size in PRESETS, "sizes", f"unknown preset {size!r}; one of {', '.join(PRESETS)}")
        require(len(set(self.sizes)) == len(self.sizes) and len(set(self.seeds)) == len(self.seeds) > 0, "seeds",
                "give each size and each seed once, and at least one seed")
        for name in ("multistep_share", "worked_share"):
            require(0 < getattr(self, name) < 1, name, f"must be in (0, 1), got {getattr(self, name)}")
        for name in ("corpus_chars", "pretrain_steps", "pretrain_batch", "sft_questions", "sft_steps", "test_questions",
                     "max_new_tokens"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        floor = 256 + len(SPECIAL_TOKENS)  # byte-level BPE's alphabet and the special tokens, as pretrain requires
        require(self.vocab_size > floor, "vocab_size", f"must be > {floor} (256 bytes and the special tokens), got "
                f"{self.vocab_size}")
        require(self.pretrain_lr > 0 and self.sft_lr > 0, "pretrain_lr", "learning rates must be > 0")


# ---------------------------------------------------------------- the data


def quiz_answer(task: world.Task, worked: bool) -> str:
    """A multi-step question's answer in the corpus's quiz form: direct, or worked after the trigger."""
    return f"{TRIGGER} {world.worked(task)}" if worked else task.reference


def documents(cfg: CotConfig, seed: int = 0):
    """The corpus, as an endless stream: arithmetic documents and quizzes of train-split multi-step questions."""
    rng = random.Random(f"{seed}:cot")
    while True:
        if rng.random() >= cfg.multistep_share:
            yield corpus.arithmetic_document(rng)
            continue
        lines = []
        for _ in range(rng.randint(2, 4)):
            task = world.multistep_task(rng)
            while world.split_of(task.group) != "train":  # no held-out computation is ever answered
                task = world.multistep_task(rng)
            lines.append(f"Question: {task.prompt}\nAnswer: {quiz_answer(task, rng.random() < cfg.worked_share)}")
        yield "\n".join(lines)


def corpus_texts(cfg: CotConfig) -> list[str]:
    """The corpus's documents, `corpus_chars` characters of them (blank lines between counted)."""
    docs, texts, length = documents(cfg), [], 0
    while length < cfg.corpus_chars:
        texts.append(next(docs))
        length += len(texts[-1]) + 2
    return texts


def sft_examples(cfg: CotConfig, worked: bool) -> list[dict]:
    """The SFT arm's conversations: the same train questions, answered directly or worked."""
    tasks = world.tasks("train", world.MULTISTEP, cfg.sft_questions)
    return [{"messages": [{"role": "user", "content": t.prompt},
                          {"role": "assistant", "content": world.worked(t) if worked else t.reference}]} for t in tasks]


def held_out(cfg: CotConfig) -> list[world.Task]:
    """The questions every model answers: the same for every size and seed, so their scores pair."""
    return world.tasks("test", world.MULTISTEP, cfg.test_questions)


def prepare(cfg: CotConfig, out: Path):
    """corpus.jsonl, the SFT files and the tokenizer every run shares, each made once; first a check
    that every size's context holds the longest worked conversation, so bad sizes write nothing."""
    texts = None
    if (out / "tokenizer" / "tokenizer.json").is_file():
        tok = load_tokenizer(out / "tokenizer")
    else:
        texts = corpus_texts(cfg)
        tok = train_tokenizer(iter(texts), "bpe", cfg.vocab_size)
    arms = {arm: sft_examples(cfg, arm == "worked") for arm in ("direct", "worked")}
    longest = max(len(encode_chat(tok, ex["messages"])) for ex in arms["worked"])
    for size in cfg.sizes:
        block = PRESETS[size][3]
        if longest > block:
            raise UserError(f"sizes: {size}'s context of {block} tokens does not hold the longest worked "
                            f"conversation ({longest} tokens); pick a preset with a longer context")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "corpus.jsonl").is_file():
        write_jsonl(out / "corpus.jsonl", [{"text": t} for t in texts or corpus_texts(cfg)])
    for arm, examples in arms.items():
        if not (out / f"sft_{arm}.jsonl").is_file():
            write_jsonl(out / f"sft_{arm}.jsonl", examples)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        save_tokenizer(tok, out / "tokenizer")
    return tok


# ---------------------------------------------------------------- the runs


def pretrain_config(cfg: CotConfig, size: str, seed: int, out: Path) -> pretrain.PretrainConfig:
    p = pretrain.PretrainConfig(out=str(out / size / f"seed{seed}" / "pretrain"), seed=seed, device=cfg.device)
    p.data = replace(p.data, files=[str(out / "corpus.jsonl")])
    p.tokenizer = replace(p.tokenizer, path=str(out / "tokenizer"))
    p.model = DecoderConfig.from_preset(size, cfg.flavour)
    steps = cfg.pretrain_steps
    p.train = replace(p.train, steps=steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
                      warmup_steps=min(100, steps // 10), eval_every=steps, save_every=steps, log_every=max(1, steps // 50))
    p.sample = replace(p.sample, num_samples=0)
    return p


def sft_config(cfg: CotConfig, base: Path, arm: str, seed: int, out: Path) -> sft.SFTConfig:
    s = sft.SFTConfig(init=str(base), out=str(base.parent / f"sft_{arm}"), seed=seed, device=cfg.device)
    # Padded batches of 32 questions, as cot.md's figures were measured.
    s.data = replace(s.data, files=[str(out / f"sft_{arm}.jsonl")], pretrain_mix=0.0, packing=False)
    steps = cfg.sft_steps
    s.train = replace(s.train, steps=steps, batch_size=32, lr=cfg.sft_lr, warmup_steps=min(20, steps // 10),
                      eval_every=steps, save_every=steps, log_every=max(1, steps // 50))
    s.eval = replace(s.eval, per_family=0)  # the world's families are not what this measures
    return s


def score(tasks: list[world.Task], answers: list[str]) -> dict:
    """Exact match (the final number), the share whose stated steps all check, and the share that state any."""
    n = len(tasks)
    return {"exact_match": round(sum(world.is_correct(t, a) for t, a in zip(tasks, answers)) / n, 4),
            "steps_valid": round(sum(world.steps_valid(t, a) for t, a in zip(tasks, answers)) / n, 4),
            "worked": round(sum(bool(world.stated_steps(a)) for a in answers) / n, 4)}


def zero_shot(model, tok, tasks: list[world.Task], max_new_tokens: int) -> tuple[dict, dict]:
    """The base model in the quiz form, "Answer:" alone and after the trigger; the answer is its
    line. (scores, answers) per prompt form."""
    eos = special_id(tok, "eos")
    scores, answers = {}, {}
    for name, suffix in (("plain", ""), ("step_by_step", " " + TRIGGER)):
        ids = [[eos] + x for x in encode_batch_ids(tok, [f"Question: {t.prompt}\nAnswer:{suffix}" for t in tasks])]
        answers[name] = [r.split("\n")[0] for r in greedy_texts(model, tok, ids, [eos], max_new_tokens)]
        scores[name] = score(tasks, answers[name])
    return scores, answers


def write_answers(path: Path, tasks: list[world.Task], answers: list[str]) -> None:
    write_jsonl(path, [{"prompt": t.prompt, "answer": t.answer, "response": a, "correct": world.is_correct(t, a),
                        "steps_valid": world.steps_valid(t, a)} for t, a in zip(tasks, answers)])


def one_seed(cfg: CotConfig, size: str, seed: int, out: Path, tok, tasks: list[world.Task], device, log) -> dict:
    """Pretrain, zero-shot, both SFT arms and their scores for one size and seed (read back when done)."""
    folder = out / size / f"seed{seed}"
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    base, _ = run_once(pretrain.run, pretrain_config(cfg, size, seed, out), folder / "pretrain")
    model, _ = ckpt.load_model(folder / "pretrain", device)
    result = {"size": size, "seed": seed, "params": base.get("params"), "val_loss": base.get("val_loss")}
    result["zero_shot"], answers = zero_shot(model, tok, tasks, cfg.max_new_tokens)
    for name, said in answers.items():
        write_answers(folder / f"answers_zero_shot_{name}.jsonl", tasks, said)
    for arm in ("direct", "worked"):
        run_once(sft.run, sft_config(cfg, folder / "pretrain", arm, seed, out), folder / f"sft_{arm}")
        model, _ = ckpt.load_model(folder / f"sft_{arm}", device)
        answers = chat_answers(model, tok, [[{"role": "user", "content": t.prompt}] for t in tasks], cfg.max_new_tokens)
        result[arm] = score(tasks, answers)
        write_answers(folder / f"answers_{arm}.jsonl", tasks, answers)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    done.write_text(json.dumps(result, indent=1))
    zs = result["zero_shot"]
    log(f"  {size} seed {seed}: direct {result['direct']['exact_match']:.3f}, worked {result['worked']['exact_match']:.3f} "
        f"(steps check {result['worked']['steps_valid']:.3f}); base zero-shot {zs['plain']['exact_match']:.3f}, "
        f"step by step {zs['step_by_step']['exact_match']:.3f} ({result['wall_s']:.0f} s)")
    return result


def summarize(results: list[dict], cfg: CotConfig) -> dict:
    """sizes.<preset>.{direct, worked, gap, worked_steps_valid, zero_shot.{plain, step_by_step, gap,
    plain_worked}}: each per seed, their mean and its SE (paired for the gaps: both arms share a base)."""
    sizes = {}
    for size in cfg.sizes:
        rs = [r for r in results if r["size"] == size]

        def arm(get) -> dict:
            m, se = mean_se([get(r) for r in rs])
            return {"per_seed": {str(r["seed"]): get(r) for r in rs}, "mean": round(m, 4), "se": round(se, 4)}

        sizes[size] = {"params": rs[0]["params"],
                       "direct": arm(lambda r: r["direct"]["exact_match"]),
                       "worked": arm(lambda r: r["worked"]["exact_match"]),
                       "gap": arm(lambda r: round(r["worked"]["exact_match"] - r["direct"]["exact_match"], 4)),
                       "worked_steps_valid": arm(lambda r: r["worked"]["steps_valid"]),
                       "zero_shot": {"plain": arm(lambda r: r["zero_shot"]["plain"]["exact_match"]),
                                     "step_by_step": arm(lambda r: r["zero_shot"]["step_by_step"]["exact_match"]),
                                     "gap": arm(lambda r: round(r["zero_shot"]["step_by_step"]["exact_match"]
                                                                - r["zero_shot"]["plain"]["exact_match"], 4)),
                                     # "Answer:" alone leaves the choice to the model: how often it works the steps anyway
                                     "plain_worked": arm(lambda r: r["zero_shot"]["plain"]["worked"])}}
    return sizes


def run(cfg: CotConfig, overwrite: bool = False, log=print) -> dict:
    """Every size and seed's runs, then the comparison; returns the summary `--json` prints."""
    t0 = time.perf_counter()
    single_process("cot")
    cfg.validate()
    out = Path(cfg.out)
    if overwrite and out.exists():
        for done in [*out.glob(f"*/seed*/*/{SUMMARY}"), *out.glob("*/seed*/result.json")]:
            done.unlink()
    device = setup_runtime(cfg.device).device  # where the models answer (each run picks its own the same way)
    tok = prepare(cfg, out)
    save_config(cfg, out / "config.yaml")
    tasks = held_out(cfg)
    log(f"cot: sizes {', '.join(cfg.sizes)}, seeds {', '.join(map(str, cfg.seeds))}; {len(tasks)} held-out "
        f"multi-step questions; runs under {out}")
    results = []
    metrics = MetricsLog(out / "metrics.jsonl")  # a record per size and seed, as each finishes (or is read back)
    for size in cfg.sizes:
        for seed in cfg.seeds:
            results.append(one_seed(cfg, size, seed, out, tok, tasks, device, log))
            metrics.write({"size": size, "seed": seed, **{k: results[-1][k] for k in ("direct", "worked", "zero_shot")}})
    result = {"out": str(out), "test_questions": len(tasks), "sizes": summarize(results, cfg)}
    plot(result["sizes"], out / "cot.png")
    result["figures"] = [str(out / "cot.png")]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "cot.json").write_text(json.dumps(result, indent=1))
    return result


def plot(sizes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "SFT", (("direct", "direct answers"), ("worked", "worked answers"))),
              (axes[1], "base model, zero-shot", (("plain", '"Answer:"'), ("step_by_step", f'"Answer: {TRIGGER}"'))))
    for ax, title, arms in panels:
        for i, (key, label) in enumerate(arms):
            for j, (size, s) in enumerate(sizes.items()):
                a = s[key] if title == "SFT" else s["zero_shot"][key]
                x = j + (i - 0.5) * 0.35
                ax.bar(x, a["mean"], 0.35, color=f"C{i}", alpha=0.6, label=label if j == 0 else None)
                ax.plot([x] * len(a["per_seed"]), list(a["per_seed"].values()), "k.", ms=4)
        ax.set_xticks(range(len(sizes)), [f"{k}\n{v['params'] / 1e6:.1f}M" if v["params"] else k for k, v in sizes.items()])
        ax.set(ylim=(0, 1.2), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], ylabel="held-out exact match", title=title)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_result(r: dict) -> str:
    lines = []
    for size, s in r["sizes"].items():
        lines.append(f"{size}: direct {s['direct']['mean']:.3f}, worked {s['worked']['mean']:.3f}, gap "
                     f"{s['gap']['mean']:+.3f} +- {s['gap']['se']:.3f} (seeds: "
                     + ", ".join(f"{v:+.3f}" for v in s["gap"]["per_seed"].values())
                     + f"); zero-shot {s['zero_shot']['plain']['mean']:.3f} -> step by step "
                     f"{s['zero_shot']['step_by_step']['mean']:.3f}")
    return "\n".join(lines)
