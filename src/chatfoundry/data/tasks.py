"""Task sources: the prompts an RL stage (`label`, `ppo`) samples from, and a verifier where the
source has one. Rewards name a source's verifier, a reward model or a Python function.

Sources (`--prompts`):
    world                the built-in task world: its splits' questions, families in SFT's
    world:F1,F2          proportions (or only the families named); its verifier is the gold reward
    PATH.jsonl           your prompts in TRL's prompt-only format, {"prompt": str | messages, ...}.
                         The line's other fields ("answer", ...) go to a Python reward. Split into
                         train and held-out prompts by a stable hash of each prompt (`heldout`
                         share), or `eval_prompts` names the held-out file. No verifier.

Rewards (`ppo --reward`; `label --labeler` takes the same python: functions):
    rm:PATH              a reward-model checkpoint (the stage loads it)
    verifier             the source's own verifier: reinforcement learning from verifiable rewards
    python:MODULE:FUNC   FUNC(prompt: str, response: str, **fields) -> float, with the prompt as
                         text (its last user message) and the line's other fields; MODULE is found
                         on sys.path, or is a file: python:path/to/rewards.py:FUNC
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatfoundry.data import world
from chatfoundry.data.formats import load_prompts
from chatfoundry.errors import UserError

@dataclass(frozen=True)
class Prompt:
    """One prompt: the chat so far, the fields a reward function receives, and for the world its
    question (what the verifier scores against)."""

    messages: tuple[dict, ...]
    fields: dict = field(default_factory=dict)
    family: str = ""  # the world's family; a prompt file's prompts have none
    task: world.Task | None = None

    @property
    def text(self) -> str:
        """The prompt as text: its last user message."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


class Source:
    """Prompts for a split, and `verify(prompt, response) -> float` when `has_verifier`."""

    name = ""
    has_verifier = False
    families: tuple[str, ...] = ()  # the families its prompts carry, for per-family statistics

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        raise NotImplementedError

    def verify(self, prompt: Prompt, response: str) -> float:
        raise NotImplementedError  # callers check `has_verifier` (`require_verifier`)

    def require_verifier(self, message: str) -> None:
        """One clear line (`message`, with {name} the source's) for a stage that needs a verifier."""
        if not self.has_verifier:
            raise UserError(message.format(name=self.name))


class WorldSource(Source):
    has_verifier = True

    def __init__(self, families: tuple[str, ...] = world.FAMILIES):
        self.families = families
        self.name = "world" if families == world.FAMILIES else "world:" + ",".join(families)

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        return [world_prompt(t) for t in prompt_tasks(split, n, seed, self.families)]

    def verify(self, prompt: Prompt, response: str) -> float:
        return world.gold_reward(prompt.task, response)


def world_prompt(task: world.Task) -> Prompt:
    """A world question as a prompt: one user message, its family, the task for the verifier."""
    return Prompt(({"role": "user", "content": task.prompt},), {}, task.family, task)


class FileSource(Source):
    def __init__(self, path: str, heldout: float = 0.1, eval_path: str = ""):
        self.name = path
        lines = load_prompts(path)
        if eval_path:  # the held-out prompts are another file's: all of this one trains
            self.split = {"train": [_prompt(x) for x in lines],
                          "held_out": [_prompt(x) for x in load_prompts(eval_path)]}
        else:
            # A stable hash, not a shuffle: a prompt stays on its side when the file grows.
            held = [_bucket(x.prompt) < heldout for x in lines]
            self.split = {"train": [_prompt(x) for x, h in zip(lines, held) if not h],
                          "held_out": [_prompt(x) for x, h in zip(lines, held) if h]}
        for side, where in (("train", path), ("held_out", eval_path or f"{path} (held-out share {heldout:g})")):
            if not self.split[side]:
                raise UserError(f"{where}: no {side.replace('_', '-')} prompts; "
                                + ("add prompts" if side == "train" or eval_path
                                   else "raise the held-out share or give --eval_prompts FILE"))

    def held_out(self) -> list[Prompt]:
        return list(self.split["held_out"])

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        pool = self.split["train" if split == "train" else "held_out"]
        if n >= len(pool):
            return list(pool)
        keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(pool)), n))
        return [pool[i] for i in keep]


def _prompt(line) -> Prompt:
    return Prompt(line.prompt, line.fields)


def _bucket(messages: tuple[dict, ...]) -> float:
    """A prompt's place in [0, 1), from its content alone."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def source(spec: str, heldout: float = 0.1, eval_prompts: str = "") -> Source:
    """`world`, `world:F1,F2` or a JSONL path (`prompts` field), checked with one clear line."""
    if spec.isdigit():  # the old meaning, a count
        raise UserError(f"prompts: {spec} names the prompts' source (world, world:FAMILY,... or a JSONL file); how "
                        "many: --rollout.pool (ppo) or --train_prompts (label)")
    if spec == "world" or spec.startswith("world:"):
        if eval_prompts:
            raise UserError("eval_prompts: the world's held-out prompts are its own test split; "
                            "--eval_prompts is for a prompt file")
        names = tuple(f for f in spec.removeprefix("world").removeprefix(":").split(",") if f) or world.FAMILIES
        unknown = [f for f in names if f not in world.FAMILIES]
        if unknown:
            raise UserError(f"prompts: unknown world family {unknown[0]!r} (the families: {', '.join(world.FAMILIES)})")
        return WorldSource(tuple(dict.fromkeys(names)))
    if not 0 < heldout < 1:
        raise UserError(f"heldout: the held-out share must be in (0, 1), got {heldout}")
    return FileSource(spec, heldout, eval_prompts)


# ---------------------------------------------------------------- the world's prompt mix


def family_counts(n: int, families: tuple[str, ...] = world.FAMILIES) -> dict[str, int]:
    """How many of `n` prompts each family gets: SFT's proportions (world.SHARES)."""
    total = sum(world.SHARES[f] for f in families)
    return {f: max(1, round(n * world.SHARES[f] / total)) for f in families}


def prompt_tasks(split: str, n: int, seed: int, families: tuple[str, ...] = world.FAMILIES) -> list[world.Task]:
    """About `n` tasks of the split, families in SFT's proportions; fewer where a family runs out."""
    return [t for f, m in family_counts(n, families).items() for t in world.tasks(split, f, m, seed)]


# ---------------------------------------------------------------- rewards

# A batch reward: prompts and responses -> one float each.
Reward = Callable[[list[Prompt], list[str]], list[float]]


def load_function(spec: str, where: str) -> Callable:
    """python:MODULE:FUNC, MODULE on sys.path or a .py file's path; UserError naming `where`."""
    target, _, name = spec.removeprefix("python:").rpartition(":")
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target)
            if not path.is_file():
                raise ImportError(f"{path}: no such file")
            module_name = f"chatfoundry_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            module = sys.modules.get(module_name)
            if module is None:
                loader = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
                sys.modules[module_name] = module
        else:
            module = importlib.import_module(target)
        fn = getattr(module, name)
    except (ImportError, AttributeError, ValueError, SyntaxError) as e:
        raise UserError(f"{where}: cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise UserError(f"{where}: {spec!r} is not a function")
    return fn


def python_reward(spec: str, where: str = "reward") -> Reward:
    """FUNC(prompt text, response, **fields) -> float, over a batch; a non-number is one clear line."""
    fn = load_function(spec, where)

    def reward(prompts: list[Prompt], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses):
            try:
                value = fn(p.text, r, **p.fields)
            except Exception as e:  # the user's code: its error is one line, with what it was given
                raise UserError(f"{where}: {spec} raised {type(e).__name__}: {e} (prompt {p.text[:60]!r}, "
                                f"response {r[:60]!r})") from None
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise UserError(f"{where}: {spec} returned {value!r}, not a number") from None
        return out

    return reward


def check_reward_spec(spec: str, name: str = "reward") -> None:
    """A config's reward field names a reward model, the verifier or a Python function."""
    if not (spec == "verifier" or spec.startswith(("rm:", "python:"))):
        raise UserError(f"{name}: give rm:PATH, verifier or python:MODULE:FUNC, got {spec!r}")


def verifier_reward(src: Source) -> Reward:
    src.require_verifier("reward: the prompts {name} have no verifier; give --reward rm:PATH or python:MODULE:FUNC")
    return lambda prompts, responses: [src.verify(p, r) for p, r in zip(prompts, responses)]
