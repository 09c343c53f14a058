"""`pregated serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the
continuous-batching scheduler (serving.py).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not),
GET /health, GET /metrics (Prometheus text). Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}} with 400, 401, 404, 429 or 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import _core
from .generation import SamplingParams
from .prompts import encode_prompt
from .serving import QueueFull, Request as Job, Scheduler, ShuttingDown


# --- request bodies ------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="extension: sample among the k most likely tokens (0 = off)")
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict]]
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --- the app -------------------------------------------------------------------------------

def create_app(engine, model_name: str, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256,
               api_key: str | None = None, request_timeout: float | None = None, state=None) -> FastAPI:
    """The server's app around an open Engine; the scheduler starts with the app and drains
    on shutdown. state: the scheduler's model state (serving.ReplicatedState on rank 0 under
    expert parallelism; default its own)."""
    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk, state=state)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # uvicorn stops accepting connections first (SIGTERM, Ctrl-C); what runs finishes
        await asyncio.get_running_loop().run_in_executor(None, lambda: scheduler.shutdown(drain=True, timeout=120))

    app = FastAPI(title="pregated", version=_core.build_info()["version"], lifespan=lifespan,
                  description="OpenAI-compatible completions from a MoE model whose experts live in host memory.")
    app.state.scheduler = scheduler
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
                        for err in e.errors())
        return _error(400, msg or "the request body is not valid", "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                              "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if scheduler.fatal is not None:  # a load balancer should stop sending here
            return JSONResponse({"status": "failed", "error": scheduler.fatal}, status_code=503)
        return {"status": "ok" if scheduler._accepting else "shutting down"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pregated"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return metrics_text(scheduler, engine)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def make_job(ids: list[int], body: _Sampling, max_tokens: int | None, top_logprobs: int | None, emit) -> Job:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        room = engine.cfg.max_position_embeddings - len(ids)
        n = min(max_tokens or room, room)
        params = SamplingParams(max_new_tokens=n, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, stop=stop)
        return Job(prompt_ids=ids, params=params, emit=emit, top_logprobs=top_logprobs, timeout_s=request_timeout)

    async def run(job_ids, body, max_tokens, top_logprobs, render_chunk, render_final):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = make_job(job_ids, body, max_tokens, top_logprobs,
                       lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        rid = f"{'chatcmpl' if isinstance(body, ChatRequest) else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            async def sse():
                try:
                    while True:
                        ev = await events.get()
                        for chunk in render_chunk(rid, ev):
                            yield f"data: {json.dumps(chunk)}\n\n"
                        if "finish_reason" in ev:
                            if body.stream_options is not None and body.stream_options.include_usage:
                                yield f"data: {json.dumps(usage_chunk(rid, body, ev, model_name))}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    job.cancel()  # a client that went away frees its row at the next step

            return StreamingResponse(sse(), media_type="text/event-stream")
        collected = []
        try:
            while True:
                ev = await events.get()
                collected.append(ev)
                if "finish_reason" in ev:
                    break
        finally:
            job.cancel()
        final = collected[-1]
        if final["finish_reason"] == "error":
            raise APIError(500, final.get("error", "generation failed"), "server_error")
        return render_final(rid, collected)

    def prompt_ids(prompt, param: str) -> list[int]:
        """The prompt's token ids as Engine.generate makes them; 400 when it is empty, outside the
        vocabulary, or leaves no room in the context."""
        try:
            ids = encode_prompt(prompt, engine.tokenizer)
            return engine._check_ids(ids, 1)
        except (ValueError, TypeError) as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise APIError(400, f"{param}: {e}", param=param, code=code) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        ids = prompt_ids(body.prompt, "prompt")
        render = CompletionRender(model_name, created=int(time.time()), logprobs=body.logprobs, tokenizer=engine.tokenizer)
        return await run(ids, body, body.max_tokens, body.logprobs, render.chunk, render.final)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        ids = prompt_ids([m.model_dump(exclude_none=True) for m in body.messages], "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        render = ChatRender(model_name, created=int(time.time()), logprobs=top, tokenizer=engine.tokenizer)
        return await run(ids, body, body.max_completion_tokens or body.max_tokens, top, render.chunk, render.final)

    return app


# --- responses -----------------------------------------------------------------------------

def _finish_reason(reason: str) -> str:
    return "length" if reason in ("length", "timeout") else "stop"


def _usage(ev: dict) -> dict:
    return {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
            "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]}


def usage_chunk(rid: str, body, ev: dict, model: str) -> dict:
    obj = "chat.completion.chunk" if isinstance(body, ChatRequest) else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": _usage(ev)}


class _Render:
    def __init__(self, model: str, created: int, logprobs: int | None, tokenizer):
        self.model, self.created, self.logprobs, self.tokenizer = model, created, logprobs, tokenizer
        self.started = False  # a stream's first chunk carries the role

    def _token(self, tid: int) -> str:
        return self.tokenizer.decode([tid])


class CompletionRender(_Render):
    def _lp(self, events):
        if self.logprobs is None:
            return None
        toks = [e for e in events if "token" in e]
        return {"tokens": [self._token(e["token"]) for e in toks],
                "token_logprobs": [e["logprob"] for e in toks],
                "top_logprobs": [{self._token(t): v for t, v in e.get("top_logprobs", [])} for e in toks],
                "text_offset": []}

    def chunk(self, rid, ev):
        if "finish_reason" not in ev and not ev.get("text") and self.logprobs is None:
            return []
        choice = {"index": 0, "text": ev.get("text", ""), "logprobs": self._lp([ev]) if "token" in ev else None,
                  "finish_reason": _finish_reason(ev["finish_reason"]) if "finish_reason" in ev else None}
        return [{"id": rid, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [choice]}]

    def final(self, rid, events):
        last = events[-1]
        text = "".join(e.get("text", "") for e in events)
        return {"id": rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": self._lp(events),
                             "finish_reason": _finish_reason(last["finish_reason"])}],
                "usage": _usage(last)}


class ChatRender(_Render):
    def _lp(self, events):
        if self.logprobs is None:
            return None
        return {"content": [{"token": self._token(e["token"]), "logprob": e["logprob"], "bytes": None,
                             "top_logprobs": [{"token": self._token(t), "logprob": v, "bytes": None}
                                              for t, v in e.get("top_logprobs", [])]}
                            for e in events if "token" in e]}

    def chunk(self, rid, ev):
        out = []
        base = {"id": rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        if not self.started:
            self.started = True
            out.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        if "finish_reason" in ev:
            delta = {"content": ev["text"]} if ev.get("text") else {}
            out.append({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": _finish_reason(ev["finish_reason"])}]})
        elif ev.get("text") or self.logprobs is not None:
            out.append({**base, "choices": [{"index": 0, "delta": {"content": ev.get("text", "")},
                                             "logprobs": self._lp([ev]), "finish_reason": None}]})
        return out

    def final(self, rid, events):
        last = events[-1]
        text = "".join(e.get("text", "") for e in events)
        return {"id": rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": self._lp(events), "finish_reason": _finish_reason(last["finish_reason"])}],
                "usage": _usage(last)}


def metrics_text(scheduler: Scheduler, engine) -> str:
    m = scheduler.metrics
    s = engine.runtime.stats()
    used = s["expert_hits"] + s["expert_misses"]
    with m.lock:
        elapsed = max(time.perf_counter() - m.started, 1e-9)
        lines = ["# HELP pregated_requests_total Requests finished, by reason.",
                 "# TYPE pregated_requests_total counter"]
        for reason, n in sorted(m.requests.items()):
            lines.append(f'pregated_requests_total{{reason="{reason}"}} {n}')
        rows = [
            ("pregated_queue_depth", "gauge", "Requests waiting for a row of the batch.", scheduler.queue_depth()),
            ("pregated_batch_size", "gauge", "Rows of the running decode batch.", scheduler.running()),
            ("pregated_batch_size_max", "gauge", "Most rows decoded together so far.", m.max_batch_seen),
            ("pregated_generated_tokens_total", "counter", "Tokens generated.", m.tokens),
            ("pregated_prompt_tokens_total", "counter", "Prompt tokens prefilled.", m.prompt_tokens),
            ("pregated_tokens_per_second", "gauge", "Tokens generated per second since start.", m.tokens / elapsed),
            ("pregated_time_to_first_token_seconds_mean", "gauge", "Mean time to first token.",
             m.ttft_sum / m.ttft_count if m.ttft_count else 0.0),
            ("pregated_expert_hit_rate", "gauge", "Experts found in a slot / experts needed.",
             s["expert_hits"] / used if used else 1.0),
            ("pregated_bytes_h2d_per_token", "gauge", "Expert bytes copied host to device per generated token.",
             s["bytes_h2d"] / m.tokens if m.tokens else 0.0),
            ("pregated_host_experts_total", "counter", "Experts computed on the host lane (policy hybrid).",
             s["host_experts"]),
        ]
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
