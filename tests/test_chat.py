"""The chat REPL: prompts in the chat format, truncation, /params, replies, and the REPL itself."""

from __future__ import annotations

import io

import pytest
import torch

from chatfoundry.errors import UserError
from chatfoundry.serve import chat
from chatfoundry.serve.chat import ChatParams, ChatSession, chat_prompt_ids, run_repl, set_param
from chatfoundry.tokenizer import chat_stop_ids as stop_ids
from chatfoundry.tokenizer import render_chat, special_id
from conftest import tiny_chat_model, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok, one_torch_thread):
    return tiny_chat_model(tok)


def session(model, tok, **params):
    return ChatSession(model, tok, params=ChatParams(**{"max_new_tokens": 6, **params}))


def ids_of(tok, messages):
    return tok.encode(render_chat(messages, add_generation_prompt=True), add_special_tokens=False).ids


def test_stop_ids_are_end_and_eos(tok):
    assert stop_ids(tok) == [special_id(tok, "end"), special_id(tok, "eos")]


def test_chat_prompt_renders_and_drops_the_oldest_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        msgs += [{"role": "user", "content": f"how are you {i}?"}, {"role": "assistant", "content": "fine"}]
    msgs.append({"role": "user", "content": "hello"})
    full = ids_of(tok, msgs)
    assert chat_prompt_ids(tok, msgs, 1000, 8) == full
    # room for the reply: max_new_tokens, capped at half the context
    assert chat_prompt_ids(tok, msgs, len(full) + 8, 8) == full
    assert chat_prompt_ids(tok, msgs, len(full) + 7, 8) == ids_of(tok, msgs[:1] + msgs[3:])
    half = len(ids_of(tok, msgs[:1] + msgs[5:])) * 2
    assert chat_prompt_ids(tok, msgs, half, 500) == ids_of(tok, msgs[:1] + msgs[5:])
    assert chat_prompt_ids(tok, msgs, half - 2, 500) == ids_of(tok, msgs[:1] + msgs[-1:])
    last = ids_of(tok, msgs[:1] + msgs[-1:])
    assert chat_prompt_ids(tok, msgs, len(last) + 1, 1) == last  # system and last user message stay
    with pytest.raises(UserError, match=f"prompt: {len(last)} tokens leave no room in the model's context of "
                                        f"{len(last)}"):
        chat_prompt_ids(tok, msgs, len(last), 1)


@pytest.mark.parametrize("text, name, value", [
    ("temperature=0.2", "temperature", 0.2), ("temperature 0", "temperature", 0.0), ("top_p=1", "top_p", 1.0),
    ("top_k = 5", "top_k", 5), ("max_new_tokens=1", "max_new_tokens", 1), ("seed 7", "seed", 7),
    ("seed=none", "seed", None), ("repetition_penalty=1.3", "repetition_penalty", 1.3)])
def test_set_param_accepts(text, name, value):
    params = ChatParams()
    assert set_param(params, text) == f"{name} = {value}"
    assert getattr(params, name) == value


@pytest.mark.parametrize("text, match", [
    ("temperature=-1", "temperature: must be"), ("top_p=0", "top_p"), ("top_p=1.5", "top_p"), ("top_k=-1", "top_k"),
    ("top_k=2.5", "top_k"), ("max_new_tokens=0", "max_new_tokens"), ("repetition_penalty=0", "repetition"),
    ("temperature=nan", "temperature"), ("temperature=abc", "temperature"), ("temperature", "give a value"),
    ("seed=x", "seed"), ("bogus=1", "unknown parameter 'bogus': one of temperature, top_p")])
def test_set_param_rejects(text, match):
    params = ChatParams()
    with pytest.raises(ValueError, match=match):
        set_param(params, text)
    assert params == ChatParams()


def test_reply_keeps_the_conversation_in_the_next_prompt(model, tok, monkeypatch):
    prompts, pieces = [], []
    real = chat.stream_text
    monkeypatch.setattr(chat, "stream_text", lambda m, t, ids, cfg: (prompts.append(ids), real(m, t, ids, cfg))[1])
    s = session(model, tok, temperature=0)
    s.system = "Be brief."
    first = s.reply("hello", pieces.append)
    assert first == "".join(pieces)
    assert s.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    s.reply("how are you?")
    assert len(s.history) == 4
    assert prompts[1] == ids_of(tok, [{"role": "system", "content": "Be brief."}] + s.history[:3])
    s.reset()
    assert s.history == [] and s.system == "Be brief." and s.params.temperature == 0


def test_greedy_and_seeded_replies_are_reproducible(model, tok):
    for params in (dict(temperature=0), dict(temperature=1.0, top_p=1.0, seed=3)):
        a, b = session(model, tok, **params), session(model, tok, **params)
        assert [a.reply("hello"), a.reply("fine")] == [b.reply("hello"), b.reply("fine")]


def test_a_reply_ends_at_the_end_token(model, tok):
    bump = torch.zeros(tok.get_vocab_size())
    bump[special_id(tok, "end")] = 100.0
    calls = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: (calls.append(1), out + bump)[1])
    try:
        s = session(model, tok, temperature=0.7)
        assert s.reply("hello") == ""
    finally:
        hook.remove()
    assert len(calls) == 1  # the prompt's forward pass picked <|end|>; no second step
    assert s.history[-1] == {"role": "assistant", "content": ""}


def test_piped_input_is_one_message_and_prints_only_the_answer(model, tok, capsys):
    s, out = session(model, tok, temperature=0), io.StringIO()
    assert run_repl(s, io.StringIO("  hello\nthere \n"), out) == 0
    assert s.history[0]["content"] == "hello\nthere"
    assert out.getvalue() == s.history[1]["content"] + "\n"
    assert run_repl(session(model, tok), io.StringIO(" \n"), io.StringIO()) == 2
    assert "error" in capsys.readouterr().err


def test_interactive_commands(model, tok):
    s, out = session(model, tok), io.StringIO()
    script = ("/params temperature=0\n\nhi\n/params\n/params top_p=2\n/reset\n/system Be brief.\n/system\n"
              "/bogus\n/exit\nhi\n")
    assert run_repl(s, io.StringIO(script), out, interactive=True) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("chatfoundry chat:") and "/help" in lines[0]
    assert lines[1] == "you> temperature = 0.0"  # no echo: a terminal shows what was typed
    assert lines[2].startswith("you> you> assistant> ")  # the empty line was skipped
    assert "  max_new_tokens = 6" in lines
    assert "you> error: top_p: must be a number in (0, 1], got '2'" in lines
    assert text.count("history cleared") == 2
    assert "system: Be brief." in text
    assert "you> unknown command /bogus: one of /reset, /system, /params, /help, /exit, /quit" in lines
    assert s.history == [] and s.system == "Be brief." and s.params.temperature == 0
    assert text.count("you> ") == 10  # /exit stopped it before the last line


def test_ctrl_c_stops_the_answer_and_keeps_what_was_shown(model, tok, monkeypatch):
    def interrupted(*args):
        yield "par", 5, 0.0
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "stream_text", interrupted)
    s, out = session(model, tok), io.StringIO()
    assert run_repl(s, io.StringIO("hi\n/system -\n"), out, interactive=True) == 0  # EOF ends it too
    assert "assistant> par [interrupted]\n" in out.getvalue()
    assert "system message removed" in out.getvalue() and s.system is None
