"""`sft serve`: an OpenAI-compatible HTTP endpoint for a trained run (or any model `sft generate` takes).

    app = create_app(Generator.load("outputs/demo"), model_name="demo", api_key=None)
    serve(app, host="127.0.0.1", port=8000)

Built on FastAPI + uvicorn (the `serve` extra). Routes: `GET /v1/models`, `GET /v1/models/{id}` and
`POST /v1/chat/completions` (`messages`, `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `stream`).
Prompts are rendered and answered by `Generator` exactly as `sft generate` does, so a greedy answer
(`temperature: 0`) is the text `sft generate` prints. Requests are answered one at a time by one worker thread,
in arrival order; the others wait in its queue (none is dropped; nothing more is generated for a client that has
disconnected). Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and name the field at fault. SIGTERM (or Ctrl-C) stops
accepting connections, finishes the answers in flight, then returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.sft.config import ConfigError
from app.sft.generation import GeneratedText, Generator
from app.sft.templates import Message, TemplateError

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""The answer's length limit when a request sets none (the model's remaining context, if smaller)."""


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    @classmethod
    def server_error(cls, error: Exception) -> APIError:
        """An answer that failed for a reason of the server's (a bug, out of memory, a model that gives NaN)."""
        return cls(500, f"the answer failed: {type(error).__name__}: {error}", type_="server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _text(value: str) -> str:
    """`value`, if it is text: JSON's escapes can spell a lone surrogate (`\\ud800`), which no tokenizer takes."""
    try:
        value.encode()
    except UnicodeEncodeError as error:
        raise ValueError(f"holds a lone surrogate at character {error.start} (an unpaired \\u escape), "
                         "not text") from None
    return value


Text = Annotated[str, AfterValidator(_text)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _one_text_or_parts(cls, content: Any) -> Any:
        """A string is one text part (no union of the two shapes: its errors would name a type, not the field)."""
        if isinstance(content, str):
            return [{"type": "text", "text": _text(content)}]
        if not isinstance(content, list):
            raise ValueError("should be a string or a list of content parts")
        return content


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, body: Any) -> Any:
        """OpenAI's optional fields may be sent as null (some clients send every field they know): the default."""
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_or_more(cls, stop: Any) -> Any:
        if isinstance(stop, str):
            return [stop]
        if not isinstance(stop, list):
            raise ValueError("should be a string or a list of strings")
        return stop


def context_length(generator: Generator) -> int | None:
    """How many tokens (prompt and answer) the model can attend to, if its config says."""
    config = getattr(generator.model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def create_app(generator: Generator, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application answering with `generator` under the model id `model_name`; with `api_key`,
    every request needs `Authorization: Bearer <api_key>`."""
    if not generator.is_chat:
        raise ConfigError(f"{model_name}: serve needs a model trained on alpaca or chat data, not plain text")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sft-serve")
    # Prompts are rendered and tokenized off the event loop (a long one takes seconds), in arrival order.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sft-serve-prompts")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        reader.shutdown(wait=True)
        worker.shutdown(wait=True)

    app = FastAPI(title="sft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    limit = context_length(generator)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception) -> JSONResponse:
        return APIError.server_error(error).response()  # uvicorn then logs the traceback

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                            code="invalid_json").response()
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if not location:  # the body itself: missing, not an object, or a form (curl -d without a Content-Type)
            sent = request.headers.get("content-type") or "no Content-Type"
            return APIError(400, "the request body should be a JSON object sent with Content-Type: application/json "
                            f"(this one: {sent}: {first.get('msg')})", code="invalid_value").response()
        param = ".".join(location)
        return APIError(400, f"{param}: {first.get('msg')}", param=param, code="invalid_value").response()

    @app.middleware("http")
    async def authorize(request: Request, call_next: Callable[[Request], Any]) -> Any:
        if api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "sft"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, model_name)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        completion_id, completion_created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())  # one per answer
        loop = asyncio.get_running_loop()
        _check_model(body.model, model_name)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options",
                           code="invalid_value")
        try:
            prompt_ids = await loop.run_in_executor(reader, generator.prompt_ids, _conversation(body.messages))
        except (TemplateError, ValueError) as error:
            raise APIError(400, f"messages: {error}", param="messages", code="invalid_value") from None
        max_tokens = _max_tokens(body, len(prompt_ids), limit)
        stop = body.stop or []
        gone = threading.Event()  # the client has left (or has its answer): nothing more is generated for it

        def run(on_text: Callable[[str], None] | None = None) -> GeneratedText:
            if gone.is_set():
                raise ClientGone  # while the request waited in the queue
            if body.seed is not None:
                torch.manual_seed(body.seed)
            return generator.answer(prompt_ids, max_new_tokens=max_tokens, temperature=body.temperature,
                                    top_p=body.top_p, stop=stop, on_text=on_text)

        if not body.stream:
            watcher = asyncio.ensure_future(_client_leaves(request))
            watcher.add_done_callback(lambda done: done.cancelled() or gone.set())
            try:
                answer = await loop.run_in_executor(worker, run)
            except ClientGone:
                return Response(status_code=499)  # "client closed request": no one reads it
            finally:
                watcher.cancel()
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": completion_created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": _finish_reason(answer), "logprobs": None}],
                "usage": _usage(len(prompt_ids), answer),
            })
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(text: str) -> None:
            if gone.is_set():
                raise ClientGone  # unwinds generate(): the worker goes on to the next request
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def ended(done: asyncio.Future[GeneratedText]) -> None:
            pieces.put_nowait(None)
            if not done.cancelled():
                done.exception()  # retrieved: a stream whose client has left awaits it no more

        job = loop.run_in_executor(worker, run, on_text)
        job.add_done_callback(ended)

        def chunk(delta: dict[str, str] | None, finish_reason: str | None = None, **extra: Any) -> str:
            """One server-sent event; `delta` None: no choices (the closing usage chunk)."""
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                 "logprobs": None}]
            event = {"id": completion_id, "object": "chat.completion.chunk", "created": completion_created,
                     "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(event)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                cutter = StopCutter(stop)
                while (piece := await pieces.get()) is not None:
                    if text := cutter.feed(piece):
                        yield chunk({"content": text})
                try:
                    answer = await job
                except Exception as error:  # the answer's end cannot be sent: say why, in the stream
                    logger.exception("generation failed")
                    yield f"data: {json.dumps(APIError.server_error(error).body())}\n\n"
                else:
                    if text := cutter.finish():
                        yield chunk({"content": text})
                    yield chunk({}, _finish_reason(answer))
                    if include_usage:
                        yield chunk(None, usage=_usage(len(prompt_ids), answer))
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects (the stream is cancelled)
                gone.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class ClientGone(Exception):
    """Stops generating an answer whose client has disconnected."""


async def _client_leaves(request: Request) -> None:
    """Returns when the client of `request`, whose body has been read, disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class StopCutter:
    """Streams text up to the first of the `stop` strings, holding back a tail that could be the start of one."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [text for text in stop if text]
        self.held = ""
        self.done = False

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        self.held += text
        cut = min((at for at in (self.held.find(s) for s in self.stop) if at >= 0), default=None)
        if cut is not None:
            self.done = True
            out, self.held = self.held[:cut], ""
            return out
        keep = max((k for s in self.stop for k in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:k])), default=0)  # never longer than what is held
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def finish(self) -> str:
        out, self.held = ("" if self.done else self.held), ""
        return out


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"model '{requested}' does not exist; this server has '{served}'", param="model",
                       code="model_not_found")


def _conversation(messages: list[ChatMessage]) -> list[Message]:
    """OpenAI messages as our conversation (text parts joined; `developer` is the system message)."""
    out: list[Message] = []
    for message in messages:
        content = "".join(part.text for part in message.content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return out


def _max_tokens(body: ChatRequest, prompt_tokens: int, limit: int | None) -> int:
    """The answer's length limit; a prompt (and answer) longer than the model's context is refused."""
    requested = body.max_completion_tokens or body.max_tokens
    if limit is None:
        return requested or DEFAULT_MAX_TOKENS
    if prompt_tokens >= limit:
        raise APIError(400, f"messages: the prompt is {prompt_tokens} tokens, longer than the model's context of "
                       f"{limit} tokens (which must also hold the answer)", param="messages",
                       code="context_length_exceeded")
    if requested is not None and prompt_tokens + requested > limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param}: the prompt's {prompt_tokens} tokens and {requested} answer tokens exceed "
                       f"the model's context of {limit} tokens", param=param, code="context_length_exceeded")
    return requested or min(DEFAULT_MAX_TOKENS, limit - prompt_tokens)


def _finish_reason(answer: GeneratedText) -> str:
    return "stop" if answer.stopped else "length"


def _usage(prompt_tokens: int, answer: GeneratedText) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": answer.num_tokens,
            "total_tokens": prompt_tokens + answer.num_tokens}


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Answer HTTP requests with `app` until SIGTERM or Ctrl-C, then finish the answers in flight and return."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=5))
    with _signals_end_serving():
        server.run()


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again to end the process its default way;
    caught here (main thread only), the graceful shutdown is the end and the command exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: logger.info("SIGTERM: answers in flight finished"))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
