"""The built-in data, ready to use: the pretraining corpus (the documents of `corpus.py` mixed
with the task world's quizzes) and the whole world exported as JSONL files in the standard formats.
It stands above both modules, which know nothing of each other's mix.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from chatfoundry.data import corpus, world
from chatfoundry.data.formats import write_jsonl

DEFAULT_SEED = 0
DEFAULT_CHARS = 2_000_000  # size of the built-in corpus used by `chatfoundry pretrain` when no --data is given


# ---------------------------------------------------------------- the pretraining corpus
# The mix, in documents. Stories are long (about 280 characters against 120 for most others), so
# these weights give roughly 13% stories, 27% facts, 22% arithmetic, 8% strings, 6% comparisons
# and 24% quizzes (questions answered in plain text, from world.py) by characters.

KIND_WEIGHTS = {"story": 8, "facts": 40, "arithmetic": 30, "strings": 8, "compare": 8, "quiz": 16}


def generate_documents(seed: int = DEFAULT_SEED) -> Iterator[str]:
    """An endless, deterministic stream of documents (paragraphs without trailing newline)."""
    rng = random.Random(seed)
    facts = corpus.load_facts()
    makers = {"story": corpus.story_document, "facts": lambda r: corpus.fact_document(r, facts),
              "arithmetic": corpus.arithmetic_document, "strings": corpus.string_document,
              "compare": corpus.comparison_document, "quiz": world.quiz_document}
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    while True:
        kind = rng.choices(kinds, weights)[0]
        yield makers[kind](rng)


def generate_corpus(num_chars: int = DEFAULT_CHARS, seed: int = DEFAULT_SEED) -> str:
    """Documents joined by blank lines until at least num_chars characters; ends with a newline."""
    if num_chars < 0:
        raise ValueError(f"num_chars must be >= 0, got {num_chars}")
    parts: list[str] = []
    length = 0
    for doc in generate_documents(seed):
        length += len(doc) + (2 if parts else 0)
        parts.append(doc)
        if length >= num_chars:
            break
    return "\n\n".join(parts) + "\n"


def write_corpus(path: str | os.PathLike, num_chars: int = DEFAULT_CHARS, seed: int = DEFAULT_SEED) -> pathlib.Path:
    """Write the corpus as UTF-8. Atomic (temp file + rename) so a crash never leaves half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = generate_corpus(num_chars, seed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def corpus_version() -> str:
    """Hash of the generators' sources and fact table: cached token shards follow any edit to them."""
    digest = hashlib.sha256()
    for module in ("builtin.py", "corpus.py", "world.py"):
        digest.update(pathlib.Path(__file__).with_name(module).read_bytes())
    digest.update(resources.files("chatfoundry.data").joinpath("facts.tsv").read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- the world as files


def export(out: str | Path, conversations_n: int = 8000, test_per_family: int = 100, seed: int = 0,
           corpus_chars: int = DEFAULT_CHARS, crowd: dict[str, float] | None = None) -> dict[str, int]:
    """Write the corpus and every dataset as JSONL in the standard formats; returns records per file.
    The SFT files are the crowd's demonstrations, each line with its `writer`."""
    out = Path(out)
    rng = random.Random(seed)
    demos = lambda d: ({"messages": x.messages, "writer": x.writer, "style": x.style} for x in d)  # noqa: E731
    singles = [t for f in world.FAMILIES for t in world.tasks("train", f, max(1, conversations_n // len(world.FAMILIES)), seed)]
    test = [t for f in world.FAMILIES for t in world.tasks("test", f, test_per_family, seed)]

    def ranked(task: world.Task) -> dict:
        responses = world.candidates(task, rng)
        rewards = [world.gold_reward(task, r) for r in responses]
        order = sorted(range(len(responses)), key=lambda i: -rewards[i])
        distinct = sorted(set(rewards), reverse=True)
        return {"prompt": task.prompt, "responses": [responses[i] for i in order],
                "ranks": [distinct.index(rewards[i]) for i in order], "family": task.family}

    def preference(task: world.Task) -> dict:
        return {"prompt": task.prompt, "chosen": task.reference, "rejected": world.wrong_answer(task, rng),
                "family": task.family}

    files = {
        "corpus.jsonl": ({"text": d} for d in generate_corpus(corpus_chars, seed).split("\n\n")),
        "sft_train.jsonl": demos(world.demonstrations("train", conversations_n, seed, crowd=crowd)),
        "sft_val.jsonl": demos(world.demonstrations("val", max(64, conversations_n // 20), seed, crowd=crowd)),
        "sft_tools_train.jsonl": demos(world.tool_demonstrations("train", conversations_n // 5, seed, crowd=crowd)),
        "calculator_test.jsonl": ({"prompt": t.prompt, "completion": t.reference, "answer": t.answer}
                                  for t in world.calculator_tasks("test", test_per_family, seed)),
        "prompt_completion_train.jsonl": ({"prompt": t.prompt, "completion": t.reference} for t in singles),
        "alpaca_train.jsonl": ({"instruction": t.prompt, "input": "", "output": t.reference} for t in singles),
        # the corpus' own quiz form, as plain text: a base model's format (prompt tuning, `eval --shots`)
        "quiz_train.jsonl": ({"text": f"Question: {t.prompt}\nAnswer: {t.reference}"} for t in singles),
        "preference_train.jsonl": (preference(t) for t in singles),
        "rankings_train.jsonl": (ranked(t) for t in singles),
        "test.jsonl": ({"prompt": t.prompt, "completion": t.reference, "family": t.family, "kind": t.kind,
                        "answer": t.answer} for t in test),
    }
    counts = {}
    for name, records in files.items():
        records = list(records)
        write_jsonl(out / name, records)
        counts[name] = len(records)
    return counts
