"""The BERT-style encoder: parity with transformers' BERT classes, conversion both ways, and the
checkpoint dispatch that keeps encoders and decoders apart."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chatfoundry import checkpoint as ckpt
from chatfoundry.models import hf_encoder
from chatfoundry.models.encoder import EncoderClassifier, EncoderConfig, EncoderLM
from chatfoundry.tokenizer import save_tokenizer, train_tokenizer
from conftest import run_cli

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
IDS = torch.tensor([[1, 17, 5, 42, 8, 11, 2, 60, 33], [1, 3, 9, 27, 2, 0, 0, 0, 0]])
TYPES = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
KEYS = IDS != 0  # the second row is padded


def bert_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return transformers.BertConfig(**{**fields, **overrides})


HF_CLASSES = {"mlm": "BertForMaskedLM", "body": "BertModel", "classifier": "BertForSequenceClassification"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the quick brown fox jumps over the lazy dog"], "char")


def hf_folder(tmp_path, kind, tokenizer, **config):
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASSES[kind])(bert_config(**config)).eval()
    with torch.no_grad():  # spread the weights (LayerNorm gains and biases too) so equal outputs mean something
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / f"hf_{kind}"
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return model, folder


def max_diff(a, b, keys=None):
    d = (a - b).abs()
    return (d[keys] if keys is not None else d).max().item()


@pytest.mark.parametrize("kind,act", [("mlm", "gelu"), ("mlm", "gelu_new"), ("body", "gelu"), ("classifier", "gelu")])
def test_import_from_transformers_gives_equal_outputs(tmp_path, capsys, tokenizer, kind, act):
    theirs, src = hf_folder(tmp_path, kind, tokenizer, hidden_act=act)
    code, out, err = run_cli(["convert", "--from_hf", str(src), "--out", str(tmp_path / "ours"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["architecture"] == HF_CLASSES[kind]
    ours, _ = ckpt.load_encoder(tmp_path / "ours")
    with torch.no_grad():
        expected = theirs(input_ids=IDS, token_type_ids=TYPES, attention_mask=KEYS.long())
        if kind == "mlm":
            diff = max_diff(ours(IDS, key_mask=KEYS, token_type_ids=TYPES)[0], expected.logits, KEYS)
        elif kind == "body":
            hidden = ours(IDS, KEYS, TYPES)
            diff = max(max_diff(hidden, expected.last_hidden_state, KEYS),
                       max_diff(ours.pooled(hidden), expected.pooler_output))
        else:
            diff = max_diff(ours(IDS, KEYS, TYPES), expected.logits)
    print(f"{kind} ({act}): max abs diff {diff:.2e}")
    assert diff < 1e-4


def test_unpadded_rows_need_no_mask(tokenizer, tmp_path):
    theirs, _ = hf_folder(tmp_path, "mlm", tokenizer)
    cfg = hf_encoder.config_from_hf(theirs.config.to_dict())
    ours = EncoderLM(cfg).eval()
    ours.load_state_dict(hf_encoder.state_dict_from_hf(theirs.state_dict(), cfg, "mlm"))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS[:1])[0], theirs(input_ids=IDS[:1]).logits, atol=1e-4, rtol=0)


def random_encoder_lm(vocab: int) -> EncoderLM:
    cfg = EncoderConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=16)
    torch.manual_seed(1)
    model = EncoderLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_round_trip_ours_to_transformers_and_back_is_lossless(tmp_path, capsys, tokenizer):
    ours = random_encoder_lm(tokenizer.get_vocab_size())
    ckpt.save_checkpoint(tmp_path / "ours", ours, tokenizer)
    theirs, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert type(theirs).__name__ == "BertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(10, tokenizer.get_vocab_size(), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, ours(ids)[0], atol=1e-4, rtol=0)
    theirs.save_pretrained(tmp_path / "hf")
    save_tokenizer(tokenizer, tmp_path / "hf")
    code, _, err = run_cli(["convert", "--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")], capsys)
    assert code == 0, err
    back, _ = ckpt.load_encoder(tmp_path / "back")
    assert isinstance(back, EncoderLM)
    original = ours.state_dict()
    assert set(back.state_dict()) == set(original)
    for k, v in back.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert back.lm_head.weight is back.body.embed_tokens.weight  # still tied
    # --to_hf writes the same layout, without the trainer state
    code, _, err = run_cli(["convert", "--to_hf", str(tmp_path / "back"), "--out", str(tmp_path / "export")], capsys)
    assert code == 0, err
    assert load_file(tmp_path / "export" / "model.safetensors").keys() == load_file(tmp_path / "ours" / "model.safetensors").keys()
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert fast.mask_token == "<|mask|>" and fast.cls_token == "<|bos|>" and fast.sep_token == "<|eos|>"


def test_classifier_export_loads_as_sequence_classification(tmp_path, tokenizer):
    body = random_encoder_lm(tokenizer.get_vocab_size())
    state = {k.removeprefix("body."): v for k, v in body.state_dict().items() if k.startswith("body.")}
    model = EncoderClassifier.from_encoder(state, body.config, 3).eval()
    model.head = {"task": "classify", "labels": ["a", "b", "c"], "dropout": 0.1}
    ckpt.save_checkpoint(tmp_path / "clf", model, tokenizer)
    theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf",
                                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert theirs.config.num_labels == 3 and theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert theirs.config.problem_type == "single_label_classification"
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=IDS % 40, attention_mask=KEYS.long()).logits,
                                   model(IDS % 40, KEYS), atol=1e-4, rtol=0)
    again, _ = ckpt.load_encoder(tmp_path / "clf")
    assert isinstance(again, EncoderClassifier) and again.head["labels"] == ["a", "b", "c"]


def test_decoder_and_encoder_loaders_refuse_each_other(tmp_path, capsys, tokenizer):
    ckpt.save_checkpoint(tmp_path / "enc", random_encoder_lm(tokenizer.get_vocab_size()), tokenizer)
    code, _, err = run_cli(["sample", "--ckpt", str(tmp_path / "enc")], capsys)
    assert code == 2 and "encoder (BERT) checkpoint" in err and len(err.strip().splitlines()) == 1
    from conftest import tiny_config
    from chatfoundry.models.decoder import DecoderLM

    ckpt.save_checkpoint(tmp_path / "dec", DecoderLM(tiny_config(vocab_size=tokenizer.get_vocab_size())), tokenizer)
    code, _, err = run_cli(["fill-mask", "--ckpt", str(tmp_path / "dec"), "--text", "a [MASK] b"], capsys)
    assert code == 2 and "not an encoder" in err and len(err.strip().splitlines()) == 1


def test_unsupported_bert_variant_is_refused(tmp_path, capsys, tokenizer):
    _, src = hf_folder(tmp_path, "mlm", tokenizer)
    config = json.loads((src / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["convert", "--from_hf", str(src), "--out", str(tmp_path / "ours")], capsys)
    assert code == 2 and "position_embedding_type" in err
    assert not (tmp_path / "ours").exists()
