"""Dataset files: the JSONL formats users already have (TRL-style), read and written.

One JSON object per line; blank lines are skipped; other keys on a line (ids, scores,
sources) are ignored. Each line is one of:

  text               {"text": str}                                   loss on every token
  prompt_completion  {"prompt": str | messages, "completion": str | messages}
  messages           {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  preference         {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                     or, without "prompt", chosen and rejected as whole conversations sharing it
  ranking            {"prompt": str | messages, "responses": [str, ...], "ranks": [int, ...] (optional)}

RL stages read prompts alone (TRL's prompt-only format), {"prompt": str | messages, ...}: the
line's other keys ("answer", ...) travel with the prompt to a reward function (`load_prompts`).

Encoder heads (`chatfoundry finetune-head`) read labelled texts, {"text": str, "label": ...}:
a class name (string or integer) to classify, a number to regress (`load_labelled`).

A string prompt is one user message; a string completion, chosen or response is the assistant
reply. SFT reads every format into `Example`s (a preference or ranking line gives its best
response); reward modelling reads preference and ranking lines into `Comparison`s.

A malformed line stops loading with one UserError "path:line: what is wrong": skipping it
silently would quietly change what the model learns. So does a line over MAX_LINE_BYTES (1 MiB,
hundreds of times any context here), read no further than the bound: tokenizing one huge line
takes ~150 bytes of memory per character. The per-object parsers raise ValueError
without the location, so they also serve callers that hold objects rather than files.

Wherever a file is read, `hf:ORG/DATASET[:split]` reads a Hugging Face Hub dataset's rows instead
(hub.py), and an error names "hf:ORG/DATASET:split row N".
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from chatfoundry.errors import UserError
from chatfoundry.tokenizer import CHAT_ROLES

FORMATS = ("text", "prompt_completion", "messages", "alpaca", "preference", "ranking")
MAX_LINE_BYTES = 1 << 20  # one JSONL line: about 250k tokens of English, far past any model's context here

# Each format is recognised by a key only it has, tried in this order, so that a line missing a
# field hears which one ("missing field 'rejected'") rather than "unknown format". Preference
# comes before messages because some exports (ultrafeedback_binarized) carry both; "prompt"
# alone is shared by three formats and is tried last.
_DETECT = (
    ("preference", ("chosen", "rejected")),
    ("ranking", ("responses", "ranks")),
    ("messages", ("messages",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("completion",)),
    ("text", ("text",)),
    ("prompt_completion", ("prompt",)),
)
_EXPECTED_KEYS = "text, prompt+completion, messages, instruction+output, prompt+chosen+rejected, prompt+responses"
_PROMPT_ENDS = ("user", "tool")  # the turn a response answers


@dataclass(frozen=True)
class Example:
    """One SFT example: a conversation (loss on assistant turns) or a plain text (loss on all)."""

    messages: tuple[dict, ...] = ()  # {"role", "content"} each; empty for a plain text
    text: str | None = None


@dataclass(frozen=True)
class PromptLine:
    """One prompt for an RL stage, with the line's other fields for the reward function."""

    prompt: tuple[dict, ...]  # the conversation so far; ends with a user or tool message
    fields: dict


@dataclass(frozen=True)
class Comparison:
    """One prompt with K >= 2 responses, best first."""

    prompt: tuple[dict, ...]  # the conversation so far; ends with a user or tool message
    responses: tuple[str, ...]
    ranks: tuple[int, ...]  # 0-based, ties share a rank, no gaps (0, 0, 1): non-decreasing


# ----------------------------------------------------------------------------- reading


def detect_format(obj: dict) -> str:
    """Which of FORMATS `obj` is, judged by its keys; ValueError naming the expected keys."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_kind(obj)}")
    for name, keys in _DETECT:
        if any(k in obj for k in keys):
            return name
    found = ", ".join(sorted(map(str, obj))) or "none"
    raise ValueError(f"unknown format: expected one of the keys {_EXPECTED_KEYS} (found {found})")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a UTF-8 JSONL file; lines count from 1."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            # Bytes split on b"\n" only: decoding line by line lets an encoding error name its
            # line, and text-mode splitting would also break on characters JSON allows in strings.
            # A line is read at most MAX_LINE_BYTES + 1 bytes at a time, so a huge one costs no memory.
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                where = f"{path}:{lineno}"
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise UserError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes; split the example "
                                    "(the model reads a few thousand tokens of it at most)")
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: drop a BOM
                except UnicodeDecodeError as e:
                    raise UserError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # a huge integer, absurd nesting
                    raise UserError(f"{where}: invalid JSON ({type(e).__name__}: {e})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{where}: expected a JSON object, got {_kind(obj)}")
                yield lineno, obj
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def load_sft(paths: str | Path | list) -> list[Example]:
    """Every line of every file as an SFT example; the formats may differ from line to line."""
    return _load(paths, parse_example)


def load_comparisons(paths: str | Path | list) -> list[Comparison]:
    """Every line of every file as a comparison: preference or ranking lines only."""
    return _load(paths, parse_comparison)


def load_comparison_splits(files: list[str], val_fraction: float, seed: int
                           ) -> tuple[list[Comparison], list[Comparison], list[dict], str]:
    """A `chatfoundry label` folder (train.jsonl, held-out val.jsonl) or JSONL files of rankings or
    pairs, `val_fraction` of them held out (shuffled by `seed`): (train, held out, the held-out
    comparisons' extras, family and gold rewards where the folder has them, a description)."""
    paths = [Path(p) for p in files]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if not (folder / "train.jsonl").is_file():
            raise UserError(f"{folder}: no train.jsonl (write one with chatfoundry label, or give JSONL files)")
        train = load_comparisons(folder / "train.jsonl")
        if (folder / "val.jsonl").is_file():
            val = load_comparisons(folder / "val.jsonl")
            extras = [{"family": obj.get("family", ""), "gold": _gold(obj)} for _, obj in read_jsonl(folder / "val.jsonl")]
            return train, val, extras, f"{folder} (labeled)"
        paths = [folder / "train.jsonl"]
    for p in paths:
        if p.is_dir():
            raise UserError(f"{p}: a folder among several data paths; give one label folder or JSONL files")
    comparisons = load_comparisons(paths)
    if len(comparisons) < 2:
        raise UserError(f"{paths[0]}: one comparison; at least two are needed (one to learn, one to check)")
    random.Random(seed).shuffle(comparisons)
    n_val = max(1, int(len(comparisons) * val_fraction))
    return comparisons[n_val:], comparisons[:n_val], [{}] * n_val, f"{len(comparisons):,} comparisons from files"


def _gold(obj: dict) -> list[float] | None:
    """The held-out file's gold rewards (best-first order, as the responses are written)."""
    gold, ranks = obj.get("gold_reward"), obj.get("ranks")
    if not isinstance(gold, list) or not isinstance(ranks, list) or sorted(ranks) != ranks \
            or len(gold) != len(obj.get("responses", [])):
        return None
    return [float(g) for g in gold]


def load_prompts(paths: str | Path | list) -> list[PromptLine]:
    """Every line of every file as a prompt: {"prompt": str | messages, ...other fields}."""
    return _load(paths, parse_prompt)


def load_labelled(paths: str | Path | list, task: str) -> list[tuple[str, str | float]]:
    """(text, label) for every line: a class name for task "classify" (integers become their
    string), a finite number for "regress"."""
    return _load(paths, lambda obj: parse_labelled(obj, task))


_T = TypeVar("_T")


def records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, object) for each record: the lines of a JSONL file ("path:line"), or the rows of a
    Hugging Face Hub dataset `hf:ORG/DATASET[:split]` ("hf:ORG/DATASET:split row N", hub.py)."""
    if str(path).startswith("hf:"):
        from chatfoundry import hub  # lazily: only hf: names need it

        return hub.dataset_rows(str(path).removeprefix(hub.PREFIX))
    return ((f"{path}:{lineno}", obj) for lineno, obj in read_jsonl(path))


def _load(paths: str | Path | list, parse: Callable[[dict], _T]) -> list[_T]:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("no data files given")
    out: list[_T] = []
    for path in paths:
        before = len(out)
        for where, obj in records(path):
            try:
                out.append(parse(obj))
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
        if len(out) == before:  # an empty file among several is almost surely a mistake
            raise UserError(f"{path}: no examples")
    return out


# ----------------------------------------------------------------------------- parsing


def parse_example(obj: dict) -> Example:
    """One object as an SFT example; ValueError says what is wrong."""
    fmt = detect_format(obj)
    if fmt == "text":
        text = _string(obj, "text")
        if not text.strip():
            raise ValueError("field 'text' is empty")
        return Example(text=text)
    if fmt == "prompt_completion":
        prompt = _prompt(obj)
        completion = _str_or_messages(obj, "completion")
        reply = (_assistant(completion, "completion"),) if isinstance(completion, str) else completion
        return Example(messages=prompt + _learnable(reply))
    if fmt == "messages":
        messages = _field(obj, "messages")
        if not isinstance(messages, list):
            raise ValueError(f"field 'messages' must be a list of messages, got {_kind(messages)}")
        return Example(messages=_learnable(_messages(messages, "messages")))
    if fmt == "alpaca":
        instruction, output = _string(obj, "instruction"), _string(obj, "output")
        extra = obj.get("input") or ""  # absent, null and "" all mean no input
        if not isinstance(extra, str):
            raise ValueError(f"field 'input' must be a string, got {_kind(extra)}")
        user = "\n\n".join(part for part in (instruction, extra) if part)
        return Example(messages=({"role": "user", "content": user}, _assistant(output, "output")))
    # preference / ranking: learn to produce the best response
    c = parse_comparison(obj)
    return Example(messages=c.prompt + ({"role": "assistant", "content": c.responses[0]},))


def parse_prompt(obj: dict) -> PromptLine:
    """One prompt-only object; its other keys are the reward function's keyword arguments."""
    if "prompt" not in obj:
        found = ", ".join(sorted(map(str, obj))) or "none"
        raise ValueError(f"missing field 'prompt' (a prompt file's lines are {{\"prompt\": str | messages, ...}}; "
                         f"found {found})")
    if "response" in obj:  # the reward function receives the response under that name
        raise ValueError("field 'response' is reserved: the reward function is called with the response under it")
    return PromptLine(_check_prompt(_prompt(obj)), {k: v for k, v in obj.items() if k != "prompt"})


def parse_labelled(obj: dict, task: str) -> tuple[str, str | float]:
    """One {"text", "label"} object; ValueError says what is wrong."""
    text = _string(obj, "text")
    if not text.strip():
        raise ValueError("field 'text' is empty")
    label = _field(obj, "label")
    if task == "regress":
        if isinstance(label, bool) or not isinstance(label, (int, float)) or label != label or abs(label) == float("inf"):
            raise ValueError(f"field 'label' must be a finite number to regress, got {_kind(label)} {label!r}")
        return text, float(label)
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"field 'label' must be a class name (string or integer) to classify, got {_kind(label)}")
    if isinstance(label, str) and not label.strip():
        raise ValueError("field 'label' is empty")
    return text, str(label)


def parse_comparison(obj: dict) -> Comparison:
    """One preference or ranking object as a comparison; ValueError says what is wrong."""
    fmt = detect_format(obj)
    if fmt == "preference":
        return _preference(obj)
    if fmt == "ranking":
        return _ranking(obj)
    raise ValueError(
        f"a {fmt} line has nothing to compare: expected the keys prompt+chosen+rejected or prompt+responses"
    )


def _preference(obj: dict) -> Comparison:
    chosen, rejected = _str_or_messages(obj, "chosen"), _str_or_messages(obj, "rejected")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    if "prompt" in obj:
        prompt = _prompt(obj)
        best, worse = _reply_to(prompt, chosen, "chosen"), _reply_to(prompt, rejected, "rejected")
    else:
        # TRL's implicit prompt: two whole conversations, the prompt is what they share.
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise ValueError("missing field 'prompt' (needed unless chosen and rejected are whole conversations)")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
        best, worse = _only_reply(chosen[n:], "chosen"), _only_reply(rejected[n:], "rejected")
    if best == worse:
        raise ValueError("chosen and rejected are identical")
    return Comparison(_check_prompt(prompt), (best, worse), (0, 1))


def _ranking(obj: dict) -> Comparison:
    responses = _field(obj, "responses")
    if not isinstance(responses, list):
        raise ValueError(f"field 'responses' must be a list of strings, got {_kind(responses)}")
    if len(responses) < 2:
        raise ValueError(f"rankings need at least 2 responses, got {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise ValueError(f"responses[{i}] must be a string, got {_kind(r)}")
        if not r.strip():
            raise ValueError(f"responses[{i}] is empty")
    if len(set(responses)) == 1:
        raise ValueError("all responses are identical")
    prompt = _check_prompt(_prompt(obj))

    ranks = obj.get("ranks")
    if ranks is None:  # listed best first, no ties
        ranks = list(range(len(responses)))
    elif not isinstance(ranks, list):
        raise ValueError(f"field 'ranks' must be a list of integers, got {_kind(ranks)}")
    elif len(ranks) != len(responses):
        raise ValueError(f"field 'ranks' has {len(ranks)} entries for {len(responses)} responses")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(f"ranks[{i}] must be an integer, got {_kind(r)}")
    if len(set(ranks)) == 1:
        raise ValueError("all responses share one rank: nothing to compare")
    # The same text ranked above and below itself is a contradiction, not a preference.
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        j = seen.setdefault(r, i)
        if ranks[j] != ranks[i]:
            raise ValueError(f"responses[{j}] and responses[{i}] are identical but ranked differently")

    order = sorted(range(len(responses)), key=lambda i: ranks[i])  # stable: ties keep file order
    dense = {r: d for d, r in enumerate(sorted(set(ranks)))}  # any integers -> 0, 1, 2, ...
    return Comparison(prompt, tuple(responses[i] for i in order), tuple(dense[ranks[i]] for i in order))


# --------------------------------------------------------------------- field checking


def _field(obj: dict, key: str):
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    return obj[key]


def _string(obj: dict, key: str) -> str:
    value = _field(obj, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {_kind(value)}")
    return value


def _str_or_messages(obj: dict, key: str) -> str | tuple[dict, ...]:
    value = _field(obj, key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key)
    raise ValueError(f"field {key!r} must be a string or a list of messages, got {_kind(value)}")


def _prompt(obj: dict) -> tuple[dict, ...]:
    value = _str_or_messages(obj, "prompt")
    return ({"role": "user", "content": value},) if isinstance(value, str) else value


def _messages(items: list, key: str) -> tuple[dict, ...]:
    """Validated messages, reduced to role and content (extra keys such as "name" are dropped)."""
    out = []
    for i, m in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with role and content, got {_kind(m)}")
        role, content = _field_of(m, "role", where), _field_of(m, "content", where)
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}.role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, got {_kind(content)}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{where}.content is empty (an assistant message needs text)")
        out.append({"role": role, "content": content})
    return tuple(out)


def _field_of(message: dict, key: str, where: str):
    if key not in message:
        raise ValueError(f"{where} has no {key!r}")
    return message[key]


def _assistant(content: str, key: str) -> dict:
    if not content.strip():
        raise ValueError(f"field {key!r} is empty")
    return {"role": "assistant", "content": content}


def _learnable(messages: tuple[dict, ...]) -> tuple[dict, ...]:
    # SFT's loss falls on assistant turns: without one the example teaches nothing.
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return messages


def _reply_to(prompt: tuple[dict, ...], value: str | tuple[dict, ...], key: str) -> str:
    if isinstance(value, str):
        return _assistant(value, key)["content"]
    # TRL's conversational form holds only the reply; some exports repeat the prompt before it.
    if len(value) > len(prompt) and value[: len(prompt)] == prompt:
        value = value[len(prompt):]
    return _only_reply(value, key)


def _only_reply(messages: tuple[dict, ...], key: str) -> str:
    # Comparison responses are single strings, so each side must be exactly one assistant turn.
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        got = ", ".join(m["role"] for m in messages) or "nothing"
        raise ValueError(f"field {key!r} must add one assistant message to the prompt, got {got}")
    return messages[0]["content"]


def _check_prompt(prompt: tuple[dict, ...]) -> tuple[dict, ...]:
    if not prompt:
        raise ValueError("the prompt is empty: it must end with a user or tool message")
    if prompt[-1]["role"] not in _PROMPT_ENDS:
        raise ValueError(f"the prompt must end with a user or tool message, not {prompt[-1]['role']}")
    return prompt


def _kind(value) -> str:
    """JSON's name for a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "bool"
    names = {int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- writing


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically: the file appears whole or not at all.

    Records go to a temp file in the same folder (same file system, so the rename is atomic),
    which replaces `path` only after the last record; an error mid-way leaves `path` as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        # mkstemp makes the file private (0600): keep the mode of the file we replace, or make
        # it readable like an ordinary data file (reading the umask would race other threads).
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.is_file() else 0o644)
        with os.fdopen(fd, "wb") as f:
            for record in records:
                line = json.dumps(record, ensure_ascii=False)
                try:
                    data = line.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate: keep it as a \u escape
                    data = json.dumps(record).encode("ascii")
                f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
        raise
    return path


def example_to_record(ex: Example) -> dict:
    """An Example as a line of its own format: {"messages": [...]} or {"text": ...}."""
    if ex.text is not None:
        return {"text": ex.text}
    return {"messages": [dict(m) for m in ex.messages]}


def comparison_to_record(c: Comparison) -> dict:
    """A Comparison as a ranking line; the prompt is a plain string when it is one user message."""
    if len(c.prompt) == 1 and c.prompt[0]["role"] == "user":
        prompt = c.prompt[0]["content"]
    else:
        prompt = [dict(m) for m in c.prompt]
    return {"prompt": prompt, "responses": list(c.responses), "ranks": list(c.ranks)}


def pairs(c: Comparison) -> list[tuple[int, int]]:
    """(winner index, loser index) for every two responses of different rank; ties give no pair."""
    k = len(c.responses)
    return [(i, j) for i in range(k) for j in range(k) if c.ranks[i] < c.ranks[j]]
