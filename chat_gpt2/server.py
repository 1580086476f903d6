"""An OpenAI-compatible HTTP API and a chat page over one model (serve.py runs it; docs/serving.md).

    POST /v1/chat/completions   OpenAI's chat completions, streaming (SSE) or not
    POST /v1/completions        raw text continuation, no chat template
    GET  /v1/models             the one model served
    POST /chat                  {"message", "history"} -> {"reply"}: the simplest client
    GET  /health                liveness and the queue's state
    GET  /                      the chat page (static/chat.html)

With an API key (create_app's api_key) every route but /health and the page needs
`Authorization: Bearer KEY` (401 otherwise). Requests are checked here (sizes, ranges, types; errors in OpenAI's shape) and decoded by a batcher.Batcher.
"""
import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, fields
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

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


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status, message, param=None, code=None, headers=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------
# Request bodies. strict: a string where a number belongs is an error naming the field, not silently converted.


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class RequestOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str | None = None  # one model is served; any name is accepted
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict | None = None


API_NAMES = {"max_new_tokens": "max_tokens"}  # OpenAI's names for options where they differ
API_TYPES = {"stop": str | list[str]}  # the request's type where it is not the option's own
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


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


class SimpleChatRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    message: str = Field(min_length=1)
    history: list[Message] = []


# ----------------------------------------------------------------------------------------------------------------
# Body size: refused before the body is read


class BodyLimit:
    """ASGI middleware: a POST must say its Content-Length (411) and stay within max_bytes (413)."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if not length.isdigit():
                await error_response(411, "a Content-Length header is required")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                message = f"request body of {int(length)} bytes exceeds the limit of {self.max_bytes}"
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


def validation_error(exc):
    """The first problem pydantic found, as a 400 naming the field (messages.0.role) or saying the JSON is bad."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON: {err.get('msg')}", code="json_invalid")
    param = ".".join(loc) or None
    return error_response(400, f"{param or 'body'}: {err.get('msg')}", param=param, code=err.get("type"))


# ----------------------------------------------------------------------------------------------------------------
# The service: requests -> prompts and params -> batcher jobs -> OpenAI responses


class Service:
    def __init__(self, engine, ckpt_info, defaults, model_name, limits):
        self.engine, self.defaults, self.model_name, self.limits = engine, defaults, model_name, limits
        self.template = ckpt_info.get("template", chat.TEMPLATE)
        self.default_stop = ckpt_info.get("default_stop", chat.NEWLINE_STOP)
        self.block_size = engine.model.config.block_size
        if limits.max_rows < MAX_N:
            raise ConfigError(f"max_rows must be at least {MAX_N} (a request may ask for n={MAX_N} choices), "
                              f"got {limits.max_rows}")
        self.batcher = Batcher(engine, max_waiting=limits.max_waiting, max_rows=limits.max_rows)

    def params(self, req, chat_stop):
        """SamplingParams: the server's defaults (as sample.py's), overridden by what the request sets. max_tokens
        is clamped to the context; the chat default stop is the checkpoint's, raw completions have none."""
        if req.stop is None:
            stops = (self.default_stop,) if chat_stop and self.default_stop else ()
        else:
            stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")
        options = {key: getattr(req, API_NAMES.get(key, key)) for key in (*SAMPLING_KEYS, "seed")}
        options = {key: self.defaults[key] if value is None else value
                   for key, value in options.items()}
        options["max_new_tokens"] = min(options["max_new_tokens"], self.block_size - 1)
        try:
            return SamplingParams(**options, stop=stops)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    def check_messages(self, messages):
        if len(messages) > self.limits.max_messages:
            raise ApiError(400, f"messages: at most {self.limits.max_messages} messages", param="messages",
                           code="too_many_messages")
        self.check_chars(sum(len(m.content) for m in messages), "messages")
        if messages[-1].role != "user":
            raise ApiError(400, "messages: the last message must be the user's", param="messages")

    def check_chars(self, n, param):
        if n > self.limits.max_chars:
            raise ApiError(400, f"{param}: {n} characters exceed the limit of {self.limits.max_chars}",
                           param=param, code="too_many_characters")

    def chat_prompt(self, messages, params):
        """The conversation rendered with the checkpoint's template, oldest turns dropped to leave room for the
        reply (as sample.py --interactive does)."""
        system = "\n".join(m.content for m in messages if m.role == "system")
        history = [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
        budget = self.block_size - min(params.max_new_tokens, self.block_size // 2)
        ids, _ = chat.fit_context(system, history, self.template, self.engine.enc, budget)
        return ids

    def raw_prompt(self, text, params):
        ids = self.engine.enc.encode_ordinary(text)
        budget = self.block_size - min(params.max_new_tokens, self.block_size // 2)
        return ids[-budget:]

    def submit(self, prompt, params, n):
        """Queue a job; its events arrive on an asyncio queue of the running loop."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(*event):  # called from the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            return self.batcher.submit(prompt, params, n, emit), events
        except QueueFull as e:
            raise ApiError(503, str(e), code="queue_full", headers={"Retry-After": "1"}) from None

    async def events(self, request, job, events):
        """The job's events until done or error; stops early (and cancels the job) when the client left."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event[0] != "text":
                    return
        finally:
            self.batcher.cancel(job)  # frees the job's place; a no-op once it is done

    async def result(self, request, job, events):
        """The finished rows of a job (non-streaming)."""
        async for event in self.events(request, job, events):
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise ApiError(500, event[1])
        raise ApiError(499, "client closed the request")


def usage(prompt, rows):
    completion = sum(len(row.tokens) for row in rows)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def chat_response(meta, prompt, rows):
    choices = [{"index": i, "message": {"role": "assistant", "content": row.text.strip()},
                "finish_reason": row.finish_reason, "logprobs": None} for i, row in enumerate(rows)]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(prompt, rows)}


def completion_response(meta, prompt, rows):
    choices = [{"index": i, "text": row.text.lstrip(), "finish_reason": row.finish_reason, "logprobs": None}
               for i, row in enumerate(rows)]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(prompt, rows)}


def sse(data):
    return f"data: {json.dumps(data)}\n\n"


async def stream(service, request, job, events, meta, is_chat, include_usage):
    """OpenAI's SSE chunks: the role first (chat), text deltas as they become final, one chunk per choice with its
    finish_reason, the usage (when asked for), then `data: [DONE]`."""
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    piece = (lambda i, text, finish: {"index": i, "delta": {"content": text} if text else {},
                                      "finish_reason": finish, "logprobs": None}) if is_chat else \
        (lambda i, text, finish: {"index": i, "text": text, "finish_reason": finish, "logprobs": None})
    if is_chat:
        yield sse({**meta, "object": obj, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None} for i in range(job.n)]})
    async for event in service.events(request, job, events):
        if event[0] == "text":
            yield sse({**meta, "object": obj, "choices": [piece(event[1], event[2], None)]})
        elif event[0] == "done":
            rows = event[1]
            yield sse({**meta, "object": obj, "choices": [piece(i, "", r.finish_reason) for i, r in enumerate(rows)]})
            if include_usage:
                yield sse({**meta, "object": obj, "choices": [], "usage": usage(job.prompt, rows)})
            yield "data: [DONE]\n\n"
        else:
            yield sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})


async def answer(service, request, req, prompt, params, is_chat):
    job, events = service.submit(prompt, params, req.n)
    meta = {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": service.model_name}
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream(service, request, job, events, meta, is_chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    rows = await service.result(request, job, events)
    return (chat_response if is_chat else completion_response)(meta, prompt, rows)


# ----------------------------------------------------------------------------------------------------------------
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
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key:
        app.add_middleware(RequireKey, key=api_key)  # added last: it runs first
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_error(exc))
    app.add_exception_handler(ApiError, lambda request, e: error_response(e.status, e.message, e.param, e.code,
                                                                          e.headers))
    add_routes(app, service)
    return app


def add_routes(app, service):
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        service.check_messages(req.messages)
        params = service.params(req, chat_stop=True)
        return await answer(service, request, req, service.chat_prompt(req.messages, params), params, True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        service.check_chars(len(req.prompt), "prompt")
        params = service.params(req, chat_stop=False)
        return await answer(service, request, req, service.raw_prompt(req.prompt, params), params, False)

    @app.post("/chat")
    async def simple_chat(req: SimpleChatRequest, request: Request):
        messages = req.history + [Message(role="user", content=req.message)]
        service.check_messages(messages)
        params = service.params(Sampling(), chat_stop=True)
        job, events = service.submit(service.chat_prompt(messages, params), params, 1)
        rows = await service.result(request, job, events)
        return {"reply": rows[0].text.strip()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "chat-gpt2"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, **service.batcher.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()
