"""Seq2seq finetuning: teach a pretrained encoder-decoder (T5) to map inputs to targets.

    pairs: JSONL lines {"input": str, "target": str}, or a task of the built-in world
           (world:strings/reverse: input 'Spell "apple" backwards.', target "elppa")
      -> encoder input = input ids + <|eos|>; labels = target ids + <|eos|>; the decoder reads the
         labels shifted right behind its start token (teacher forcing)
      -> cross-entropy on every target token, batches padded (inputs masked, labels -100)
      -> run/checkpoint/, metrics.jsonl, loss.png and exact match of greedy outputs on held-out
         inputs: the world task's test split (the words it asks about are never trained on),
         or for files the share held out (`val_fraction`)
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field

import torch

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import corpus, world
from chatfoundry.data.formats import records
from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate_seq2seq
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.models.seq2seq import Seq2SeqLM
from chatfoundry.tokenizer import encode_batch_ids, special_id
from chatfoundry.train import stage
from chatfoundry.train.loop import (Epochs, TrainConfig, accumulation, fit, make_optimizer, resume_step, trainer_state,
                                    wrap)


def _finetune_train() -> TrainConfig:
    # world:strings/reverse --synthetic 20000 --reinit: 1.000 on the test split, 0.990 on 200 unseen
    # random strings, ~5 minutes on 2 CPU cores (README, "Learning to reverse")
    return TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_steps=100, weight_decay=0.0, eval_every=500,
                       eval_batches=4, save_every=1500)


@dataclass
class Seq2SeqEvalConfig:
    max_new_tokens: int = 32  # longest output per held-out input, in tokens
    num_beams: int = 1  # 1: greedy
    batch_size: int = 64  # held-out inputs per generation batch

    def validate(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            require(getattr(self, name) > 0, f"eval.{name}", f"must be > 0, got {getattr(self, name)}")


@dataclass
class FinetuneSeq2SeqConfig(stage.StageConfig):
    init: str = ""  # the pretrained T5 checkpoint (chatfoundry pretrain --objective span, or convert --from_hf)
    data: str = "world:strings/reverse"  # a JSONL file of {"input", "target"}, or world:FAMILY[/KIND]
    out: str = "runs/seq2seq"  # run folder: checkpoint/, config.yaml, metrics.jsonl, loss.png, eval.json
    dtype: str = "fp32"  # fp32 or bf16 (autocast)
    val_fraction: float = 0.1  # JSONL data: share held out for validation loss and exact match
    # world:strings/reverse only: this many extra training pairs that reverse random letter
    # strings in the task's own phrasings. 55 training words teach a tiny model the words, not
    # the algorithm; these teach the algorithm. The held-out words stay unseen either way.
    synthetic: int = 0
    # world:strings/reverse only: exact match also on this many fresh random strings (none
    # trained on), phrased as the test questions: a steadier figure than the test split's 12.
    synthetic_eval: int = 200
    # Take only the tokenizer and the model's shape from `init`, not its weights (fresh, seeded):
    # the baseline that shows what span-corruption pretraining adds.
    reinit: bool = False
    train: TrainConfig = field(default_factory=_finetune_train)
    eval: Seq2SeqEvalConfig = field(default_factory=Seq2SeqEvalConfig)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the pretrained T5 checkpoint to finetune (--init DIR)")
        require(bool(self.data), "data", "give a JSONL file of input/target pairs or world:FAMILY[/KIND]")
        require(self.dtype in ("fp32", "bf16"), "dtype", f"must be fp32 or bf16, got {self.dtype!r}")
        require(0 < self.val_fraction < 0.5, "val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        require(self.synthetic >= 0, "synthetic", f"must be >= 0, got {self.synthetic}")
        require(self.synthetic_eval >= 0, "synthetic_eval", f"must be >= 0, got {self.synthetic_eval}")
        require(not self.synthetic or self.data == "world:strings/reverse", "synthetic",
                "synthetic pairs exist for data world:strings/reverse only")


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Pair:
    input: str
    target: str
    task: world.Task | None = None  # world data: what the verifier checks


def world_pairs(spec: str, split: str, draws: int = 20000, seed: int = 0) -> list[Pair]:
    """Every distinct prompt (all phrasings) of a world task in one split, target its answer.
    `spec` is FAMILY or FAMILY/KIND, e.g. strings/reverse."""
    family, _, kind = spec.partition("/")
    if family not in world.FAMILIES:
        raise UserError(f"data: world family {family!r} is not one of {', '.join(world.FAMILIES)}")
    rng, found = random.Random(f"{seed}:{split}:{spec}"), {}
    for _ in range(draws):  # the world's question space is small: this many draws see all of it
        task = world.SAMPLERS[family](rng)
        if world.split_of(task.group) == split and (not kind or task.kind == kind) and task.answer:
            found.setdefault(task.prompt, Pair(task.prompt, task.answer, task))
    if not found and split == "train":
        raise UserError(f"data: world:{spec} has no questions (is {kind!r} a kind of {family}?)")
    return sorted(found.values(), key=lambda p: p.input)


def synthetic_reverse(train: list[Pair], n: int, seed: int, avoid: set[str] = frozenset(),
                      tag: str = "synthetic") -> list[Pair]:
    """`n` reverse questions about distinct random lowercase strings (3 to 8 letters), phrased as
    the questions in `train` are; none is a word of the world or in `avoid`."""
    rng = random.Random(f"{seed}:{tag}")
    words = {p.task.group.removeprefix("word:") for p in train if p.task} | set(corpus.SPELLING_WORDS) | set(avoid)
    out = []
    while len(out) < n:
        fake = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        if fake in words:
            continue
        words.add(fake)
        template = rng.choice(train)
        word = template.task.group.removeprefix("word:")
        out.append(Pair(template.input.replace(f'"{word}"', f'"{fake}"'), fake[::-1]))
    return out


def reversed_string(pair: Pair) -> str:
    """The string a reverse question asks about (between its quotes)."""
    return pair.input.split('"')[1]


def file_pairs(path: str) -> list[Pair]:
    pairs = []
    for where, obj in records(path):  # a JSONL file or a Hub dataset (hf:ORG/DATASET)
        for key in ("input", "target"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise UserError(f"{where}: field {key!r} must be a non-empty string")
        pairs.append(Pair(obj["input"], obj["target"]))
    if len(pairs) < 2:
        raise UserError(f"{path}: needs at least 2 input/target pairs (some are held out), found {len(pairs)}")
    return pairs


def load_pairs(cfg: FinetuneSeq2SeqConfig) -> tuple[list[Pair], list[Pair], list[Pair], list[Pair], str]:
    """(train, validation, held-out test, held-out random strings (reverse only), description)."""
    if cfg.data.startswith("world:"):
        spec = cfg.data.removeprefix("world:")
        train, test = world_pairs(spec, "train"), world_pairs(spec, "test")
        extra = synthetic_reverse(train, cfg.synthetic, cfg.seed) if cfg.synthetic else []
        fresh = []
        if spec == "strings/reverse" and cfg.synthetic_eval:  # disjoint from the training strings
            fresh = synthetic_reverse(test, cfg.synthetic_eval, cfg.seed, {reversed_string(p) for p in extra},
                                      tag="held-out")
        return (train + extra, world_pairs(spec, "val"), test, fresh,
                f"the world's {spec} task" + (f" (+{len(extra)} synthetic)" if extra else ""))
    pairs = file_pairs(cfg.data)
    random.Random(cfg.seed).shuffle(pairs)
    n_val = max(1, int(len(pairs) * cfg.val_fraction))
    return pairs[n_val:], pairs[:n_val], pairs[:n_val], [], f"{len(pairs)} pairs from {cfg.data}"


def encode_inputs(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encoder inputs: the text's ids and <|eos|>, as span-corruption pretraining shaped them."""
    eos = special_id(tokenizer, "eos")
    return [ids + [eos] for ids in encode_batch_ids(tokenizer, texts)]


def to_rows(pairs: list[Pair], tokenizer, block: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(input ids, label ids) per pair, each cut to `block`; returns the rows and how many were cut."""
    inputs, targets = encode_inputs(tokenizer, [p.input for p in pairs]), encode_inputs(tokenizer, [p.target for p in pairs])
    rows, cut = [], 0
    for x, y in zip(inputs, targets):
        cut += len(x) > block or len(y) > block
        rows.append((x[:block], y[:block]))
    return rows, cut


def pad(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """{"input_ids", "mask", "labels"}: inputs right-padded with 0 (masked), labels with -100."""
    wx, wy = max(len(x) for x, _ in rows), max(len(y) for _, y in rows)
    return {"input_ids": torch.tensor([x + [0] * (wx - len(x)) for x, _ in rows]),
            "mask": torch.tensor([[True] * len(x) + [False] * (wx - len(x)) for x, _ in rows]),
            "labels": torch.tensor([y + [-100] * (wy - len(y)) for _, y in rows])}


def predict(model: Seq2SeqLM, tokenizer, texts: list[str], max_new_tokens: int = 32, num_beams: int = 1,
            batch_size: int = 64) -> list[str]:
    """The model's output for each input text (greedy, or beam search with num_beams > 1)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=special_id(tokenizer, "eos"))
    was_training = model.training
    model.eval()
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids = encode_inputs(tokenizer, texts[start:start + batch_size])
            out += [tokenizer.decode(s, skip_special_tokens=True).strip()
                    for s in generate_seq2seq(model, ids, cfg).sequences]
    model.train(was_training)
    return out


def exact_match(model: Seq2SeqLM, tokenizer, pairs: list[Pair], cfg: Seq2SeqEvalConfig) -> dict:
    """Share of outputs equal to the target (and, for world tasks, judged right by its verifier)."""
    outputs = predict(model, tokenizer, [p.input for p in pairs], cfg.max_new_tokens, cfg.num_beams, cfg.batch_size)
    exact = [o == p.target.strip() for o, p in zip(outputs, pairs)]
    report = {"n": len(pairs), "exact_match": sum(exact) / max(len(pairs), 1),
              "answers": [{"input": p.input, "target": p.target, "output": o, "exact": e}
                          for p, o, e in zip(pairs, outputs, exact)]}
    if pairs and all(p.task for p in pairs):
        report["verifier_correct"] = sum(world.is_correct(p.task, o) for p, o in zip(pairs, outputs)) / len(pairs)
    return report


# ---------------------------------------------------------------- the stage


def run(cfg: FinetuneSeq2SeqConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Finetune as configured; returns the summary that `--json` prints."""
    with stage.start("finetune-seq2seq", cfg, resume, overwrite, log, dtype=cfg.dtype) as r:
        model, tokenizer = ckpt.load_model(ckpt.resolve_checkpoint(r.out) if resume else cfg.init, seq2seq=True)
        if not isinstance(model, Seq2SeqLM):
            raise UserError(f"{cfg.init}: a decoder-only checkpoint; finetune-seq2seq needs an encoder-decoder "
                            "(chatfoundry pretrain --objective span)")
        if special_id(tokenizer, "eos") is None:
            raise UserError(f"{cfg.init}: the tokenizer has no <|eos|> to end inputs and targets")
        if cfg.reinit and not resume:
            torch.manual_seed(cfg.seed)
            model = Seq2SeqLM(model.config)
        return _run(r, model, tokenizer, *load_pairs(cfg))


def _run(r: stage.Run, model, tokenizer, train_pairs, val_pairs, test_pairs, fresh_pairs, source) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    torch.manual_seed(cfg.seed)
    block = model.config.block_size
    rows, cut = to_rows(train_pairs, tokenizer, block)
    val_rows, _ = to_rows(val_pairs, tokenizer, block)
    micro, accum = accumulation(cfg.train, rt)
    order = Epochs(len(rows), cfg.seed)
    model = model.to(rt.device).train()
    optimizer = make_optimizer(model, cfg.train, rt.device)
    start_step = resume_step(out, optimizer, cfg.train, order, resume)
    if rt.is_main:
        r.prepare(("metrics.jsonl", "loss.png", "eval.json"))
        log(f"finetune-seq2seq: {len(rows):,} pairs from {source}" + (f" ({cut} cut to {block} tokens)" if cut else "")
            + f"; {len(val_rows):,} for validation, {len(test_pairs):,} held out; batch {cfg.train.batch_size} = "
            f"{micro} x {accum} steps x {rt.world} processes; device {rt.device}")
    metrics = r.metrics(start_step)
    train_model = wrap(model, rt, False)

    def micro_batches():
        batch = pad([rows[order.next()] for _ in range(cfg.train.batch_size)])
        mine = {k: v[rt.rank * micro * accum:(rt.rank + 1) * micro * accum] for k, v in batch.items()}
        return [{k: v[i * micro:(i + 1) * micro].to(rt.device) for k, v in mine.items()} for i in range(accum)]

    def loss_fn(m, batch):
        return m(batch["input_ids"], labels=batch["labels"], mask=batch["mask"])[1]

    @torch.no_grad()
    def evaluate(step: int):
        losses = [loss_fn(model, {k: v.to(rt.device) for k, v in pad(val_rows[i:i + micro]).items()}).item()
                  for i in range(0, min(len(val_rows), micro * cfg.train.eval_batches), micro)]
        if not losses:
            return {}
        val = sum(losses) / len(losses)
        scores = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        if rt.is_main:
            scores["val_exact_match"] = exact_match(model, tokenizer, val_pairs, cfg.eval)["exact_match"]
        return scores

    def save(step: int):
        if rt.is_main:
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, model, tokenizer,
                                 trainer_state(step, optimizer, order=order.state()))
        rt.barrier()

    tokens_per_step = cfg.train.batch_size * sum(len(x) + len(y) for x, y in rows) // max(len(rows), 1)
    train_start = time.perf_counter()
    last = fit(train_model, optimizer, rt, cfg.train, micro_batches=micro_batches, loss_fn=loss_fn, evaluate=evaluate,
               save=save, log=metrics, tokens_per_step=tokens_per_step, start_step=start_step, desc="finetune-seq2seq")
    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "steps": cfg.train.steps,
               "pairs": len(rows), "train_loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "train_s": round(time.perf_counter() - train_start, 2)}
    if rt.is_main:
        plot_curves(read_metrics(out / "metrics.jsonl"), out / "loss.png",
                    {"loss": "train loss", "val_loss": "validation loss", "val_exact_match": "validation exact match"},
                    title="seq2seq finetuning", ylabel="cross-entropy (nats/token); exact match")
        report = exact_match(model, tokenizer, test_pairs, cfg.eval)
        summary.update({k: v for k, v in report.items() if k != "answers"})
        summary["held_out"] = "test split" if cfg.data.startswith("world:") else f"{cfg.val_fraction:g} of the pairs"
        log(f"held-out exact match: {report['exact_match']:.3f} on {report['n']} inputs"
            + (f" (verifier: {report['verifier_correct']:.3f})" if "verifier_correct" in report else ""))
        if fresh_pairs:
            fresh = exact_match(model, tokenizer, fresh_pairs, cfg.eval)
            report["random_strings"] = fresh
            summary["random_strings_exact_match"], summary["random_strings_n"] = fresh["exact_match"], fresh["n"]
            log(f"held-out random strings exact match: {fresh['exact_match']:.3f} on {fresh['n']} inputs")
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        for a in report["answers"][:5]:
            log(f"  {a['input']!r} -> {a['output']!r} (target {a['target']!r})")
    summary["wall_s"] = r.wall_s()
    return summary
