"""Tools: the calculator's parser and bounds, the call format, the world's tool-use data, the
runtime loop, and OpenAI's `tools` / `tool_calls` through the API with the real client."""

from __future__ import annotations

import json

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatfoundry.data import world
from chatfoundry import tools
from chatfoundry.serve.api import create_app
from chatfoundry.tools import CALL, ToolError, calculate, format_number, parse_call, run_call, split_calls
from chatfoundry.tokenizer import encode_chat, render_chat, special_id, train_tokenizer
from chatfoundry.train.sft import Example, encode
from conftest import randomize, served, tiny_config

# ---------------------------------------------------------------- the calculator


@pytest.mark.parametrize("expression, value", [
    ("347 * 29", "10063"), ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("2 ^ 10", "1024"), ("2 ** 3 ** 2", "512"),
    ("-5 + 3", "-2"), ("7 / 2", "3.5"), ("10 / 2", "5"), ("7 // 2", "3"), ("7 % 3", "1"), ("1 / 3", "0.3333333333"),
    ("3 × 4 ÷ 6", "2"), ("0.1 + 0.2", "0.3"), (" 12 ", "12"), ("-(2 - 10)", "8"),
    ("7 times 8", "56"), ("836 minus 24 plus 1", "813"), ("9 multiplied by 3 divided by 2", "13.5"),
])
def test_calculator_values(expression, value):
    assert format_number(calculate(expression)) == value


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("", "empty"), ("2 +", "cannot parse"), ("__import__('os')", "only numbers"),
    ("x + 1", "only numbers"), ("(1).real", "only numbers"), ("[1, 2]", "only numbers"), ("'a' * 3", "only numbers"),
    ("9 ** 9 ** 9", "exponent"), ("10 ** 40", "too large"), ("1" * 40, "too large"), ("1+" * 150 + "1", "longer"),
    ("True + 1", "only numbers"), ("1e400", "too large"), ("(-8) ** 0.5", "no real"),
    ("7 timesx 8", "cannot parse"), ("plus", "cannot parse"),
])
def test_calculator_refuses_what_it_should(expression, message):
    with pytest.raises(ToolError, match=message):
        calculate(expression)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/%()^. e_ax", max_size=tools.MAX_EXPRESSION + 5))
def test_calculator_any_text_gives_a_number_or_a_tool_error(text):
    try:
        value = calculate(text)
    except ToolError:
        return
    assert isinstance(value, (int, float)) and abs(value) <= tools.MAX_MAGNITUDE


def test_calls_parse_run_and_fail_into_the_answer():
    assert parse_call('calculator {"expression": "2 + 2"}') == ("calculator", {"expression": "2 + 2"})
    assert run_call('calculator {"expression": "2 + 2"}')[2] == "4"
    assert run_call('calculator {"expression": "1/0"}')[2] == "error: division by zero"
    assert run_call('search {"q": "x"}')[2] == "error: no tool named 'search'"
    assert run_call("calculator 2+2")[2] == "error: malformed arguments of calculator: not JSON"
    assert run_call('calculator {"expr": "1"}')[2].startswith("error: calculator: give")
    assert run_call("")[2].startswith("error: malformed tool call")


@pytest.fixture(scope="module")
def tok():
    """A char tokenizer that can write the tool-use conversations."""
    text = " ".join(render_chat(m) for m in world.tool_conversations("train", 60))
    return train_tokenizer([text.replace("<|", " ").replace("|>", " ")], "char")


def test_split_calls_reads_one_or_several_calls(tok):
    one = encode_chat(tok, [{"role": "user", "content": "1+1"}])  # not a call: words
    assert split_calls(tok, one) is None
    ids = tok.encode(f'{CALL}calculator {{"expression": "1 + 1"}}{CALL}calculator {{"expression": "2"}}').ids
    assert ids[0] == special_id(tok, "tool")
    assert split_calls(tok, ids) == ['calculator {"expression": "1 + 1"}', 'calculator {"expression": "2"}']


# ---------------------------------------------------------------- the world's tool-use data


def test_tool_conversations_call_the_calculator_with_the_right_expression():
    convs = world.tool_conversations("train", 400, seed=3)
    calls = 0
    for messages in convs:
        assert messages[0]["role"] == "system" and messages[0]["content"].endswith("Tools: calculator.")
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and m["content"].startswith(CALL):
                calls += 1
                name, args = parse_call(m["content"][len(CALL):])
                assert name == "calculator" and messages[i + 1] == {"role": "tool", "content": run_call(
                    m["content"][len(CALL):])[2]}
                assert messages[i + 1]["content"] in messages[i + 2]["content"]  # the answer quotes the result
    assert 0.6 < calls / len(convs) < 0.9  # most ask arithmetic; the rest are answered directly


def test_calculator_questions_are_held_out_by_their_numbers():
    train = {t.group for t in world.calculator_tasks("train", 2000)}
    test = world.calculator_tasks("test", 100)
    assert len(test) == 100 and not train & {t.group for t in test}
    assert all(int(t.answer) == calculate(t.key) and t.family == "arithmetic" for t in test)


def test_sft_learns_the_call_and_the_answer_not_the_tool_result(tok):
    messages = world.tool_conversations("train", 20)[0]
    assert messages[2]["content"].startswith(CALL)
    (ids, learn), = encode([Example(messages=tuple(messages))], tok)
    tool_id = special_id(tok, "tool")
    call_at = ids.index(tool_id)  # the first <|tool|>: inside the assistant's turn, learned
    result_at = ids.index(tool_id, call_at + 1)  # the tool message: not learned
    assert learn[call_at] and not any(learn[result_at:ids.index(special_id(tok, "assistant"), result_at)])
    assert learn[-1]  # the final answer's <|end|>


# ---------------------------------------------------------------- the runtime loop


def test_answer_with_tools_runs_calls_and_feeds_the_result_back(tok, monkeypatch):
    """A scripted model: it calls the calculator when the last message is the user's, and answers
    with the tool's result when the last message is the tool's."""
    seen = []

    def scripted(model, prompts, cfg):
        seen.append(len(prompts))
        out = []
        for ids in prompts:
            text = tok.decode(ids, skip_special_tokens=False)
            if "<|tool|> 4 <|end|>" in text.replace("  ", " ") or text.endswith("4<|end|><|assistant|>"):
                reply = "It is 4."
            elif "2 plus 2" in text:
                reply = f'{CALL}calculator {{"expression": "2 + 2"}}'
            else:
                reply = "I do not know."
            out.append(tok.encode(reply).ids + [special_id(tok, "end")])
        return type("Out", (), {"sequences": out})

    monkeypatch.setattr(tools, "generate_batch", scripted)
    model = type("M", (), {"training": False, "eval": lambda self: None, "train": lambda self, mode: None})()
    asks = [[{"role": "user", "content": "What is 2 plus 2?"}], [{"role": "user", "content": "Who are you?"}]]
    turns = tools.answer_with_tools(model, tok, asks)
    assert turns[0] == [{"role": "assistant", "content": f'{CALL}calculator {{"expression": "2 + 2"}}'},
                        {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}]
    assert turns[1] == [{"role": "assistant", "content": "I do not know."}]
    assert seen == [2, 1]  # one batch per round; the closed conversation left
    assert tools.final_answer(turns[0]) == "It is 4."


def test_declare_names_the_tools_in_the_system_message():
    user = {"role": "user", "content": "hi"}
    assert tools.declare([user], ["calculator"])[0] == {"role": "system", "content": "Tools: calculator."}
    assert tools.declare([{"role": "system", "content": "Be brief."}, user], ["a", "b"])[0]["content"] == \
        "Be brief. Tools: a, b."
    assert tools.declare([user], []) == [user]


# ---------------------------------------------------------------- through the API


@pytest.fixture(scope="module")
def client(tok, one_torch_thread):
    import torch

    from chatfoundry.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = randomize(DecoderLM(tiny_config("llama", vocab_size=tok.get_vocab_size(), block_size=256))).eval()
    with served(create_app(model, tok, "tiny")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


TOOLS = [tools.CALCULATOR.spec()]
ASK = [{"role": "user", "content": "What is 2 plus 2?"}]


def test_api_tool_choice_named_returns_tool_calls_streamed_and_not(client):
    choice = {"type": "function", "function": {"name": "calculator"}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0,
                                       max_tokens=12)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                            temperature=0, max_tokens=12, stream=True)
    chunks = list(stream)
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert [d.function.name for d in deltas] == ["calculator"]
    assert deltas[0].function.arguments == call.function.arguments  # the same call, streamed
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks)


def test_api_renders_tools_calls_and_results_into_the_prompt(client, tok):
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "4"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=1)
    want = [{"role": "system", "content": "Tools: calculator."}, *ASK,
            {"role": "assistant", "content": f'{CALL}calculator {{"expression": "2+2"}}'}, {"role": "tool", "content": "4"}]
    assert r.usage.prompt_tokens == len(encode_chat(tok, want))
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=1)
    assert plain.usage.prompt_tokens == len(encode_chat(tok, ASK))  # tool_choice none: no tools named


def test_api_tool_choice_required_opens_with_a_call_and_bad_tools_get_400(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
    bad = [({"type": "function", "function": {"name": "no such"}}, "auto"),  # not an identifier
           (TOOLS[0], {"type": "function", "function": {"name": "search"}})]  # not among the tools
    for tool, choice in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=ASK, tools=[tool], tool_choice=choice)
        assert e.value.status_code == 400 and json.dumps(e.value.body)


def test_chat_session_runs_the_calculator_and_shows_the_call(tok, monkeypatch):
    from chatfoundry.serve import chat

    def scripted(model, tokenizer, ids, cfg, stops=()):
        text = tokenizer.decode(ids, skip_special_tokens=False).replace(" ", "")
        assert "Tools:calculator." in text  # the tool is on offer in the prompt
        reply = "It is 4." if text.endswith("4<|end|><|assistant|>") else f'{CALL}calculator {{"expression": "2 + 2"}}'
        for token in tokenizer.encode(reply).ids + [special_id(tokenizer, "end")]:
            yield tokenizer.decode([token], skip_special_tokens=True), token, 0.0

    monkeypatch.setattr(chat, "stream_text", scripted)
    model = type("M", (), {"training": False, "config": type("C", (), {"block_size": 256}),
                           "eval": lambda self: None, "train": lambda self, mode: None})()
    shown = []
    session = chat.ChatSession(model, tok, tools={"calculator": tools.CALCULATOR})
    assert session.reply("What is 2 plus 2?", shown.append) == "It is 4."
    assert "".join(shown) == "[calculator: 2 + 2 = 4] It is 4."  # the call itself is never shown raw
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]


def test_chat_cli_rejects_an_unknown_tool(capsys, tmp_path):
    from conftest import run_cli

    code, _, err = run_cli(["chat", "--ckpt", str(tmp_path), "--tools", "calculator,search"], capsys)
    assert code == 2 and "--tools: unknown tool 'search'" in err


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_function = st.fixed_dictionaries({}, optional={"name": st.sampled_from(["calculator", "f", "", "no such"]) | _json,
                                                "arguments": _json, "parameters": _json})
_tool_bodies = st.fixed_dictionaries({"max_tokens": st.just(2)}, optional={
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"])}, optional={
        "content": _json, "tool_calls": st.lists(st.fixed_dictionaries({}, optional={
            "id": _json, "type": st.sampled_from(["function", "x"]), "function": _function}), max_size=2) | _json,
        "tool_call_id": _json}), min_size=1, max_size=3),
    "tools": st.lists(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["function", "x"]),
                                                          "function": _function}), max_size=2) | _json,
    "tool_choice": st.sampled_from(["auto", "none", "required", "x"]) | st.fixed_dictionaries(
        {}, optional={"type": st.just("function"), "function": _function}) | _json,
    "stream": st.booleans()})


@pytest.fixture(scope="module")
def http(tok):
    import torch
    from fastapi.testclient import TestClient

    from chatfoundry.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", vocab_size=tok.get_vocab_size(), block_size=256)).eval()
    return TestClient(create_app(model, tok, "tiny"), raise_server_exceptions=False)


@settings(max_examples=60, deadline=None)
@given(body=_tool_bodies)
def test_fuzzed_tool_requests_never_500(http, body):
    r = http.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
