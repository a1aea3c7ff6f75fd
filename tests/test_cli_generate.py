"""`chatfoundry generate` and `decode-compare` on a tiny trained checkpoint."""

from __future__ import annotations

import pytest

from conftest import TINY, last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    from chatfoundry.cli import main

    assert main(["pretrain", *TINY, "--model.block_size", "48", "--out", str(out)]) == 0
    return out


def gen(capsys, ckpt, *args) -> dict:
    code, out, err = run_cli(["generate", "--ckpt", str(ckpt), "--prompt", "The ", "--max_new_tokens", "12",
                              *args, "--json"], capsys)
    assert code == 0, err
    return last_json(out)


def test_generate_json_shape_and_greedy_equals_the_python_api(ckpt, capsys):
    from chatfoundry.checkpoint import load_model
    from chatfoundry.generation import GenerationConfig, generate
    from chatfoundry.tokenizer import special_id

    result = gen(capsys, ckpt, "--strategy", "greedy")
    model, tok = load_model(ckpt)
    assert result["prompt_token_ids"] == tok.encode("The ", add_special_tokens=False).ids
    direct = generate(model, result["prompt_token_ids"],
                      GenerationConfig(max_new_tokens=12, eos_token_id=special_id(tok, "eos")))
    assert result["token_ids"] == direct.sequences[0]
    assert len(result["logprobs"]) == len(result["token_ids"]) > 0
    assert all(lp <= 0 for lp in result["logprobs"])
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)


def test_beam_returns_sequences_best_first(ckpt, capsys):
    result = gen(capsys, ckpt, "--strategy", "beam", "--num_beams", "4", "--num_return_sequences", "3")
    scores = [s["score"] for s in result["sequences"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert result["token_ids"] == result["sequences"][0]["token_ids"]


def test_sampling_is_reproducible_by_seed(ckpt, capsys):
    a = gen(capsys, ckpt, "--strategy", "sample", "--top_p", "0.9", "--seed", "3")
    b = gen(capsys, ckpt, "--strategy", "sample", "--top_p", "0.9", "--seed", "3")
    assert a["token_ids"] == b["token_ids"]
    # Different seeds give different text (over several seeds, at least one differs).
    others = {tuple(gen(capsys, ckpt, "--strategy", "sample", "--seed", str(s))["token_ids"]) for s in range(4)}
    assert len(others) > 1


@pytest.mark.parametrize("bad, field", [
    (["--strategy", "nucleus"], "--strategy"),
    (["--strategy", "sample", "--top_p", "0"], "top_p"),
    (["--strategy", "sample", "--top_p", "1.5"], "top_p"),
    (["--strategy", "sample", "--top_k", "-1"], "top_k"),
    (["--strategy", "sample", "--temperature", "-1"], "temperature"),
    (["--strategy", "beam", "--num_beams", "0"], "num_beams"),
    (["--prompt", "x" * 200], "prompt"),
])
def test_bad_generation_input_is_one_line_exit_2(ckpt, capsys, bad, field):
    code, out, err = run_cli(["generate", "--ckpt", str(ckpt), *bad], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and field.replace("-", "_") in err.replace("-", "_")
    assert "Traceback" not in err


def test_decode_compare_lists_each_strategy_with_its_logprob(ckpt, capsys):
    code, out, err = run_cli(["decode-compare", "--ckpt", str(ckpt), "--prompt", "The ", "--max_new_tokens", "12",
                              "--json"], capsys)
    assert code == 0, err
    rows = last_json(out)
    assert [r["strategy"] for r in rows][:2] == ["greedy", "beam (4)"] and len(rows) == 6
    greedy = gen(capsys, ckpt, "--strategy", "greedy")
    assert rows[0]["text"] == greedy["text"]
    assert rows[0]["logprob"] == pytest.approx(sum(greedy["logprobs"]))
    for r in rows:
        assert r["strategy"] in out and r["logprob"] <= 0


def test_stream_prints_the_same_text_as_json_and_stop_cuts_it(ckpt, capsys):
    code, out, err = run_cli(["generate", "--ckpt", str(ckpt), "--prompt", "The ", "--max_new_tokens", "20",
                              "--stream", "--json"], capsys)
    assert code == 0, err
    result = last_json(out)
    assert out.splitlines()[0] == "The " + result["text"].split("\n")[0]
    full = gen(capsys, ckpt, "--strategy", "greedy", "--max_new_tokens", "20")
    assert full["text"] == result["text"]
    stop = full["text"][3:5]
    cut = gen(capsys, ckpt, "--strategy", "greedy", "--max_new_tokens", "20", "--stop", stop)
    assert cut["text"] == full["text"][:full["text"].find(stop)]
    beams = gen(capsys, ckpt, "--strategy", "beam", "--stop", stop)
    assert all(stop not in s["text"] for s in beams["sequences"])
