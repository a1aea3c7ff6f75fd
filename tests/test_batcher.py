"""Continuous batching (`serve.batcher`): rows join and leave a running batch at every step, and each
row's tokens equal its lone run; a client that disconnects frees its slot."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from chatfoundry.generation import GenerationConfig, generate
from chatfoundry.serve.api import Job, create_app
from chatfoundry.serve.batcher import Batcher
from chatfoundry.textgen import prompt_ids
from chatfoundry.tokenizer import chat_stop_ids, encode_chat
from conftest import served, tiny_chat_model, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok, one_torch_thread):
    return tiny_chat_model(tok)  # context 64


def chat_job(tok, text: str, **cfg) -> Job:
    return Job(encode_chat(tok, [{"role": "user", "content": text}]),
               GenerationConfig(**{"eos_token_id": chat_stop_ids(tok), **cfg}), [])


def ids_job(n_prompt: int, max_new_tokens: int, seed: int = 0, **cfg) -> Job:
    """Random prompt ids, no EOS: the row runs exactly max_new_tokens steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 31, (n_prompt,), generator=g).tolist()
    return Job(ids, GenerationConfig(max_new_tokens=max_new_tokens, **cfg), [])


def lone(model, job: Job) -> list[int]:
    return generate(model, job.ids, job.cfg).sequences[0]


def text_of(events) -> tuple[str, dict]:
    events = list(events)
    return "".join(e.get("text", "") for e in events), events[-1]


def tokens_of(events) -> tuple[list[int], dict]:
    events = list(events)
    return [e["token"] for e in events if e.get("token", -1) >= 0], events[-1]


def drive(batcher: Batcher, steps: int | None = None, track: list | None = None) -> None:
    """Run the worker's rounds by hand (a batcher made with start=False): `steps` rounds, or until idle."""
    n = 0
    while (batcher.rows or batcher.waiting or not batcher.inbox.empty()) if steps is None else n < steps:
        batcher.step()
        n += 1
        if track is not None:
            track.append((batcher.pos, batcher.active))


# ---------------------------------------------------------------- exactness


def test_jobs_waiting_together_share_one_batch_and_equal_their_lone_runs(model, tok):
    batcher = Batcher(model, tok, start=False)  # everything is queued before the worker looks
    jobs = [chat_job(tok, text, max_new_tokens=n) for text, n in (("hello", 5), ("how are you?", 12), ("fine", 1))]
    streams = [batcher.submit(job) for job in jobs]
    batcher.start()
    for job, events in zip(jobs, streams):
        text, last = text_of(events)
        tokens = lone(model, job)
        assert text == tok.decode(tokens, skip_special_tokens=True)
        assert last == {"finish_reason": "stop" if tokens[-1] in chat_stop_ids(tok) else "length",
                        "completion_tokens": len(tokens)}
    assert batcher.batch_sizes == [3]
    batcher.close()


def test_rows_joining_a_running_batch_equal_their_lone_runs_through_realigns_both_ways(model, tok):
    """A runs; B, a longer prompt, joins at step 3 (all rows move right); C, a short one, at step 8;
    when B leaves, the leading columns only it used go (all rows move left)."""
    batcher = Batcher(model, tok, start=False)
    a, b, c = ids_job(10, 50, seed=1), ids_job(30, 34, seed=2), ids_job(4, 20, seed=3)
    track = []
    streams = {"a": batcher.submit(a)}
    drive(batcher, 3, track)
    assert (batcher.pos, batcher.active) == (13, 1)
    streams["b"] = batcher.submit(b)
    drive(batcher, 1, track)
    assert track[-1] == (31, 2)  # moved right to fit B's 30 tokens, then one step
    drive(batcher, 4)
    streams["c"] = batcher.submit(c)
    drive(batcher, track=track)
    for name, job in (("a", a), ("b", b), ("c", c)):
        tokens, last = tokens_of(streams[name])
        assert tokens == lone(model, job), name
        assert last == {"finish_reason": "length", "completion_tokens": job.cfg.max_new_tokens}
    assert any(later < earlier for (earlier, _), (later, _) in zip(track, track[1:])), "never moved left"
    assert batcher.batch_sizes == [3] and batcher.shifts == 2


def test_a_row_reaching_the_context_moves_the_batch_left(model, tok):
    """X's 10 + 55 tokens and Y's 20 + 44 fill the 64-token context; once Y is done, the write column
    reaches the context and the batch moves left by the columns only Y used."""
    batcher = Batcher(model, tok, start=False)
    x, y = ids_job(10, 55, seed=4), ids_job(20, 44, seed=5)
    track = []
    sx = batcher.submit(x)
    drive(batcher, 1)
    sy = batcher.submit(y)
    drive(batcher, track=track)
    assert tokens_of(sx)[0] == lone(model, x) and tokens_of(sy)[0] == lone(model, y)
    assert max(pos for pos, _ in track) == model.config.block_size
    assert (64 - 9 + 1, 1) in track  # moved left by the 9 columns only Y had used, then one step


def test_more_jobs_than_slots_reuse_them(model, tok):
    batcher = Batcher(model, tok, max_batch=2, start=False)
    jobs = [ids_job(3 + 4 * i, 6 + 5 * (i % 3), seed=10 + i) for i in range(6)]
    streams = [batcher.submit(job) for job in jobs]
    track = []
    drive(batcher, track=track)
    assert max(active for _, active in track) == 2
    for job, events in zip(jobs, streams):
        tokens, last = tokens_of(events)
        assert tokens == lone(model, job)
        assert last["completion_tokens"] == job.cfg.max_new_tokens
    assert batcher.batch_sizes == [6] and batcher.active == 0


def test_mixed_settings_share_one_batch(model, tok):
    """Greedy, penalized greedy, n-gram ban, sampling restricted to the argmax (top_k 1, a tiny
    top_p) must all equal their lone greedy runs; free sampling and a stop string run beside them."""
    batcher = Batcher(model, tok, start=False)
    plain = ids_job(7, 20, seed=20)
    penalized = ids_job(9, 20, seed=21, repetition_penalty=1.5)
    no_repeat = ids_job(5, 20, seed=22, no_repeat_ngram_size=2)
    top_k1 = ids_job(11, 20, seed=23, do_sample=True, temperature=0.7, top_k=1)
    top_p = ids_job(6, 20, seed=24, do_sample=True, top_p=1e-4)
    free = ids_job(8, 20, seed=25, do_sample=True, temperature=1.3, top_k=10, top_p=0.9, min_p=0.05)
    greedy_of = {id(j): GenerationConfig(max_new_tokens=20, repetition_penalty=j.cfg.repetition_penalty,
                                         no_repeat_ngram_size=j.cfg.no_repeat_ngram_size)
                 for j in (plain, penalized, no_repeat, top_k1, top_p)}
    stopped = chat_job(tok, "Be brief. hi there", max_new_tokens=30)
    alone = lone(model, stopped)
    full = tok.decode(alone, skip_special_tokens=True)
    stop = full[5:7]
    stopped.stops = [stop]
    upto = next(k for k in range(len(alone)) if stop in tok.decode(alone[:k], skip_special_tokens=True))
    jobs = [plain, penalized, no_repeat, top_k1, top_p, free, stopped]
    streams = [batcher.submit(job) for job in jobs]
    drive(batcher)
    for job, events in zip(jobs[:5], streams):
        assert tokens_of(events)[0] == generate(model, job.ids, greedy_of[id(job)]).sequences[0]
    assert tokens_of(streams[5])[1]["completion_tokens"] == 20
    assert text_of(streams[6]) == (full[:full.find(stop)], {"finish_reason": "stop", "completion_tokens": upto})
    assert lone(model, penalized) != generate(model, penalized.ids, GenerationConfig(max_new_tokens=20)).sequences[0]
    assert batcher.batch_sizes == [7] and batcher.steps == 19  # one batch, one step per token


def test_seeded_jobs_run_alone_and_replay(model, tok):
    batcher = Batcher(model, tok, start=False)
    cfg = dict(max_new_tokens=10, do_sample=True, temperature=1.0)
    jobs = [chat_job(tok, "hello", seed=1, **cfg), chat_job(tok, "hello", seed=2, **cfg),
            chat_job(tok, "fine", **cfg), chat_job(tok, "hello", **cfg)]
    streams = [batcher.submit(job) for job in jobs]
    batcher.start()
    texts = [text_of(events)[0] for events in streams]
    for job, text in zip(jobs[:2], texts):
        out = generate(model, job.ids, job.cfg)
        assert text == tok.decode(out.sequences[0], skip_special_tokens=True)
    assert sorted(batcher.batch_sizes) == [1, 1, 2]  # the unseeded pair shares a batch
    batcher.close()
    assert not batcher._thread.is_alive()


def test_a_seeded_job_waits_for_the_batch_to_drain(model, tok):
    batcher = Batcher(model, tok, start=False)
    first = ids_job(5, 8, seed=30)
    seeded = Job(ids_job(6, 8, seed=31).ids, GenerationConfig(max_new_tokens=8, do_sample=True, seed=7), [])
    behind = ids_job(4, 3, seed=32)
    s_first = batcher.submit(first)
    drive(batcher, 2)
    s_seeded, s_behind = batcher.submit(seeded), batcher.submit(behind)
    drive(batcher, 3)
    assert batcher.active == 1 and len(batcher.waiting) == 2  # nothing joins ahead of the seeded job
    drive(batcher)
    assert tokens_of(s_seeded)[0] == generate(model, seeded.ids, seeded.cfg).sequences[0]
    assert tokens_of(s_first)[0] == lone(model, first) and tokens_of(s_behind)[0] == lone(model, behind)
    assert batcher.batch_sizes == [1, 1, 1]


# ---------------------------------------------------------------- leaving early, errors


def test_a_closed_stream_leaves_its_batch(model, tok):
    """What the server does when a client disconnects: its row stops, the others go on."""
    batcher = Batcher(model, tok, start=False)
    gone, stays = chat_job(tok, "hello", max_new_tokens=40), Job(prompt_ids(tok, "how", 64),
                                                                  GenerationConfig(max_new_tokens=40), [])
    first, second = batcher.submit(gone), batcher.submit(stays)
    batcher.start()
    assert "token" in next(first)
    first.close()
    assert gone.cancel.is_set()
    assert text_of(second)[1] == {"finish_reason": "length", "completion_tokens": 40}
    batcher.close()


def test_a_cancelled_row_frees_its_slot(model, tok):
    batcher = Batcher(model, tok, max_batch=1, start=False)
    gone, waits, never = ids_job(5, 30, seed=40), ids_job(7, 10, seed=41), ids_job(3, 5, seed=42)
    s_gone, s_waits, s_never = batcher.submit(gone), batcher.submit(waits), batcher.submit(never)
    drive(batcher, 2)
    assert batcher.active == 1 and len(batcher.waiting) == 2
    assert next(s_gone)["token"] == lone(model, gone)[0]
    s_gone.close()  # the client goes away
    never.cancel.set()  # this one while still waiting
    drive(batcher, 1)
    # the row and the waiting job are both dropped at once; the next job has the slot
    assert batcher.cancelled == 2 and batcher.rows[0].job is waits and not batcher.waiting
    assert list(s_never) == []
    drive(batcher)
    assert tokens_of(s_waits)[0] == lone(model, waits)
    assert batcher.cancelled == 2


def test_an_error_reaches_every_row_it_hits_and_the_worker_lives_on(model, tok, monkeypatch):
    boom = {"decode": False, "prefill": False}
    forward = model.forward

    def flaky(idx, *args, **kwargs):
        kind = "decode" if idx.shape[1] == 1 else "prefill"
        if boom[kind]:
            boom[kind] = False
            raise RuntimeError(f"{kind} failed")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    batcher = Batcher(model, tok, start=False)
    hit = [batcher.submit(ids_job(5 + i, 10, seed=50 + i)) for i in range(3)]
    boom["decode"] = True
    batcher.start()
    for events in hit:  # each had its first token from its own prefill, then the step failed
        with pytest.raises(RuntimeError, match="decode failed"):
            list(events)
    runs = ids_job(6, 30, seed=60)
    s_runs = batcher.submit(runs)
    next(s_runs)
    boom["prefill"] = True  # a job joining now fails alone; the running row goes on
    with pytest.raises(RuntimeError, match="prefill failed"):
        list(batcher.submit(ids_job(8, 5, seed=61)))
    with pytest.raises(ValueError, match="at least one token"):  # an empty prompt: its own error
        list(batcher.submit(Job([], GenerationConfig(max_new_tokens=3), [])))
    assert tokens_of(s_runs)[0] == lone(model, runs)[1:]
    assert tokens_of(batcher.submit(ids_job(4, 6, seed=62)))[0] == lone(model, ids_job(4, 6, seed=62))
    batcher.close()


# ---------------------------------------------------------------- a real client over a real socket


@pytest.fixture
def live_server(model, tok, monkeypatch):
    """The app under uvicorn on a free port in a background thread; decoding slowed to ~20 steps/s so
    a 40-token answer is still running when its client goes away."""
    forward = model.forward

    def slow(idx, *args, **kwargs):
        if idx.shape[1] == 1:
            time.sleep(0.05)
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)
    app = create_app(model, tok, "tiny", max_batch=4)
    with served(app) as url:
        yield url, app.state.batcher
    app.state.batcher.close()


def test_a_client_that_disconnects_frees_its_slot(live_server, model, tok):
    url, batcher = live_server
    messages = [{"role": "user", "content": "Be brief. hi there"}]
    assert len(lone(model, chat_job(tok, messages[0]["content"], max_new_tokens=40))) == 40  # no early stop
    body = {"messages": messages, "temperature": 0, "max_tokens": 40, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:  # the role chunk and two of content
                    break
            assert batcher.active == 1
        # leaving the block closes the response and its connection mid-stream
    deadline = time.monotonic() + 10
    while batcher.active:  # until the row leaves: cancelled, or (the bug) at its 40th token
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert batcher.cancelled == 1 and batcher.steps < 39
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
