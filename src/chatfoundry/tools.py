"""Tools, the talk's "plugins": the model calls a calculator in the chat format and the runtime
feeds the result back before the model goes on (Toolformer, ChatGPT plugins).

The format lives inside the chat template and needs no new token. The tools on offer are named
in the system message; an assistant turn that calls one opens with <|tool|>, then the tool's name
and its arguments as JSON; the runtime answers with a tool message and the assistant continues:

    <|system|>Tools: calculator.<|end|><|user|>What is 347 times 29?<|end|>
    <|assistant|><|tool|>calculator {"expression": "347 times 29"}<|end|>
    <|tool|>10063<|end|>
    <|assistant|>347 times 29 is 10063.<|end|>

Several calls in one turn are several <|tool|> segments. Through the API the same turn is
OpenAI's `tool_calls` (serve/api.py); there the client runs the tools, as OpenAI's clients do.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chatfoundry.generation import GenerationConfig, generate_batch
from chatfoundry.tokenizer import SPECIAL_TOKENS, chat_stop_ids, encode_chat, special_id

CALL = SPECIAL_TOKENS["tool"]  # opens a tool call inside an assistant turn, and a tool's answer


class ToolError(ValueError):
    """A call the tool cannot run; its message goes back to the model as the tool's answer."""


# ---------------------------------------------------------------- the calculator

MAX_EXPRESSION = 200  # characters
MAX_MAGNITUDE = 10**30  # every intermediate result: keeps the work bounded whatever the input
MAX_EXPONENT = 100

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


_WORDS = ((re.compile(r"\bplus\b"), "+"), (re.compile(r"\bminus\b"), "-"),
          (re.compile(r"\b(times|multiplied by)\b"), "*"), (re.compile(r"\bdivided by\b"), "/"))


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % ** (or ^), parentheses, and
    the words plus, minus, times, multiplied by, divided by (so a model can pass a question's own
    words: "7 times 8", copied, not translated).

    Python's own parser reads it (`ast`, never `eval`); only number literals and those operators
    are walked, and the size of the text, of every intermediate value and of exponents is
    bounded, so no input runs long or grows without end.
    """
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression longer than {MAX_EXPRESSION} characters")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    for word, symbol in _WORDS:
        text = word.sub(symbol, text)
    if not text:
        raise ToolError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"cannot parse {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent over {MAX_EXPONENT}")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result too large") from None
        if isinstance(result, complex):  # (-8) ** 0.5
            raise ToolError("no real result")
        return _bounded(result)
    raise ToolError(f"only numbers and + - * / // % ** are allowed, not {ast.unparse(node)!r}")


def _bounded(x: int | float) -> int | float:
    if isinstance(x, float) and not math.isfinite(x) or abs(x) > MAX_MAGNITUDE:
        raise ToolError("result too large")
    return x


def format_number(x: int | float) -> str:
    """10063, 3.5, 0.3333333333: whole floats as integers, others to 10 significant digits."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.10g}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------- tools and calls


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments, as OpenAI's function tools declare them
    run: Callable[[dict], str]

    def spec(self) -> dict:
        """The tool as an OpenAI `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _calculator(arguments: dict) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ToolError('calculator: give {"expression": "..."}')
    return format_number(calculate(expression))


CALCULATOR = Tool("calculator", "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses "
                  "(or the words plus, minus, times, divided by).",
                  {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
                  _calculator)
TOOLS = {CALCULATOR.name: CALCULATOR}


def declare(messages: list[dict], names: Sequence[str]) -> list[dict]:
    """The messages with the tools on offer named in the system message (one is added if none)."""
    if not names:
        return list(messages)
    line = f"Tools: {', '.join(names)}."
    if messages and messages[0]["role"] == "system" and messages[0]["content"]:
        return [{"role": "system", "content": f"{messages[0]['content']} {line}"}, *messages[1:]]
    return [{"role": "system", "content": line}, *messages[1 if messages and messages[0]["role"] == "system" else 0:]]


def call_text(name: str, arguments: dict | str) -> str:
    """One call as the model writes it: `<|tool|>name {"arg": ...}`."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return f"{CALL}{name} {args}"


def parse_call(text: str) -> tuple[str, dict]:
    """`name {"arg": ...}` (the text after <|tool|>) -> (name, arguments); ToolError if malformed."""
    name, _, args = text.strip().partition(" ")
    if not name.isidentifier():
        raise ToolError(f"malformed tool call {text.strip()[:60]!r}: expected a name, then JSON arguments")
    try:
        arguments = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
        raise ToolError(f"malformed arguments of {name}: not JSON") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"malformed arguments of {name}: expected a JSON object")
    return name, arguments


def split_calls(tokenizer, ids: Sequence[int]) -> list[str] | None:
    """The calls in a generated turn (the ids after <|assistant|>) as texts, or None when the turn
    is an answer in words (it does not open with <|tool|>). Decoding drops special tokens, the
    closing <|end|> among them."""
    tool = special_id(tokenizer, "tool")
    if tool is None or not ids or ids[0] != tool:
        return None
    calls, current = [], []
    for token in list(ids[1:]) + [tool]:
        if token == tool:
            calls.append(tokenizer.decode(current, skip_special_tokens=True))
            current = []
        else:
            current.append(token)
    return calls


def run_call(text: str, tools: dict[str, Tool] = TOOLS) -> tuple[str, dict, str]:
    """Run one call text: (name, arguments, result). A failing call answers with its error, so the
    model (or the user) sees what went wrong."""
    try:
        name, arguments = parse_call(text)
    except ToolError as e:
        return "", {}, f"error: {e}"
    tool = tools.get(name)
    if tool is None:
        return name, arguments, f"error: no tool named {name!r}"
    try:
        return name, arguments, tool.run(arguments)
    except ToolError as e:
        return name, arguments, f"error: {e}"


# ---------------------------------------------------------------- the runtime loop


def answer_with_tools(model, tokenizer, conversations: Sequence[list[dict]], tools: dict[str, Tool] = TOOLS,
                      max_new_tokens: int = 48, max_rounds: int = 3, batch_size: int = 64) -> list[list[dict]]:
    """Greedy replies to conversations (each ending with a user message) with `tools` on offer:
    each round decodes every open conversation in one batch; a turn that calls tools gets their
    results as tool messages and goes round again, an answer in words closes it. Returns the new
    messages of each conversation (calls, tool results, the answer); after `max_rounds` rounds of
    calls, the last turn stands as it is."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=chat_stop_ids(tokenizer))
    new: list[list[dict]] = [[] for _ in conversations]
    open_ = list(range(len(conversations)))
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_rounds + 1):
            if not open_:
                break
            prompts = [encode_chat(tokenizer, declare(conversations[i], list(tools)) + new[i]) for i in open_]
            replies = []
            with torch.inference_mode():
                for start in range(0, len(prompts), batch_size):
                    replies += generate_batch(model, prompts[start:start + batch_size], cfg).sequences
            still = []
            for i, ids in zip(open_, replies):
                calls = split_calls(tokenizer, ids)
                if calls is None:
                    new[i].append({"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True).strip()})
                    continue
                new[i].append({"role": "assistant", "content": "".join(CALL + c for c in calls)})
                new[i] += [{"role": "tool", "content": run_call(c, tools)[2]} for c in calls]
                still.append(i)
            open_ = still
    finally:
        model.train(was_training)
    return new


def final_answer(messages: list[dict]) -> str:
    """The last assistant answer in words among `messages` ("" when the model only called tools)."""
    for m in reversed(messages):
        if m["role"] == "assistant" and not m["content"].startswith(CALL):
            return m["content"]
    return ""
