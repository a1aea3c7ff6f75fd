"""Pretraining end to end: artifacts, learning, determinism, bit-exact resume after a kill, the NaN
guard, sampling, file inputs with a cached shard store, the Llama flavour and bf16."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import build_config, load_yaml, to_dict
from chatfoundry.data.builtin import generate_corpus
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import load_tokenizer
from chatfoundry.train.pretrain import PretrainConfig

from conftest import TINY, cli_subprocess_cmd, last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CKPT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "trainer_state.pt")


def run_captured(argv: list[str]) -> tuple[int, str, str]:
    """Like conftest.run_cli, for fixtures wider than one test (capsys is per test)."""
    from chatfoundry.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """stderr lines that are not the progress bar (tqdm redraws with carriage returns)."""
    return [ln for ln in err.splitlines() if "error" in ln.lower() and "pretrain:" in ln]


def train_records(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


def val_records(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "val_loss" in r]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One TINY run shared by the read-only tests below: (out dir, --json summary)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    code, stdout, err = run_captured(["pretrain", *TINY, "--out", str(out), "--json"])
    assert code == 0, err
    return out, last_json(stdout)


# ---------------------------------------------------------------- artifacts


def test_tiny_run_summary(tiny_run):
    out, summary = tiny_run
    assert summary["steps"] == 12
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] > 0
    assert math.isfinite(summary["train_loss"])
    assert isinstance(summary["params"], int) and summary["params"] > 0
    assert summary["checkpoint"] == str(out / "checkpoint")
    assert len(summary["samples"]) == 1


def test_tiny_run_leaves_every_artifact(tiny_run):
    out, summary = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "samples.txt"):
        assert (out / name).is_file(), name
    for name in CKPT_FILES:
        assert (out / "checkpoint" / name).is_file(), name
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (out / "loss.png").stat().st_size > 2000
    samples = (out / "samples.txt").read_text()
    assert "--- step 6" in samples and "--- step 12" in samples


def test_config_yaml_is_the_resolved_config(tiny_run):
    out, summary = tiny_run
    saved = build_config(PretrainConfig, [("config.yaml", load_yaml(out / "config.yaml"))])
    from chatfoundry.cli import build_parser
    from chatfoundry.config import resolve_config

    resolved = resolve_config(PretrainConfig, build_parser().parse_args(["pretrain", *TINY, "--out", str(out)]))
    vocab = load_tokenizer(out / "checkpoint").get_vocab_size()
    resolved.model.vocab_size = vocab  # the run fills in the tokenizer's size
    assert saved == resolved
    assert to_dict(saved)["train"]["steps"] == 12
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["n_embd"] == 32


def test_metrics_jsonl(tiny_run):
    out, summary = tiny_run
    train, val = train_records(out), val_records(out)
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in val] == [6, 12]
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["lr"] > 0
    assert val[-1]["val_loss"] == pytest.approx(summary["val_loss"])
    assert train[-1]["loss"] == pytest.approx(summary["train_loss"])
    # Warmup then cosine decay.
    lrs = [r["lr"] for r in train]
    assert lrs[0] < lrs[1] and lrs[1] == max(lrs) and lrs[-1] == min(lrs[1:])


def test_trainer_state_and_checkpoint_load(tiny_run):
    out, summary = tiny_run
    state = ckpt.load_trainer_state(out)
    assert state["step"] == 12
    assert {"optimizer", "sampler", "torch_rng"} <= state.keys()
    model, tok = ckpt.load_model(out)
    assert model.config.vocab_size == tok.get_vocab_size()
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    # The default flavour (GPT-2's block, rotary positions) is transformers' GPT-NeoX.
    assert config["model_type"] == "gpt_neox" and config["hidden_size"] == 32 and config["num_hidden_layers"] == 2


def test_checkpoint_loads_in_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    out, _ = tiny_run
    ours, _ = ckpt.load_model(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- learning


# Measured with a char vocabulary of 83 (ln 83 = 4.42; the untrained model starts at ~4.42): after 160
# steps at lr 3e-3, val_loss 2.71-2.77 over seeds 1337, 1, 2, 3 (0.61-0.63 ln V), below the corpus's
# unigram character entropy of 3.14 nats, so the model uses context. Thresholds keep ~0.3 nats of margin.
LEARN_RATIO = 0.7


def test_pretraining_learns(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", *TINY, "--train.steps", "160", "--train.lr", "3e-3",
                                 "--train.warmup_steps", "10", "--train.eval_every", "80", "--train.eval_batches", "8",
                                 "--train.save_every", "160", "--train.log_every", "20", "--out", str(out), "--json"],
                                capsys)
    assert code == 0, err
    summary = last_json(stdout)
    vocab = load_tokenizer(out / "checkpoint").get_vocab_size()
    first = train_records(out)[0]["loss"]
    assert first == pytest.approx(math.log(vocab), abs=0.15)  # an untrained model is ~uniform
    assert summary["val_loss"] < LEARN_RATIO * math.log(vocab), (summary["val_loss"], math.log(vocab))
    assert summary["train_loss"] < LEARN_RATIO * math.log(vocab)

    text = generate_corpus(60_000)
    counts = Counter(text)
    unigram = -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())
    assert summary["val_loss"] < unigram - 0.15, (summary["val_loss"], unigram)
    vals = [r["val_loss"] for r in val_records(out)]
    assert vals == sorted(vals, reverse=True)


# ---------------------------------------------------------------- determinism and resume


def test_identical_runs_are_bit_identical(tiny_run, tmp_path, capsys):
    out_a, _ = tiny_run
    out_b = tmp_path / "b"
    code, _, err = run_cli(["pretrain", *TINY, "--out", str(out_b)], capsys)
    assert code == 0, err
    assert (out_a / "checkpoint" / "model.safetensors").read_bytes() == \
        (out_b / "checkpoint" / "model.safetensors").read_bytes()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_metrics(out_a / "metrics.jsonl")) == strip(read_metrics(out_b / "metrics.jsonl"))


def test_different_seed_gives_different_weights(tiny_run, tmp_path, capsys):
    out_a, _ = tiny_run
    code, _, err = run_cli(["pretrain", *TINY, "--seed", "1", "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert (out_a / "checkpoint" / "model.safetensors").read_bytes() != \
        (tmp_path / "c" / "checkpoint" / "model.safetensors").read_bytes()


RESUME_STEPS = 240  # long enough that the first checkpoint (step 6) lands well before the end


def _resume_args(out) -> list[str]:
    return [*TINY, "--train.steps", str(RESUME_STEPS), "--train.save_every", "6", "--train.eval_every", "60",
            "--train.log_every", "3", "--out", str(out)]


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(tmp_path):
    # CHATFOUNDRY_CACHE: the session's private cache. One thread per process: fast on a busy
    # 2-core machine, and the same arithmetic in all three runs.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a, b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run([*cli_subprocess_cmd(), "pretrain", *_resume_args(a)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    # Run B: the same run, killed with SIGKILL as soon as its first checkpoint is on disk.
    proc = subprocess.Popen([*cli_subprocess_cmd(), "pretrain", *_resume_args(b)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = b / "checkpoint" / ckpt.TRAINER_STATE
    deadline = time.monotonic() + 300
    while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "run B ended before it could be killed"
    killed_at = int(ckpt.load_trainer_state(b)["step"])
    print(f"killed at step {killed_at}")
    assert killed_at % 6 == 0 and 0 < killed_at < RESUME_STEPS

    resumed = subprocess.run([*cli_subprocess_cmd(), "pretrain", *_resume_args(b), "--resume", "--json"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert last_json(resumed.stdout)["steps"] == RESUME_STEPS
    assert ckpt.load_trainer_state(b)["step"] == RESUME_STEPS

    wa = load_file(a / "checkpoint" / "model.safetensors")
    wb = load_file(b / "checkpoint" / "model.safetensors")
    assert tensors_equal(wa, wb), f"resumed from step {killed_at}: weights differ from the straight run"
    sa, sb = ckpt.load_trainer_state(a), ckpt.load_trainer_state(b)
    assert sa["sampler"] == sb["sampler"] and torch.equal(sa["torch_rng"], sb["torch_rng"])

    # metrics.jsonl: the whole history, each step once, and the same losses as the straight run.
    tb, vb = train_records(b), val_records(b)
    steps = [r["step"] for r in tb]
    assert steps == sorted(set(steps)), "duplicated or out-of-order steps after resume"
    assert steps[0] == 1 and steps[-1] == RESUME_STEPS
    assert [r["step"] for r in vb] == [r["step"] for r in val_records(a)] == list(range(60, RESUME_STEPS + 1, 60))
    by_step = {r["step"]: r for r in train_records(a)}
    common = [r for r in tb if r["step"] in by_step]
    assert len(common) >= len(by_step) - 1
    for r in common:
        assert r["loss"] == by_step[r["step"]]["loss"] and r["lr"] == by_step[r["step"]]["lr"], r["step"]
    assert [r["val_loss"] for r in vb] == [r["val_loss"] for r in val_records(a)]


def test_resume_of_a_finished_run_changes_nothing_but_can_extend(tiny_run, tmp_path, capsys):
    """--resume with more steps continues from the saved step and keeps the history."""
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["pretrain", *TINY, "--train.steps", "18", "--out", str(out), "--resume",
                                 "--json"], capsys)
    assert code == 0, err
    assert ckpt.load_trainer_state(out)["step"] == 18
    steps = [r["step"] for r in train_records(out)]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 18
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 18


# ---------------------------------------------------------------- NaN guard


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    original = DecoderLM.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, cache=None):
        logits, loss = original(self, idx, targets, cache)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] >= 3:  # one forward per step (no accumulation): step 3 onwards
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(DecoderLM, "forward", forward)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", *TINY, "--train.save_every", "2", "--train.log_every", "1",
                                 "--out", str(out), "--json"], capsys)
    assert code == 1
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, lines
    assert "nan" in lines[0].lower() and "step 3" in lines[0]
    assert stdout.strip() == "" or not stdout.strip().splitlines()[-1].startswith("{")

    monkeypatch.setattr(DecoderLM, "forward", original)
    assert ckpt.load_trainer_state(out)["step"] == 2
    model, _ = ckpt.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(r["step"] for r in train_records(out)) == 2
    assert not (out / "checkpoint.tmp").exists()


# ---------------------------------------------------------------- sample


def _sample(run, capsys, *extra) -> list[str]:
    code, stdout, err = run_cli(["sample", "--ckpt", str(run), "--prompt", "The ", "--max_new_tokens", "20",
                                 "--json", *extra], capsys)
    assert code == 0, err
    result = last_json(stdout)
    assert result["prompt"] == "The "
    return result["samples"]


def test_sample_json(tiny_run, capsys):
    out, _ = tiny_run
    samples = _sample(out, capsys, "--num_samples", "3")
    assert len(samples) == 3 and all(isinstance(s, str) for s in samples)  # "" if eos came first
    # The checkpoint folder itself works as well as the run folder.
    assert _sample(out / "checkpoint", capsys, "--num_samples", "3") == samples


def test_sample_same_seed_same_output(tiny_run, capsys):
    out, _ = tiny_run
    first = _sample(out, capsys, "--seed", "7", "--num_samples", "2")
    assert _sample(out, capsys, "--seed", "7", "--num_samples", "2") == first
    others = [_sample(out, capsys, "--seed", str(s), "--num_samples", "2") for s in (8, 9)]
    assert any(o != first for o in others), "the seed has no effect on sampling"


def test_sample_temperature_zero_is_greedy(tiny_run, capsys):
    out, _ = tiny_run
    a = _sample(out, capsys, "--temperature", "0", "--seed", "1", "--num_samples", "2")
    b = _sample(out, capsys, "--temperature", "0", "--seed", "2")
    assert a[0] == a[1] == b[0]

    model, tok = ckpt.load_model(out)
    ids = tok.encode("The ", add_special_tokens=False).ids
    with torch.no_grad():
        nxt = int(model(torch.tensor([ids]))[0][0, -1].argmax())
    eos = tok.token_to_id("<|eos|>")
    if nxt != eos:
        assert a[0].startswith(tok.decode([nxt], skip_special_tokens=True))


def test_sample_prompt_too_long(tiny_run, capsys):
    out, _ = tiny_run
    code, stdout, err = run_cli(["sample", "--ckpt", str(out), "--prompt", "a" * 40], capsys)
    assert code == 2
    assert "prompt" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- text files, BPE, cached shards


def test_folder_of_text_files_with_bpe_and_cached_shards(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHATFOUNDRY_CACHE", str(cache))
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    text = generate_corpus(30_000, seed=5)
    third = len(text) // 3
    (docs / "a.txt").write_text(text[:third], encoding="utf-8")
    (docs / "b.txt").write_text(text[third:2 * third], encoding="utf-8")
    (docs / "sub" / "c.md").write_text(text[2 * third:], encoding="utf-8")
    (docs / ".hidden").write_bytes(b"\xff\xfe not utf-8, and ignored because hidden")

    argv = ["pretrain", *TINY, "--tokenizer.kind", "bpe", "--tokenizer.vocab_size", "300", "--data", str(docs),
            "--json"]
    code, stdout, err = run_cli([*argv, "--out", str(tmp_path / "r1")], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    assert math.isfinite(summary["val_loss"])
    tok = load_tokenizer(tmp_path / "r1" / "checkpoint")
    assert 266 < tok.get_vocab_size() <= 300
    assert ckpt.model_config(tmp_path / "r1").vocab_size == tok.get_vocab_size()

    shard_dirs = [d for d in (cache / "shards").iterdir() if d.is_dir()]
    assert len(shard_dirs) == 1 and not any(".tmp" in d.name for d in shard_dirs)
    train_bin = shard_dirs[0] / "train.bin"
    meta = json.loads((shard_dirs[0] / "meta.json").read_text())
    assert train_bin.stat().st_size == meta["train_tokens"] * 2  # uint16 for a 300-token vocabulary
    assert meta["train_tokens"] > 5_000
    mtime = train_bin.stat().st_mtime_ns
    tokenizers_before = sorted(p.name for p in (cache / "tokenizers").iterdir())

    code, stdout, err = run_cli([*argv, "--out", str(tmp_path / "r2")], capsys)
    assert code == 0, err
    assert sorted(d.name for d in (cache / "shards").iterdir()) == [shard_dirs[0].name]
    assert train_bin.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert sorted(p.name for p in (cache / "tokenizers").iterdir()) == tokenizers_before
    assert last_json(stdout)["val_loss"] == summary["val_loss"]

    # Editing an input makes a new cache entry; the old one is left alone.
    with (docs / "b.txt").open("a", encoding="utf-8") as f:
        f.write("\n\nOne more document, added later.\n")
    code, stdout, err = run_cli([*argv, "--out", str(tmp_path / "r3")], capsys)
    assert code == 0, err
    assert len([d for d in (cache / "shards").iterdir() if d.is_dir()]) == 2
    assert train_bin.stat().st_mtime_ns == mtime


def test_a_jsonl_corpus_is_a_document_per_line(tmp_path):
    """`world export`'s corpus.jsonl (and Hub text datasets): each line's "text" is a document,
    with <|eos|> after it as after each built-in document; a line without one names its place."""
    from chatfoundry.data.shards import read_documents, tokenize_documents
    from chatfoundry.errors import UserError
    from chatfoundry.tokenizer import special_id, train_tokenizer

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One.", "Two\nlines.", "Three.")))
    plain = tmp_path / "notes.txt"
    plain.write_text('{"text": "read as it is"}\n')
    docs = list(read_documents([path, plain]))
    assert docs == ["One.", "Two\nlines.", "Three.", '{"text": "read as it is"}\n']
    tok = train_tokenizer(iter(docs), "char")
    ids = tokenize_documents(tok, iter(docs[:3]))
    assert list(ids).count(special_id(tok, "eos")) == 3
    path.write_text('{"text": "fine"}\n{"txt": "a typo"}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: a corpus line needs a \"text\" string"):
        list(read_documents([path]))


def test_a_tokenizer_another_run_cached_meanwhile_is_kept(tmp_path, capsys, monkeypatch):
    """Two runs on one cache may train the same tokenizer at once. Each writes its own temporary
    folder; the one that lands second keeps the first's entry (they once shared one temporary
    folder, and a run deleted the other's half-written files: "cannot write tokenizer")."""
    import chatfoundry.train.pretrain as pretrain

    monkeypatch.setenv("CHATFOUNDRY_CACHE", str(tmp_path / "cache"))
    save = pretrain.save_tokenizer
    landed = {}

    def save_while_another_run_lands(tok, path):
        entry = path.with_name(path.name.split(".tmp")[0])
        save(tok, entry)  # the other run, finishing first
        landed["mtime"] = (entry / "tokenizer.json").stat().st_mtime_ns
        save(tok, path)

    monkeypatch.setattr(pretrain, "save_tokenizer", save_while_another_run_lands)
    code, _, err = run_cli(["pretrain", *TINY, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    (entry,) = (tmp_path / "cache" / "tokenizers").iterdir()  # no temporary folder left
    assert (entry / "tokenizer.json").stat().st_mtime_ns == landed["mtime"]


# ---------------------------------------------------------------- flavours and dtypes


def test_llama_flavour_runs_and_loads_in_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", *TINY, "--model.flavour", "llama", "--model.n_head", "4",
                                 "--model.n_kv_head", "2", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert math.isfinite(last_json(stdout)["val_loss"])
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2

    ours, _ = ckpt.load_model(out)
    assert ours.config.pos == "rope" and ours.config.n_kv_head == 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)


def test_bf16_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", *TINY, "--dtype", "bf16", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    assert math.isfinite(summary["val_loss"]) and math.isfinite(summary["train_loss"])
    assert all(math.isfinite(r["loss"]) for r in train_records(out))
    weights = load_file(out / "checkpoint" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # bf16 autocast, fp32 weights


@pytest.mark.parametrize("device, world, want", [("cuda", 1, 0), ("auto", 1, 0), ("cuda:1", 1, 1), ("cuda", 2, 1)])
def test_a_cuda_device_gets_an_index(monkeypatch, device, want, world):
    # torch.cuda.set_device refuses a bare "cuda" (seen on the first GPU run): the runtime names one.
    from chatfoundry.train import stage
    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: picked.append(torch.cuda._utils._get_device_index(d)))
    monkeypatch.setattr(stage.dist, "is_initialized", lambda: True)  # no process group for world 2
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", "1")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        rt = stage.setup_runtime(device)
    finally:  # the runtime turns TF32 on for CUDA; leave the other tests as they were
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert rt.device == torch.device("cuda", want) and picked == [want]
