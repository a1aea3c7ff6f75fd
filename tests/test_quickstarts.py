"""The README's quickstarts run as written, in order, in one folder, on tiny settings: each
`chatfoundry` command the README shows runs with tiny settings appended (the command line's last
value wins), `chat` gets a line on its stdin, `serve` starts in the background on a free port and
the README's `openai` snippet calls it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_mlm import HEAD_TINY, MLM_TINY
from test_pipeline import TINY_PIPELINE
from test_seq2seq import TINY_T5

from conftest import subprocess_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--train.steps", "4", "--train.batch_size", "4", "--train.warmup_steps", "1", "--train.eval_every", "2",
         "--train.save_every", "4"]
RL = ["--iterations", "2", "--rollout.max_new_tokens", "8", "--eval.per_family", "2", "--eval.max_new_tokens", "8",
      "--eval.samples", "2"]
# What each command gets appended: (command, a word its line must hold or None) -> flags.
TINY = {
    ("pipeline", None): TINY_PIPELINE,
    ("pretrain", "mlm"): [*MLM_TINY, "--data.corpus_chars", "60000", "--encoder.max_position_embeddings", "80",
                          "--train.block_size", "32", "--train.steps", "6", "--train.eval_every", "3",
                          "--train.save_every", "6"],
    ("pretrain", "span"): [*TINY_T5, "--train.steps", "6", "--train.eval_every", "3", "--train.save_every", "6"],
    ("sft", None): [*STEPS, "--eval.per_family", "0", "--device", "cpu"],
    ("rm", None): [*STEPS, "--device", "cpu"],
    ("dpo", None): [*STEPS, "--eval.per_family", "2", "--eval.max_new_tokens", "8", "--eval.samples", "2"],
    ("ppo", None): [*RL, "--rollout.batch_size", "8", "--rollout.pool", "40", "--minibatch_size", "4", "--epochs", "1"],
    ("grpo", None): [*RL, "--rollout.batch_size", "8", "--group", "4", "--minibatch_size", "4", "--epochs", "1"],
    ("eval", None): ["--per_family", "2", "--tool_questions", "2", "--max_new_tokens", "8"],
    ("calibrate", None): ["--questions", "20", "--hallucination", "4", "--max_new_tokens", "8", "--bootstrap", "50"],
    ("finetune-head", None): [*HEAD_TINY, "--train.steps", "4", "--train.eval_every", "2"],
    ("finetune-seq2seq", None): [*STEPS, "--device", "cpu"],
    ("rl", "train"): ["--steps", "4096", "--progress", "false"],
    ("rl", "compare"): ["--steps", "4096", "--seeds", "1"],
}

# The `chatfoundry` the quickstarts call: the real one, tiny settings appended.
WRAPPER = textwrap.dedent("""\
    #!{python}
    import json, os, subprocess, sys, time, urllib.request
    argv, tiny = sys.argv[1:], json.load(open({tiny!r}))
    extra = next((t[2] for t in tiny if t[0] == argv[0] and (t[1] is None or t[1] in argv)), [])
    cmd = [sys.executable, "-m", "chatfoundry", *argv, *extra]
    if argv[0] == "serve":  # in the background, on a free port; the test stops it
        port = os.environ["QUICKSTART_PORT"]
        server = subprocess.Popen([*cmd, "--port", port], stdout=open("serve.log", "w"), stderr=subprocess.STDOUT)
        open("serve.pid", "w").write(str(server.pid))
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{{port}}/health", timeout=1)
                sys.exit(0)
            except OSError:
                time.sleep(0.1)
        sys.exit("serve did not come up")
    sys.exit(subprocess.run(cmd, input="Hello!\\n" if argv[0] == "chat" else None, text=True).returncode)
    """)


def _sections(readme: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The quickstarts: (title, [(language, code), ...]) for each `### N. ...` under `## Quickstarts`."""
    part = readme.split("## Quickstarts", 1)[1].split("\n## ", 1)[0]
    out = []
    for chunk in re.split(r"\n### ", part)[1:]:
        title = chunk.splitlines()[0]
        out.append((title, re.findall(r"```(\w+)\n(.*?)```", chunk, flags=re.S)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_has_the_quickstarts_the_issue_names():
    titles = [t for t, _ in _sections((ROOT / "README.md").read_text())]
    assert len(titles) == 9 and all(re.match(rf"{i + 1}\. ", t) for i, t in enumerate(titles)), titles
    text = (ROOT / "README.md").read_text()
    assert "**The KL penalty is `--kl.coef`**" in text and len(text.splitlines()) < 300


def test_every_quickstart_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("openai")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "tiny.json").write_text(json.dumps([[c, w, flags] for (c, w), flags in TINY.items()]))
    wrapper = bin_dir / "chatfoundry"
    wrapper.write_text(WRAPPER.format(python=sys.executable, tiny=str(tmp_path / "tiny.json")))
    wrapper.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    port = _free_port()
    env = {**subprocess_env(), "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "QUICKSTART_PORT": str(port)}
    try:
        for title, blocks in _sections((ROOT / "README.md").read_text()):
            for lang, code in blocks:
                if lang == "python":
                    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                    cmd = [sys.executable, "-c", code]
                else:
                    cmd = ["bash", "-euo", "pipefail", "-c", code]
                t = time.perf_counter()
                done = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, timeout=900)
                assert done.returncode == 0, f"quickstart {title!r} failed:\n{code}\n{done.stderr[-3000:]}"
                print(f"{title}: {lang} block in {time.perf_counter() - t:.0f} s")
    finally:
        pid = work / "serve.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGTERM)
    assert (work / "runs" / "demo" / "report.md").is_file() and (work / "hf" / "sft" / "config.json").is_file()
    assert (work / "runs" / "my-ppo" / "eval.json").is_file() and (work / "runs" / "calibration").is_dir()
