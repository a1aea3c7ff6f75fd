"""The `chatfoundry` command: help everywhere, presets, tokenizer round trips and clean refusals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from chatfoundry.cli import build_parser
from chatfoundry.data.builtin import generate_corpus

from conftest import TINY, last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_error_line(err: str, command: str | None = None) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    if command:
        assert lines[0].startswith(f"chatfoundry {command}: error:"), lines[0]
    return lines[0]


def snapshot(folder) -> dict[str, bytes] | None:
    """Every file under `folder` with its bytes (None if the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


# ---------------------------------------------------------------- --help


def _command_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, prefix + (name,))
    return paths


COMMANDS = _command_paths(build_parser())


def test_the_command_tree_is_what_we_expect():
    assert {("pretrain",), ("sample",), ("tokenizer",), ("tokenizer", "train"), ("tokenizer", "encode"),
            ("tokenizer", "decode"), ("presets",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "chatfoundry")
def test_help_works_everywhere(path, capsys):
    code, out, err = run_cli([*path, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: chatfoundry" + "".join(f" {p}" for p in path))
    assert "Traceback" not in err


def test_pretrain_help_lists_the_dotted_flags(capsys):
    code, out, err = run_cli(["pretrain", "--help"], capsys)
    assert code == 0
    for flag in ("--train.lr", "--model.preset", "--data", "--resume", "--overwrite", "--json", "--config"):
        assert flag in out


def test_no_subcommand_is_a_usage_error(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2
    one_error_line(err)


def test_unknown_subcommand(capsys):
    code, out, err = run_cli(["pretrian"], capsys)
    assert code == 2
    assert "pretrian" in one_error_line(err)


# ---------------------------------------------------------------- presets


def test_presets_json_lists_every_preset_with_params(capsys):
    code, out, err = run_cli(["presets", "--json"], capsys)
    assert code == 0
    rows = last_json(out)
    assert isinstance(rows, list)
    by_name = {(r["preset"], r["flavour"]): r for r in rows}
    for name in ("tiny", "mini", "small", "gpt2"):
        for flavour in ("gpt2", "llama"):
            row = by_name[(name, flavour)]
            assert isinstance(row["params"], int) and row["params"] > 0
            assert row["flops_per_token"] > 6 * row["params"] * 0.5
    sizes = [by_name[(n, "gpt2")]["params"] for n in ("tiny", "mini", "small", "gpt2")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    # The human table comes before the JSON line.
    assert "preset" in out.splitlines()[0]


def test_presets_gpt2_size_matches_gpt2_small(capsys):
    """With GPT-2's vocabulary the gpt2 preset is GPT-2 small: 124,439,808 parameters (tied head)."""
    code, out, err = run_cli(["presets", "--vocab_size", "50257", "--json"], capsys)
    assert code == 0
    row = next(r for r in last_json(out) if (r["preset"], r["flavour"]) == ("gpt2", "gpt2"))
    assert row["params"] == 124_439_808


def test_presets_bad_vocab_size(capsys):
    code, out, err = run_cli(["presets", "--vocab_size", "0"], capsys)
    assert code == 2
    assert "--vocab_size" in one_error_line(err, "presets")


# ---------------------------------------------------------------- tokenizer train / encode / decode


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(generate_corpus(20_000, seed=3), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind,vocab", [("bpe", 300), ("unigram", 200), ("char", 0)])
def test_tokenizer_train_encode_decode_round_trip(kind, vocab, text_file, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(text_file), "--kind", kind, "--out", str(out), "--json"]
    if vocab:
        argv += ["--vocab_size", str(vocab)]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    info = last_json(stdout)
    assert info["kind"] == kind and (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    if vocab:
        assert 10 < info["vocab_size"] <= vocab

    text = "The cat sat on the mat. 12 + 30 = 42"
    code, stdout, err = run_cli(["tokenizer", "encode", "--tokenizer", str(out), "--text", text, "--json"], capsys)
    assert code == 0, err
    enc = last_json(stdout)
    assert len(enc["ids"]) == len(enc["tokens"]) > 0
    assert all(0 <= i < info["vocab_size"] for i in enc["ids"])
    if kind == "char":
        assert len(enc["ids"]) == len(text)

    code, stdout, err = run_cli(["tokenizer", "decode", "--tokenizer", str(out / "tokenizer.json"),
                                 *map(str, enc["ids"]), "--json"], capsys)
    assert code == 0, err
    assert last_json(stdout)["text"] == text


def test_tokenizer_plain_output(text_file, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run_cli(["tokenizer", "train", str(text_file), "--kind", "char", "--out", str(out)], capsys)[0] == 0
    code, stdout, _ = run_cli(["tokenizer", "encode", "--tokenizer", str(out), "--text", "cat"], capsys)
    ids = stdout.split()
    assert code == 0 and len(ids) == 3
    code, stdout, _ = run_cli(["tokenizer", "decode", "--tokenizer", str(out), *ids], capsys)
    assert code == 0 and stdout == "cat\n"


def test_tokenizer_train_on_the_builtin_corpus(tmp_path, capsys):
    out = tmp_path / "tok"
    code, stdout, err = run_cli(["tokenizer", "train", "--kind", "char", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert last_json(stdout)["vocab_size"] > 40
    code, stdout, _ = run_cli(["tokenizer", "encode", "--tokenizer", str(out), "--text", "Paris is big.", "--json"],
                              capsys)
    ids = last_json(stdout)["ids"]
    code, stdout, _ = run_cli(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids), "--json"], capsys)
    assert last_json(stdout)["text"] == "Paris is big."


def test_tokenizer_decode_out_of_range_id(text_file, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run_cli(["tokenizer", "train", str(text_file), "--kind", "char", "--out", str(out)], capsys)[0] == 0
    code, _, err = run_cli(["tokenizer", "decode", "--tokenizer", str(out), "1", "99999"], capsys)
    assert code == 2
    assert "99999" in one_error_line(err, "tokenizer")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n", b"ok \xff\xfe bad"], ids=["empty", "whitespace", "not-utf8"])
def test_tokenizer_train_bad_file(content, tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    code, _, err = run_cli(["tokenizer", "train", str(path), "--kind", "bpe", "--vocab_size", "300",
                            "--out", str(tmp_path / "tok")], capsys)
    assert code == 2
    assert "bad.txt" in one_error_line(err, "tokenizer")


def test_tokenizer_missing_inputs(tmp_path, capsys):
    code, _, err = run_cli(["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "tok")],
                           capsys)
    assert code == 2 and "nope.txt" in one_error_line(err, "tokenizer")
    code, _, err = run_cli(["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope"), "--text", "x"], capsys)
    assert code == 2 and "nope" in one_error_line(err, "tokenizer")


# ---------------------------------------------------------------- pretrain: refusals before any work


def _write(tmp_path, name: str, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


BAD_PRETRAIN = {
    "missing-file": (lambda t: ["--data", "/missing.txt"], "/missing.txt"),
    "empty-file": (lambda t: ["--data", _write(t, "empty.txt", b"")], "empty.txt"),
    "whitespace-file": (lambda t: ["--data", _write(t, "blank.txt", b" \n\n\t \n")], "blank.txt"),
    "not-utf8": (lambda t: ["--data", _write(t, "latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50)],
                 "latin1.txt"),
    "empty-folder": (lambda t: ["--data", str((t / "nothing").mkdir() or t / "nothing")], "nothing"),
    "vocab-below-specials": (lambda t: ["--tokenizer.kind", "unigram", "--tokenizer.vocab_size", "5"],
                             "tokenizer.vocab_size"),
    "bpe-vocab-below-bytes": (lambda t: ["--tokenizer.kind", "bpe", "--tokenizer.vocab_size", "200"],
                              "tokenizer.vocab_size"),
    "unknown-config-key": (lambda t: ["--config", _write(t, "c.yaml", b"train:\n  foo: 1\n")], "train.foo"),
    "negative-lr": (lambda t: ["--train.lr", "-1"], "train.lr"),
    "block-over-model-max": (lambda t: ["--train.block_size", "64"], "train.block_size"),
    "missing-tokenizer": (lambda t: ["--tokenizer", str(t / "no_tok")], "no_tok"),
    "model-vocab-below-tokenizer": (lambda t: ["--model.vocab_size", "20"], "model.vocab_size"),
    "batch-not-divisible": (lambda t: ["--train.micro_batch_size", "3"], "train.batch_size"),
    "data-too-short-for-block": (lambda t: ["--data", _write(t, "short.txt", b"just a few words here\n")], "data"),
}


@pytest.mark.parametrize("preexisting", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("case", list(BAD_PRETRAIN))
def test_bad_pretrain_input_exits_2_and_writes_nothing(case, preexisting, tmp_path, capsys):
    make_args, needle = BAD_PRETRAIN[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out_dir = tmp_path / "run"
    if preexisting:
        out_dir.mkdir()
        (out_dir / "notes.txt").write_text("mine\n")
    before = snapshot(out_dir)
    code, out, err = run_cli(["pretrain", *TINY, *make_args(inputs), "--out", str(out_dir), "--json"], capsys)
    assert code == 2, err
    line = one_error_line(err, "pretrain")
    assert needle in line
    assert snapshot(out_dir) == before  # not created, or left exactly as it was
    assert out.strip() == ""  # no JSON summary for a failed run


# ---------------------------------------------------------------- pretrain: an existing run


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["pretrain", *TINY, "--out", str(out_dir), "--json"], capsys)
    assert code == 0, err
    before = snapshot(out_dir)

    code, out, err = run_cli(["pretrain", *TINY, "--out", str(out_dir)], capsys)
    assert code == 2
    line = one_error_line(err, "pretrain")
    assert str(out_dir) in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out_dir) == before

    # --overwrite replaces it: a fresh run with one set of metrics, not two appended.
    code, out, err = run_cli(["pretrain", *TINY, "--train.steps", "6", "--out", str(out_dir), "--overwrite",
                              "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["steps"] == 6
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and max(steps) == 6
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["train"]["steps"] == 6


@pytest.fixture
def finished_run(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["pretrain", *TINY, "--out", str(out_dir)], capsys)
    assert code == 0, err
    return out_dir


def test_resume_with_a_different_model_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    code, out, err = run_cli(["pretrain", *TINY, "--model.n_layer", "3", "--train.steps", "18",
                              "--out", str(finished_run), "--resume"], capsys)
    assert code == 2
    assert "model.n_layer" in one_error_line(err, "pretrain")
    assert snapshot(finished_run) == before


def test_resume_with_fewer_steps_than_done_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    code, out, err = run_cli(["pretrain", *TINY, "--train.steps", "6", "--out", str(finished_run), "--resume"],
                             capsys)
    assert code == 2
    assert "train.steps" in one_error_line(err, "pretrain")
    assert snapshot(finished_run) == before


def test_resume_without_a_run(tmp_path, capsys):
    code, out, err = run_cli(["pretrain", *TINY, "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2
    assert "empty" in one_error_line(err, "pretrain")
    assert not (tmp_path / "empty").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    code, out, err = run_cli(["pretrain", *TINY, "--out", str(target)], capsys)
    assert code == 2
    assert "afile" in one_error_line(err, "pretrain")
    assert target.read_text() == "x"


# ---------------------------------------------------------------- sample: refusals


def test_sample_missing_checkpoint(tmp_path, capsys):
    code, out, err = run_cli(["sample", "--ckpt", str(tmp_path / "nowhere"), "--prompt", "Hi"], capsys)
    assert code == 2
    assert "nowhere" in one_error_line(err, "sample")


def test_sample_folder_without_checkpoint(tmp_path, capsys):
    code, out, err = run_cli(["sample", "--ckpt", str(tmp_path)], capsys)
    assert code == 2
    assert str(tmp_path) in one_error_line(err, "sample")


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--max_new_tokens", "-5"), ("--top_k", "-1"),
                                        ("--num_samples", "-2")])
def test_sample_bad_numbers(flag, value, tmp_path, capsys):
    code, out, err = run_cli(["sample", "--ckpt", str(tmp_path), flag, value], capsys)
    assert code == 2
    assert flag in one_error_line(err, "sample")


def test_sample_requires_ckpt(capsys):
    code, out, err = run_cli(["sample"], capsys)
    assert code == 2
    assert "--ckpt" in one_error_line(err)


def test_a_saved_runs_relative_paths_are_read_from_the_folder_it_ran_in(tmp_path, monkeypatch):
    from chatfoundry.commands.common import from_where_it_ran as _from_where_it_ran

    saved = {"out": "runs/x/rm", "init": "runs/x/sft", "device": "auto", "rm": "python:mod:fn",
             "data": {"files": ["a.jsonl", str(tmp_path / "b.jsonl")], "cache_dir": ""}}
    run = tmp_path / "project" / "runs" / "x" / "rm"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve() / "project"
    assert _from_where_it_ran(saved, run) == {
        "out": "runs/x/rm", "init": str(root / "runs/x/sft"), "device": "auto", "rm": "python:mod:fn",
        "data": {"files": [str(root / "a.jsonl"), str(tmp_path / "b.jsonl")], "cache_dir": ""}}
    monkeypatch.chdir(root)  # where it ran: as written
    assert _from_where_it_ran(saved, Path("runs/x/rm")) == saved
    # A run folder moved or renamed since: nothing to go by, as written.
    assert _from_where_it_ran({**saved, "out": "runs/y/rm"}, run) == {**saved, "out": "runs/y/rm"}
