"""Dataset formats: every TRL-style line parses to one normalised form; bad lines name file:line."""

from __future__ import annotations

import json
import re

import pytest

from chatfoundry.data.formats import (
    Comparison,
    Example,
    comparison_to_record,
    detect_format,
    example_to_record,
    load_comparisons,
    load_sft,
    pairs,
    read_jsonl,
    write_jsonl,
)
from chatfoundry.errors import UserError


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def sys_(text):
    return {"role": "system", "content": text}


def write(tmp_path, *lines, name="data.jsonl"):
    """A JSONL file; a dict is dumped, a str or bytes written as it is."""
    path = tmp_path / name
    raw = [x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


SFT_CASES = [
    ({"text": "hello world"}, Example(text="hello world")),
    ({"prompt": "2+2?", "completion": "4"}, Example(messages=(u("2+2?"), a("4")))),
    ({"prompt": [sys_("Be brief."), u("Hi")], "completion": [a("Hello!")]},
     Example(messages=(sys_("Be brief."), u("Hi"), a("Hello!")))),
    ({"messages": [sys_(""), u("Hi"), a("Hey"), u("Bye"), {"role": "assistant", "content": "Bye!", "name": "x"}]},
     Example(messages=(sys_(""), u("Hi"), a("Hey"), u("Bye"), a("Bye!")))),
    ({"instruction": "Translate.", "input": "chat", "output": "cat"},
     Example(messages=(u("Translate.\n\nchat"), a("cat")))),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, Example(messages=(u("Say hi."), a("hi")))),
    ({"instruction": "Say hi.", "output": "hi"}, Example(messages=(u("Say hi."), a("hi")))),
    ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, Example(messages=(u("Q"), a("good")))),
    ({"prompt": "Q", "responses": ["x", "y", "z"], "ranks": [2, 0, 1]}, Example(messages=(u("Q"), a("y")))),
]


@pytest.mark.parametrize("obj,expected", SFT_CASES, ids=lambda x: detect_format(x) if isinstance(x, dict) else "")
def test_each_sft_format_parses(tmp_path, obj, expected):
    assert load_sft(write(tmp_path, obj)) == [expected]


def test_mixed_file_blank_lines_and_several_files(tmp_path):
    first = write(tmp_path, {"text": "t"}, "", "   ", {"messages": [u("q"), a("r")]}, name="a.jsonl")
    second = write(tmp_path, {"instruction": "i", "output": "o", "id": 7}, name="b.jsonl")
    assert load_sft([first, str(second)]) == [
        Example(text="t"), Example(messages=(u("q"), a("r"))), Example(messages=(u("i"), a("o")))]


def test_read_jsonl_numbers_lines_and_skips_bom_and_blanks(tmp_path):
    path = write(tmp_path, b'\xef\xbb\xbf{"text": "a"}', b"", b'{"text": "b"}\r')
    assert list(read_jsonl(path)) == [(1, {"text": "a"}), (3, {"text": "b"})]


COMPARISON_CASES = [
    ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, Comparison((u("Q"),), ("good", "bad"), (0, 1))),
    ({"prompt": [u("Q")], "chosen": [a("good")], "rejected": [a("bad")]},
     Comparison((u("Q"),), ("good", "bad"), (0, 1))),
    # implicit prompt: the shared prefix of two whole conversations
    ({"chosen": [sys_("S"), u("Q"), a("A"), u("Q2"), a("good")],
      "rejected": [sys_("S"), u("Q"), a("A"), u("Q2"), a("bad")]},
     Comparison((sys_("S"), u("Q"), a("A"), u("Q2")), ("good", "bad"), (0, 1))),
    # explicit prompt repeated in front of each reply (ultrafeedback_binarized)
    ({"prompt": "Q", "chosen": [u("Q"), a("good")], "rejected": [u("Q"), a("bad")], "messages": [u("Q"), a("good")]},
     Comparison((u("Q"),), ("good", "bad"), (0, 1))),
    ({"prompt": "Q", "responses": ["best", "mid", "worst"]},
     Comparison((u("Q"),), ("best", "mid", "worst"), (0, 1, 2))),
    ({"prompt": [u("Q"), a("A"), {"role": "tool", "content": "42"}], "responses": ["c", "a", "b", "d"],
      "ranks": [5, 1, 5, 3]},
     Comparison((u("Q"), a("A"), {"role": "tool", "content": "42"}), ("a", "d", "c", "b"), (0, 1, 2, 2))),
]


@pytest.mark.parametrize("obj,expected", COMPARISON_CASES)
def test_each_comparison_format_parses(tmp_path, obj, expected):
    assert load_comparisons(write(tmp_path, obj)) == [expected]


def test_pairs_skip_ties():
    c = Comparison((u("Q"),), ("a", "b", "c", "d"), (0, 0, 1, 2))
    assert pairs(c) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pairs(Comparison((u("Q"),), ("a", "b"), (0, 1))) == [(0, 1)]


OK_SFT = {"prompt": "p", "completion": "c"}
OK_CMP = {"prompt": "p", "chosen": "c", "rejected": "r"}
ROLES = "system, user, assistant, tool"

SFT_ERRORS = [
    ('{"text": "a",}', r"invalid JSON \(.+ at column 14\)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"prompt": "p"}, "missing field 'completion'"),
    ({"text": 3}, "field 'text' must be a string, got int"),
    ({"text": " \n"}, "field 'text' is empty"),
    ({"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "p", "chosen": 1, "rejected": "r"}, "field 'chosen' must be a string or a list of messages, got int"),
    ({"messages": [u("a"), a("b"), {"role": "bot", "content": "c"}]},
     f"messages\\[2\\].role 'bot' is not one of {ROLES}"),
    ({"messages": [u("a"), {"content": "b"}]}, "messages\\[1\\] has no 'role'"),
    ({"messages": [u("a"), {"role": "assistant", "content": None}]}, r"messages\[1\].content must be a string, got null"),
    ({"messages": [u("a"), a("")]}, r"messages\[1\].content is empty \(an assistant message needs text\)"),
    ({"messages": [sys_("s"), u("a")]}, "no assistant message to learn from"),
    ({"prompt": "p", "completion": [u("more")]}, "no assistant message to learn from"),
    ({"instruction": "i", "input": 3, "output": "o"}, "field 'input' must be a string, got int"),
    ({"prompt": "p", "responses": ["only"]}, "rankings need at least 2 responses, got 1"),
    ({"id": 1, "question": "q"}, "unknown format: expected one of the keys text, prompt\\+completion, messages, "
     "instruction\\+output, prompt\\+chosen\\+rejected, prompt\\+responses \\(found id, question\\)"),
    (b'{"text": "caf\xe9"}', r"not UTF-8 text \(bad byte at column 14\)"),
]

CMP_ERRORS = [
    ({"prompt": "p", "responses": ["x", "x", "x"]}, "all responses are identical"),
    ({"prompt": "p", "responses": ["x", " "]}, r"responses\[1\] is empty"),
    ({"prompt": "p", "responses": ["x", 2]}, r"responses\[1\] must be a string, got int"),
    ({"prompt": "p", "responses": ["x", "y"], "ranks": [0]}, "field 'ranks' has 1 entries for 2 responses"),
    ({"prompt": "p", "responses": ["x", "y"], "ranks": [0, 1.5]}, r"ranks\[1\] must be an integer, got float"),
    ({"prompt": "p", "responses": ["x", "y"], "ranks": [1, 1]}, "all responses share one rank: nothing to compare"),
    ({"prompt": "p", "responses": ["x", "y", "x"]}, r"responses\[0\] and responses\[2\] are identical but ranked differently"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("x")]}, "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "missing field 'prompt'"),
    ({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("x"), u("q2"), a("y")]},
     "field 'chosen' must add one assistant message to the prompt, got nothing"),
    ({"prompt": [u("q"), a("x")], "responses": ["y", "z"]}, "the prompt must end with a user or tool message, not assistant"),
    ({"messages": [u("q"), a("x")]}, "a messages line has nothing to compare"),
]


@pytest.mark.parametrize("bad,message", SFT_ERRORS)
def test_sft_errors_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, OK_SFT, "", bad, OK_SFT)  # the bad line is line 3
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:3: {message}"):
        load_sft(path)


@pytest.mark.parametrize("bad,message", CMP_ERRORS)
def test_comparison_errors_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, OK_CMP, "", bad)
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:3: {message}"):
        load_comparisons(path)


def test_file_level_errors(tmp_path):
    empty = write(tmp_path, "", "  ", name="empty.jsonl")
    with pytest.raises(UserError, match=f"^{re.escape(str(empty))}: no examples$"):
        load_sft([write(tmp_path, OK_SFT), empty])
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=f"^{re.escape(str(missing))}: no such file$"):
        load_comparisons(missing)
    with pytest.raises(UserError, match="no data files given"):
        load_sft([])


def test_detect_format_raises_value_error():
    assert detect_format({"prompt": "p", "responses": []}) == "ranking"
    with pytest.raises(ValueError, match="unknown format"):
        detect_format({})


def test_round_trip_through_write_jsonl(tmp_path):
    examples = load_sft(write(tmp_path, *(obj for obj, _ in SFT_CASES), "\u2028", {"text": "line\u2028sep \ud800"}))
    path = write_jsonl(tmp_path / "out" / "sft.jsonl", map(example_to_record, examples))
    assert load_sft(path) == examples
    comparisons = load_comparisons(write(tmp_path, *(obj for obj, _ in COMPARISON_CASES)))
    path = write_jsonl(tmp_path / "out" / "cmp.jsonl", map(comparison_to_record, comparisons))
    assert load_comparisons(path) == comparisons
    assert comparison_to_record(comparisons[0]) == {"prompt": "Q", "responses": ["good", "bad"], "ranks": [0, 1]}
    assert comparison_to_record(comparisons[2])["prompt"][0] == sys_("S")


def test_write_jsonl_is_atomic(tmp_path):
    target = tmp_path / "deep" / "er" / "d.jsonl"
    assert write_jsonl(target, [{"text": "é"}]) == target
    assert target.read_text(encoding="utf-8") == '{"text": "é"}\n'
    assert target.stat().st_mode & 0o777 == 0o644

    def records():
        yield {"text": "new"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # an existing file is left as it was
        write_jsonl(target, records())
    assert target.read_text(encoding="utf-8") == '{"text": "é"}\n'
    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(RuntimeError, match="boom"):  # a new one never appears
        write_jsonl(fresh, records())
    assert not fresh.exists()
    with pytest.raises(TypeError):
        write_jsonl(fresh, [{"x": object()}])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.jsonl", "deep", "er"]
