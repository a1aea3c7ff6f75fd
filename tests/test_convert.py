"""`chatfoundry convert`: transformers folders in (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2) and out, equal logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatfoundry.checkpoint import load_model
from chatfoundry.tokenizer import save_tokenizer, train_tokenizer
from conftest import run_cli

transformers = pytest.importorskip("transformers")

VOCAB = 64
IDS = torch.tensor([[3, 17, 5, 42, 8, 11, 2, 60]])

HF_MODELS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    # GPT-2's block with rotary positions (our default pipeline model): sequential residual, full rotary.
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, use_parallel_residual=False, hidden_act="gelu_new", tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0}),
    # GPT-NeoX's own GELU, the exact one (our neox flavour's default).
    "gpt_neox_exact_gelu": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, use_parallel_residual=False, hidden_act="gelu", tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}),
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, rope_theta=5000.0),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=32, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the quick brown fox jumps over the lazy dog"], "char")


def hf_folder(tmp_path, name, tokenizer):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_MODELS[name]()).eval()
    with torch.no_grad():  # spread the weights so equal logits mean something
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / f"hf_{name}"
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return model, folder


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_gives_equal_logits_and_export_loads_back(tmp_path, capsys, tokenizer, name):
    theirs, src = hf_folder(tmp_path, name, tokenizer)
    code, out, err = run_cli(["convert", "--from_hf", str(src), "--out", str(tmp_path / "ours"), "--json"], capsys)
    assert code == 0, err
    ours, _ = load_model(tmp_path / "ours")
    with torch.no_grad():
        expected = theirs(IDS).logits
        torch.testing.assert_close(ours(IDS)[0], expected, atol=1e-4, rtol=0)

    code, out, err = run_cli(["convert", "--to_hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")], capsys)
    assert code == 0, err
    again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS).logits, expected, atol=1e-4, rtol=0)
    # transformers 5's AutoTokenizer rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer, whose
    # own pre-tokenizer replaces ours; the generic fast tokenizer reads tokenizer.json as it is.
    load = transformers.PreTrainedTokenizerFast if name == "qwen2" else transformers.AutoTokenizer
    assert load.from_pretrained(tmp_path / "back")("the fox")["input_ids"] == tokenizer.encode("the fox").ids


def test_missing_weights_are_named(tmp_path, capsys, tokenizer):
    _, src = hf_folder(tmp_path, "llama_gqa_untied", tokenizer)
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # transformers' own progress output while saving
    code, out, err = run_cli(["convert", "--from_hf", str(src), "--out", str(tmp_path / "ours")], capsys)
    assert code == 2 and "layers.1.mlp.up_proj.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ours").exists()


def test_unsupported_model_and_missing_folder(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    code, _, err = run_cli(["convert", "--from_hf", str(tmp_path / "bert"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bert" in err
    code, _, err = run_cli(["convert", "--from_hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope" in err


def test_export_refuses_a_shape_transformers_lacks(tmp_path, capsys, tokenizer):
    from chatfoundry.checkpoint import save_checkpoint
    from chatfoundry.models.decoder import DecoderConfig, DecoderLM

    cfg = DecoderConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                        pos="sinusoidal")
    save_checkpoint(tmp_path / "ours", DecoderLM(cfg), tokenizer)
    code, _, err = run_cli(["convert", "--to_hf", str(tmp_path / "ours"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "sinusoidal" in err


@pytest.mark.parametrize("mlp, act", [("gelu", "gelu_new"), ("gelu_exact", "gelu")])
def test_gpt2_block_with_rotary_exports_as_gpt_neox(mlp, act, tmp_path, capsys, tokenizer):
    # GPT-2's block with rotary positions (the neox flavour), with GPT-2's tanh GELU or GPT-NeoX's exact one.
    from chatfoundry.checkpoint import save_checkpoint
    from chatfoundry.models.decoder import DecoderLM
    from conftest import randomize, tiny_config

    model = randomize(DecoderLM(tiny_config("neox", vocab_size=VOCAB, mlp=mlp, rope_theta=500.0))).eval()
    save_checkpoint(tmp_path / "ours", model, tokenizer)
    with torch.no_grad():
        expected = model(IDS)[0]
    code, out, err = run_cli(["convert", "--to_hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == "GPTNeoXForCausalLM" and theirs.config.tie_word_embeddings
    assert theirs.config.hidden_act == act
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(IDS).logits, expected, atol=1e-4, rtol=0)

    # A checkpoint of this shape saved before the export existed holds our own weight names: it still loads.
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, tmp_path / "ours" / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")[0](IDS)[0], expected, atol=0, rtol=0)
