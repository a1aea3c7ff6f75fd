"""Checkpoint folders: layout, transformers compatibility, trainer state, atomic saves under kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import chatfoundry.checkpoint as ckpt_mod
from chatfoundry.checkpoint import load_model, load_trainer_state, model_config, resolve_checkpoint, save_checkpoint
from chatfoundry.errors import UserError
from chatfoundry.models.decoder import FLAVOURS, DecoderConfig, DecoderLM
from chatfoundry.tokenizer import special_id, train_tokenizer

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
        "and by opposing end them. To die: to sleep; no more; and by a sleep to say we end the "
        "heart-ache and the thousand natural shocks that flesh is heir to. 0123456789 XYZ!?\n")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT, TEXT.upper()], kind="char", vocab_size=100)


def tiny_model(tok, flavour: str = "gpt2", seed: int = 0, **overrides) -> DecoderLM:
    base = dict(flavour=flavour, vocab_size=tok.get_vocab_size(), block_size=40, n_layer=2, n_head=4,
                n_kv_head=4, n_embd=16, **FLAVOURS[flavour])
    cfg = DecoderConfig(**{**base, **overrides})
    cfg.validate()
    torch.manual_seed(seed)
    model = DecoderLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # away from the init so norms and biases are not trivial
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids_for(tok, text: str = "to be or not to be") -> torch.Tensor:
    return torch.tensor([tok.encode(text).ids])


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def assert_same_model(a: DecoderLM, b: DecoderLM, ids: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.config == b.config
    assert torch.equal(logits(a, ids), logits(b, ids))


def weights_of(path) -> torch.Tensor:
    model, _ = load_model(path)
    return torch.cat([p.flatten() for p in model.parameters()])


MODEL_CASES = {
    "gpt2": dict(flavour="gpt2"),
    "llama": dict(flavour="llama", n_kv_head=2),
    "llama_untied_bias": dict(flavour="llama", n_kv_head=1, tie_embeddings=False, bias=True),
}


# ---------------------------------------------------------------- save and load


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_save_then_load_is_identical(tmp_path, tok, case):
    model = tiny_model(tok, **MODEL_CASES[case])
    out = save_checkpoint(tmp_path / "run" / "checkpoint", model, tok, trainer_state={"step": 3},
                          generation={"temperature": 0.7})
    assert out == tmp_path / "run" / "checkpoint"
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "trainer_state.pt"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]  # no .tmp / .old left
    loaded, tok2 = load_model(out)
    assert not loaded.training
    assert_same_model(model, loaded, ids_for(tok))
    assert tok2.to_str() == tok.to_str()
    assert model_config(tmp_path / "run") == model.config
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == special_id(tok, "eos") == 2
    assert gen["bos_token_id"] == 1 and gen["pad_token_id"] == 0
    assert gen["max_length"] == model.config.block_size and gen["temperature"] == 0.7


def test_no_trainer_state_file_unless_given(tmp_path, tok):
    out = save_checkpoint(tmp_path / "ck", tiny_model(tok), tok)
    assert not (out / "trainer_state.pt").exists()
    with pytest.raises(UserError, match="trainer_state.pt"):
        load_trainer_state(out)


def test_config_json_uses_hf_field_names(tmp_path, tok):
    gpt2 = tiny_model(tok, "gpt2")
    c = json.loads((save_checkpoint(tmp_path / "g", gpt2, tok) / "config.json").read_text())
    assert c["model_type"] == "gpt2" and c["architectures"] == ["GPT2LMHeadModel"]
    assert (c["n_embd"], c["n_layer"], c["n_head"], c["n_positions"], c["vocab_size"]) == (16, 2, 4, 40, tok.get_vocab_size())
    assert c["eos_token_id"] == 2

    llama = tiny_model(tok, "llama", n_kv_head=2, tie_embeddings=False)
    c = json.loads((save_checkpoint(tmp_path / "l", llama, tok) / "config.json").read_text())
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (16, 2, 4, 2)
    assert c["intermediate_size"] == llama.config.ffn_dim and c["max_position_embeddings"] == 40
    assert c["tie_word_embeddings"] is False and c["hidden_act"] == "silu"
    assert c["chatfoundry"]["n_kv_head"] == 2


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_transformers_loads_our_folder(tmp_path, tok, case):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(tok, **MODEL_CASES[case])
    out = save_checkpoint(tmp_path / "ck", model, tok)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])
    assert theirs.config.model_type == ("gpt2" if case == "gpt2" else "llama")
    theirs.eval()
    ids = ids_for(tok, "Whether 'tis nobler in the mind")
    with torch.no_grad():
        b = theirs(ids).logits
    a = logits(model, ids)
    assert a.std() > 0.05
    assert (a - b).abs().max().item() <= 1e-4

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["to be, or not", "THE QUESTION 42!", "a<|eos|>b", "unseen ~ char"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token_id == special_id(tok, "eos") and hf_tok.pad_token_id == special_id(tok, "pad")
    assert hf_tok.decode(tok.encode("to be").ids) == "to be"


def test_foreign_mix_saves_and_loads_with_our_loader(tmp_path, tok):
    model = tiny_model(tok, "gpt2", pos="sinusoidal", n_kv_head=2, norm="rmsnorm")
    out = save_checkpoint(tmp_path / "checkpoint", model, tok)
    assert json.loads((out / "config.json").read_text())["model_type"] == "chatfoundry"
    loaded, _ = load_model(tmp_path)  # via the run folder
    assert_same_model(model, loaded, ids_for(tok))


def test_load_model_device_and_config_errors(tmp_path, tok):
    out = save_checkpoint(tmp_path / "ck", tiny_model(tok), tok)
    loaded, _ = load_model(out, device=torch.device("cpu"))
    assert next(loaded.parameters()).device.type == "cpu"
    config = json.loads((out / "config.json").read_text())
    del config["chatfoundry"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json"):
        load_model(out)


# ---------------------------------------------------------------- trainer state


class NotATensor:
    pass


def test_trainer_state_round_trip(tmp_path, tok):
    model = tiny_model(tok, "llama", n_kv_head=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    ids = ids_for(tok)
    for _ in range(2):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    rng = np.random.default_rng(1234)
    rng.random(5)
    state = {"step": 2, "optimizer": opt.state_dict(), "numpy_rng": rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(), "data": {"shard": 1, "offset": 4096}, "lr": 1e-3}
    out = save_checkpoint(tmp_path / "checkpoint", model.eval(), tok, trainer_state=state)
    back = load_trainer_state(tmp_path)
    assert back["step"] == 2 and back["data"] == {"shard": 1, "offset": 4096} and back["lr"] == 1e-3
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    sd, sd2 = opt.state_dict(), back["optimizer"]
    assert sd2["param_groups"] == sd["param_groups"]
    assert set(sd2["state"]) == set(sd["state"])
    for i, entry in sd["state"].items():
        for k, v in entry.items():
            assert torch.equal(sd2["state"][i][k], v), (i, k)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(sd2)
    assert back["numpy_rng"] == state["numpy_rng"]
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = back["numpy_rng"]
    assert np.array_equal(rng2.random(10), rng.random(10))

    # weights_only=True: an arbitrary pickled object is refused, never executed, in one clear line
    torch.save({"step": 1, "evil": NotATensor()}, out / "trainer_state.pt")
    with pytest.raises(UserError, match=r"trainer_state.pt: cannot be read.*Weights only load failed"):
        load_trainer_state(out)


# ---------------------------------------------------------------- atomicity


class _OsReplaceFailsAfter:
    """Stands in for the `os` module inside chatfoundry.checkpoint: os.replace dies after `n` calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, []

    def replace(self, src, dst):
        if len(self.calls) >= self.n:
            raise KeyboardInterrupt("simulated kill between the renames")
        self.calls.append((Path(src), Path(dst)))
        os.replace(src, dst)

    def __getattr__(self, name):
        return getattr(os, name)


def test_kill_between_the_two_renames_leaves_the_old_checkpoint(tmp_path, tok, monkeypatch):
    run = tmp_path / "run"
    path = run / "checkpoint"
    old_model, new_model = tiny_model(tok, seed=1), tiny_model(tok, seed=2)
    save_checkpoint(path, old_model, tok, trainer_state={"step": 1})
    fake = _OsReplaceFailsAfter(1)
    monkeypatch.setattr(ckpt_mod, "os", fake)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, new_model, tok, trainer_state={"step": 2})
    monkeypatch.undo()
    assert fake.calls == [(path, run / "checkpoint.old")]
    assert not path.exists() and (run / "checkpoint.old").is_dir() and (run / "checkpoint.tmp").is_dir()

    ids = ids_for(tok)
    for where in (path, run):
        assert resolve_checkpoint(where) == run / "checkpoint.old"
        loaded, _ = load_model(where)
        assert_same_model(old_model, loaded, ids)
        assert load_trainer_state(where)["step"] == 1

    # the next save recovers: the new weights in checkpoint/, nothing else left
    save_checkpoint(path, new_model, tok, trainer_state={"step": 2})
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert_same_model(new_model, load_model(run)[0], ids)
    assert load_trainer_state(run)["step"] == 2


@pytest.mark.parametrize("fail_in", ["save_file", "save_tokenizer", "torch_save"])
def test_crash_while_writing_tmp_leaves_old_checkpoint_untouched(tmp_path, tok, monkeypatch, fail_in):
    path = tmp_path / "checkpoint"
    old_model = tiny_model(tok, seed=1)
    save_checkpoint(path, old_model, tok, trainer_state={"step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if fail_in == "torch_save":
        monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    else:
        monkeypatch.setattr(ckpt_mod, fail_in, boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, tiny_model(tok, seed=2), tok, trainer_state={"step": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert resolve_checkpoint(path) == path
    assert_same_model(old_model, load_model(path)[0], ids_for(tok))
    # a leftover .tmp does not block the next save
    new_model = tiny_model(tok, seed=3)
    save_checkpoint(path, new_model, tok)
    assert_same_model(new_model, load_model(path)[0], ids_for(tok))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# The child imports once (torch takes seconds), then forks a fresh saver for each round: every
# saver is a separate process that the test SIGKILLs at a random moment, mid-save or not.
_KILL_CHILD = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from chatfoundry.checkpoint import save_checkpoint
    from chatfoundry.models.decoder import DecoderConfig, DecoderLM
    from chatfoundry.tokenizer import load_tokenizer
    path, tok_dir = sys.argv[1], sys.argv[2]
    tok = load_tokenizer(tok_dir)
    print("ready", flush=True)
    for line in sys.stdin:
        round_ = int(line)
        pid = os.fork()
        if pid == 0:
            cfg = DecoderConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=2, n_head=2,
                                n_kv_head=2, n_embd=16)
            model = DecoderLM(cfg)
            step = round_ * 100000
            while True:
                step += 1
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float(step))
                save_checkpoint(path, model, tok, trainer_state={"step": step})
        print(pid, flush=True)
        os.waitpid(pid, 0)
""")


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, tok):
    from chatfoundry.tokenizer import save_tokenizer

    tok_dir = tmp_path / "tok"
    save_tokenizer(tok, tok_dir)
    path = tmp_path / "run" / "checkpoint"
    cfg = DecoderConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=16)
    model = DecoderLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    save_checkpoint(path, model, tok, trainer_state={"step": 0})

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), str(tok_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    rnd = random.Random(0)
    seen, last = [], 0
    try:
        assert child.stdout.readline().strip() == "ready"
        for round_ in range(1, 9):
            child.stdin.write(f"{round_}\n")
            child.stdin.flush()
            pid = int(child.stdout.readline())
            time.sleep(rnd.uniform(0.05, 0.5))
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)  # let the child reap it before we look (we only read, though)
            weights = weights_of(path)
            step = weights[0].item()
            assert torch.all(weights == step), "weights from more than one save"
            assert step == int(step) and step >= last
            assert step == 0 or (step // 100000 <= round_ and step % 100000 >= 1), step  # a value a saver wrote
            assert load_trainer_state(path)["step"] == int(step), "trainer state from another save than the weights"
            last = step
            seen.append(int(step))
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    # the kills landed at different points of a running save loop
    assert len({s // 100000 for s in seen if s}) >= 4, seen
    assert child.returncode == 0


# ---------------------------------------------------------------- resolve_checkpoint


def test_resolve_checkpoint_folder_or_run_folder(tmp_path, tok):
    path = save_checkpoint(tmp_path / "run" / "checkpoint", tiny_model(tok), tok)
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(tmp_path / "run") == path
    assert resolve_checkpoint(str(tmp_path / "run")) == path
    named = save_checkpoint(tmp_path / "elsewhere" / "step100", tiny_model(tok), tok)
    assert resolve_checkpoint(named) == named


def test_resolve_checkpoint_errors_name_the_path(tmp_path, tok):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope") as info:
        resolve_checkpoint(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(UserError, match="nope"):
        load_model(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as info:
        resolve_checkpoint(empty)
    assert str(empty) in str(info.value) and "config.json" in str(info.value)

    no_weights = tmp_path / "run" / "checkpoint"
    no_weights.mkdir(parents=True)
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(UserError, match=str(tmp_path / "run")):
        resolve_checkpoint(tmp_path / "run")


def test_resolve_checkpoint_of_the_current_folder(tmp_path, tok, monkeypatch):
    model = tiny_model(tok)
    save_checkpoint(tmp_path / "checkpoint", model, tok)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(".").resolve() == (tmp_path / "checkpoint").resolve()
    assert_same_model(model, load_model(".")[0], ids_for(tok))


def test_invalid_config_json_is_a_user_error(tmp_path, tok):
    out = save_checkpoint(tmp_path / "checkpoint", tiny_model(tok), tok)
    config = json.loads((out / "config.json").read_text())
    config["chatfoundry"]["n_kv_head"] = 3  # does not divide n_head 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
        load_model(out)
    assert "config.json" in str(info.value) and "n_kv_head" in str(info.value)


def test_missing_or_mismatched_weights_name_the_keys(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    out = save_checkpoint(tmp_path / "checkpoint", tiny_model(tok), tok)
    weights = load_file(out / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    save_file({k: v for k, v in weights.items() if k != name}, out / "model.safetensors")
    with pytest.raises(UserError, match=r"missing weights layers\.\d\.mlp\.up_proj\.weight"):
        load_model(out)
    save_file({**weights, name: weights[name][:, :-1].contiguous()}, out / "model.safetensors")
    with pytest.raises(UserError, match="does not match config.json.*up_proj"):
        load_model(out)
