"""The OpenAI-compatible HTTP API behind `chatfoundry serve`: one checkpoint, FastAPI routes.

Routes: `GET /` (the web chat page, `static/index.html`), `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`,
plain JSON or (`stream: true`) server-sent events in OpenAI's chunk format ending in
`data: [DONE]`. The official `openai` client works against it unchanged.

Requests that arrive together decode as rows of one batch (`batcher.Batcher`), admitted fairly
(a request with many choices gets no slot ahead of one with fewer running). A client that goes
away cancels its request, streamed or not: its rows leave the batch at the next token, and its
jobs still waiting for a slot are dropped. Bad input never reaches the model: it gets a 400 (401
without the bearer key, 413 for too large a body) with OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`.

The work one request can ask for is bounded: at most `max_choices` choices (prompts x n), 4
stop strings of at most 256 characters, max_tokens within the context. A `model` name other
than the served one is accepted and answered by the served model, under its own name.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
from importlib import resources
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatfoundry.generation import GenerationConfig
from chatfoundry.errors import UserError
from chatfoundry.serve.batcher import Batcher
from chatfoundry.tools import ToolError, call_text, declare, parse_call, split_calls
from chatfoundry.textgen import prompt_ids
from chatfoundry.tokenizer import chat_stop_ids, encode_batch_ids, encode_chat, special_id

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a context
MAX_N = 8  # choices per prompt
MAX_CHOICES = 32  # choices per request (prompts x n), the default of create_app's max_choices
MAX_STOPS = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256  # characters per stop string (OpenAI's are short; a long one costs every token)
DISCONNECT_POLL_S = 0.05  # how often a non-streamed request looks whether its client is still there
_requests = itertools.count(1)  # tells the batcher which jobs are one request's (fair admission)


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # fields we do not know (user, presence_penalty, stream_options...) are accepted and ignored
    # (pydantic's default, in every model here), as clients send them routinely; the ones we use
    # are checked strictly
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, lt=2**62)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = ""  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = ""  # None: an assistant message that only called tools
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: which call this answers

    def text(self) -> str:
        """The message as the chat format holds it: tool calls are <|tool|>name {args} segments."""
        if isinstance(self.content, list):  # OpenAI's content parts; text is all a language model reads
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        return text + "".join(call_text(c.function.name, c.function.arguments) for c in self.tool_calls or ())


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionCall  # only its name is read


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    tools: list[ToolSpec] | None = Field(default=None, max_length=32)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(_Body):
    prompt: str | list[str] = ""
    logprobs: int | None = Field(default=None, ge=0, le=5)  # legacy: an int; we return the chosen token's


# ---------------------------------------------------------------- generation


@dataclass
class Job:
    """One choice to decode: prompt ids, config, stop strings; `cancel` stops it at the next token
    (or drops it before it starts). Jobs of one `request` share a key, which admission reads."""

    ids: list[int]
    cfg: GenerationConfig
    stops: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    request: int | None = None  # None: a request of its own


class _Gone(Exception):
    """A job ended without its finish event: its request was cancelled (the client went away)."""


# ---------------------------------------------------------------- errors


class APIError(HTTPException):
    """An HTTP error with OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(status, message)
        self.type, self.param, self.code = type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line, and the first offending field as OpenAI's `param`."""
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, by its Content-Length header or,
    when it is sent in chunks, as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises an HTTPException met while reading the body
                raise APIError(413, f"request body over {self.limit} bytes", code="request_too_large")
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body over {limit} bytes", code="request_too_large")


# ---------------------------------------------------------------- the app


def check_api_key(api_key: str | None) -> None:
    """UserError for a key no client can send as `Authorization: Bearer KEY`: an HTTP header holds
    visible ASCII, and clients strip the spaces around a value."""
    if api_key is None:
        return
    if not api_key.strip():
        raise UserError("--api_key: must not be empty")
    if api_key != api_key.strip():
        raise UserError("--api_key: has spaces at its start or end, which clients strip from the header")
    bad = next((c for c in api_key if not " " <= c <= "~"), None)
    if bad is not None:
        raise UserError(f"--api_key: holds {bad!r}; an HTTP header carries only printable ASCII")


def create_app(model, tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = 16, max_choices: int = MAX_CHOICES) -> FastAPI:
    """The API serving `model` (a DecoderLM in eval mode) with `tokenizer` under `model_name`;
    with `api_key`, every /v1 route wants `Authorization: Bearer API_KEY`. Up to `max_batch`
    choices decode together; one request may ask for up to `max_choices` (prompts x n)."""
    check_api_key(api_key)
    if max_choices < 1:
        raise UserError(f"--max_choices: must be >= 1, got {max_choices}")
    if getattr(model, "prompt", None) is not None:  # the batcher lays rows out by column; a soft prompt has none
        raise UserError(f"{model_name}: a prompt-tuned model; serve does not batch soft prompts yet "
                        "(chat, eval and generate take it)")
    batcher = Batcher(model, tokenizer, max_batch=max_batch)
    app = FastAPI(title="chatfoundry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    context = model.config.block_size
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404/405
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, APIError):
            return _error(exc.status_code, str(exc.detail), exc.type, exc.param, exc.code)
        return _error(exc.status_code, str(exc.detail), code=str(exc.status_code))  # 404, 405...

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a bug of ours: still OpenAI's shape
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:  # the web chat page: one static file that talks to /v1/chat/completions
        return resources.files("chatfoundry.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers and uptime checks send
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    def one_model(name: str) -> dict:
        if name != model_name:
            raise APIError(404, f"model {name!r} not found: this server has {model_name!r}", param="model",
                           code="model_not_found")
        return _model_card(model_name, created)

    # The routes are async so that a non-streamed request can watch its client (`_whole`); the
    # work (tokenizing, decoding) runs in worker threads, never on the event loop.

    def chat_jobs(req: ChatRequest) -> tuple[list[Job], list[int] | None]:
        _check_limits(req, 1, max_choices)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        forced = _offer_tools(req, messages, tokenizer)
        ids = encode_chat(tokenizer, messages) + (forced or [])
        limit = req.max_completion_tokens or req.max_tokens
        return _jobs(req, [ids], limit, context, chat_stop_ids(tokenizer), "messages"), forced

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatRequest, request: Request):
        jobs, forced = await run_in_threadpool(chat_jobs, req)
        if req.stream:
            return _sse(_chat_chunks(batcher, jobs, model_name, _include_usage(req), forced))
        return await _whole(request, jobs, lambda: _chat_response(batcher, jobs, model_name, req.logprobs, forced))

    def completion_jobs(req: CompletionRequest) -> list[Job]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        _check_limits(req, len(prompts), max_choices)
        try:
            all_ids = [prompt_ids(tokenizer, p, context) for p in prompts]
        except UserError as e:
            raise APIError(400, f"{e}", param="prompt", code="context_length_exceeded") from None
        eos = [i for i in (special_id(tokenizer, "eos"),) if i is not None]
        room = context - max(len(ids) for ids in all_ids)  # >= 1: prompt_ids checked
        max_tokens = req.max_tokens if req.max_tokens is not None else min(16, room)  # OpenAI's default: 16
        return _jobs(req, all_ids, max_tokens, context, eos, "prompt")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        jobs = await run_in_threadpool(completion_jobs, req)
        if req.stream:
            return _sse(_completion_chunks(batcher, jobs, model_name, _include_usage(req)))
        return await _whole(request, jobs,
                            lambda: _completion_response(batcher, jobs, model_name, req.logprobs is not None))

    return app


def _check_limits(req: _Body, prompts: int, max_choices: int) -> None:
    """The bounds on one request's work that its body alone decides (before any tokenizing)."""
    choices = prompts * req.n
    if choices > max_choices:
        raise APIError(400, f"{prompts} prompt(s) x n={req.n} ask for {choices} choices; this server answers at "
                            f"most {max_choices} per request", param="prompt" if prompts > 1 else "n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    for i, stop in enumerate(stops):
        if len(stop) > MAX_STOP_CHARS:
            raise APIError(400, f"stop[{i}]: {len(stop):,} characters; at most {MAX_STOP_CHARS}", param="stop")


async def _whole(request: Request, jobs: list[Job], respond):
    """A non-streamed answer: `respond()` decodes in a worker thread while this watches the
    client; one that goes away cancels the jobs (a running row leaves at its next token, a
    waiting one is dropped), so abandoned work stops at once, as for a stream."""
    work = asyncio.ensure_future(run_in_threadpool(respond))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                _cancel(jobs)
        return work.result()
    except _Gone:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    finally:
        if not work.done():  # this task itself was cancelled (the server shutting down)
            _cancel(jobs)


def _offer_tools(req: ChatRequest, messages: list[dict], tokenizer) -> list[int] | None:
    """Name the request's tools in the system message (tools.py's format), in place. Returns
    None when no tools are on offer (calls are not parsed), else the ids forced at the start of
    the reply: [] for tool_choice auto, <|tool|> for required, `<|tool|>name {` for a named tool."""
    choice = req.tool_choice
    if not req.tools:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            what = "required" if choice == "required" else f"the tool {choice.function.name!r}"
            raise APIError(400, f"tool_choice: {what} needs tools, and the request gives none", param="tool_choice")
        return None
    if choice == "none":
        return None
    names = [t.function.name for t in req.tools]
    tool = special_id(tokenizer, "tool")
    if tool is None:
        raise APIError(400, "tools: this model's tokenizer has no tool-call token", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice: {choice.function.name!r} is not among the tools", param="tool_choice")
    messages[:] = declare(messages, names)
    if isinstance(choice, NamedToolChoice):  # the name and the opening of its JSON arguments
        return [tool, *encode_batch_ids(tokenizer, [f"{choice.function.name} {{"])[0]]
    return [tool] if choice == "required" else []


def _tool_calls(tokenizer, forced: list[int] | None, tokens: list[int]) -> list[dict] | None:
    """OpenAI's `tool_calls` of a reply that calls tools (None for an answer in words)."""
    if forced is None:
        return None
    calls = split_calls(tokenizer, forced + tokens)
    if calls is None:
        return None
    out = []
    for text in calls:
        try:
            name, arguments = parse_call(text)
        except ToolError:  # a garbled call: pass it on as written, the client decides
            name, _, raw = text.strip().partition(" ")
            arguments = raw
        out.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                                 else json.dumps(arguments)}})
    return out


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "chatfoundry"}


def _include_usage(req: _Body) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def _jobs(req: _Body, prompts: list[list[int]], max_tokens: int | None, context: int, eos: list[int],
          prompt_field: str) -> list[Job]:
    """n jobs per prompt, prompt after prompt. Prompt plus max_tokens must fit the context (the
    generator could slide its window past it, but the answer would forget its own prompt)."""
    longest = max(len(p) for p in prompts)
    room = context - longest
    if room < 1:
        raise APIError(400, f"{prompt_field}: {longest} tokens leave no room in the model's context of {context}",
                       param=prompt_field, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(400, f"max_tokens: {max_tokens} new tokens after a prompt of {longest} exceed the model's "
                            f"context of {context} (at most {room})", param="max_tokens",
                       code="context_length_exceeded")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])  # bounded by _check_limits
    greedy = req.temperature == 0
    request = next(_requests)
    jobs = []
    for ids in prompts:
        for i in range(req.n):
            # each choice draws from its own seed, so a seeded request replays exactly
            cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=not greedy,
                                   temperature=1.0 if greedy else req.temperature, top_p=req.top_p,
                                   eos_token_id=eos, seed=None if req.seed is None else req.seed + i)
            jobs.append(Job(ids, cfg, stops, request=request))
    return jobs


def _sse(chunks: Iterator[dict]) -> StreamingResponse:
    def lines() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            chunks.close()  # a client gone mid-stream: cancel the decoding at once

    async def body():
        # Our own async loop, so that a client gone mid-stream closes `lines` here and now:
        # handed a plain generator, starlette's cancellation leaves it to the garbage collector,
        # and the abandoned row would decode to its end.
        it = lines()
        try:
            async for line in iterate_in_threadpool(it):
                yield line
        finally:
            it.close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _cancel(jobs: list[Job]) -> None:
    """A stream closed early (its client gone): every choice still decoding leaves its batch at the
    next token; a finished one is unaffected."""
    for job in jobs:
        job.cancel.set()


def _prompt_tokens(jobs: list[Job]) -> int:
    """Each distinct prompt counts once (n choices of one prompt share its ids), as OpenAI counts."""
    return sum(len(ids) for ids in {id(job.ids): job.ids for job in jobs}.values())


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False) if token >= 0 else ""


def _collect(events: Iterator[dict]) -> tuple[str, list[tuple[int, float]], str, int]:
    """(text, [(token, logprob)], finish_reason, completion tokens) of one whole choice."""
    pieces, tokens = [], []
    for event in events:
        if "finish_reason" in event:
            return "".join(pieces), tokens, event["finish_reason"], event["completion_tokens"]
        pieces.append(event["text"])
        if event["token"] >= 0:
            tokens.append((event["token"], event["logprob"]))
    raise _Gone()


def _decode_all(batcher: Batcher, jobs: list[Job]) -> tuple[list[tuple[str, list[tuple[int, float]], str]], int]:
    """Every choice whole: [(text, [(token, logprob)], finish_reason)] and the completion tokens."""
    streams = [batcher.submit(job) for job in jobs]  # all at once: the n choices share a batch
    results, completion = [], 0
    try:
        for events in streams:
            text, tokens, finish, count = _collect(events)
            results.append((text, tokens, finish))
            completion += count
    finally:
        _cancel(jobs)  # one choice failed or was cancelled: the others stop too (finished ones are done)
    return results, completion


def _chat_response(batcher: Batcher, jobs: list[Job], model_name: str, logprobs: bool,
                   forced: list[int] | None = None) -> dict:
    results, completion = _decode_all(batcher, jobs)
    choices = []
    for index, (text, tokens, finish) in enumerate(results):
        message = {"role": "assistant", "content": text}
        calls = _tool_calls(batcher.tokenizer, forced, [t for t, _ in tokens])
        if calls:
            message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        choice = {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
        if logprobs:
            choice["logprobs"] = {"content": [_chat_logprob(batcher.tokenizer, t, lp) for t, lp in tokens]}
        choices.append(choice)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": _usage(_prompt_tokens(jobs), completion)}


def _chat_logprob(tokenizer, token: int, logprob: float) -> dict:
    text = _token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}


def _chat_chunks(batcher: Batcher, jobs: list[Job], model_name: str, include_usage: bool,
                 forced: list[int] | None = None) -> Iterator[dict]:
    """OpenAI's chunks: per choice a first delta with the role, deltas of content, a last one with
    the finish reason; with stream_options.include_usage, a final chunk with usage and no choices.
    A reply that calls tools is held back to its end and sent as one `tool_calls` delta."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model_name}
    completion = 0
    tool = special_id(batcher.tokenizer, "tool")
    streams = [batcher.submit(job) for job in jobs]  # all at once: the n choices share a batch
    try:
        for index, events in enumerate(streams):
            yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
            tokens: list[int] = []  # of a reply that may be a tool call, until that is known
            calling = forced is not None and (bool(forced) or None)  # None: decided by the first token
            for event in events:
                if "finish_reason" in event:
                    completion += event["completion_tokens"]
                    finish = event["finish_reason"]
                    calls = _tool_calls(batcher.tokenizer, forced, tokens) if calling else None
                    if calls:
                        finish = "tool_calls"
                        yield {**base, "choices": [{"index": index, "finish_reason": None, "delta": {"tool_calls": [
                            {"index": i, **call} for i, call in enumerate(calls)]}}]}
                    yield {**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]}
                    continue
                if calling is None:
                    calling = event["token"] == tool
                if calling:
                    tokens.append(event["token"])
                elif event["text"]:
                    yield {**base, "choices": [{"index": index, "delta": {"content": event["text"]},
                                                "finish_reason": None}]}
    finally:
        _cancel(jobs)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(_prompt_tokens(jobs), completion)}


def _completion_response(batcher: Batcher, jobs: list[Job], model_name: str, logprobs: bool) -> dict:
    results, completion = _decode_all(batcher, jobs)
    choices = []
    for index, (text, tokens, finish) in enumerate(results):
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        if logprobs:
            choice["logprobs"] = {"tokens": [_token_text(batcher.tokenizer, t) for t, _ in tokens],
                                  "token_logprobs": [lp for _, lp in tokens], "top_logprobs": None,
                                  "text_offset": None}
        choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": _usage(_prompt_tokens(jobs), completion)}


def _completion_chunks(batcher: Batcher, jobs: list[Job], model_name: str, include_usage: bool) -> Iterator[dict]:
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name}
    completion = 0
    streams = [batcher.submit(job) for job in jobs]
    try:
        for index, events in enumerate(streams):
            for event in events:
                if "finish_reason" in event:
                    completion += event["completion_tokens"]
                    yield {**base, "choices": [{"index": index, "text": "", "finish_reason": event["finish_reason"],
                                                "logprobs": None}]}
                elif event["text"]:
                    yield {**base, "choices": [{"index": index, "text": event["text"], "finish_reason": None,
                                                "logprobs": None}]}
    finally:
        _cancel(jobs)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(_prompt_tokens(jobs), completion)}
