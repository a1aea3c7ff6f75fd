"""Stage 2, supervised finetuning (SFT): teach a pretrained model to answer as an assistant.

    conversations: the task world's train split, or JSONL files in any SFT format
      -> chat template, token ids and the mask of tokens to learn: each assistant reply and the
         <|end|> that closes it (so the model learns to stop); system and user turns are context
      -> batches, right-padded (or packed: several conversations per row, attention kept
         inside each, positions restarting)
      -> cross-entropy on the learned tokens only, averaged over all learned tokens of a step
      -> run/checkpoint/ (generation stops at <|end|>), metrics.jsonl, loss.png and, on the world,
         exact match and gold reward per family on its held-out test split (eval.json, eval.png)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from chatfoundry import adapters, checkpoint as ckpt
from chatfoundry.adapters import LoraConfig, PromptConfig
from chatfoundry.config import require
from chatfoundry.data import builtin, world
from chatfoundry.data.formats import Example, load_sft
from chatfoundry.errors import UserError
from chatfoundry.eval.world import evaluate_world, format_report, write_report
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.tokenizer import SPECIAL_TOKENS, chat_stop_ids, encode_batch_ids, special_id
from chatfoundry.train import stage
from chatfoundry.train.loop import (Epochs, TrainConfig, accumulation, fit, make_optimizer, restore, save_shards, shard,
                                    sharded, trainer_state, wrap)


@dataclass
class SFTDataConfig:
    files: list[str] = field(default_factory=list)  # JSONL files (any SFT format) or hf:ORG/DATASET[:split]; empty: the task world
    conversations: int = 8000  # world conversations drawn from its train split
    # World: who writes the demonstrations, as writer:weight (data/world.py WRITERS: careful,
    # terse, chatty, brusque, guesser, sloppy). careful:1 is the world of perfect demonstrations.
    crowd: list[str] = field(default_factory=lambda: [f"{w}:{x:g}" for w, x in world.CROWD.items()])
    system_prob: float = 0.3  # world: share of conversations that open with a system message
    multi_turn_prob: float = 0.2  # world: share with two or three exchanges
    # World: conversations with the calculator on offer (tools.py). 5,000 rather than 2,500:
    # with the crowd's styles a 1M model copied the calculator's result right 3% of the time on
    # 2,500, 48% on 5,000 (docs/log.md).
    tool_conversations: int = 5000
    val_fraction: float = 0.05  # user files: share held out for validation loss (the world has a val split)
    # Pack conversations into full rows of the context (each attends only to itself) instead of
    # padding each to the batch's longest, which left 55% of the default's tokens pad. None: packed,
    # except for prompt tuning (a soft prompt goes before each conversation). Packed, train.batch_size
    # counts rows: 16 rows of 128 tokens hold about 34 of the world's conversations.
    packing: bool | None = None
    # The share of training examples that are documents of the built-in corpus (plain text, every
    # token learned), as InstructGPT's PPO-ptx mixes pretraining into RL. Without it SFT teaches
    # the model to answer only about what SFT showed it: held-out facts 0.11 -> 0.80 (README).
    # None: 0.5 on the world, 0 on files (the corpus is the world's; a file's model may not know it).
    pretrain_mix: float | None = None

    def validate(self) -> None:
        require(self.conversations > 0, "data.conversations", f"must be > 0, got {self.conversations}")
        try:
            world.parse_crowd(self.crowd)
        except ValueError as e:
            raise UserError(f"data.crowd: {e}") from None
        require(self.tool_conversations >= 0, "data.tool_conversations", f"must be >= 0, got {self.tool_conversations}")
        for name in ("system_prob", "multi_turn_prob"):
            require(0 <= getattr(self, name) <= 1, f"data.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        require(0 < self.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        require(self.pretrain_mix is None or 0 <= self.pretrain_mix < 1, "data.pretrain_mix",
                f"must be in [0, 1), or none; got {self.pretrain_mix}")


@dataclass
class EvalConfig:
    per_family: int = 100  # world test questions per family scored at the end; 0: skip
    max_new_tokens: int = 48  # longest reply to a test question, in tokens
    batch_size: int = 64  # test questions answered (greedily) per generation batch

    def validate(self) -> None:
        require(self.per_family >= 0, "eval.per_family", f"must be >= 0, got {self.per_family}")
        require(self.max_new_tokens > 0, "eval.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        require(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")


def _sft_train() -> TrainConfig:
    # 500 steps of 16 packed rows: the validation loss of 400 padded steps of 32 (0.239 against
    # 0.241), in two thirds of the time; 400 packed steps fell short (0.250).
    return TrainConfig(steps=500, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=100, eval_batches=4,
                       save_every=500)


@dataclass
class SFTConfig(stage.StageConfig):
    init: str = ""  # the pretrained checkpoint (or run folder) to start from, or a Hub model hf:ORG/NAME[@REVISION]
    out: str = "runs/sft"  # run folder: checkpoint/, config.yaml, metrics.jsonl, loss.png, eval.json, eval.png
    dtype: str = "fp32"  # fp32 or bf16 (autocast)
    compile: bool = False  # torch.compile the model
    # Under torchrun: ddp keeps a whole copy of the model and AdamW on every process; fsdp (FSDP2)
    # shards the weights, gradients and AdamW's moments across the processes
    dist: Literal["ddp", "fsdp"] = "ddp"
    # lora: train low-rank adapters beside the attention and MLP projections and the output layer;
    # prompt: train a soft prompt, virtual tokens' embeddings before every conversation (prompt
    # tuning: raise train.lr, e.g. 3e-2). The base is frozen either way, and the checkpoint is the
    # adapter alone, in peft's format, naming init as its base.
    peft: Literal["none", "lora", "prompt"] = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    merge: bool = False  # with --peft lora: also write the base with the adapter folded in, a plain checkpoint in OUT/merged
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=_sft_train)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def packed(self) -> bool:
        return self.data.packing if self.data.packing is not None else self.peft != "prompt"

    def validate(self) -> None:
        require(bool(self.init), "init", "give the pretrained checkpoint to finetune (--init DIR)")
        require(self.dtype in ("fp32", "bf16"), "dtype", f"must be fp32 or bf16, got {self.dtype!r}")
        require(self.peft == "none" or self.dist == "ddp", "peft", f"{self.peft} under --dist fsdp is not supported yet")
        self.data.packing = self.packed  # resolved, as the run's config.yaml shows it
        require(self.peft != "prompt" or not self.data.packing, "data.packing",
                "a soft prompt goes before each conversation: prompt tuning trains on padded batches")
        require(not self.merge or self.peft == "lora", "merge", "merges a LoRA adapter: give --peft lora")


# ---------------------------------------------------------------- tokens and the loss mask


def encode(examples: list[Example], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Per example: token ids and, per token, whether the model learns to produce it.

    Each message is `<|role|>` + content + `<|end|>`; special tokens split the text before the
    tokenizer merges anything, so encoding piece by piece equals encoding the whole conversation.
    Plain-text examples are learned whole and end with <|eos|>.
    """
    role_ids = {role: special_id(tokenizer, role) for role in ("system", "user", "assistant", "tool")}
    end, eos = special_id(tokenizer, "end"), special_id(tokenizer, "eos")
    used = {m["role"] for ex in examples for m in ex.messages}
    needed = {**{r: i for r, i in role_ids.items() if r in used}, "end": end, "eos": eos}
    missing = [SPECIAL_TOKENS[k] for k, v in needed.items() if v is None]
    if missing:
        raise UserError(f"tokenizer: lacks the chat tokens {', '.join(missing)}; SFT needs the chatfoundry chat format")
    texts, roles = [], []
    for ex in examples:
        texts += [ex.text] if ex.text is not None else [m["content"] for m in ex.messages]
        roles += [None] if ex.text is not None else [m["role"] for m in ex.messages]
    # one parallel call for all texts; content is text (an assistant's <|tool|> opens a call)
    encoded = iter(encode_batch_ids(tokenizer, texts, roles))
    out = []
    for ex in examples:
        if ex.text is not None:
            ids = next(encoded) + [eos]
            out.append((ids, [True] * len(ids)))
            continue
        ids, learn = [], []
        for message in ex.messages:
            content, reply = next(encoded), message["role"] == "assistant"
            ids += [role_ids[message["role"]], *content, end]
            learn += [False] + [reply] * (len(content) + 1)
        out.append((ids, learn))
    return out


def to_rows(encoded: list[tuple[list[int], list[bool]]], block: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(inputs, targets) per example, cut to the context; targets are -100 where nothing is learned.
    Returns the rows that still learn something and how many examples were cut."""
    rows, cut = [], 0
    for ids, learn in encoded:
        if len(ids) > block + 1:
            ids, learn, cut = ids[:block + 1], learn[:block + 1], cut + 1
        targets = [t if keep else -100 for t, keep in zip(ids[1:], learn[1:])]
        if any(t != -100 for t in targets):
            rows.append((ids[:-1], targets))
    return rows, cut


def pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"idx", "targets"}: the rows right-padded to the longest (targets with -100)."""
    width = max(len(x) for x, _ in rows)
    return {"idx": torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in rows]),
            "targets": torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])}


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the learned tokens (targets -100 are skipped)."""
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="sum")


class Batches:
    """Shuffled epochs over the rows; each step takes `batch_size` sequences (padded) or rows of
    `block` tokens holding several packed sequences (first fit, in order). State is (epoch,
    position): resume is exact."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, block: int, pad_id: int,
                 seed: int, packing: bool):
        self.rows, self.batch_size, self.block, self.pad_id = rows, batch_size, block, pad_id
        self.packing = packing
        self.order = Epochs(len(rows), seed)

    def _next_row(self) -> tuple[list[int], list[int]]:
        return self.rows[self.order.next()]

    def state(self) -> dict:
        return self.order.state()

    def set_state(self, state: dict) -> None:
        self.order.set_state(state)

    def next(self) -> dict[str, torch.Tensor]:
        """{"idx", "targets"} (and "segments" when packing) for one optimizer step: (batch_size, T)."""
        if not self.packing:
            return pad([self._next_row() for _ in range(self.batch_size)], self.pad_id)
        idx = torch.full((self.batch_size, self.block), self.pad_id)
        tgt = torch.full((self.batch_size, self.block), -100)
        seg = torch.zeros((self.batch_size, self.block), dtype=torch.long)
        used, count = [0] * self.batch_size, [0] * self.batch_size
        # First fit, in the epoch's order: each sequence goes into the first row with room for it, and
        # the step ends at the first that fits in none (it opens the next step). Filling one row at a
        # time left 29% of the default's rows empty; first fit leaves 10%, at the same compute.
        while True:
            x, y = self.rows[self.order.peek()]
            r = next((i for i, u in enumerate(used) if u + len(x) <= self.block), None)
            if r is None:
                break
            self._next_row()
            u = used[r]
            idx[r, u:u + len(x)], tgt[r, u:u + len(y)] = torch.tensor(x), torch.tensor(y)
            seg[r, u:u + len(x)] = count[r]
            used[r], count[r] = u + len(x), count[r] + 1
        for r in range(self.batch_size):
            seg[r, used[r]:] = count[r]  # padding: a segment of its own that no real token sees
        return {"idx": idx, "targets": tgt, "segments": seg}


# ---------------------------------------------------------------- the stage


def world_demonstrations(cfg: SFTConfig, split: str, n: int, with_tools: int,
                         crowd: dict[str, float]) -> list[world.Demonstration]:
    """The world's conversations for a split, as the crowd wrote them, with the calculator's after them."""
    return (world.demonstrations(split, n, cfg.seed, cfg.data.system_prob, cfg.data.multi_turn_prob, crowd)
            + world.tool_demonstrations(split, with_tools, cfg.seed, cfg.data.system_prob, crowd=crowd))


def _examples(cfg: SFTConfig) -> tuple[list[Example], list[Example], str, dict | None]:
    """(train, validation, source description, the world's demonstrations' worth: `world.crowd_report`)."""
    def mix(train: list[Example], share: float) -> list[Example]:
        n = round(len(train) * share / (1 - share))
        docs = builtin.generate_documents(cfg.seed + 1)
        return train + [Example(text=next(docs)) for _ in range(n)]

    if cfg.data.files:
        examples = load_sft(cfg.data.files)
        random.Random(cfg.seed).shuffle(examples)
        n_val = max(1, int(len(examples) * cfg.data.val_fraction)) if len(examples) > 1 else 0
        train, source = examples[n_val:], f"{len(examples)} examples from {', '.join(map(str, cfg.data.files))}"
        if cfg.data.pretrain_mix:
            train, source = mix(train, cfg.data.pretrain_mix), source + " and the built-in corpus"
        return train, examples[:n_val], source, None

    crowd = world.parse_crowd(cfg.data.crowd)

    reports = {}

    def world_examples(split: str, n: int, with_tools: int) -> list[Example]:
        demos = world_demonstrations(cfg, split, n, with_tools, crowd)
        reports[split] = world.crowd_report(demos)
        convs = [d.messages for d in demos]
        random.Random(f"{cfg.seed}:{split}").shuffle(convs)
        return [Example(messages=tuple(m)) for m in convs]

    train = world_examples("train", cfg.data.conversations, cfg.data.tool_conversations)
    share = 0.5 if cfg.data.pretrain_mix is None else cfg.data.pretrain_mix
    if share:
        train = mix(train, share)
    val = world_examples("val", max(64, cfg.data.conversations // 20), cfg.data.tool_conversations // 20)
    return train, val, "the task world's crowd (" + ", ".join(cfg.data.crowd) + ")", reports["train"]


def run(cfg: SFTConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Finetune as configured; returns the summary that `--json` prints."""
    with stage.start("sft", cfg, resume, overwrite, log, dtype=cfg.dtype) as r:
        base = None  # the checkpoint an adapter run trains on and names
        if cfg.peft != "none":
            spec = cfg.lora if cfg.peft == "lora" else cfg.prompt
            model, tokenizer, base = ckpt.load_adapted(cfg.init, r.out, resume, spec, cfg.seed)
        else:
            model, tokenizer = ckpt.load_model(ckpt.resolve_checkpoint(r.out) if resume else cfg.init)
        return _run(r, model, tokenizer, base, *_examples(cfg))


def _run(r: stage.Run, model, tokenizer, adapter_of, train_examples, val_examples, source, data) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    torch.manual_seed(cfg.seed)
    block = cfg.train.block_size or model.config.block_size
    require(block <= model.config.block_size, "train.block_size",
            f"{block} exceeds the model's context {model.config.block_size}")
    rows, cut = to_rows(encode(train_examples, tokenizer), block)
    val_rows, _ = to_rows(encode(val_examples, tokenizer), block)
    if not rows:
        raise UserError("data: no example has an assistant token left to learn within the context")
    micro, accum = accumulation(cfg.train, rt)
    pad_id = special_id(tokenizer, "pad") or 0
    batches = Batches(rows, cfg.train.batch_size, block, pad_id, cfg.seed, cfg.packed)
    model = shard(model.to(rt.device).train(), rt, cfg.dist)
    optimizer = make_optimizer(model, cfg.train, rt.device)
    start_step = 0
    if resume:
        state = restore(out, optimizer, cfg.train, model)
        batches.set_state(state["batches"])
        start_step = int(state["step"])

    if rt.is_main:
        r.prepare(("metrics.jsonl", "loss.png", "eval.json", "eval.png", "merged"))
        learned = sum(sum(t != -100 for t in y) for _, y in rows)
        log(f"sft: {len(rows):,} conversations from {source} ({learned:,} tokens to learn"
            + (f", {cut} cut to the context of {block}" if cut else "") + f"); {len(val_rows):,} for validation; "
            f"batch {cfg.train.batch_size} ({'packed rows' if cfg.packed else 'padded'}) = {micro} x {accum} steps "
            f"x {rt.world} processes{' (FSDP)' if sharded(model) else ''}; device {rt.device}")
        if adapters.is_adapted(model):
            log(f"sft: {adapters.describe(model)}")
        if data:
            log(f"sft: the demonstrations' gold reward {data['gold_reward']:.3f} ("
                + ", ".join(f"{w} {d['share']:.0%}: {d['gold_reward']:.3f}" for w, d in data["writers"].items()) + ")")
    metrics = r.metrics(start_step)

    train_model = wrap(model, rt, cfg.compile)

    def micro_batches():
        batch = batches.next()
        # The loss is a sum over learned tokens divided by the step's total, so every learned
        # token weighs the same whatever micro-batch or process it falls in.
        per_process = (batch["targets"] != -100).sum().item() / rt.world
        mine = {k: v[rt.rank * micro * accum:(rt.rank + 1) * micro * accum] for k, v in batch.items()}
        return [({k: v[i * micro:(i + 1) * micro].to(rt.device, non_blocking=True) for k, v in mine.items()},
                 per_process / accum) for i in range(accum)]

    def loss_fn(m, item):
        batch, norm = item
        logits, _ = m(batch["idx"], segments=batch.get("segments"))
        return summed_loss(logits, batch["targets"]) / max(norm, 1.0)

    @torch.no_grad()
    def evaluate(step: int):
        total, count = 0.0, 0
        for start in range(0, min(len(val_rows), micro * cfg.train.eval_batches), micro):
            batch = {k: v.to(rt.device) for k, v in pad(val_rows[start:start + micro], pad_id).items()}
            total += summed_loss(model(batch["idx"])[0], batch["targets"]).item()
            count += int((batch["targets"] != -100).sum())
        val = total / max(count, 1)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def save(step: int):
        shards = save_shards(out, model, optimizer, rt)
        if rt.is_main:
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, model, tokenizer,
                                 trainer_state(step, optimizer, batches=batches.state()),
                                 generation={"eos_token_id": chat_stop_ids(tokenizer)}, weights=shards.weights,
                                 shards=shards.folder, adapter_of=adapter_of)
        rt.barrier()

    sample = rows[:1000]  # the mean padded-batch size, for the tokens/s figure
    tokens_per_step = sum(len(x) for x, _ in sample) * cfg.train.batch_size // len(sample)
    train_start = time.perf_counter()
    last = fit(train_model, optimizer, rt, cfg.train, micro_batches=micro_batches, loss_fn=loss_fn,
               evaluate=evaluate if val_rows else (lambda step: {}), save=save, log=metrics,
               tokens_per_step=block * cfg.train.batch_size if cfg.packed else tokens_per_step,
               start_step=start_step, desc="sft")
    train_s = time.perf_counter() - train_start

    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "steps": cfg.train.steps,
               "examples": len(rows), "train_loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "train_s": round(train_s, 2)}
    if adapter_of is not None:
        summary.update(ckpt.adapter_outputs(out, model, tokenizer, cfg.merge and rt.is_main))
    if data:
        summary["data"] = data  # what the demonstrations are worth, by the gold reward SFT never sees
    if rt.is_main:
        if sharded(model):  # the whole model, as saved, answers the test questions
            model = ckpt.load_model(out, rt.device)[0]
        plot_curves(read_metrics(out / "metrics.jsonl"), out / "loss.png",
                    {"loss": "train loss", "val_loss": "validation loss"}, title="SFT (assistant tokens only)",
                    ylabel="cross-entropy (nats/token)")
        if cfg.eval.per_family:
            report = evaluate_world(model, tokenizer, "test", cfg.eval.per_family, seed=0,
                                    max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                    tool_questions=cfg.eval.per_family if cfg.data.tool_conversations else 0)
            write_report(report, out, "SFT model on the world's test split")
            summary["families"] = report["families"]
            if "tool_use" in report:
                summary["tool_use"] = {k: v for k, v in report["tool_use"].items() if k != "answers"}
            log(format_report(report))
    summary["wall_s"] = r.wall_s()
    return summary
