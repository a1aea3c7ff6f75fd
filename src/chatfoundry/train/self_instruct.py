"""Self-Instruct (Wang et al. 2022) as Alpaca made it: a teacher writes new instructions and their
answers, filters keep the good ones, and a smaller student is SFT-ed on what is left.

    seed instructions: a few of the world's train-split questions (`--seed_tasks world`), or a JSONL
      file of them (Alpaca's seed_tasks.jsonl {"instruction", ...}, or {"prompt": ...} lines)
      -> each round, `batch_size` writing prompts: `shots` instructions as a plain document,
         "Question: ...\\n" each, ending "Question:"; up to `machine_shots` of them are instructions
         already kept, the rest seeds (Self-Instruct's 6 + 2), so the pool grows from itself
      -> the writer continues each prompt, sampled, to the end of its line: one new instruction
      -> instruction filters: malformed (empty, line never ended, too long); with the world as the
         seed source, a world question of its val or test split (the student is scored on those:
         decontamination) and, under `--unverifiable drop`, one the world cannot read back
         (world.parse); a near-duplicate: ROUGE-L F above `rouge` against any seed or instruction
         kept so far (Self-Instruct's 0.7)
      -> the teacher answers each in its chat template, greedily (its best answer, as `chat` gives it)
      -> answer filters: malformed (empty, never ended within `max_answer_tokens`, over `max_words`,
         repeats the instruction); the world's verifier, where it reads the instruction: a wrong
         answer is dropped (the gold check of content; the teacher's style is kept as it is)
      -> out/data.jsonl in Alpaca's format, {"instruction", "input": "", "output"} (`sft --data`
         reads it), metrics.jsonl (per round), self_instruct.png (where the instructions went)

Why the writer prompt is a plain "Question:" list and not a request to the chat model: a 1M chat
model has never been asked to write an instruction and answers the examples instead, and a
"Task 1: ... Task 8:" list (Self-Instruct's) is not a form its corpus has, so it answers the last
task. "Question: ..." lines are the pretraining corpus' quiz form, and a base model, and a chat
model read as a plain language model, both continue them with a new question (docs/self_instruct.md
measures how many parse). So one checkpoint can do both jobs, as GPT-3 did for Self-Instruct:
`--teacher` answers and, unless `--writer` names another model, writes too.

The report, in the `--json` summary: the teacher's generated tokens and the CPU-seconds they cost
(Alpaca's "$600"), how many instructions each filter dropped, and the kept data's diversity:
distinct-1/2 of the instructions, their mean pairwise ROUGE-L, and each world family's share.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import world
from chatfoundry.data.formats import parse_prompt, read_jsonl, write_jsonl
from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate_batch
from chatfoundry.metrics import plot_bars
from chatfoundry.tokenizer import chat_stop_ids, encode_batch_ids, encode_chat, special_id
from chatfoundry.train import stage

# Where an instruction can end, in the order the filters run (README of the report).
FILTERS = ("malformed_instruction", "held_out", "unverifiable", "near_duplicate", "malformed_answer", "verifier")


@dataclass
class SelfInstructConfig(stage.StageConfig):
    teacher: str = ""  # the chat checkpoint (or run folder) that answers the instructions, and writes them unless --writer
    writer: str = ""  # the model that writes new instructions, read as a plain LM (a base model works too); empty: the teacher
    out: str = "runs/self-instruct"  # output folder: data.jsonl (Alpaca), config.yaml, metrics.jsonl, self_instruct.png
    seed_tasks: str = "world"  # world (instructions from its train split) or a JSONL file: {"instruction"} or {"prompt"} lines
    seeds: int = 25  # world: seed instructions, as many from each family
    n: int = 1000  # instructions to keep
    max_written: int = 0  # stop after writing this many instructions even if fewer than n survive (0: 20 * n)
    shots: int = 6  # instructions shown in each writing prompt (fewer where the writer's context is short)
    machine_shots: int = 2  # of them, at most this many from the instructions already kept (Self-Instruct: 2 of 8)
    temperature: float = 1.0  # the writer's sampling temperature (the answers are greedy)
    max_instruction_tokens: int = 32  # longest instruction written, in tokens; one not ended by then is malformed
    max_answer_tokens: int = 48  # longest answer, in tokens; one not ended by then is malformed
    max_words: int = 40  # an instruction or answer longer than this many words is malformed
    rouge: float = 0.7  # drop an instruction whose ROUGE-L F with a seed or kept one is above this (1: exact copies only)
    # A generated instruction the world cannot read back (with the world as the seed source): drop
    # (only verified data is kept) or keep it unverified, as Self-Instruct keeps everything
    unverifiable: Literal["drop", "keep"] = "drop"
    batch_size: int = 64  # writing prompts per round; answers per forward pass

    def validate(self) -> None:
        require(bool(self.teacher), "teacher", "give the chat checkpoint that answers (--teacher DIR)")
        require(bool(self.seed_tasks), "seed_tasks", "give world or a JSONL file of seed instructions")
        require(self.seeds > 0, "seeds", f"must be > 0, got {self.seeds}")
        require(self.n > 0, "n", f"must be > 0, got {self.n}")
        require(self.max_written >= 0, "max_written", f"must be >= 0, got {self.max_written}")
        require(self.shots >= 1, "shots", f"must be >= 1, got {self.shots}")
        require(0 <= self.machine_shots < self.shots, "machine_shots", f"must be in [0, shots), got {self.machine_shots}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        for name in ("max_instruction_tokens", "max_answer_tokens", "max_words", "batch_size"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(0 < self.rouge <= 1, "rouge", f"must be in (0, 1], got {self.rouge}")


# ---------------------------------------------------------------- ROUGE-L and diversity


def words(text: str) -> list[str]:
    """ROUGE's tokens: lowercase runs of letters and digits (as rouge_score, without stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists: the longest common subsequence's length L,
    precision L/len(b), recall L/len(a), F = 2PR / (P + R) = 2L / (len(a) + len(b))."""
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)  # LCS by dynamic programming, one row at a time
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return 2 * row[-1] / (len(a) + len(b))


def near_duplicate(candidate: list[str], pool: list[list[str]], threshold: float) -> bool:
    """Whether `candidate` copies anything in `pool` or has a ROUGE-L F above `threshold` with it.
    2 min / sum of the two lengths bounds F, so most pairs are skipped without computing their LCS."""
    n = len(candidate)
    return any(p == candidate or (2 * min(n, len(p)) / (n + len(p)) > threshold and rouge_l(candidate, p) > threshold)
               for p in pool)


def diversity(instructions: list[str], seed: int, sample: int = 400) -> dict:
    """distinct-1/2 (unique n-grams over all n-grams of the instructions), the mean ROUGE-L F over
    pairs (of at most `sample` instructions drawn at random), and each world family's share."""
    toks = [words(i) for i in instructions]
    out = {}
    for n in (1, 2):
        grams = [tuple(t[i:i + n]) for t in toks for i in range(len(t) - n + 1)]
        out[f"distinct_{n}"] = round(len(set(grams)) / max(len(grams), 1), 4)
    some = random.Random(seed).sample(toks, min(sample, len(toks)))
    pairs = [rouge_l(a, b) for i, a in enumerate(some) for b in some[i + 1:]]
    out["mean_pairwise_rouge_l"] = round(sum(pairs) / max(len(pairs), 1), 4)
    families = [t.family if (t := world.parse(i)) else "not_a_world_question" for i in instructions]
    out["families"] = {f: round(families.count(f) / max(len(families), 1), 4)
                       for f in (*world.FAMILIES, "not_a_world_question") if f in families}
    return out


# ---------------------------------------------------------------- the filters


def instruction_verdict(instruction: str, ended: bool, task: world.Task | None, pool: list[list[str]],
                        cfg: SelfInstructConfig) -> str | None:
    """The filter that drops a written instruction (one of FILTERS), or None: answer it. `task` is
    the world's reading of it (world.parse), with the world as the seed source; `pool` the ROUGE
    tokens of the seeds and of the instructions kept so far."""
    if not instruction or not ended or len(instruction.split()) > cfg.max_words:
        return "malformed_instruction"
    if task is not None and world.split_of(task.group) != "train":
        return "held_out"  # a question the student is scored on, or of the split kept for choosing
    if cfg.seed_tasks == "world" and task is None and cfg.unverifiable == "drop":
        return "unverifiable"
    if near_duplicate(words(instruction), pool, cfg.rouge):
        return "near_duplicate"
    return None


def answer_verdict(instruction: str, answer: str, ended: bool, task: world.Task | None, max_words: int) -> str | None:
    """The filter that drops the teacher's answer (one of FILTERS), or None: keep the pair. Where the
    world reads the instruction (`task`), its verifier checks the answer's content."""
    if not answer or not ended or len(answer.split()) > max_words or _repeats(instruction, answer):
        return "malformed_answer"
    if task is not None and not world.score(task, answer).correct:
        return "verifier"
    return None


def _repeats(instruction: str, answer: str) -> bool:
    """The answer restates the instruction (whole) rather than answering it."""
    return f" {' '.join(words(instruction))} " in f" {' '.join(words(answer))} "


# ---------------------------------------------------------------- seeds


def seed_instructions(cfg: SelfInstructConfig) -> list[str]:
    """The world's train-split questions, `seeds` of them spread over the families, or a file's lines."""
    if cfg.seed_tasks == "world":
        per = -(-cfg.seeds // len(world.FAMILIES))
        return [t.prompt for f in world.FAMILIES for t in world.tasks("train", f, per, cfg.seed)][:cfg.seeds]
    out = []
    for lineno, obj in read_jsonl(cfg.seed_tasks):
        where = f"{cfg.seed_tasks}:{lineno}"
        if isinstance(obj.get("instruction"), str):
            text = obj["instruction"]
        elif "prompt" in obj:
            try:
                messages = parse_prompt(obj).prompt
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
            text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        else:
            raise UserError(f'{where}: expected an "instruction" string (Alpaca\'s seed tasks) or a "prompt"')
        text = " ".join(text.split())  # one line: the writer's prompt is a list of lines
        if not text:
            raise UserError(f"{where}: an empty instruction")
        out.append(text)
    if not out:
        raise UserError(f"{cfg.seed_tasks}: no seed instructions")
    return out


# ---------------------------------------------------------------- the stage


def run(cfg: SelfInstructConfig, overwrite: bool = False, log=print) -> dict:
    """Write, filter and answer instructions as configured; returns the summary that `--json` prints."""
    with stage.start("self-instruct", cfg, False, overwrite, log, one_process=True) as r:
        seeds = seed_instructions(cfg)
        teacher, tok = ckpt.load_model(cfg.teacher, r.rt.device)
        writer, wtok = ckpt.load_model(cfg.writer, r.rt.device) if cfg.writer else (teacher, tok)
        if not chat_stop_ids(tok):
            raise UserError(f"{cfg.teacher}: the tokenizer has no <|end|> or <|eos|> token to stop an answer")
        return _run(r, seeds, teacher, tok, writer, wtok)


class Writer:
    """The writer's prompts and its stops: the end of a line (the instruction is written), or <|eos|>."""

    def __init__(self, model, tok, seeds: list[str], cfg: SelfInstructConfig):
        self.model, self.tok, self.cfg = model, tok, cfg
        newline = encode_batch_ids(tok, ["\n"])[0]
        self.stops = [i for i in (newline[0] if len(newline) == 1 else None, special_id(tok, "eos")) if i is not None]
        self.room = model.config.block_size - cfg.max_instruction_tokens
        for s in seeds:  # each seed alone must fit, with room to write
            if len(self.encode([s])) > self.room:
                raise UserError(f"seed_tasks: {s[:60]!r} leaves the writer's context of {model.config.block_size} "
                                f"tokens no room for {cfg.max_instruction_tokens} more; shorten it or lower "
                                "--max_instruction_tokens")

    def encode(self, shots: list[str]) -> list[int]:
        eos = special_id(self.tok, "eos")  # a fresh document, as in pretraining
        text = "".join(f"Question: {s}\n" for s in shots) + "Question:"
        return ([eos] if eos is not None else []) + encode_batch_ids(self.tok, [text])[0]

    def prompt(self, shots: list[str]) -> list[int]:
        """The list of `shots`, the first ones dropped while it leaves too little room to write."""
        while len(ids := self.encode(shots)) > self.room:
            shots = shots[1:]
        return ids


def _run(r: stage.Run, seeds: list[str], teacher, tok, writer_model, wtok) -> dict:
    cfg, out, log = r.cfg, r.out, r.log
    world_source = cfg.seed_tasks == "world"  # the world reads the instructions back and checks the answers
    writer = Writer(writer_model, wtok, seeds, cfg)
    answer_stops = chat_stop_ids(tok)
    budget = cfg.max_written or 20 * cfg.n
    r.prepare(("data.jsonl", "metrics.jsonl", "self_instruct.png"))
    metrics = r.metrics()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    kept: list[dict] = []
    pool = [words(s) for s in seeds]  # everything a new instruction must not resemble
    dropped = dict.fromkeys(FILTERS, 0)
    tokens = {"writer": 0, "answers": 0}
    written, surplus, generation_cpu, cpu0, step = 0, 0, 0.0, time.process_time(), 0
    bar = tqdm(total=cfg.n, desc="self-instruct", unit="kept", dynamic_ncols=True, mininterval=1.0)
    while len(kept) < cfg.n and written < budget:
        # Write: one instruction per prompt, each prompt a fresh draw of seeds and kept instructions.
        prompts = []
        for _ in range(min(cfg.batch_size, budget - written)):
            machine = rng.sample([k["instruction"] for k in kept], min(cfg.machine_shots, len(kept)))
            shots = rng.sample(seeds, min(cfg.shots - len(machine), len(seeds))) + machine
            rng.shuffle(shots)
            prompts.append(writer.prompt(shots))
        t0 = time.process_time()
        gen = GenerationConfig(max_new_tokens=cfg.max_instruction_tokens, do_sample=True, temperature=cfg.temperature,
                               eos_token_id=writer.stops, seed=cfg.seed * 7919 + step)
        lines = _generate(writer_model, wtok, prompts, gen, writer.stops, cfg.batch_size)
        written += len(lines)
        tokens["writer"] += sum(n for _, _, n in lines)

        # Filter the instructions before any answer is paid for.
        todo: list[tuple[str, world.Task | None]] = []
        for text, ended, _ in lines:
            instruction, ended = text.split("\n")[0].strip(), ended or "\n" in text  # a tokenizer without a newline token
            task = world.parse(instruction) if world_source else None
            if why := instruction_verdict(instruction, ended, task, pool, cfg):
                dropped[why] += 1
            else:
                todo.append((instruction, task))
                pool.append(words(instruction))  # a later one in this round must not resemble it either

        # Answer, then filter the answers.
        gen = GenerationConfig(max_new_tokens=cfg.max_answer_tokens, eos_token_id=answer_stops)
        answers = _generate(teacher, tok, [encode_chat(tok, [{"role": "user", "content": i}]) for i, _ in todo],
                            gen, answer_stops, cfg.batch_size)
        generation_cpu += time.process_time() - t0
        tokens["answers"] += sum(n for _, _, n in answers)
        for (instruction, task), (answer, ended, _) in zip(todo, answers):
            if why := answer_verdict(instruction, answer, ended, task, cfg.max_words):
                dropped[why] += 1
            elif len(kept) < cfg.n:
                kept.append({"instruction": instruction, "input": "", "output": answer})
                bar.update(1)
            else:  # passed every filter, but the last round wrote more than n needed
                surplus += 1
        metrics.write({"step": step, "written": written, "kept": len(kept), **dropped,
                       "teacher_tokens": sum(tokens.values()), "teacher_cpu_s": round(generation_cpu, 2)})
        step += 1
    bar.close()
    if not kept:
        raise UserError(f"none of the {written:,} instructions written survived the filters ({_counts(dropped)}); "
                        "raise --max_written, --rouge or --temperature, or give other seeds")
    write_jsonl(out / "data.jsonl", kept)
    _plot(out / "self_instruct.png", written, len(kept), dropped)
    summary = {"out": str(out), "data": str(out / "data.jsonl"), "seed_tasks": cfg.seed_tasks, "seeds": len(seeds),
               "written": written, "kept": len(kept), "dropped": dropped, "surplus": surplus,
               "teacher_tokens": {**tokens, "total": sum(tokens.values())},
               "teacher_cpu_s": round(generation_cpu, 2), "cpu_s": round(time.process_time() - cpu0, 2),
               "diversity": diversity([k["instruction"] for k in kept], cfg.seed)}
    log(f"self-instruct: kept {len(kept):,} of {written:,} instructions written ({_counts(dropped)}); "
        f"{summary['teacher_tokens']['total']:,} teacher tokens in {generation_cpu:.0f} CPU-seconds -> {out / 'data.jsonl'}")
    summary["wall_s"] = r.wall_s()
    return summary


def _generate(model, tok, prompts: list[list[int]], gen: GenerationConfig, stops: list[int],
              batch_size: int) -> list[tuple[str, bool, int]]:
    """(text, whether a stop token ended it, tokens generated) per prompt, batched by length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[str, bool, int]] = [("", False, 0)] * len(prompts)
    with torch.inference_mode():
        for b, start in enumerate(range(0, len(order), batch_size)):
            chunk = order[start:start + batch_size]
            batch_gen = replace(gen, seed=None if gen.seed is None else gen.seed + b)
            for i, seq in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], batch_gen).sequences):
                out[i] = (tok.decode(seq, skip_special_tokens=True).strip(), bool(seq) and seq[-1] in stops, len(seq))
    return out


def _counts(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in dropped.items() if v) or "none dropped"


def _plot(path: Path, written: int, kept: int, dropped: dict[str, int]) -> None:
    """Where the instructions written went: kept, or the filter that dropped each, as shares."""
    names = ["kept", *(k.replace("_", "\n") for k in dropped)]
    plot_bars(names, {"share of the instructions written": [x / max(written, 1) for x in (kept, *dropped.values())]},
              path, f"Self-instruct: {kept:,} of {written:,} instructions kept")
