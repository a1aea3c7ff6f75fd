"""The chat REPL behind `chatfoundry chat`: a conversation with a checkpoint in the terminal.

A session holds the system message apart from the history of user and assistant messages; each
reply renders `[system] + history` in the chat format (`tokenizer.render_chat`), ends the prompt
with `<|assistant|>` and streams the model's answer until `<|end|>` or `<|eos|>`. A conversation
longer than the context loses its oldest turns first; the system message and the newest user
message always stay.

Interactive (a terminal): a banner, a `you> ` prompt, answers streamed after `assistant> `, and
slash commands (`/help` lists them). Ctrl-C during an answer stops it; the part already shown
stays in the history as the assistant's reply, so the model remembers what the user saw.
Piped (`echo hi | chatfoundry chat --ckpt DIR`): all of standard input is one user message and
only the answer is printed.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig
from chatfoundry.models.decoder import num_params
from chatfoundry.textgen import stream_text
from chatfoundry.tools import CALL, Tool, declare, run_call, split_calls
from chatfoundry.tokenizer import chat_stop_ids, encode_chat, special_id

MAX_TOOL_ROUNDS = 3  # tool calls in a row before the model must answer in words
COMMANDS = ("/reset", "/system", "/params", "/help", "/exit", "/quit")

HELP = """\
  /reset              forget the conversation (system message and parameters stay)
  /system TEXT        set the system message and start a new conversation
  /system             show the system message; /system - removes it
  /params             show the generation parameters
  /params NAME=VALUE  set one (temperature 0 is greedy; seed none draws fresh randomness)
  /help               this list
  /exit, /quit        leave (as does Ctrl-D); Ctrl-C stops an answer"""


@dataclass
class ChatParams:
    """What `/params` shows and sets."""

    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    max_new_tokens: int = 128
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: torch's global generator

    def generation_config(self, eos: list[int], turn: int = 0) -> GenerationConfig:
        """The config of one reply; `turn` varies the seed so each reply of a seeded conversation
        draws afresh, yet the same conversation replays identically."""
        sampling = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=sampling, temperature=self.temperature if sampling else 1.0,
            top_p=self.top_p, top_k=self.top_k or None, repetition_penalty=self.repetition_penalty,
            eos_token_id=eos, seed=None if self.seed is None else self.seed + turn)


# name -> (parse, valid, what a valid value is)
_PARAMS: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1: off)"),
    "seed": (lambda s: None if s.lower() == "none" else int(s), lambda v: True, "an integer or none"),
}


def set_param(params: ChatParams, assignment: str) -> str:
    """Set one parameter from "name=value" or "name value"; a ValueError names what is wrong."""
    text = assignment.strip()
    name, sep, value = text.partition("=") if "=" in text else text.partition(" ")
    name, value = name.strip(), value.strip()
    if name not in _PARAMS:
        raise ValueError(f"unknown parameter {name!r}: one of {', '.join(_PARAMS)}")
    parse, valid, allowed = _PARAMS[name]
    if not sep or not value:
        raise ValueError(f"{name}: give a value, as in {name}=VALUE ({allowed})")
    try:
        parsed = parse(value)
        ok = parsed is None or (math.isfinite(parsed) and valid(parsed))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: must be {allowed}, got {value!r}")
    setattr(params, name, parsed)
    return f"{name} = {parsed}"


def show_params(params: ChatParams) -> str:
    return "\n".join(f"  {f.name} = {getattr(params, f.name)}" for f in fields(params))


def chat_prompt_ids(tokenizer, messages: list[dict], context: int, max_new_tokens: int = 1) -> list[int]:
    """The messages in the chat format with the generation prompt, as ids that fit the context.

    The reply gets room for `max_new_tokens`, but never more than half the context (past the
    context the generator slides its window, see `generation._steps`), and at least one token.
    Too long a prompt loses whole turns (a user message and what follows it), oldest first; a
    leading system message and the last user message are never dropped.
    """
    budget = context - max(1, min(max_new_tokens, context // 2))
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(head):]
    # where the kept part may start: its first message, or any user message (the last one at the latest)
    starts = sorted({0} | {i for i, m in enumerate(rest) if m.get("role") == "user"})
    for start in starts:
        ids = encode_chat(tokenizer, head + rest[start:])
        if len(ids) <= budget:
            return ids
    raise UserError(f"prompt: {len(ids)} tokens leave no room in the model's context of {context}")


@dataclass
class ChatSession:
    """A conversation with one model: the system message apart, the user/assistant turns in `history`."""

    model: Any
    tokenizer: Any
    system: str | None = None
    params: ChatParams = field(default_factory=ChatParams)
    history: list[dict] = field(default_factory=list)
    tools: dict[str, Tool] = field(default_factory=dict)  # on offer to the model (tools.py)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return declare(system + self.history, list(self.tools))

    def reset(self) -> None:
        self.history.clear()

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add `user_text`, stream the answer (`on_text` gets each new piece) and add it too.

        A prompt that cannot fit raises UserError and leaves the history as it was. Ctrl-C
        (KeyboardInterrupt) mid-answer keeps the part already produced as the reply, then re-raises.
        With tools on offer, a reply that calls one is not shown as such: the call runs, `on_text`
        gets a line like "[calculator: 347 times 29 = 10063]", the call and its result join the history,
        and the model goes on, up to MAX_TOOL_ROUNDS calls in a row.
        """
        user = {"role": "user", "content": user_text}
        block, limit = self.model.config.block_size, self.params.max_new_tokens
        ids = chat_prompt_ids(self.tokenizer, self.messages() + [user], block, limit)
        turn = sum(m["role"] == "user" for m in self.history)
        cfg = self.params.generation_config(chat_stop_ids(self.tokenizer), turn)
        self.history.append(user)
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(MAX_TOOL_ROUNDS):
                calls = self._answer(ids, cfg, on_text)
                if calls is None:
                    break
                for call in calls:
                    name, arguments, result = run_call(call, self.tools)
                    self.history.append({"role": "tool", "content": result})
                    if on_text is not None:
                        on_text(f"[{name}: {arguments.get('expression', json.dumps(arguments))} = {result}] ")
                ids = chat_prompt_ids(self.tokenizer, self.messages(), block, limit)
            else:
                self._answer(ids, cfg, on_text, calls_allowed=False)
        finally:
            self.model.train(was_training)
        return self.history[-1]["content"]

    def _answer(self, ids: list[int], cfg: GenerationConfig, on_text, calls_allowed: bool = True) -> list[str] | None:
        """Stream one assistant turn into the history: None for an answer in words, else the
        calls it made (as texts). On Ctrl-C what was shown stays as the reply."""
        tool = special_id(self.tokenizer, "tool") if self.tools and calls_allowed else None
        pieces, tokens, calling = [], [], False
        try:
            with torch.inference_mode():
                for piece, token, _ in stream_text(self.model, self.tokenizer, ids, cfg):
                    if token >= 0:
                        tokens.append(token)
                    calling = tool is not None and tokens[:1] == [tool]
                    if piece and not calling:  # a call is held back, and run by reply()
                        pieces.append(piece)
                        if on_text is not None:
                            on_text(piece)
        except BaseException:  # Ctrl-C: what was shown becomes the reply (nothing, mid-call)
            self.history.append({"role": "assistant", "content": "".join(pieces)})
            raise
        if not calling:
            self.history.append({"role": "assistant", "content": "".join(pieces)})
            return None
        calls = split_calls(self.tokenizer, tokens)
        self.history.append({"role": "assistant", "content": "".join(CALL + c for c in calls)})
        return calls


# ---------------------------------------------------------------- the REPL


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _banner(session: ChatSession) -> str:
    n = num_params(session.model)
    return (f"chatfoundry chat: {_size(n)}-parameter model, context {session.model.config.block_size} tokens; "
            f"/help for commands, /exit or Ctrl-D to quit")


def _command(session: ChatSession, line: str, out) -> bool:
    """Run one slash command; False when it ends the REPL."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("history cleared", file=out)
    elif name == "/system":
        if not arg:
            print(f"system: {session.system}" if session.system else "no system message", file=out)
        else:
            session.system = None if arg == "-" else arg
            session.reset()
            print(("system message set" if session.system else "system message removed") + "; history cleared",
                  file=out)
    elif name == "/params":
        if not arg:
            print(show_params(session.params), file=out)
        else:
            try:
                print(set_param(session.params, arg), file=out)
            except ValueError as e:
                print(f"error: {e}", file=out)
    elif name == "/help":
        print(HELP, file=out)
    else:
        print(f"unknown command {name}: one of {', '.join(COMMANDS)}", file=out)
    return True


def _reader(stdin, stdout) -> Callable[[str], str | None]:
    """prompt -> the next line without its newline, or None at EOF. On a real terminal `input()`
    gives line editing and history (through `readline` when it imports)."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            importlib.import_module("readline")  # input() uses it once imported
        except ImportError:
            pass

        def read(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None

        return read

    def read(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return line.rstrip("\r\n") if line else None

    return read


def _writer(stdout) -> Callable[[str], None]:
    """Writes each streamed piece at once (a terminal shows text as it comes)."""
    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    return show


def _interactive(session: ChatSession, stdin, stdout) -> int:
    print(_banner(session), file=stdout)
    read = _reader(stdin, stdout)
    show = _writer(stdout)
    while True:
        try:
            line = read("you> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, ask again
            print(file=stdout)
            continue
        if line is None:  # Ctrl-D
            print(file=stdout)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, stdout):
                return 0
            continue
        show("assistant> ")
        try:
            session.reply(line, show)
        except KeyboardInterrupt:
            show(" [interrupted]")
        except UserError as e:
            show(f"error: {e}")
        print(file=stdout, flush=True)


def run_repl(session: ChatSession, stdin=None, stdout=None, interactive: bool | None = None) -> int:
    """Chat on `stdin`/`stdout` (default: the process's); interactive when stdin is a terminal.

    Piped: all of stdin is one user message and only the answer is printed; empty input is an
    error (status 2). Returns the exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    if interactive is None:
        interactive = stdin.isatty()
    if interactive:
        return _interactive(session, stdin, stdout)
    text = stdin.read().strip()
    if not text:
        print("chatfoundry chat: error: no input: pipe the user message on standard input", file=sys.stderr)
        return 2
    try:
        session.reply(text, _writer(stdout))
    except UserError as e:
        print(f"chatfoundry chat: error: {e}", file=sys.stderr)
        return 2
    print(file=stdout, flush=True)
    return 0
