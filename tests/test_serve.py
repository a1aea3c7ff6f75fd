"""The OpenAI-compatible API: the real `openai` client against a live server, and bad input."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfoundry.checkpoint import save_checkpoint
from chatfoundry.generation import GenerationConfig, generate
from chatfoundry.serve.api import create_app
from chatfoundry.textgen import prompt_ids
from chatfoundry.tokenizer import chat_stop_ids, encode_chat, special_id
from conftest import cli_subprocess_cmd, run_cli, served, tiny_chat_model, tiny_chat_tokenizer

KEY = "sekret"
NAME = "tiny-chat"
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok, one_torch_thread):
    return tiny_chat_model(tok)


@pytest.fixture(scope="module")
def client(model, tok):
    """The openai client talking to uvicorn on a free localhost port, in a background thread."""
    with served(create_app(model, tok, NAME, api_key=KEY)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(model, tok):
    """In-process HTTP client for the error cases (no key)."""
    return TestClient(create_app(model, tok, NAME, max_body_bytes=4096), raise_server_exceptions=False)


def greedy_text(model, tok, ids, max_new_tokens, eos) -> tuple[str, list[int]]:
    out = generate(model, ids, GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos))
    return tok.decode(out.sequences[0], skip_special_tokens=True), out.sequences[0]


# ---------------------------------------------------------------- the real client


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert http.get("/health").json() == {"status": "ok", "model": NAME}


def test_chat_greedy_matches_generate_and_streaming(client, model, tok):
    ids = encode_chat(tok, HELLO)
    want, tokens = greedy_text(model, tok, ids, 20, chat_stop_ids(tok))
    r = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if tokens[-1] in chat_stop_ids(tok) else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    assert r.usage.total_tokens == len(ids) + len(tokens)

    chunks = list(client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_chat_sampling_seed_n_logprobs_and_stop(client, model, tok):
    args = dict(model=NAME, messages=HELLO, temperature=1.0, top_p=0.9, max_tokens=12, seed=3)
    a = client.chat.completions.create(n=2, logprobs=True, **args)
    b = client.chat.completions.create(n=2, **args)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: replays
    assert [c.index for c in a.choices] == [0, 1]
    for choice in a.choices:
        lps = [t.logprob for t in choice.logprobs.content]
        assert len(lps) >= 1 and all(lp <= 0 for lp in lps)
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)

    full = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20)
    text = full.choices[0].message.content
    assert len(text) >= 3, "the tiny model's greedy answer should be a few characters"
    stop = text[2:4]
    cut = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content


def test_tool_messages_and_content_parts(client, model, tok):
    messages = HELLO + [{"role": "assistant", "content": "fine"}, {"role": "tool", "content": "42"},
                        {"role": "user", "content": [{"type": "text", "text": "how are"},
                                                     {"type": "text", "text": " you"}]}]
    plain = [*messages[:-1], {"role": "user", "content": "how are you"}]
    want, _ = greedy_text(model, tok, encode_chat(tok, plain), 10, chat_stop_ids(tok))
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=10)
    assert r.choices[0].message.content == want


def test_completions_plain_and_streamed(client, model, tok):
    ids = prompt_ids(tok, "how are", 64)
    want, tokens = greedy_text(model, tok, ids, 10, [special_id(tok, "eos")])
    r = client.completions.create(model=NAME, prompt="how are", temperature=0, max_tokens=10, logprobs=1)
    assert r.choices[0].text == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    assert len(r.choices[0].logprobs.token_logprobs) == len(tokens)
    chunks = list(client.completions.create(model=NAME, prompt="how are", temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_wrong_key_and_bad_input_through_the_client(client):
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=10_000)


def test_concurrent_requests_each_get_their_own_answer(client, model, tok):
    questions = [[{"role": "user", "content": q}] for q in ("hello", "how are you?", "fine", "Be brief. hi there")]
    want = [greedy_text(model, tok, encode_chat(tok, m), 6 + i, chat_stop_ids(tok))[0] for i, m in enumerate(questions)]
    got = [None] * len(questions)

    def ask(i):
        got[i] = client.chat.completions.create(model=NAME, messages=questions[i], temperature=0,
                                                max_tokens=6 + i).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == want


# ---------------------------------------------------------------- errors: OpenAI's error object, never a 500


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_api_key_required(model, tok):
    http = TestClient(create_app(model, tok, NAME, api_key=KEY))
    assert http.get("/health").status_code == 200  # a load balancer's probe needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert error_of(http.get("/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
        error_of(http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}, headers=headers), 401)
    ok = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
    ({"messages": HELLO, "temperature": -1}, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "n": 1000}, "n"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 64}, "max_tokens"),  # the prompt leaves less room than that
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HELLO, "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "hello there " * 10}]}, "messages"),  # longer than the context
])
def test_bad_chat_requests_get_400(http, body, param):
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"].startswith(param) and err["type"] == "invalid_request_error"


def test_bad_completion_requests_and_transport_errors(http):
    assert error_of(http.post("/v1/completions", json={"prompt": "hello " * 20}), 400)["code"] == \
        "context_length_exceeded"
    error_of(http.post("/v1/completions", json={"prompt": []}), 400)
    error_of(http.post("/v1/completions", json={"prompt": "hi", "logprobs": 99}), 400)
    error_of(http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}),
             400)
    error_of(http.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    error_of(http.post("/v1/chat/completions", content=b"x" * 5000), 413)  # by Content-Length

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b" " * 1000

    error_of(http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.get("/v1/chat/completions"), 405)
    error_of(http.get("/v1/models/other"), 404)


def _containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=True) | st.text(max_size=5),
                     _containers, max_leaves=8)
_fields = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "system", "tool", "x", 1]), "content": _json}), max_size=2) | _json,
    "temperature": _json, "top_p": _json, "n": _json, "stop": _json, "seed": _json, "stream": _json,
    "logprobs": _json, "model": _json})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_fields | _json)
def test_fuzzed_bodies_never_500(http, body):
    if isinstance(body, dict):
        body = {**body, "max_tokens": 2}  # keep the valid ones quick
    r = http.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        error_of(r, 400)


# ---------------------------------------------------------------- the CLI


def test_serve_cli_help_and_bad_input(capsys):
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0 and "--api_key" in out and "127.0.0.1" in out
    code, _, err = run_cli(["serve", "--ckpt", "/no/such/folder"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "/no/such/folder" in err
    code, _, err = run_cli(["serve", "--ckpt", "x", "--port", "70000"], capsys)
    assert code == 2 and "--port" in err


def test_serve_cli_answers_the_openai_client(model, tok, tmp_path):
    """`chatfoundry serve` end to end: a checkpoint on disk, a real process, the key, greedy text."""
    save_checkpoint(tmp_path / "tiny", model, tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*cli_subprocess_cmd(), "serve", "--ckpt", str(tmp_path / "tiny"), "--port", str(port),
                             "--api_key", KEY], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["tiny"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        want, _ = greedy_text(model, tok, encode_chat(tok, HELLO), 8, chat_stop_ids(tok))
        r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8)
        assert r.choices[0].message.content == want
    finally:
        proc.terminate()
    code, err = proc.wait(10), proc.stderr.read().decode()
    # uvicorn shuts down, then re-raises SIGTERM; no abort from a torch thread killed at exit
    assert code in (0, -signal.SIGTERM) and "Finished server process" in err and "terminate called" not in err, err
