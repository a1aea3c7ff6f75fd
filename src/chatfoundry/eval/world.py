"""Score a model on the task world: greedy answers to held-out questions, checked by the world's
verifier. Per family: exact match (the content is right), the mean gold reward and how often the
model said it does not know. A chat model is asked in its chat template; a base model (`shots`)
in the quiz form of its pretraining corpus, after K worked questions: in-context learning.

    chatfoundry eval --ckpt runs/sft --json                  ->  families.<name>.exact_match / .gold_reward
    chatfoundry eval --ckpt runs/pretrain --shots 4 --json   ->  the base model, 4-shot
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from chatfoundry.data import world
from chatfoundry.generation import GenerationConfig, generate_batch
from chatfoundry.tokenizer import chat_stop_ids, encode_batch_ids, encode_chat, special_id


def chat_answers(model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int = 48,
                 batch_size: int = 64) -> list[str]:
    """The model's greedy reply to each conversation (which ends with a user message)."""
    return greedy_texts(model, tokenizer, [encode_chat(tokenizer, m) for m in conversations], chat_stop_ids(tokenizer),
                        max_new_tokens, batch_size)


def greedy_texts(model, tokenizer, ids: Sequence[list[int]], stop_ids: list[int], max_new_tokens: int = 48,
                 batch_size: int = 64) -> list[str]:
    """The greedy continuation of each prompt (token ids) until a stop id, decoded and stripped."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    replies: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out = generate_batch(model, [ids[i] for i in chunk], cfg)
            for i, seq in zip(chunk, out.sequences):
                replies[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    model.train(was_training)
    return replies


def quiz_prompt(task: world.Task, examples: Sequence[world.Task]) -> str:
    """The quiz form of the pretraining corpus (world.quiz_document): worked questions, then the question."""
    return "".join(f"Question: {e.prompt}\nAnswer: {e.reference}\n" for e in examples) + f"Question: {task.prompt}\nAnswer:"


def quiz_prompts(tokenizer, tasks: Sequence[world.Task], shots: int, block: int, room: int,
                 seed: int = 0) -> list[tuple[list[int], list[world.Task]]]:
    """Each task's prompt ids in the quiz form and its worked questions: `shots` of its family
    from the train split, the first ones dropped while the prompt leaves fewer than `room` of the
    `block` tokens to answer in. A fresh document, as in pretraining: after <|eos|>."""
    eos = special_id(tokenizer, "eos")
    rng = random.Random(f"{seed}:shots")
    pools = {f: world.tasks("train", f, 200, seed) for f in {t.family for t in tasks}} if shots else {}
    out = []
    for task in tasks:
        examples = rng.sample(pools[task.family], min(shots, len(pools[task.family]))) if shots else []
        while True:
            ids = ([eos] if eos is not None else []) + encode_batch_ids(tokenizer, [quiz_prompt(task, examples)])[0]
            if len(ids) + room <= block or not examples:
                break
            examples = examples[1:]
        out.append((ids, examples))
    return out


def quiz_answers(model, tokenizer, tasks: Sequence[world.Task], shots: int = 0, seed: int = 0, max_new_tokens: int = 48,
                 batch_size: int = 64) -> tuple[list[str], list[int]]:
    """A base model's greedy answers in the quiz form after `shots` worked questions (`quiz_prompts`),
    read to the end of the answer's line: (answers, worked questions each prompt holds)."""
    prompts = quiz_prompts(tokenizer, tasks, shots, model.config.block_size, max_new_tokens, seed)
    eos = special_id(tokenizer, "eos")
    replies = greedy_texts(model, tokenizer, [ids for ids, _ in prompts], [eos] if eos is not None else [],
                           max_new_tokens, batch_size)
    return [r.split("\n")[0].strip() for r in replies], [len(examples) for _, examples in prompts]


def evaluate_world(model, tokenizer, split: str = "test", per_family: int = 100,
                   families: Sequence[str] = world.FAMILIES, system: str | None = None, seed: int = 0,
                   max_new_tokens: int = 48, batch_size: int = 64, tool_questions: int = 0,
                   shots: int | None = None) -> dict:
    """{"split", "families": {name: {n, exact_match, gold_reward, abstain_rate}}, "overall", "answers"},
    and with `tool_questions` "tool_use" (see `evaluate_tool_use`). With `shots`, a base model in
    the quiz form (`quiz_answers`), and "shots" and "shots_used" (the mean that fit the context)."""
    tasks = [t for family in families for t in world.tasks(split, family, per_family, seed)]
    report: dict = {"split": split}
    if shots is None:
        head = [{"role": "system", "content": system}] if system else []
        replies = chat_answers(model, tokenizer, [head + [{"role": "user", "content": t.prompt}] for t in tasks],
                               max_new_tokens, batch_size)
    else:
        replies, used = quiz_answers(model, tokenizer, tasks, shots, seed, max_new_tokens, batch_size)
        report.update(shots=shots, shots_used=round(sum(used) / max(len(used), 1), 2))
    scores = [world.score(t, r) for t, r in zip(tasks, replies)]
    report["families"] = {}
    for family in families:
        mine = [s for t, s in zip(tasks, scores) if t.family == family]
        report["families"][family] = world.score_summary(mine)
    report["overall"] = world.score_summary(scores)
    report["answers"] = [{"family": t.family, "kind": t.kind, "prompt": t.prompt, "reference": t.reference,
                          "response": r, "correct": s.correct, "gold_reward": s.reward}
                         for t, r, s in zip(tasks, replies, scores)]
    if tool_questions and special_id(tokenizer, "tool") is not None:
        report["tool_use"] = evaluate_tool_use(model, tokenizer, split, tool_questions, seed, max_new_tokens,
                                               batch_size)
    return report


def evaluate_tool_use(model, tokenizer, split: str = "test", n: int = 100, seed: int = 0, max_new_tokens: int = 48,
                      batch_size: int = 64) -> dict:
    """Held-out arithmetic answered twice by the same model: with the calculator on offer (its
    calls run, tools.py) and without (no tool named in the prompt: the answer comes from the
    weights alone). `n` calculator questions (numbers up to 999) and as many small ones (the
    arithmetic family, 0..12).
    {"n", "with_tool", "without_tool", "called" (share that called the tool): the calculator
    questions; "small": the same for the small ones; "answers"}."""
    from chatfoundry.tools import answer_with_tools, final_answer

    groups = {"calculator": world.calculator_tasks(split, n, seed), "small": world.tasks(split, "arithmetic", n, seed)}
    tasks = [t for group in groups.values() for t in group]
    asks = [[{"role": "user", "content": t.prompt}] for t in tasks]
    alone = chat_answers(model, tokenizer, asks, max_new_tokens, batch_size)
    turns = answer_with_tools(model, tokenizer, asks, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = [(world.is_correct(t, a), world.is_correct(t, final_answer(turn)), any(m["role"] == "tool" for m in turn))
            for t, a, turn in zip(tasks, alone, turns)]

    def summary(lo: int, hi: int) -> dict:
        mine = rows[lo:hi]
        mean = (lambda i: round(sum(r[i] for r in mine) / len(mine), 4)) if mine else (lambda i: 0.0)
        return {"n": len(mine), "with_tool": mean(1), "without_tool": mean(0), "called": mean(2)}

    big = len(groups["calculator"])
    return {**summary(0, big), "small": summary(big, len(tasks)),
            "answers": [{"prompt": t.prompt, "answer": t.answer, "without_tool": a, "with_tool": turn}
                        for t, a, turn in zip(tasks, alone, turns)]}

def plot_report(report: dict, out: str | Path, title: str) -> None:
    """Bars of exact match and gold reward per family."""
    from chatfoundry.metrics import plot_bars

    names = list(report["families"])
    plot_bars(names, {"exact match": [report["families"][n]["exact_match"] for n in names],
                      "gold reward": [report["families"][n]["gold_reward"] for n in names]}, out, title)


def write_report(report: dict, out: Path, title: str) -> None:
    """eval.json (scores and every answer) and eval.png in `out`."""
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    plot_report(report, out / "eval.png", title)


def format_report(report: dict) -> str:
    lines = [f"{'family':<14}{'n':>5}{'exact match':>13}{'gold reward':>13}{'abstains':>10}"]
    for name, s in [*report["families"].items(), ("overall", report["overall"])]:
        lines.append(f"{name:<14}{s['n']:>5}{s['exact_match']:>13.3f}{s['gold_reward']:>13.3f}{s['abstain_rate']:>10.3f}")
    if "shots" in report:
        lines.append(f"asked in the quiz form, {report['shots']}-shot ({report['shots_used']:g} worked questions fit "
                     "the context on average)")
    if "tool_use" in report:
        t = report["tool_use"]
        for name, g in (("calculator questions", t), ("small arithmetic", t["small"])):
            lines.append(f"{name} (n={g['n']}): exact match {g['with_tool']:.3f} with the calculator "
                         f"(called on {g['called']:.0%}), {g['without_tool']:.3f} without")
    return "\n".join(lines)
