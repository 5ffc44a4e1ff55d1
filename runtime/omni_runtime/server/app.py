"""The FastAPI app: /v1/chat/completions (JSON or server-sent events), /v1/models, /health, /metrics.

Every error is the OpenAI body (``errors.APIError``) with its status, never a traceback; the log
gets one line per request (method, path, status, seconds, request id).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni_runtime.server.engine import Cancelled, Engine
from omni_runtime.server.errors import APIError
from omni_runtime.server.openai_map import parse_call

log = logging.getLogger("omni_runtime.server")


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    media_dir: Path | None = None
    max_body_bytes: int = 64 * 2**20
    max_speech_seconds: float | None = None


def pcm16(pcm: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian int16 (rounded, clipped)."""
    return (np.clip(np.asarray(pcm, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(samples: bytes, sample_rate: int) -> bytes:
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples)
    return out.getvalue()


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="omni-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    runner = engine.runner
    voices = None
    if runner.has_speech:
        from omni_runtime.stages.token2wav import speaker_names

        voices = speaker_names(runner.manifest)

    @app.middleware("http")
    async def one_line(request: Request, call_next):
        started = time.perf_counter()
        rid = uuid.uuid4().hex[:12]
        request.state.rid = rid
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001
            log.exception("unhandled error")
            response = error_response(APIError(500, "internal error (see the server log)", type="server_error",
                                               code="internal_error"))
        response.headers["x-request-id"] = rid
        if request.url.path.startswith("/v1/chat"):
            engine.metrics.request(response.status_code)
        log.info("%s %s %s %.3fs id=%s", request.method, request.url.path, response.status_code,
                 time.perf_counter() - started, rid)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return error_response(exc)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit / 2**20:g} MB "
                                f"(--max-body-mb)", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "queued": engine.queued, "running": engine.running,
                "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.queued, engine.running, runner.pool.loaded),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "omni-runtime"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await read_body(request)
        call = parse_call(body, config.model_id, config.media_dir, config.max_speech_seconds, voices)
        job = engine.submit(call, asyncio.get_running_loop())
        rid = "chatcmpl-" + request.state.rid
        created = int(time.time())
        # the first event decides the status: an error before any output is an error answer
        try:
            first = await wait_event(job, request)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if first is None:  # the client went away
            job.cancel.set()
            return error_response(APIError(499, "client closed the request", code="cancelled"))
        if first[0] == "error":
            return answer_error(first[1])
        if call.stream:
            return StreamingResponse(sse(job, first, rid, created, call), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(job, first, rid, created, call, request)

    def answer_error(exc) -> JSONResponse:
        if isinstance(exc, Cancelled):
            return error_response(APIError(499, "client closed the request", code="cancelled"))
        return error_response(exc)

    async def wait_event(job, request: Request):
        """The job's next event; None if the client disconnects meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    def usage(done: dict) -> dict:
        p, c = done["prompt_tokens"], done["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def whole(job, event, rid, created, call, request):
        text, pcm = [], []
        while True:
            kind = event[0]
            if kind == "text":
                text.append(event[1])
            elif kind == "audio":
                pcm.append(pcm16(event[1]))
            elif kind == "error":
                return answer_error(event[1])
            elif kind == "done":
                break
            event = await wait_event(job, request)
            if event is None:
                job.cancel.set()
                return error_response(APIError(499, "client closed the request", code="cancelled"))
        done = event[1]
        result = done["result"]
        message = {"role": "assistant", "content": done["text"]}
        if call.request.speech and result is not None:
            data = b"".join(pcm)
            if call.audio_format == "wav":
                data = wav_bytes(data, result.sample_rate)
            message["audio"] = {"id": "audio-" + rid, "data": base64.b64encode(data).decode(),
                                "expires_at": created + 3600, "transcript": done["text"]}
        return {"id": rid, "object": "chat.completion", "created": created, "model": call.model,
                "choices": [{"index": 0, "message": message, "finish_reason": done["finish_reason"],
                             "logprobs": None}], "usage": usage(done)}

    async def sse(job, event, rid, created, call):
        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": call.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            if call.include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        transcript_sent = False
        text = []
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind = event[0]
                if kind == "text":
                    text.append(event[1])
                    yield chunk({"content": event[1]})
                elif kind == "audio":
                    audio = {"id": "audio-" + rid, "data": base64.b64encode(pcm16(event[1])).decode(),
                             "transcript": "" if transcript_sent else "".join(text)}
                    transcript_sent = True
                    if event[2]:
                        audio["expires_at"] = created + 3600
                    yield chunk({"audio": audio})
                elif kind == "error":
                    exc = event[1]
                    if not isinstance(exc, APIError):
                        exc = APIError(499, "cancelled", code="cancelled")
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    break
                elif kind == "done":
                    done = event[1]
                    yield chunk({}, done["finish_reason"])
                    if call.include_usage:
                        body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": call.model, "choices": [], "usage": usage(done)}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                event = await job.events.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a no-op once done; stops the generation if the client went away

    return app
