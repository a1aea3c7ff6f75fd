"""Every `chatfoundry ...` command the README and docs/ name is real: a command line in a code
block parses as written (argparse, no work done); one inline in prose or a table names a real
command and only flags that command has (placeholders such as DIR or `clm|mlm` aside)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from chatfoundry.cli import build_parser
from chatfoundry.config import _option_strings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str) -> list[str]:
    """The shell lines of a Markdown file's fenced (bash, sh, console or bare) and indented code
    blocks, continuation lines joined."""
    lines, out, fence = text.splitlines(), [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        indented = fence is None and line.startswith("    ") and (i == 0 or not lines[i - 1].strip() or
                                                                 lines[i - 1].startswith("    "))
        if (fence is not None and fence in ("", "bash", "sh", "shell", "console")) or indented:
            out.append(stripped)
    joined = "\n".join(out).replace("\\\n", " ")
    return [line.removeprefix("$ ") for line in joined.splitlines()]


def _argv(line: str) -> list[str] | None:
    """The arguments after `chatfoundry` (or `-m chatfoundry`) in a shell line, up to a pipe,
    `&&`, `;` or `&`; None when the line runs no chatfoundry command."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a command line
        return None
    for i, tok in enumerate(tokens):
        if tok.endswith("chatfoundry") and (tok.rsplit("/", 1)[-1] == "chatfoundry" or i and tokens[i - 1] == "-m"):
            if "/" not in tok and i and tokens[i - 1] not in ("-m", "|", "&&", ";", "&") and not tokens[i - 1].endswith("="):
                continue  # "pip install chatfoundry" and the like
            rest = tokens[i + 1:]
            cut = next((j for j, t in enumerate(rest) if t and set(t) <= set("|&;<>")), len(rest))
            return [t for t in rest[:cut] if t != "..."]  # "..." elides more flags
    return None


def _inline(text: str) -> list[str]:
    """The inline code spans that start with `chatfoundry ` (table cells unescape `\\|`)."""
    return [m.replace("\\|", "|") for m in re.findall(r"`(chatfoundry [^`]+)`", text)]


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, int] | None:
    """The (sub)command's parser that `words` names, and how many words named it."""
    used = 0
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            return parser, used
        if used >= len(words) or words[used].startswith("-"):
            return parser, used  # a group named alone: "chatfoundry rl"
        names = words[used].split("|")  # "train|compare|play": each must be real
        if not all(n in sub.choices for n in names):
            return None
        parser, used = sub.choices[names[0]], used + 1


def _parse_error(argv: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for path in DOCS:
        text = path.read_text()
        for line in _blocks(text):
            if _argv(line) is not None:
                cases.append((path.name, "block", line))
        cases += [(path.name, "inline", span) for span in _inline(text)]
    return cases


CASES = _cases()


def test_the_docs_name_commands():
    assert sum(kind == "block" for _, kind, _ in CASES) > 80 and sum(kind == "inline" for _, kind, _ in CASES) > 80


@pytest.mark.parametrize("doc, kind, line", CASES, ids=[f"{d}:{k}:{i}" for i, (d, k, _) in enumerate(CASES)])
def test_every_command_the_docs_name_is_real(doc, kind, line):
    if kind == "block":
        error = _parse_error(_argv(line))
        assert error is None, f"{doc}: `{line}` does not parse: {error}"
        return
    words = line.split()[1:]
    found = _subparser(build_parser(), words)
    assert found is not None, f"{doc}: `{line}` names no chatfoundry command"
    parser, _ = found
    known = _option_strings(parser) | {"--help"}
    flags = [f.rstrip(".,)]") for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9_.]*", line)]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{doc}: `{line}` names flags its command does not have: {', '.join(unknown)}"


def test_the_checker_catches_a_bad_flag_and_a_bad_command():
    assert _parse_error(_argv("chatfoundry ppo --init a --out b --kl.coeff 0.1")) is not None
    assert _parse_error(_argv(".venv/bin/chatfoundry ppo --init a --out b --kl.coef 0.1  # beta")) is None
    assert _argv("echo hi | chatfoundry chat --ckpt x --temperature 0") == ["chat", "--ckpt", "x", "--temperature", "0"]
    assert _argv("torchrun --nproc_per_node 2 -m chatfoundry pretrain --out r") == ["pretrain", "--out", "r"]
    assert _argv("pip install chatfoundry") is None
    assert _subparser(build_parser(), ["frobnicate"]) is None
    assert _subparser(build_parser(), ["rl", "train"]) is not None
