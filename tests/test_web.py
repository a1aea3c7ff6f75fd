"""The web chat page at `/`, end to end: headless Chromium (Debian's, driven by Playwright) against a
live server. Skips with its reason where there is no browser or no playwright."""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import urlsplit

import httpx
import pytest

from chatfoundry.serve.api import create_app
from conftest import served, tiny_chat_model, tiny_chat_tokenizer

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no browser at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

NAME = "tiny-chat"
KEY = "sekret"
CHUNK_DELAY = 0.02  # seconds between the server's streamed chunks, so the browser sees them one by one
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# every text the last assistant message shows, recorded in the page as it changes
RECORD_TEXTS = """
window.__texts = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('[data-testid=assistant]');
  const text = all.length ? all[all.length - 1].textContent : null;
  if (text && window.__texts[window.__texts.length - 1] !== text) window.__texts.push(text);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


class _SlowStream:
    """ASGI middleware: a pause after each part of a streamed body. The tiny model answers in a few
    milliseconds, so the browser could read a whole answer in one go; a real model's pace makes
    every chunk its own read, which is what lets the test watch the answer grow."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def paced(message):
            await send(message)
            if message["type"] == "http.response.body" and message.get("more_body"):
                await asyncio.sleep(CHUNK_DELAY)

        await self.app(scope, receive, paced)


@pytest.fixture(scope="module")
def servers(one_torch_thread):
    tok = tiny_chat_tokenizer()
    model = tiny_chat_model(tok)
    with served(_SlowStream(create_app(model, tok, NAME))) as open_, \
            served(_SlowStream(create_app(model, tok, NAME, api_key=KEY))) as keyed:
        yield open_, keyed


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    except Exception as e:  # a browser that cannot start here is the machine's problem, not the page's
        pw.stop()
        pytest.skip(f"{CHROMIUM} does not start under playwright: {str(e).splitlines()[0]}")
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture
def hosts():
    """The host:port of every request the pages of a test made."""
    return set()


@pytest.fixture
def page(browser, servers, hosts):
    context = browser.new_context()
    context.on("request", lambda r: hosts.add(urlsplit(r.url).netloc))
    page = context.new_page()
    page.add_init_script(RECORD_TEXTS)
    page.set_default_timeout(10_000)
    page.goto(servers[0] + "/")
    yield page
    context.close()
    # the page is self-contained: no CDN, no web font, nothing fetched from anywhere but the servers
    assert hosts and hosts <= {urlsplit(s).netloc for s in servers}, hosts


def api_answer(server, messages, key: str | None = None, **params) -> str:
    """What the API answers, not streamed, for the same request."""
    r = httpx.post(server + "/v1/chat/completions", json={"messages": messages, **params}, timeout=30,
                   headers={"Authorization": f"Bearer {key}"} if key else None)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def fill_settings(page, **values):
    for name, value in values.items():
        page.get_by_test_id(name).fill(str(value))


def say(page, text: str, *, enter: bool = False) -> str:
    """Type `text`, send it, wait for the answer to finish; the answer's text."""
    page.get_by_test_id("input").fill(text)
    if enter:
        page.get_by_test_id("input").press("Enter")
    else:
        page.get_by_test_id("send").click()
    sync_api.expect(page.get_by_test_id("stop")).to_be_disabled()
    sync_api.expect(page.get_by_test_id("send")).to_be_enabled()
    return page.get_by_test_id("assistant").last.text_content()


def chat_bodies(page, action) -> list[dict]:
    """The bodies of the chat requests the page sent while `action()` ran."""
    bodies = []
    listener = lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(r.post_data_json)  # noqa: E731
    page.on("request", listener)
    try:
        action()
    finally:
        page.remove_listener("request", listener)
    return bodies


def test_page_streams_greedy_answers_and_keeps_the_history(page, server):
    sync_api.expect(page.get_by_test_id("model-name")).to_have_text(NAME)
    fill_settings(page, temperature=0, max_tokens=12)
    answers = []
    bodies = chat_bodies(page, lambda: answers.append(say(page, "hi")))  # greedy: 12 characters
    assert bodies == [{"messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "temperature": 0, "top_p": 1, "max_tokens": 12}]
    first = answers[0]
    assert first == api_answer(server, bodies[0]["messages"], temperature=0, max_tokens=12)
    texts = page.evaluate("window.__texts")
    # streamed: the answer grew through several texts, each extending the one before, to the whole
    assert len(texts) >= 3 and texts[-1] == first, texts
    assert all(b.startswith(a) and a != b for a, b in zip(texts, texts[1:])), texts

    # the second turn carries the first (user and assistant); Enter sends too
    bodies = chat_bodies(page, lambda: answers.append(say(page, "how are you?", enter=True)))
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "how are you?"}]
    assert bodies[0]["messages"] == history
    assert answers[1] == api_answer(server, history, temperature=0, max_tokens=12)
    assert page.get_by_test_id("user").all_text_contents() == ["hi", "how are you?"]
    assert page.get_by_test_id("assistant").all_text_contents() == answers


def test_system_message_and_sampling_controls_reach_the_server(page, server):
    system = [{"role": "system", "content": "Be brief."}]
    page.get_by_test_id("system").fill("Be brief.")
    fill_settings(page, temperature=0, max_tokens=10)
    bodies = chat_bodies(page, lambda: say(page, "hello there"))
    greedy = page.get_by_test_id("assistant").last.text_content()
    assert bodies[0]["messages"] == [*system, {"role": "user", "content": "hello there"}]
    assert greedy == api_answer(server, bodies[0]["messages"], temperature=0, max_tokens=10)
    assert greedy != api_answer(server, bodies[0]["messages"][1:], temperature=0, max_tokens=10)  # it mattered

    # sampled and seeded: the page's answer replays the API's
    page.get_by_test_id("new-chat").click()
    fill_settings(page, temperature=1.3, top_p=0.9, max_tokens=8, seed=7)
    bodies = chat_bodies(page, lambda: say(page, "fine thanks"))
    params = dict(temperature=1.3, top_p=0.9, max_tokens=8, seed=7)
    assert bodies[0] == {"messages": [*system, {"role": "user", "content": "fine thanks"}], "stream": True, **params}
    assert page.get_by_test_id("assistant").last.text_content() == api_answer(server, bodies[0]["messages"], **params)


def test_new_chat_empties_the_conversation_and_keeps_the_settings(page):
    page.get_by_test_id("system").fill("Be brief.")
    fill_settings(page, temperature=0, max_tokens=6)
    say(page, "hello there")
    assert page.get_by_test_id("messages").locator(".msg").count() == 2
    page.get_by_test_id("new-chat").click()
    assert page.get_by_test_id("messages").locator("*").count() == 0
    assert page.get_by_test_id("system").input_value() == "Be brief."
    assert page.get_by_test_id("max_tokens").input_value() == "6"
    bodies = chat_bodies(page, lambda: say(page, "how are you?"))
    assert bodies[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "how are you?"}]  # no old turns


def test_stop_keeps_the_partial_answer(page):
    fill_settings(page, temperature=0, max_tokens=40)
    page.get_by_test_id("input").fill("hi")
    page.get_by_test_id("send").click()
    page.wait_for_function("window.__texts.length >= 2")
    page.get_by_test_id("stop").click()
    sync_api.expect(page.get_by_test_id("send")).to_be_enabled()
    partial = page.get_by_test_id("assistant").last.text_content()
    time.sleep(5 * CHUNK_DELAY)
    assert page.get_by_test_id("assistant").last.text_content() == partial  # it stopped growing
    assert 0 < len(partial) < 40
    # the conversation goes on from the partial answer
    bodies = chat_bodies(page, lambda: say(page, "fine thanks"))
    assert bodies[0]["messages"][1] == {"role": "assistant", "content": partial}


def test_server_errors_show_on_the_page(page, servers):
    fill_settings(page, temperature=0, max_tokens=1000)  # over the tiny model's 64-token context
    page.get_by_test_id("input").fill("hello there")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    sync_api.expect(error).to_contain_text("max_tokens: 1000 new tokens")
    sync_api.expect(error).to_contain_text("exceed the model's context of 64")
    assert page.get_by_test_id("assistant").count() == 0
    assert page.get_by_test_id("input").input_value() == "hello there"  # back in the box, to retry
    fill_settings(page, max_tokens=5)
    say(page, "hello there")  # the retry replaces the failed turn and its error
    assert page.get_by_test_id("messages").locator("> *").all_text_contents()[0] == "hello there"
    assert (page.get_by_test_id("error").count(), page.get_by_test_id("user").count()) == (0, 1)

    # a server that wants a key: without it, and with a wrong one, the 401's message; with it, an answer
    keyed = servers[1]
    page.goto(keyed + "/")
    sync_api.expect(page.get_by_test_id("model-name")).to_contain_text("missing or wrong API key")
    fill_settings(page, temperature=0, max_tokens=5)
    page.get_by_test_id("api-key").fill("wrong")
    page.get_by_test_id("api-key").blur()
    page.get_by_test_id("input").fill("hello there")
    page.get_by_test_id("send").click()
    sync_api.expect(page.get_by_test_id("error")).to_have_text("missing or wrong API key: send Authorization: Bearer KEY")
    page.get_by_test_id("api-key").fill(KEY)
    page.get_by_test_id("api-key").blur()
    sync_api.expect(page.get_by_test_id("model-name")).to_have_text(NAME)
    page.reload()  # the key is remembered
    assert page.get_by_test_id("api-key").input_value() == KEY
    fill_settings(page, temperature=0, max_tokens=5)
    want = api_answer(keyed, [{"role": "user", "content": "hello there"}], KEY, temperature=0, max_tokens=5)
    assert say(page, "hello there") == want
