"""An OpenAI-compatible HTTP API and a chat page over one model (serve.py runs it; docs/serving.md).

    POST /v1/chat/completions   OpenAI's chat completions, streaming (SSE) or not
    POST /v1/completions        raw text continuation, no chat template
    GET  /v1/models             the one model served
    POST /chat                  {"message", "history"} -> {"reply"}: the simplest client
    GET  /health                liveness and the queue's state (503 while draining)
    GET  /metrics               Prometheus metrics (Metrics)
    GET  /                      the chat page (static/chat.html)

With an API key (create_app's api_key) every route but /health and the page needs
`Authorization: Bearer KEY` (401 otherwise). uvicorn_server's SIGTERM drains the queue first
(Service.drain: new requests get 503, those in flight finish within a grace period). Requests
are checked here (sizes, ranges, types, the OpenAI fields not implemented; errors in OpenAI's
shape) and decoded by a batcher.Batcher.
"""
import asyncio
import contextlib
import hmac
import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from . import chat
from .batcher import Batcher, QueueFull
from .sampling import SAMPLING_KEYS, SamplingParams
from .errors import ConfigError

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")
MAX_N = 8
MAX_STOPS = 4


@dataclass
class Limits:
    """What one request may ask for: refused with a 4xx before it reaches the queue."""
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_chars: int = 32_000  # all messages' (or the prompt's) characters together
    max_waiting: int = 64  # requests queued for a place in the running batch; more get 503
    max_rows: int = 16  # rows decoded together (a request's n choices are n rows); at least MAX_N
    request_timeout: float = 0.0  # seconds from queueing to the last token (504 past it); 0 = none


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = (
            status, message, param, code, headers)


def error_response(status, message, param=None, code=None, headers=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------------
# Request bodies. strict: a string where a number belongs is an error naming the field, not
# silently converted.


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def text_parts(cls, content):
        """Content given as a list of parts, [{"type": "text", "text": ...}, ...]: their texts
        joined by newlines; any other kind of part (image_url, input_audio, file) is refused by its
        type."""
        if not isinstance(content, list):
            return content
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} is {kind!r}: only text parts "
                                 f'({{"type": "text", "text": "..."}}) are supported')
        return "\n".join(part["text"] for part in content)


# OpenAI request fields this server does not implement, and the values that ask for nothing of it:
# accepted as no-ops (ANY: every value), refused with a 400 naming the field otherwise; a field
# that is neither declared by the request model nor here is refused as unknown. docs/serving.md's
# table lists every field (tests/test_serve_fields.py checks it against these).
ANY = "any value"
NO_OPS = {"frequency_penalty": (0,), "presence_penalty": (0,), "user": ANY}
CHAT_NO_OPS = {
    **NO_OPS, "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": ANY, "functions": ([],),
    "function_call": ("none", "auto"), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "verbosity": (), "web_search_options": (), "moderation": (),
    "store": (False,), "metadata": ANY, "service_tier": ("auto", "default"),
    "prompt_cache_key": ANY, "prompt_cache_options": ANY, "prompt_cache_retention": ANY,
    "safety_identifier": ANY}
COMPLETION_NO_OPS = {**NO_OPS, "best_of": (1,), "suffix": ("",)}


def refuse_unsupported(req, no_ops):
    """400 naming the first field of req that it does not declare and that asks for something."""
    for name, value in (req.model_extra or {}).items():
        allowed = no_ops.get(name)
        if allowed is None:
            raise ApiError(400, f"{name}: unrecognized request field", param=name,
                           code="unknown_parameter")
        if allowed is not ANY and value is not None and value not in allowed:
            accepted = ", ".join(json.dumps(v) for v in (None, *allowed))
            raise ApiError(400, f"{name}: not supported by this server (accepted only as "
                                f"{accepted}, got {json.dumps(value)})", param=name,
                           code="unsupported_parameter")


class RequestOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # extra fields: refuse_unsupported
    model: str | None = None  # one model is served; any name is accepted
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict | None = None


API_NAMES = {"max_new_tokens": "max_tokens"}  # OpenAI's names for options where they differ
API_TYPES = {"stop": str | list[str],  # the request's type where it is not the option's own
             "logit_bias": dict[str, int | float]}
API_LIMITS = {"temperature": dict(le=2), "repetition_penalty": dict(le=10)}  # the API's own limits


def sampling_fields():
    """The request fields of SamplingParams' options (top_k and repetition_penalty extend OpenAI's
    API): None leaves it to the server's default; the option's bounds and the API's limits."""
    return {API_NAMES.get(f.name, f.name): (API_TYPES.get(f.name, f.type) | None, Field(
        None, description=f.metadata["help"], **f.metadata["bounds"], **API_LIMITS.get(f.name, {})))
        for f in fields(SamplingParams)}


Sampling = create_model("Sampling", __base__=RequestOptions, **sampling_fields())


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1,
                                              description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, description="each reply token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20,
                                     description="and its most likely alternatives")

    def scoring(self):
        """(alternatives per token, or None for no log-probabilities; echo)."""
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, False


class CompletionRequest(Sampling):
    prompt: list[str | list[int]] = Field(description="a string, a list of strings, token ids or "
                                                      "lists of token ids")
    logprobs: int | None = Field(None, ge=0, le=5, description="each token's log-probability and "
                                                              "this many most likely alternatives")
    echo: bool | None = Field(None, description="the prompt too: in the text and the logprobs")

    def scoring(self):
        return self.logprobs, bool(self.echo)

    @field_validator("prompt", mode="before")
    @classmethod
    def prompt_list(cls, prompt):
        """One prompt (a string or token ids) as a list of one; each prompt non-empty."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                type(t) is int for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("a string, a list of strings, token ids or lists of token ids")
        for i, one in enumerate(prompt):
            if not (isinstance(one, str) and one or isinstance(one, list) and one and all(
                    type(t) is int for t in one)):
                raise ValueError(f"prompt {i}: a non-empty string or list of token ids")
        return prompt


class SimpleChatRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    message: str = Field(min_length=1)
    history: list[Message] = []


# --------------------------------------------------------------------------------------------------
# Body size: refused before the body is read


class BodyLimit:
    """ASGI middleware: a POST must say its Content-Length (411) and stay within max_bytes (413)."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if not length.isdigit():
                await error_response(411, "a Content-Length header is required")(
                    scope, receive, send)
                return
            if int(length) > self.max_bytes:
                message = (f"request body of {int(length)} bytes exceeds the limit of "
                           f"{self.max_bytes}")
                await error_response(413, message, code="body_too_large")(scope, receive, send)
                return
        await self.app(scope, receive, send)


OPEN_PATHS = ("/", "/health")  # what a browser fetches before it can send a key, and liveness


class RequireKey:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer <key>` (compared in
    constant time), else 401 in OpenAI's shape."""

    def __init__(self, app, key):
        self.app, self.key = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                message = "a valid API key is required: send the header Authorization: Bearer <key>"
                await error_response(401, message, code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app). Queue depth and
    running rows are read from the batcher at each scrape; the rest is counted as requests go."""

    def __init__(self, batcher):
        self.registry = r = CollectorRegistry()
        gauges = {"queue_depth": ("requests waiting for a place in the running batch",
                                  lambda: len(batcher.waiting)),
                  "running_requests": ("requests being decoded", lambda: len(batcher.running)),
                  "running_rows": ("rows being decoded (n choices: n rows)", lambda: batcher.rows),
                  "max_rows": ("rows decoded together at most", lambda: batcher.max_rows)}
        for name, (doc, read) in gauges.items():
            Gauge(f"chat_gpt2_{name}", doc, registry=r).set_function(read)
        self.requests = Counter("chat_gpt2_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("chat_gpt2_prompt_tokens", "prompt tokens decoded", registry=r)
        self.generated_tokens = Counter("chat_gpt2_generated_tokens", "tokens generated",
                                        registry=r)
        seconds = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("chat_gpt2_request_duration_seconds", "POST requests, from the "
                                 "request to the response's last byte", ["route"],
                                 buckets=seconds, registry=r)
        self.first_token = Histogram("chat_gpt2_time_to_first_token_seconds", "from queueing a "
                                     "generation to its first event (text, or its end)",
                                     buckets=seconds, registry=r)

    def text(self):
        return generate_latest(self.registry)


class Measure:
    """ASGI middleware (the outermost): every request counted by route and status, POSTs timed."""

    def __init__(self, app, metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        route = scope["path"] if scope["path"] in self.routes else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            if scope["method"] == "POST":
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class RefuseWhileDraining:
    """ASGI middleware: once the server drains (Service.drain), every POST gets 503."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and self.service.draining:
            await error_response(503, "the server is shutting down", code="shutting_down")(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


def validation_error(exc):
    """The first problem pydantic found, as a 400 naming the field (messages.0.role) or saying the
    JSON is bad."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON: {err.get('msg')}", code="json_invalid")
    param = ".".join(loc) or None
    return error_response(400, f"{param or 'body'}: {err.get('msg')}", param=param,
                          code=err.get("type"))


# --------------------------------------------------------------------------------------------------
# The service: requests -> prompts and params -> batcher jobs -> OpenAI responses


class Service:
    def __init__(self, engine, ckpt_info, defaults, model_name, limits):
        self.engine, self.defaults, self.model_name, self.limits = (
            engine, defaults, model_name, limits)
        self.template = ckpt_info.get("template", chat.TEMPLATE)
        self.default_stop = ckpt_info.get("default_stop", chat.NEWLINE_STOP)
        self.block_size = engine.model.config.block_size
        if limits.max_rows < MAX_N:
            raise ConfigError(f"max_rows must be at least {MAX_N} (a request may ask for "
                              f"n={MAX_N} choices), got {limits.max_rows}")
        self.batcher = Batcher(engine, max_waiting=limits.max_waiting, max_rows=limits.max_rows)
        self.metrics, self.draining = Metrics(self.batcher), False

    def drain(self, grace):
        """Stop taking requests (503) and give the queued and running ones grace seconds to finish;
        then end those left with a 503 error. Returns how many were ended so."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.batcher.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.batcher.abort(f"the server is shutting down: not finished within {grace:g} s")

    def params(self, req, chat_stop):
        """SamplingParams: the server's defaults (as sample.py's), overridden by what the request
        sets. max_tokens is clamped to the context; the chat default stop is the checkpoint's, raw
        completions have none."""
        if req.stop is None:
            stops = (self.default_stop,) if chat_stop and self.default_stop else ()
        else:
            stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")
        options = {key: getattr(req, API_NAMES.get(key, key)) for key in (*SAMPLING_KEYS, "seed")}
        newer = getattr(req, "max_completion_tokens", None)  # chat's newer name of max_tokens
        if newer is not None:
            if options["max_new_tokens"] not in (None, newer):
                raise ApiError(400, "max_completion_tokens: differs from max_tokens (give one)",
                               param="max_completion_tokens")
            options["max_new_tokens"] = newer
        options = {key: self.defaults[key] if value is None else value
                   for key, value in options.items()}
        options["max_new_tokens"] = min(options["max_new_tokens"], self.block_size - 1)
        try:
            params = SamplingParams(**options, stop=stops, logit_bias=req.logit_bias or ())
        except ConfigError as e:
            raise ApiError(400, str(e), param="logit_bias" if str(e).startswith("logit_bias")
                           else None) from None
        vocab = self.engine.enc.n_vocab
        if any(token >= vocab for token, _ in params.logit_bias):
            raise ApiError(400, f"logit_bias: token ids must be in 0..{vocab - 1}",
                           param="logit_bias")
        return params

    def check_messages(self, messages):
        if len(messages) > self.limits.max_messages:
            raise ApiError(400, f"messages: at most {self.limits.max_messages} messages",
                           param="messages", code="too_many_messages")
        self.check_chars(sum(len(m.content) for m in messages), "messages")
        if messages[-1].role != "user":
            raise ApiError(400, "messages: the last message must be the user's", param="messages")

    def check_chars(self, n, param):
        if n > self.limits.max_chars:
            raise ApiError(400, f"{param}: {n} characters exceed the limit of "
                                f"{self.limits.max_chars}", param=param, code="too_many_characters")

    def chat_prompt(self, messages, params):
        """The conversation rendered with the checkpoint's template, oldest turns dropped to leave
        room for the reply (as sample.py --interactive does)."""
        system = "\n".join(m.content for m in messages if m.role == "system")
        history = [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
        budget = self.block_size - min(params.max_new_tokens, self.block_size // 2)
        ids, _ = chat.fit_context(system, history, self.template, self.engine.enc, budget)
        return ids

    def raw_prompts(self, prompts, n, params, echo=False):
        """The token ids of each prompt (a string, or token ids checked against the vocabulary), its
        oldest tokens dropped to leave room for the reply."""
        if len(prompts) * n > self.limits.max_rows:
            raise ApiError(400, f"prompt: {len(prompts)} prompts of {n} choices each exceed the "
                                f"{self.limits.max_rows} rows decoded together", param="prompt")
        self.check_chars(sum(len(prompt) for prompt in prompts), "prompt")
        vocab = self.engine.enc.n_vocab
        real = chat.is_token(self.engine.enc, vocab)  # not the free id before added special tokens
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list) and not all(0 <= t < vocab and real[t] for t in prompt):
                raise ApiError(400, f"prompt: prompt {i} has token ids outside 0..{vocab - 1}",
                               param="prompt")
        return [self.raw_prompt(prompt, params, echo) for prompt in prompts]

    def raw_prompt(self, prompt, params, echo=False):
        ids = self.engine.enc.encode_ordinary(prompt) if isinstance(prompt, str) else prompt
        budget = self.block_size - min(params.max_new_tokens, self.block_size // 2)
        if echo and len(ids) > budget:  # echo returns the prompt: it is not cut
            raise ApiError(400, f"prompt: {len(ids)} tokens leave no room for the reply in the "
                                f"context of {self.block_size} (echo: at most {budget})",
                           param="prompt")
        return ids[-budget:]

    def submit(self, prompts, params, n, scoring=(None, False)):
        """Queue a job per prompt; their events arrive on one asyncio queue of the running loop,
        with the choices numbered across the prompts (prompt i's are i*n ... i*n+n-1, as OpenAI's):
        ("text", choice, text), ("done", first choice, rows) or ("error", message). scoring:
        (logprobs, echo) for batcher.Batcher.submit."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(first):
            def emit(kind, *args):  # called from the worker thread
                args = (first + args[0], args[1]) if kind == "text" else \
                    (first, *args) if kind == "done" else args
                with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
                    loop.call_soon_threadsafe(events.put_nowait, (kind, *args))
            return emit

        jobs, queued = [], time.perf_counter()
        try:
            for i, prompt in enumerate(prompts):
                jobs.append(self.batcher.submit(prompt, params, n, emitter(i * n), *scoring))
                jobs[-1].queued = queued
        except QueueFull as e:
            for job in jobs:
                self.batcher.cancel(job)
            raise ApiError(503, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(sum(len(job.prompt) for job in jobs))
        return jobs, events

    async def events(self, request, jobs, events):
        """The jobs' events until all are done or one failed; stops early (and cancels them) when
        the client left, or with a 504 error event past the request_timeout."""
        left, first, limit = len(jobs), True, self.limits.request_timeout
        try:
            while left:
                wait = min(0.5, jobs[0].queued + limit - time.perf_counter()) if limit else 0.5
                if wait <= 0:
                    yield ("error", "the request took longer than the server's limit of "
                                    f"{limit:g} s", 504)
                    return
                try:
                    event = await asyncio.wait_for(events.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if first:
                    self.metrics.first_token.observe(time.perf_counter() - jobs[0].queued)
                    first = False
                yield event
                if event[0] == "error":
                    return
                left -= event[0] == "done"
        finally:
            for job in jobs:
                self.batcher.cancel(job)  # frees the job's place; a no-op once it is done
            generated = sum(len(reply.tokens) for job in jobs for reply in job.replies)
            self.metrics.generated_tokens.inc(generated)

    async def result(self, request, jobs, events):
        """The finished rows of the jobs, in choice order (non-streaming); their scores are the
        jobs'."""
        done = 0
        async for event in self.events(request, jobs, events):
            if event[0] == "error":
                raise ApiError(event[2] if len(event) > 2 else 500, event[1])
            done += event[0] == "done"
        if done < len(jobs):
            raise ApiError(499, "client closed the request")
        return [row for job in jobs for row in job.replies]


def usage(prompts, rows):
    prompt = sum(len(ids) for ids in prompts)
    completion = sum(len(row.tokens) for row in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_response(meta, prompts, jobs, enc):
    choices = [{"index": i, "message": {"role": "assistant", "content": row.text.strip()},
                "finish_reason": row.finish_reason, "logprobs": chat_logprobs(scores, enc)}
               for i, (row, scores) in enumerate(choice_rows(jobs))]
    rows = [row for row, _ in choice_rows(jobs)]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(prompts, rows)}


def completion_response(meta, prompts, jobs, enc):
    choices = []
    for i, (row, scores) in enumerate(choice_rows(jobs)):
        job = jobs[i // jobs[0].n]
        text = enc.decode(job.prompt) + row.text if job.echo else row.text.lstrip()
        logprobs = completion_logprobs(scores, enc, job.prompt, job.echo)
        choices.append({"index": i, "text": text, "finish_reason": row.finish_reason,
                        "logprobs": logprobs})
    rows = [row for row, _ in choice_rows(jobs)]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(prompts, rows)}


def choice_rows(jobs):
    """(Completion, its scores or None) of every choice, in order."""
    return [(row, job.scores[i] if job.scores else None)
            for job in jobs for i, row in enumerate(job.replies)]


def token_entry(enc, token, logprob):
    return {"token": enc.decode([token]), "logprob": logprob,
            "bytes": list(enc.decode_single_token_bytes(token))}


def chat_logprobs(scores, enc):
    """Chat's shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}."""
    if scores is None:
        return None
    content = [{**token_entry(enc, token, logprob),
                "top_logprobs": [token_entry(enc, t, lp) for t, lp in top]}
               for token, logprob, top in scores]
    return {"content": content, "refusal": None}


def completion_logprobs(scores, enc, prompt, echo):
    """The completions' shape: {"tokens", "token_logprobs", "top_logprobs" ({token: logprob}),
    "text_offset"}, from the prompt's first token (which has no log-probability) when echo."""
    if scores is None:
        return None
    entries = ([(prompt[0], None, None)] if echo else []) + [tuple(entry) for entry in scores]
    text = b"" if echo else enc.decode_bytes(prompt)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        out["text_offset"].append(len(text.decode("utf-8", errors="replace")))
        text += enc.decode_single_token_bytes(token)
        out["tokens"].append(enc.decode([token]))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {enc.decode([t]): lp for t, lp in top})
    return out


def sse(data):
    return f"data: {json.dumps(data)}\n\n"


async def stream(service, request, jobs, events, meta, is_chat, include_usage):
    """OpenAI's SSE chunks: the role first (chat), text deltas as they become final, one chunk per
    choice with its finish_reason as its job ends, the usage (when asked for), then
    `data: [DONE]`."""
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    piece = (lambda i, text, finish: {"index": i, "delta": {"content": text} if text else {},
                                      "finish_reason": finish, "logprobs": None}) if is_chat else \
        (lambda i, text, finish: {"index": i, "text": text, "finish_reason": finish,
                                  "logprobs": None})
    chunk = lambda choices, **more: sse({**meta, "object": obj, "choices": choices,  # noqa: E731
                                         **more})
    if is_chat:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}
                     for i in range(sum(job.n for job in jobs))])
    done = 0
    async for event in service.events(request, jobs, events):
        if event[0] == "text":
            yield chunk([piece(event[1], event[2], None)])
        elif event[0] == "done":
            done += 1
            first, rows = event[1], event[2]
            yield chunk([piece(first + i, "", row.finish_reason) for i, row in enumerate(rows)])
        else:
            yield sse({"error": {"message": event[1], "type": "server_error", "param": None,
                                 "code": None}})
            yield "data: [DONE]\n\n"
    if done == len(jobs):
        if include_usage:
            rows = [row for job in jobs for row in job.replies]
            yield chunk([], usage=usage([job.prompt for job in jobs], rows))
        yield "data: [DONE]\n\n"


async def answer(service, request, req, prompts, params, is_chat):
    scoring = req.scoring()
    for name, asked in zip(("logprobs", "echo"), (scoring[0] is not None, scoring[1])):
        if req.stream and asked:
            raise ApiError(400, f"{name}: not available when streaming (ask without stream)",
                           param=name)
    jobs, events = service.submit(prompts, params, req.n, scoring)
    meta = {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": service.model_name}
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream(service, request, jobs, events, meta, is_chat,
                                        include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    await service.result(request, jobs, events)
    return (chat_response if is_chat else completion_response)(
        meta, prompts, jobs, service.engine.enc)


# --------------------------------------------------------------------------------------------------
# The app


def create_app(engine, ckpt_info, defaults, model_name="chat-gpt2", limits=None, api_key=""):
    """The FastAPI app; its lifespan starts and stops the batcher's worker thread. defaults: a
    script's cfg (the sampling options but stop: SAMPLING_KEYS and seed) where a request sets none.
    api_key: required on every route but OPEN_PATHS ("" = none)."""
    limits = limits or Limits()
    service = Service(engine, ckpt_info, defaults, model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="chat-gpt2", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # the last added runs first
    app.add_middleware(RefuseWhileDraining, service=service)
    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_error(exc))
    app.add_exception_handler(ApiError, lambda request, e: error_response(
        e.status, e.message, e.param, e.code, e.headers))
    add_routes(app, service)
    routes = {route.path for route in app.routes}
    app.add_middleware(Measure, metrics=service.metrics, routes=routes)  # outermost: sees all
    return app


def uvicorn_server(app, grace, **config):
    """A uvicorn.Server for app (config: uvicorn.Config's options) whose first SIGTERM drains
    (Service.drain(grace)) before it stops, and then exits 0; Ctrl-C or a second SIGTERM stop at
    once, as uvicorn does."""
    import uvicorn  # only serving needs it

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig != signal.SIGTERM or app.state.service.draining:
                return super().handle_exit(sig, frame)
            threading.Thread(target=self.drain, name="drain", daemon=True).start()

        def drain(self):
            app.state.service.drain(grace)
            self.should_exit = True  # not a captured signal: run() returns, the script exits 0

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))


def add_routes(app, service):
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        refuse_unsupported(req, CHAT_NO_OPS)
        service.check_messages(req.messages)
        params = service.params(req, chat_stop=True)
        prompt = service.chat_prompt(req.messages, params)
        return await answer(service, request, req, [prompt], params, True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        refuse_unsupported(req, COMPLETION_NO_OPS)
        params = service.params(req, chat_stop=False)
        prompts = service.raw_prompts(req.prompt, req.n, params, echo=bool(req.echo))
        return await answer(service, request, req, prompts, params, False)

    @app.post("/chat")
    async def simple_chat(req: SimpleChatRequest, request: Request):
        messages = req.history + [Message(role="user", content=req.message)]
        service.check_messages(messages)
        params = service.params(Sampling(), chat_stop=True)
        jobs, events = service.submit([service.chat_prompt(messages, params)], params, 1)
        rows = await service.result(request, jobs, events)
        return {"reply": rows[0].text.strip()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": 0, "owned_by": "chat-gpt2"}]}

    @app.get("/health")
    async def health():
        body = {"status": "draining" if service.draining else "ok", "model": service.model_name,
                **service.batcher.stats()}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()
