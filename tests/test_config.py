"""Config resolution: defaults < YAML < flags, presets first, one clear line for every bad value."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfoundry.cli import build_parser
from chatfoundry.config import build_config, flatten, leaf_fields, load_yaml, resolve_config, save_config, to_dict
from chatfoundry.errors import UserError
from chatfoundry.models.decoder import PRESETS, DecoderConfig
from chatfoundry.train.pretrain import PretrainConfig

from conftest import run_cli


def resolve(argv: list[str], base: dict | None = None) -> PretrainConfig:
    """`chatfoundry pretrain ARGV`'s config, without running anything."""
    args = build_parser().parse_args(["pretrain", *argv])
    return resolve_config(PretrainConfig, args, base)


def write_yaml(path, tree: dict):
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- defaults and overrides


def test_no_flags_gives_the_dataclass_defaults():
    assert resolve([]) == PretrainConfig()


def test_dotted_override_reaches_the_config():
    cfg = resolve(["--train.lr", "3e-4", "--model.n_layer", "3", "--sample.prompt", "Once", "--seed", "7"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 3 and isinstance(cfg.model.n_layer, int)
    assert cfg.sample.prompt == "Once"
    assert cfg.seed == 7
    # Everything not named keeps its default.
    assert cfg.train.steps == PretrainConfig().train.steps
    assert cfg.model.n_embd == PretrainConfig().model.n_embd


def test_every_leaf_field_has_a_flag():
    parser = build_parser()
    pretrain = parser._subparsers._group_actions[0].choices["pretrain"]
    flags = {s for a in pretrain._actions for s in a.option_strings}
    for name in leaf_fields(PretrainConfig):
        assert f"--{name}" in flags


def test_integer_fields_accept_exponent_notation():
    assert resolve(["--train.steps", "1e3"]).train.steps == 1000


def test_negative_numbers_parse_as_values():
    cfg = resolve(["--seed", "-3"])
    assert cfg.seed == -3


def test_yaml_file_with_nested_sections(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "out": "runs/x", "seed": 5,
        "train": {"lr": 1e-3, "steps": 77, "batch_size": 4},
        "model": {"n_layer": 2, "flavour": "llama"},
        "data": {"files": ["a.txt", "b.txt"]},
        "sample": {"prompt": "Hi"},
    })
    cfg = resolve(["--config", str(path)])
    assert cfg.out == "runs/x" and cfg.seed == 5
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 77 and cfg.train.batch_size == 4
    assert cfg.model.n_layer == 2 and cfg.model.flavour == "llama"
    assert cfg.model.pos == "rope" and cfg.model.norm == "rmsnorm"  # the flavour is a preset key
    assert cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.sample.prompt == "Hi"


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"lr": 1e-3, "steps": 77}, "seed": 5})
    cfg = resolve(["--config", str(path), "--train.lr", "3e-4"])
    assert cfg.train.lr == pytest.approx(3e-4)  # CLI beats YAML
    assert cfg.train.steps == 77  # YAML beats defaults
    assert cfg.seed == 5
    assert cfg.train.warmup_steps == PretrainConfig().train.warmup_steps  # defaults otherwise


def test_precedence_saved_config_below_yaml_and_cli(tmp_path):
    """A resumed run's config.yaml is the lowest layer above the defaults."""
    base = {"train.lr": 5e-3, "train.steps": 99, "seed": 11}
    path = write_yaml(tmp_path / "c.yaml", {"train": {"steps": 55}})
    cfg = resolve(["--config", str(path), "--seed", "12"], base)
    assert cfg.train.lr == 5e-3 and cfg.train.steps == 55 and cfg.seed == 12


def test_yaml_may_be_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert resolve(["--config", str(path)]) == PretrainConfig()


# ---------------------------------------------------------------- presets


def _is_mini_with_3_layers(cfg):
    n_layer, n_head, n_embd, block = PRESETS["mini"]
    assert cfg.model.preset == "mini"
    assert cfg.model.n_layer == 3 != n_layer
    assert (cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (n_head, n_embd, block)


def test_preset_then_override_on_cli():
    _is_mini_with_3_layers(resolve(["--model.preset", "mini", "--model.n_layer", "3"]))
    # Order on the command line does not matter: presets are applied first.
    _is_mini_with_3_layers(resolve(["--model.n_layer", "3", "--model.preset", "mini"]))


def test_preset_in_yaml_override_on_cli(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"preset": "mini"}})
    _is_mini_with_3_layers(resolve(["--config", str(path), "--model.n_layer", "3"]))


def test_preset_on_cli_override_in_yaml(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"n_layer": 3}})
    _is_mini_with_3_layers(resolve(["--config", str(path), "--model.preset", "mini"]))


def test_preset_and_override_both_in_yaml(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"n_layer": 3, "preset": "mini"}})
    _is_mini_with_3_layers(resolve(["--config", str(path)]))


def test_flavour_preset_key_combines_with_preset(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"preset": "small"}})
    cfg = resolve(["--config", str(path), "--model.flavour", "llama", "--model.bias", "true"])
    assert cfg.model == dataclasses.replace(DecoderConfig.from_preset("small", "llama"), bias=True)


def test_a_preset_keeps_the_default_flavour_and_applies_in_nested_sections():
    assert resolve([]).model == DecoderConfig.from_preset("tiny", "neox")  # the pretraining default
    assert resolve(["--model.preset", "mini"]).model == DecoderConfig.from_preset("mini", "neox")
    from chatfoundry.pipeline import PipelineConfig  # its pretrain.model is two sections down
    cfg = build_config(PipelineConfig, [("cli", {"pretrain.model.preset": "mini", "pretrain.model.n_layer": 3})])
    assert cfg.pretrain.model == dataclasses.replace(DecoderConfig.from_preset("mini", "neox"), n_layer=3)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match=r"model\.preset.*'huge'"):
        resolve(["--model.preset", "huge"])


# ---------------------------------------------------------------- unknown keys and flags


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"foo": 1}})
    with pytest.raises(UserError) as e:
        resolve(["--config", str(path)])
    msg = str(e.value)
    assert "'train.foo'" in msg and str(path) in msg
    assert "did you mean" in msg
    assert "\n" not in msg


def test_unknown_yaml_key_suggests_the_close_one(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"stepz": 1}})
    with pytest.raises(UserError, match=r"'train\.stepz'.*did you mean 'train\.steps'"):
        resolve(["--config", str(path)])


def test_unknown_yaml_section_names_it(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"optim": {"lr": 1}})
    with pytest.raises(UserError, match=r"'optim\.lr'"):
        resolve(["--config", str(path)])


def test_unknown_yaml_key_through_the_cli(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"foo": 1}})
    code, out, err = run_cli(["pretrain", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert "train.foo" in one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["--train.foo", "--trian.lr", "--model.layers"])
def test_unknown_cli_flag_exits_2_with_one_line(bad, tmp_path, capsys):
    code, out, err = run_cli(["pretrain", bad, "1", "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert bad in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_unknown_cli_flag_suggests_the_close_one(capsys):
    code, out, err = run_cli(["pretrain", "--train.stepz", "5"], capsys)
    assert code == 2
    assert "--train.steps" in one_error_line(err)


def test_abbreviated_flag_is_not_silently_accepted(tmp_path, capsys):
    code, out, err = run_cli(["pretrain", "--train.ste", "5", "--train.lr", "-1", "--out", str(tmp_path / "r")],
                             capsys)
    assert code == 2
    assert "--train.ste" in one_error_line(err)


# ---------------------------------------------------------------- bad values


BAD_VALUES = [
    (["--train.lr", "abc"], "train.lr"),
    (["--train.steps", "2.5"], "train.steps"),
    (["--train.steps", "many"], "train.steps"),
    (["--model.pos", "foo"], "model.pos"),
    (["--model.flavour", "mamba"], "model.flavour"),
    (["--train.lr", "-1"], "train.lr"),
    (["--train.lr", "0"], "train.lr"),
    (["--model.dropout", "1.5"], "model.dropout"),
    (["--tokenizer.vocab_size", "5"], "tokenizer.vocab_size"),
    (["--tokenizer.kind", "unigram", "--tokenizer.vocab_size", "5"], "tokenizer.vocab_size"),
    (["--train.block_size", "4096"], "train.block_size"),
    (["--model.n_embd", "30", "--model.n_head", "4"], "model.n_embd"),
    (["--model.n_head", "4", "--model.n_kv_head", "3"], "model.n_kv_head"),
    (["--train.steps", "0"], "train.steps"),
    (["--data.val_fraction", "0.9"], "data.val_fraction"),
    (["--model.bias", "maybe"], "model.bias"),
    (["--dtype", "fp8"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--sample.temperature", "-0.5"], "sample.temperature"),
]


@pytest.mark.parametrize("argv,field", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_line_naming_the_field(argv, field, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["pretrain", *argv, "--out", str(out_dir)], capsys)
    assert code == 2
    line = one_error_line(err)
    assert field in line
    assert line.startswith("chatfoundry pretrain: error:")
    assert not out_dir.exists()


@pytest.mark.parametrize("tree,field", [
    ({"train": {"lr": "abc"}}, "train.lr"),
    ({"train": {"steps": 2.5}}, "train.steps"),
    ({"train": {"steps": True}}, "train.steps"),
    ({"model": {"bias": "perhaps"}}, "model.bias"),
    ({"model": {"pos": "foo"}}, "model.pos"),
    ({"data": {"files": {"a": 1}}}, "data.files"),
    ({"sample": {"prompt": ["a", "b"]}}, "sample.prompt"),
])
def test_bad_yaml_value_is_a_user_error_naming_the_field(tree, field, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tree)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        resolve(["--config", str(path)])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  steps: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_yaml(path)
    assert str(path) in str(e.value) and "not valid YAML" in str(e.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(path)


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, out, err = run_cli(["pretrain", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")],
                             capsys)
    assert code == 2
    assert "nope.yaml" in one_error_line(err)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- bools and lists


def test_bool_flag_without_value_is_true():
    assert resolve(["--compile"]).compile is True
    assert resolve([]).compile is False


@pytest.mark.parametrize("text,value", [("false", False), ("False", False), ("no", False), ("0", False),
                                        ("off", False), ("true", True), ("yes", True), ("1", True), ("on", True)])
def test_bool_flag_with_value(text, value):
    assert resolve(["--model.bias", text]).model.bias is value
    assert resolve(["--compile", text]).compile is value


def test_yaml_bool(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"compile": True, "model": {"bias": False}})
    cfg = resolve(["--config", str(path)])
    assert cfg.compile is True and cfg.model.bias is False


def test_list_field_takes_several_values():
    assert resolve(["--data", "a.txt", "b.txt"]).data.files == ["a.txt", "b.txt"]
    assert resolve(["--data.files", "a.txt"]).data.files == ["a.txt"]
    assert resolve([]).data.files == []


def test_list_field_from_yaml_or_comma_string(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"files": "a.txt,b.txt"}})
    assert resolve(["--config", str(path)]).data.files == ["a.txt", "b.txt"]
    path = write_yaml(tmp_path / "c.yaml", {"data": {"files": ["x", "y"]}})
    # CLI replaces the YAML list, it does not append to it.
    assert resolve(["--config", str(path), "--data", "z"]).data.files == ["z"]


def test_tokenizer_alias_sets_tokenizer_path():
    assert resolve(["--tokenizer", "tok/"]).tokenizer.path == "tok/"


# ---------------------------------------------------------------- save / load round trip


def _round_trip(cfg: PretrainConfig, path) -> PretrainConfig:
    save_config(cfg, path)
    return build_config(PretrainConfig, [(str(path), load_yaml(path))])


def test_save_and_load_round_trip(tmp_path):
    cfg = resolve(["--model.preset", "mini", "--model.n_layer", "3", "--model.flavour", "llama",
                   "--model.vocab_size", "300", "--train.lr", "3e-4", "--data", "a.txt", "b.txt",
                   "--compile", "--sample.prompt", "null", "--out", "runs/rt", "--dtype", "bf16"])
    again = _round_trip(cfg, tmp_path / "config.yaml")
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # The file is plain nested YAML a person can read and edit.
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    assert tree["train"]["lr"] == 3e-4 and tree["model"]["preset"] == "mini"
    assert set(flatten(tree)) == set(leaf_fields(PretrainConfig))


def test_round_trip_of_the_defaults(tmp_path):
    assert _round_trip(PretrainConfig(), tmp_path / "config.yaml") == PretrainConfig()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lr=st.floats(min_value=1e-8, max_value=10.0, allow_nan=False),
       steps=st.integers(min_value=1, max_value=10**9),
       prompt=st.text(max_size=20),
       files=st.lists(st.text(min_size=1, max_size=10).filter(lambda s: "," not in s), max_size=3),
       preset=st.sampled_from(sorted(PRESETS)),
       flavour=st.sampled_from(["gpt2", "llama"]),
       dropout=st.floats(min_value=0.0, max_value=0.99),
       bias=st.booleans())
def test_round_trip_property(tmp_path, lr, steps, prompt, files, preset, flavour, dropout, bias):
    cfg = PretrainConfig()
    cfg.model = dataclasses.replace(DecoderConfig.from_preset(preset, flavour), dropout=dropout, bias=bias)
    cfg.train.lr, cfg.train.steps = lr, steps
    cfg.sample.prompt = prompt
    cfg.data.files = files
    assert _round_trip(cfg, tmp_path / "config.yaml") == cfg
