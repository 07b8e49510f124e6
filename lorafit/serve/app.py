"""The OpenAI-compatible HTTP API: routes, auth, limits and metrics around the decode loop (scheduler.Engine).

Requests are validated by hand so that every error, from a malformed body to an unknown model, comes back
in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) and never takes the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafit.generate import TextStreamer
from lorafit.lora import ADAPTER_CONFIG
from lorafit.model import LLaMA
from lorafit.serve import DEFAULT_MAX_PREFILL_TOKENS
from lorafit.serve.adapters import AdapterError, AdapterStore
from lorafit.serve.scheduler import Engine, Sampling
from lorafit.serve.scheduler import Request as GenerationRequest


@dataclass
class ServeSettings:
    """What the server is called and the bounds it enforces."""

    base_name: str
    api_key: str | None
    max_batch: int
    max_model_len: int
    max_body_bytes: int
    graceful_shutdown_s: float = 30.0
    compile: bool = False
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    threads: int | None = None  # CPU threads of the decode loop (None: torch's count where the app is made)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def error_response(error: APIError) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status)


# ---------------------------------------------------------------------------- request parsing


def _number(body: dict[str, Any], key: str, default: float | None, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise APIError(400, f"{key} must be an integer {bound}, got {value!r}", param=key)
    return value


def _stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return stops


def _sampling(body: dict[str, Any]) -> Sampling:
    top_k = _integer(body, "top_k", -1)
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", None, 1e-9, 1.0),
        top_k=None if top_k is None or top_k <= 0 else top_k,  # -1 and 0 mean "off", as in vLLM
        seed=_integer(body, "seed", -(2**63)),
    )


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if not all(isinstance(t, str) for t in texts):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": message["role"], "content": content})
    return out


class StopStrings:
    """Cut streamed text at the first stop string, holding back a tail that might begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        """The held-back tail at the end of generation."""
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------------------- the app


class EngineCounters:
    """The decode loop's own counters, read at each scrape: prefill forwards, requests prefilled, decode steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        """Prometheus metric families (the registry calls this on every scrape)."""
        engine = self.engine
        yield CounterMetricFamily(
            "lorafit_prefill_forwards", "Prefill forwards (each may prefill several requests)", engine.prefill_forwards
        )
        yield CounterMetricFamily("lorafit_prefilled_requests", "Requests prefilled", engine.prefilled_requests)
        yield CounterMetricFamily("lorafit_decode_steps", "Batched decode steps", engine.decode_steps)


def create_app(model: LLaMA, tokenizer: Any, adapters: AdapterStore, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving `model` (named settings.base_name) and the adapters in `adapters`."""
    registry = CollectorRegistry()
    requests_total = Counter(
        "lorafit_requests", "Finished generation requests", ["model", "finish_reason"], registry=registry
    )
    prompt_tokens = Counter("lorafit_prompt_tokens", "Prompt tokens processed", registry=registry)
    generation_tokens = Counter("lorafit_generation_tokens", "Tokens generated", registry=registry)
    occupancy = Gauge("lorafit_batch_occupancy", "Requests in the running batch", registry=registry)
    waiting = Gauge("lorafit_requests_waiting", "Requests waiting to join the batch", registry=registry)
    ttft = Histogram(
        "lorafit_time_to_first_token_seconds",
        "Time from a request's arrival to its first token",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=registry,
    )

    def on_step(running: int, queued: int) -> None:
        occupancy.set(running)
        waiting.set(queued)

    engine = Engine(
        model,
        adapters,
        settings.max_batch,
        settings.max_model_len,
        on_step,
        compiled=settings.compile,
        max_prefill_tokens=settings.max_prefill_tokens,
        threads=settings.threads,
    )
    registry.register(EngineCounters(engine))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has stopped taking requests and waited for open ones; fail whatever is left.
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="lorafit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))

    @app.middleware("http")
    async def auth_and_size(request: Request, call_next: Any) -> Response:
        if settings.api_key is not None and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), settings.api_key):
                return error_response(APIError(401, "missing or invalid API key", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(APIError(413, f"the request body exceeds {settings.max_body_bytes} bytes"))
        return await call_next(request)

    async def read_json(request: Request) -> dict[str, Any]:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise APIError(413, f"the request body exceeds {settings.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    # ------------------------------------------------------------------------ simple routes
    @app.get("/health")
    async def health() -> Response:
        if not engine.ready.is_set():
            # Requests are accepted meanwhile: they wait in the queue until the step is compiled.
            detail = "compiling the batched decode step (--compile); requests wait until it is done"
            return JSONResponse({"status": "warming up", "detail": detail}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            # vLLM's shape: an adapter's root is its directory and its parent the base model.
            fields = {"id": name, "object": "model", "created": created, "owned_by": "lorafit"}
            return fields | {"root": root, "parent": parent}

        data = [card(settings.base_name, settings.base_name, None)]
        loaded = adapters.paths()
        data += [card(name, str(path), settings.base_name) for name, path in loaded.items()]
        if adapters.adapter_dir is not None and adapters.adapter_dir.is_dir():
            on_disk = sorted(p for p in adapters.adapter_dir.iterdir() if (p / ADAPTER_CONFIG).is_file())
            data += [card(p.name, str(p), settings.base_name) for p in on_disk if p.name not in loaded]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = await read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise APIError(400, "lora_name and lora_path must be non-empty strings")
        if name == settings.base_name:
            raise APIError(400, f"{name!r} is the base model's name", param="lora_name")
        try:
            await run_in_threadpool(adapters.load, name, Path(path), True, True)
        except (AdapterError, OSError) as error:
            raise APIError(getattr(error, "status", 400), str(error), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name must be a non-empty string", param="lora_name")
        try:
            adapters.unload(name)
        except AdapterError as error:
            raise APIError(error.status, str(error), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # ------------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
        return await generate(request, body, tokenizer.encode(prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        messages = _messages(body)
        try:
            text = tokenizer.apply_chat_template(messages)
        except Exception as error:  # no template, or the template rejects the conversation
            raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from None
        # The template writes the special tokens itself (BOS included where the model wants one).
        return await generate(request, body, tokenizer.encode(text, bos=False), chat=True)

    async def generate(request: Request, body: dict[str, Any], prompt_ids: list[int], chat: bool) -> Response:
        model_name = body.get("model")
        if not isinstance(model_name, str):
            raise APIError(400, "model must be a string", param="model")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be a boolean", param="stream")
        # vLLM's extra: the prompt's and the answer's token ids beside the text.
        return_ids = body.get("return_token_ids") is True
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        room = settings.max_model_len - len(prompt_ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most {settings.max_model_len - 1}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, key, 1)
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"{key}={max_tokens} is too large: the prompt's {len(prompt_ids)} tokens leave room for {room} "
                f"of this server's {settings.max_model_len} positions",
                param=key,
                code="context_length_exceeded",
            )
        # OpenAI's defaults: 16 tokens for completions, the rest of the context for chat.
        max_tokens = max_tokens or (room if chat else min(16, room))
        sampling, stops = _sampling(body), _stop_strings(body)

        slot = -1
        if model_name != settings.base_name:
            try:
                slot = await run_in_threadpool(adapters.acquire, model_name)
            except AdapterError as error:
                code = "model_not_found" if error.status == 404 else None
                raise APIError(error.status, str(error), param="model", code=code) from None

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()

        def emit(token: int | None, reason: str | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (token, reason))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        job = GenerationRequest(prompt_ids, max_tokens, sampling, frozenset(tokenizer.stop_ids), emit, slot=slot)
        try:
            engine.submit(job)
        except (ValueError, RuntimeError) as error:
            if slot >= 0:
                adapters.release(slot)
            raise APIError(503, str(error)) from None
        prompt_tokens.inc(len(prompt_ids))
        started = time.perf_counter()
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "total_tokens": len(prompt_ids)}
        token_ids: list[int] = []

        async def pieces() -> AsyncIterator[tuple[str, str | None]]:
            """(text, None) as text is ready, then (text, finish_reason) once; cancels the request when left."""
            streamer, stopper = TextStreamer(tokenizer), StopStrings(stops)
            reason = None
            try:
                while reason is None:
                    try:
                        token, end = await asyncio.wait_for(events.get(), timeout=1.0)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if token is not None:
                        if usage["completion_tokens"] == 0:
                            ttft.observe(time.perf_counter() - started)
                        usage["completion_tokens"] += 1
                        token_ids.append(token)
                        generation_tokens.inc()
                        text = "" if token in job.stop_ids else streamer.put(token)
                        out, hit = stopper.feed(text)
                        reason = "stop" if hit else None
                    elif end.startswith("error: "):
                        raise APIError(500, f"generation failed: {end.removeprefix('error: ')}")
                    else:
                        out, hit = stopper.feed(streamer.flush())
                        out += "" if hit else stopper.flush()
                        reason = "stop" if hit or end == "stop" else "length"
                    if out or reason:
                        yield out, reason
            finally:
                engine.cancel(job)
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                requests_total.labels(model_name, reason or "abort").inc()

        if not stream:
            text, reason = [], None
            async for out, end in pieces():
                text.append(out)
                reason = end
            if reason is None:  # the client went away
                return Response(status_code=499)
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice["text"] = "".join(text)
            if return_ids:
                choice["token_ids"] = token_ids
            kind = "chat.completion" if chat else "text_completion"
            data = {"id": ident, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            data["usage"] = usage
            if return_ids:
                data["prompt_token_ids"] = prompt_ids
            return JSONResponse(data)

        def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            kind = "chat.completion.chunk" if chat else "text_completion"
            data = {"id": ident, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def sse() -> AsyncIterator[str]:
            if chat:
                yield chunk(None, None, first=True)
            try:
                async for out, reason in pieces():
                    if out:
                        yield chunk(out, None)
                    if reason:
                        yield chunk(None, reason)
            except APIError as error:
                body = {"message": error.message, "type": error.kind, "param": None, "code": None}
                yield f"data: {json.dumps({'error': body})}\n\n"
            if include_usage:
                final = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": int(time.time()), "model": model_name, "choices": [], "usage": usage}  # fmt: skip
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app
