"""Models and datasets by Hub name (hf:ORG/NAME), read from a hub cache built here, offline.

The cache has huggingface_hub's layout (models--ORG--NAME/refs/main, snapshots/COMMIT/ linking into
blobs/), so snapshot_download and datasets run their own code with HF_HUB_OFFLINE=1 and no network.
The CLI runs in a child process, as huggingface_hub reads HF_HOME and HF_HUB_OFFLINE on import.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from chatfoundry import adapters
from chatfoundry.checkpoint import load_model
from chatfoundry.errors import UserError
from chatfoundry.tokenizer import save_tokenizer
from conftest import cli_subprocess_cmd, last_json, run_cli, subprocess_env, tiny_chat_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")
pytest.importorskip("datasets")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL, CHAT, BAD = "org/tiny-llama", "org/chat", "org/bad"
QUICK = ("--train.steps 3 --train.batch_size 4 --train.eval_every 3 --train.save_every 3 --train.warmup_steps 1 "
         "--eval.per_family 0 --device cpu").split()


def add_to_hub_cache(hub: Path, repo_type: str, repo: str, folder: Path) -> None:
    """`folder`'s files as huggingface_hub caches a download of `repo` at COMMIT: content in
    blobs/ by hash, snapshots/COMMIT/ linking to it, refs/main naming the commit."""
    root = hub / f"{repo_type}s--{repo.replace('/', '--')}"
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(file.read_bytes())
        link = root / "snapshots" / COMMIT / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def chat_rows(n: int) -> list[dict]:
    questions = ["hello there", "how are you?", "be brief"]
    return [{"messages": [{"role": "user", "content": questions[i % 3]},
                          {"role": "assistant", "content": "fine thanks" if i % 2 else "hello"}], "id": i}
            for i in range(n)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with a tiny random Llama (our char tokenizer with the chat tokens) and two chat
    datasets, one with a bad row; yields (HF_HOME, the transformers model)."""
    home, src = tmp_path_factory.mktemp("hf_home"), tmp_path_factory.mktemp("hub_src")
    tok = tiny_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    assert tok.get_vocab_size() <= config.vocab_size
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # spread the weights so equal logits mean something
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(src / "model")
    save_tokenizer(tok, src / "model")
    add_to_hub_cache(home / "hub", "model", MODEL, src / "model")

    card = "---\nlicense: mit\n---\nA few chats.\n"  # a dataset card, as Hub datasets have
    for repo, rows in ((CHAT, chat_rows(12)), (BAD, [*chat_rows(2), {"messages": [{"role": "user", "content": "hi"}]}])):
        folder = src / repo
        (folder / "data").mkdir(parents=True)
        (folder / "README.md").write_text(card)
        (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        add_to_hub_cache(home / "hub", "dataset", repo, folder)
    return home, model


def cli(hub, *args: str) -> subprocess.CompletedProcess:
    """`chatfoundry ARGS` in a child process, offline, with `hub`'s HF_HOME as its only Hub cache."""
    env = {**subprocess_env(), "HF_HOME": str(hub[0]), "HF_HUB_OFFLINE": "1"}
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE"):
        env.pop(var, None)  # these would override HF_HOME
    return subprocess.run([*cli_subprocess_cmd(), *args], env=env, capture_output=True, text=True, timeout=300)


def test_convert_from_a_hub_name_gives_equal_logits(hub, tmp_path):
    done = cli(hub, "convert", "--from_hf", MODEL, "--out", str(tmp_path / "ours"))
    assert done.returncode == 0, done.stderr
    ours, _ = load_model(tmp_path / "ours")
    ids = torch.tensor([[3, 17, 5, 42, 8, 11, 2, 60]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hub[1](ids).logits, atol=1e-5, rtol=0)


def test_sft_on_a_hub_model_and_dataset(hub, tmp_path):
    """LoRA on the Hub model, converted once into the cache; the Hub dataset's rows are the data."""
    done = cli(hub, "sft", "--init", f"hf:{MODEL}", "--data", f"hf:{CHAT}", "--peft", "lora",
               "--out", str(tmp_path / "run"), *QUICK, "--json")
    assert done.returncode == 0, done.stderr
    assert last_json(done.stdout)["examples"] == 11  # 12 rows, one held out for validation
    converted = Path(os.environ["CHATFOUNDRY_CACHE"]) / "hub" / f"{MODEL.replace('/', '--')}@{COMMIT}"
    assert f"converted to {converted}" in done.stderr
    base, _ = adapters.read_adapter_config(tmp_path / "run" / "checkpoint")
    assert base == converted.resolve()

    # Any command that reads a checkpoint takes the name; the conversion is not done again.
    done = cli(hub, "generate", "--ckpt", f"hf:{MODEL}", "--prompt", "how are", "--max_new_tokens", "4")
    assert done.returncode == 0 and "converted" not in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    (["convert", "--from_hf", "org/absent"],
     "hf:org/absent: not in the hub cache (HF_HUB_OFFLINE=1, cache "),
    (["convert", "--from_hf", f"hf:{MODEL}@v2"],  # a revision the cache has no ref for
     f"hf:{MODEL}@v2: not in the hub cache (HF_HUB_OFFLINE=1, cache "),
    (["sft", "--init", f"hf:{MODEL}", "--data", f"hf:{BAD}", *QUICK],
     f"hf:{BAD}:train row 2: no assistant message to learn from"),
    (["sft", "--init", f"hf:{MODEL}", "--data", f"hf:{CHAT}:test", *QUICK],
     f"hf:{CHAT}: Unknown split \"test\". Should be one of ['train']."),
])
def test_names_the_hub_cannot_give_get_one_line(hub, tmp_path, args, message):
    done = cli(hub, *args, "--out", str(tmp_path / "out"))
    lines = done.stderr.strip().splitlines()  # after datasets' progress bars, where it read the rows
    assert done.returncode == 2 and sum("error" in line for line in lines) == 1, done.stderr
    assert lines[-1].startswith(f"chatfoundry {args[0]}: error: {message}"), done.stderr
    assert not (tmp_path / "out").exists()


def test_without_the_extra_one_clear_line(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def without(*missing):
        def fake(name, *args, **kwargs):
            if name.split(".")[0] in missing:
                raise ImportError(name)
            return real_import(name, *args, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "__import__", without("huggingface_hub"))
    code, _, err = run_cli(["convert", "--from_hf", f"hf:{MODEL}", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"chatfoundry convert: error: hf:{MODEL}: Hub models and datasets need the huggingface_hub package: "
        "pip install 'chatfoundry[hub]'")

    from chatfoundry.data.formats import load_sft

    monkeypatch.setattr(builtins, "__import__", without("datasets"))
    with pytest.raises(UserError, match=r"^hf:org/chat: Hub datasets need the datasets package: "
                                        r"pip install 'chatfoundry\[hub\]'$"):
        load_sft(f"hf:{CHAT}")
