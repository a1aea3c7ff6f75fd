"""Prompt tuning (`sft --peft prompt`): the soft prompt a run saves loads in peft + transformers
with our logits, for every flavour; decoding with a KV cache, left padding and beam search sees
the prompt as a full forward pass does; training moves the prompt alone (the base bit-identical)
and lowers the loss; a resumed run goes on exactly; chat and eval load it; serve refuses it."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load_file

from chatfoundry import adapters
from chatfoundry import checkpoint as ckpt
from chatfoundry.generation import GenerationConfig, generate, generate_batch
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM

from conftest import TINY, last_json, randomize, run_cli, tiny_chat_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
peft = pytest.importorskip("peft")


def _prompted(flavour: str, tok, n: int = 5, **overrides):
    """A random model of `flavour` with a random soft prompt of n tokens, and its base weights."""
    torch.manual_seed(0)
    model = randomize(DecoderLM(tiny_config(flavour, vocab_size=tok.get_vocab_size(), **overrides))).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = adapters.add_prompt(model, adapters.PromptConfig(tokens=n))
    with torch.no_grad():
        model.prompt.copy_(0.5 * torch.randn(model.prompt.shape, generator=torch.Generator().manual_seed(3)))
    return model, base


@pytest.mark.parametrize("flavour, n_kv_head", [("neox", 4), ("llama", 2), ("gpt2", 4)])
def test_the_soft_prompt_loads_in_peft_and_transformers_with_our_logits(tmp_path, flavour, n_kv_head):
    transformers = pytest.importorskip("transformers")
    tok = tiny_chat_tokenizer()
    model, base = _prompted(flavour, tok, n_kv_head=n_kv_head)
    assert model.config.block_size == 32 - 5  # the real tokens' share of the context
    plain = DecoderLM(tiny_config(flavour, vocab_size=tok.get_vocab_size(), n_kv_head=n_kv_head))
    plain.load_state_dict(base)
    ckpt.save_checkpoint(tmp_path / "base", plain, tok)
    ckpt.save_checkpoint(tmp_path / "prompt", model, tok, adapter_of=tmp_path / "base")
    assert adapters.is_adapter(tmp_path / "prompt") and not (tmp_path / "prompt" / "model.safetensors").exists()

    x = torch.randint(0, tok.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)[0]
        hf = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "prompt")).eval()
        assert (hf(input_ids=x).logits[:, 5:] - ours).abs().max() < 1e-4  # peft returns the virtual tokens' too
        assert (plain(x)[0] - ours).abs().max() > 1e-2  # the prompt matters
        back = ckpt.load_model(tmp_path / "prompt")[0]
        assert torch.equal(back(x)[0], ours) and back.config.block_size == 27
    assert ckpt.model_config(tmp_path / "prompt").block_size == 27


@pytest.mark.parametrize("flavour", ["neox", "gpt2"])
def test_decoding_sees_the_soft_prompt_as_a_full_forward_pass_does(flavour):
    tok = tiny_chat_tokenizer()
    model, _ = _prompted(flavour, tok)
    prompts = [[3, 5, 7, 9, 11, 2], [4, 6]]
    greedy = GenerationConfig(max_new_tokens=12)

    def by_hand(prompt: list[int], steps: int) -> list[int]:  # no cache: the whole sequence every step
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        return seq[len(prompt):]

    want = [by_hand(p, 12) for p in prompts]
    assert [generate(model, p, greedy).sequences[0] for p in prompts] == want  # KV cache
    assert generate_batch(model, prompts, greedy).sequences == want  # left padding and a key mask
    beam = generate(model, prompts[0], GenerationConfig(max_new_tokens=6, num_beams=1))
    assert beam.sequences[0] == want[0][:6]
    # Past the context the window slides, and the soft prompt comes first again.
    long = generate(model, prompts[0], GenerationConfig(max_new_tokens=40)).sequences[0]
    assert len(long) == 40 and long[:12] == want[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained checkpoint with the chat tokens."""
    from chatfoundry.cli import main

    out = tmp_path_factory.mktemp("prompt") / "base"
    # Trained past the first steps: a soft prompt steers a model only through attention it has learned.
    assert main(["pretrain", *TINY, "--model.block_size", "96", "--train.steps", "150", "--train.lr", "3e-3",
                 "--train.save_every", "150", "--out", str(out)]) == 0
    return out


SFT = ["--train.batch_size", "8", "--train.warmup_steps", "1", "--train.eval_every", "10", "--train.save_every", "10",
       "--train.log_every", "1", "--train.lr", "3e-2", "--train.min_lr_ratio", "1", "--data.conversations", "128",
       "--eval.per_family", "2", "--eval.max_new_tokens", "8", "--device", "cpu", "--peft", "prompt",
       "--prompt.tokens", "8"]  # padded batches: SFT's default for a soft prompt (data.packing none)


def test_prompt_tuning_trains_the_prompt_alone_and_resumes_exactly(base_run, tmp_path, capsys, monkeypatch):
    before = load_file(base_run / "checkpoint" / "model.safetensors")
    code, out, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "a"), *SFT,
                              "--train.steps", "40", "--json"], capsys)
    assert code == 0, err
    assert "prompt tuning, 8 virtual tokens: 256 of" in out
    summary = last_json(out)
    assert summary["trainable_params"] == 8 * 32
    val = [r["val_loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 0.005, val  # it learns (slowly: 256 numbers steer a 2-layer model)
    after = load_file(base_run / "checkpoint" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base on disk untouched
    tuned = ckpt.load_model(tmp_path / "a")[0]
    base = ckpt.load_model(base_run)[0]
    assert all(torch.equal(p, tuned.state_dict()[k]) for k, p in base.state_dict().items())  # and as trained

    code, _, err = run_cli(["eval", "--ckpt", str(tmp_path / "a"), "--per_family", "1", "--max_new_tokens", "4"], capsys)
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO("what is 2 + 3?\n"))  # a piped question
    code, out, err = run_cli(["chat", "--ckpt", str(tmp_path / "a"), "--max_new_tokens", "4"], capsys)
    assert code == 0 and out.strip(), err

    # Twenty steps, then resumed to forty: the same prompt and losses as forty straight.
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "b"), *SFT, "--train.steps", "20"],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["sft", "--out", str(tmp_path / "b"), "--resume", "--train.steps", "40"], capsys)
    assert code == 0, err
    wa, wb = (load_file(tmp_path / d / "checkpoint" / "adapter_model.safetensors") for d in "ab")
    assert torch.equal(wa["prompt_embeddings"], wb["prompt_embeddings"])
    la, lb = ({r["step"]: r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r} for d in "ab")
    assert la == lb and max(la) == 40


def test_what_prompt_tuning_refuses_is_one_line(base_run, tmp_path, capsys):
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "x"), *SFT, "--data.packing", "true"],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data.packing: a soft prompt goes before each" in err
    code, _, err = run_cli(["sft", "--init", str(base_run), "--out", str(tmp_path / "x"), *SFT, "--prompt.tokens", "96"],
                           capsys)
    assert code == 2 and "prompt.tokens: 96 virtual tokens leave no room in the model's context of 96" in err
    assert not (tmp_path / "x").exists()

    # The stages that sample through rollouts (packed rows) take no soft prompt yet.
    model, tok = ckpt.load_model(base_run)
    ckpt.save_checkpoint(tmp_path / "tuned", adapters.add_prompt(model, adapters.PromptConfig(tokens=8)), tok,
                         adapter_of=base_run / "checkpoint")
    for stage, name in (("grpo", "GRPO"), ("best-of-n", "best-of-n")):
        code, _, err = run_cli([stage, "--init", str(tmp_path / "tuned"), "--reward", "verifier", "--out",
                                str(tmp_path / "g"), "--device", "cpu"], capsys)
        assert code == 2 and f"a prompt-tuned model; {name} takes a plain checkpoint or a LoRA one" in err, err
    assert not (tmp_path / "g").exists()

    from chatfoundry.serve.api import create_app

    tok = tiny_chat_tokenizer()
    model, _ = _prompted("llama", tok)
    with pytest.raises(Exception, match="a prompt-tuned model; serve does not batch soft prompts yet"):
        create_app(model, tok, "tuned")
