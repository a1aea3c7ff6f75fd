"""LoRA through peft (`sft/grpo/ppo/dpo --peft lora`): the adapter a run saves loads in peft +
transformers with the same logits, for every flavour (GPT-2's and GPT-NeoX's fused qkv included);
our loader reads it back exactly; training moves only the adapter; --merge folds it in; a resumed
run goes on exactly; an RL stage's reference is the base in the policy's own tensors, and GRPO
learns a toy reward through the adapter alone; bad targets and mismatched bases get one clear
line."""

from __future__ import annotations

import builtins

import pytest
import torch
from safetensors.torch import load_file

from chatfoundry import adapters
from chatfoundry import checkpoint as ckpt
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM

from conftest import TINY, last_json, randomize, run_cli, tiny_chat_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
peft = pytest.importorskip("peft")


def _adapted(flavour: str, tok, targets=(), n_kv_head=4, seed=1, tie=True):
    """A random model of `flavour` with LoRA whose B is random too (peft starts B at 0)."""
    torch.manual_seed(0)
    model = randomize(DecoderLM(tiny_config(flavour, vocab_size=tok.get_vocab_size(), n_kv_head=n_kv_head,
                                            tie_embeddings=tie))).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = adapters.add_lora(model, adapters.LoraConfig(r=4, alpha=8, targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval(), base


@pytest.mark.parametrize("flavour, targets, n_kv_head, tie", [
    ("neox", (), 4, True), ("llama", (), 2, False), ("gpt2", ("q_proj", "v_proj", "o_proj", "down_proj"), 4, True)])
def test_the_adapter_loads_in_peft_and_transformers_with_our_logits(tmp_path, flavour, targets, n_kv_head, tie):
    transformers = pytest.importorskip("transformers")
    tok = tiny_chat_tokenizer()
    model, base = _adapted(flavour, tok, targets, n_kv_head, tie=tie)
    plain = DecoderLM(model.config)
    plain.load_state_dict(base)
    ckpt.save_checkpoint(tmp_path / "base", plain, tok)
    ckpt.save_checkpoint(tmp_path / "adapter", model, tok, adapter_of=tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix in (".json", ".safetensors")) == \
        ["adapter_config.json", "adapter_model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json"]

    x = torch.randint(0, tok.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)[0]
        hf = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")).eval()
        assert (hf(x).logits - ours).abs().max() < 1e-4
        assert (plain(x)[0] - ours).abs().max() > 1e-2  # the adapter matters
        back = ckpt.load_model(tmp_path / "adapter")[0]  # ours again: the base, the adapter merged in
        assert (back(x)[0] - ours).abs().max() < 1e-4
        assert not adapters.has_lora(back) and isinstance(back.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_the_base_of_a_lora_model_is_the_model_before_its_adapters_in_the_same_tensors():
    tok = tiny_chat_tokenizer()
    model, base = _adapted("llama", tok, n_kv_head=2)
    plain = DecoderLM(model.config)
    plain.load_state_dict(base)
    ref = adapters.base_of(model)
    x = torch.randint(0, tok.get_vocab_size(), (1, 12))
    with torch.no_grad():
        assert torch.equal(ref(x)[0], plain(x)[0])  # the adapters off
        assert not torch.equal(model(x)[0], plain(x)[0])
    assert not adapters.has_lora(ref) and type(ref.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not any(p.requires_grad for p in ref.parameters())
    # one copy of the weights: every tensor of the reference is the LoRA model's own
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in ref.parameters())
    assert adapters.has_lora(model) and adapters.targets(model)  # the policy keeps its adapters


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained checkpoint with the chat tokens."""
    from chatfoundry.cli import main

    out = tmp_path_factory.mktemp("lora") / "base"
    assert main(["pretrain", *TINY, "--model.block_size", "96", "--out", str(out)]) == 0
    return out


SFT = ["--train.steps", "6", "--train.batch_size", "4", "--train.warmup_steps", "1", "--train.eval_every", "3",
       "--train.save_every", "3", "--train.log_every", "1", "--data.conversations", "64", "--eval.per_family", "2",
       "--eval.max_new_tokens", "8", "--device", "cpu", "--peft", "lora"]


def test_lora_sft_trains_only_the_adapter_merges_and_resumes_exactly(base_run, tmp_path, capsys):
    before = load_file(base_run / "checkpoint" / "model.safetensors")
    code, out, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "a"), *SFT, "--merge",
                              "--json"], capsys)
    assert code == 0, err
    assert "parameters trainable (" in out and "the base frozen" in out
    after = load_file(base_run / "checkpoint" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base on disk untouched
    folder = tmp_path / "a" / "checkpoint"
    assert adapters.is_adapter(folder) and not (folder / "model.safetensors").exists()
    base, lora = adapters.read_adapter_config(folder)
    assert base == (base_run / "checkpoint").resolve() and lora.r == 8 and lora.targets == \
        ["down_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]

    # The trained model differs from its base; --merge wrote the same model as a plain checkpoint.
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        trained, merged = ckpt.load_model(tmp_path / "a")[0], ckpt.load_model(tmp_path / "a" / "merged")[0]
        assert (trained(x)[0] - merged(x)[0]).abs().max() < 1e-5
        assert (trained(x)[0] - ckpt.load_model(base_run)[0](x)[0]).abs().max() > 1e-4
    code, _, err = run_cli(["eval", "--ckpt", str(tmp_path / "a"), "--per_family", "1", "--max_new_tokens", "4"],
                           capsys)
    assert code == 0, err

    # Three steps, then resumed to six: the same adapter and losses as six straight (a flat
    # learning rate after warmup, so a 3-step run's schedule is the start of a 6-step one's).
    flat = ["--train.min_lr_ratio", "1"]
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "a"), *SFT, *flat, "--overwrite"],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "b"), *SFT, *flat,
                            "--train.steps", "3"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["sft", "--out", str(tmp_path / "b"), "--resume", "--train.steps", "6"], capsys)
    assert code == 0, err
    wa, wb = (load_file(tmp_path / d / "checkpoint" / "adapter_model.safetensors") for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = ({r["step"]: r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r} for d in "ab")
    assert la == lb and max(la) == 6


def test_bad_targets_and_mismatched_bases_get_one_line(base_run, tmp_path, capsys):
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "x"), *SFT,
                            "--lora.targets", "q_proj", "qkv"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "lora.targets: qkv matches no layer of this model (it has down_proj, k_proj, lm_head, o_proj" in err
    assert not (tmp_path / "x").exists()

    # An adapter trained on one base, pointed at another of a different width.
    tok = tiny_chat_tokenizer()
    model, base = _adapted("neox", tok)
    plain = DecoderLM(model.config)
    plain.load_state_dict(base)
    ckpt.save_checkpoint(tmp_path / "adapter", model, tok, adapter_of=tmp_path / "base")
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "base", DecoderLM(tiny_config("neox", vocab_size=tok.get_vocab_size(),
                                                                  n_embd=48)), tok)
    code, _, err = run_cli(["eval", "--ckpt", str(tmp_path / "adapter")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the adapter was trained on another base" in err


def test_without_peft_one_clear_line(base_run, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "x"), *SFT], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == ("chatfoundry sft: error: peft: LoRA needs the peft package: "
                                            "pip install 'chatfoundry[peft]'")


# ---------------------------------------------------------------- RL stages

RL = ["--rollout.batch_size", "4", "--rollout.max_new_tokens", "8", "--rollout.pool", "50", "--eval.per_family", "0",
      "--device", "cpu", "--json"]


def test_lora_grpo_learns_a_toy_reward_against_its_base_in_one_copy_of_the_weights(base_run, tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def say_a(prompt, response):\n"
                                         "    return response.count('a') / max(len(response), 1)\n")
    before = load_file(base_run / "checkpoint" / "model.safetensors")
    grpo = ["grpo", "--init", str(base_run), "--reward", f"python:{tmp_path / 'rewards.py'}:say_a", "--group", "4",
            "--minibatch_size", "8", "--kl.coef", "0.01", *RL]
    code, out, err = run_cli([*grpo, "--out", str(tmp_path / "lora"), "--peft", "lora", "--lora.r", "2", "--lr", "1e-2",
                              "--iterations", "20", "--merge"], capsys)
    assert code == 0, err
    lora = last_json(out)
    assert "parameters trainable (" in out and "the reference is that base, in the same tensors" in out
    rows = read_metrics(tmp_path / "lora" / "metrics.jsonl")
    assert rows[0]["kl"] == 0.0  # B starts at 0: the first policy is its reference exactly
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.05, (first, last)
    after = load_file(base_run / "checkpoint" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    folder = tmp_path / "lora" / "checkpoint"
    assert adapters.is_adapter(folder) and adapters.read_adapter_config(folder)[0] == (base_run / "checkpoint").resolve()
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        assert (ckpt.load_model(folder)[0](x)[0] - ckpt.load_model(tmp_path / "lora" / "merged")[0](x)[0]).abs().max() < 1e-5

    # The memory the weights and AdamW hold: LoRA's reference is the policy's base, full RL's a copy.
    code, out, err = run_cli([*grpo, "--out", str(tmp_path / "full"), "--iterations", "1"], capsys)
    assert code == 0, err
    full = last_json(out)
    assert lora["memory_mb"]["weights"] < 0.6 * full["memory_mb"]["weights"], (lora["memory_mb"], full["memory_mb"])
    assert lora["memory_mb"]["optimizer"] < 0.2 * full["memory_mb"]["optimizer"]
    assert lora["trainable_params"] < 0.15 * lora["params"]

    code, out, err = run_cli([*grpo, "--out", str(tmp_path / "lora"), "--iterations", "22", "--resume"], capsys)
    assert code == 0, err
    assert [r["iteration"] for r in read_metrics(tmp_path / "lora" / "metrics.jsonl")] == list(range(1, 23))


def test_lora_ppo_starts_at_its_reference_and_saves_an_adapter(base_run, tmp_path, capsys):
    code, out, err = run_cli(["ppo", "--init", str(base_run), "--reward", "verifier", "--out", str(tmp_path / "p"),
                              "--peft", "lora", "--iterations", "2", "--minibatch_size", "4", "--epochs", "1", *RL], capsys)
    assert code == 0, err
    rows = read_metrics(tmp_path / "p" / "metrics.jsonl")
    assert rows[0]["kl"] == 0.0 and rows[0]["ratio_first"] == 1.0  # no dropout: the update's function sampled
    assert adapters.is_adapter(tmp_path / "p" / "checkpoint") and (tmp_path / "p" / "critic" / "model.safetensors").is_file()
    summary = last_json(out)
    assert summary["trainable_params"] < summary["params"] and summary["memory_mb"]["weights"] > 0


def test_lora_dpo_saves_an_adapter_and_resumes(base_run, tmp_path, capsys):
    from chatfoundry.data import world

    lines = [{"prompt": t.prompt, "chosen": t.reference, "rejected": t.reference.upper()}
             for t in world.tasks("train", "arithmetic", 40, 0)]
    (tmp_path / "prefs.jsonl").write_text("".join(__import__("json").dumps(x) + "\n" for x in lines))
    dpo = ["dpo", "--init", str(base_run), "--data", str(tmp_path / "prefs.jsonl"), "--out", str(tmp_path / "d"),
           "--peft", "lora", "--train.batch_size", "8", "--train.warmup_steps", "1", "--train.eval_every", "2",
           "--eval.per_family", "0", "--device", "cpu", "--json"]
    code, out, err = run_cli([*dpo, "--train.steps", "2", "--train.save_every", "2"], capsys)
    assert code == 0, err
    assert adapters.is_adapter(tmp_path / "d" / "checkpoint") and last_json(out)["memory_mb"]["optimizer"] > 0
    code, out, err = run_cli([*dpo, "--train.steps", "4", "--resume"], capsys)
    assert code == 0, err
    assert max(r["step"] for r in read_metrics(tmp_path / "d" / "metrics.jsonl")) == 4
