"""`gptcpp serve`: an OpenAI-compatible completions server with continuous batching.

One engine thread owns the C++ Decoder and calls its step() in a loop: requests that arrive while others
decode join the running batch at the next step, and one forward pass per step serves every live sequence.
The HTTP side (FastAPI + uvicorn, the optional `server` extra) only validates, queues and streams.
"""
import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from .generation import TextStream, sampling_dict, validate_options
from .quantize import DTYPES, KV_CACHE_DTYPES

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class Choice:
    index: int
    prompt_ids: list
    options: dict
    logprobs: int | None
    stream: TextStream
    tokens: list = field(default_factory=list)
    text: str = ""  # text handed out so far
    lp_tokens: list = field(default_factory=list)
    lp_values: list = field(default_factory=list)
    lp_top: list = field(default_factory=list)
    finish: str | None = None
    seq_id: int | None = None


class Request:
    def __init__(self, choices, loop, stream):
        self.id = "cmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = choices
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.stream = stream
        self.arrived = time.perf_counter()
        self.first_token_at = None
        self.cancelled = False

    def emit(self, event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Runs the batched decoding loop in its own thread."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 64):
        from . import _core
        self.model = model
        self.decoder = _core.Decoder(model._core)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: queue.Queue = queue.Queue()
        self.cancels: queue.Queue = queue.Queue()
        self.active: dict[int, tuple[Request, Choice]] = {}
        self.cv = threading.Condition()
        self.draining = False
        self.stopped = False
        self.metrics = {"requests_total": 0, "requests_failed_total": 0, "tokens_generated_total": 0,
                        "ttft_sum": 0.0, "ttft_count": 0, "tokens_per_second": 0.0}
        self.thread = threading.Thread(target=self._run, name="gptcpp-engine", daemon=True)
        self.thread.start()

    # -- called from the event loop ------------------------------------------------------------------
    def submit(self, req: Request):
        with self.cv:
            if self.draining:
                raise RequestError(503, "the server is shutting down", kind="server_error")
            if self.waiting.qsize() >= self.max_queue:
                raise RequestError(429, f"the request queue is full ({self.max_queue} waiting); retry later",
                                   kind="rate_limit_exceeded")
            self.waiting.put(req)
            self.metrics["requests_total"] += 1
            self.cv.notify()

    def cancel(self, req: Request):
        req.cancelled = True
        with self.cv:
            self.cancels.put(req)
            self.cv.notify()

    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def drain(self, timeout: float = 300.0):
        """Stops admitting requests and waits until every accepted one has finished."""
        with self.cv:
            self.draining = True
            self.cv.notify()
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.cv:
                if not self.active and self.waiting.empty():
                    break
            time.sleep(0.02)
        with self.cv:
            self.stopped = True
            self.cv.notify()

    # -- engine thread -------------------------------------------------------------------------------
    def _admit(self):
        while len(self.active) < self.max_batch and not self.waiting.empty():
            req = self.waiting.get()
            if req.cancelled:
                continue
            for c in req.choices:
                try:
                    c.seq_id = self.decoder.add(c.prompt_ids, sampling_dict(c.options), c.options["max_new_tokens"],
                                                -1 if c.logprobs is None else c.logprobs, c.index)
                except Exception as e:  # noqa: BLE001 - reported to the client, the engine goes on
                    req.emit(("error", str(e)))
                    break
                self.active[c.seq_id] = (req, c)

    def _apply_cancels(self):
        while not self.cancels.empty():
            req = self.cancels.get()
            for c in req.choices:
                if c.seq_id is not None and c.seq_id in self.active:
                    self.decoder.cancel(c.seq_id)
                    del self.active[c.seq_id]

    def _run(self):
        tok = self.model.tokenizer
        while True:
            with self.cv:
                while not self.stopped and not self.active and self.waiting.empty() and self.cancels.empty():
                    self.cv.wait()
                if self.stopped and not self.active:
                    return
            self._apply_cancels()
            self._admit()
            if not self.active:
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.decoder.step()
            except Exception as e:  # noqa: BLE001
                for req, c in list(self.active.values()):
                    req.emit(("error", f"generation failed: {e}"))
                self.active.clear()
                continue
            dt = time.perf_counter() - t0
            self.metrics["tokens_generated_total"] += len(outputs)
            self.metrics["tokens_per_second"] = len(outputs) / dt if dt > 0 else 0.0
            for sid, token, finish, lp, _, _ in outputs:
                if sid not in self.active:
                    continue
                req, c = self.active[sid]
                if req.first_token_at is None:
                    req.first_token_at = time.perf_counter()
                    self.metrics["ttft_sum"] += req.first_token_at - req.arrived
                    self.metrics["ttft_count"] += 1
                c.tokens.append(token)
                piece = self._advance_text(c, token, finish)
                if lp is not None and c.logprobs is not None:
                    chosen, top = lp
                    c.lp_tokens.append(tok.id_to_token(token) or "")
                    c.lp_values.append(chosen)
                    c.lp_top.append({(tok.id_to_token(t) or str(t)): v for t, v in top})
                if c.finish is None and finish is not None:
                    c.finish = finish
                if c.finish is not None and sid in self.active:
                    if finish is None:  # stopped by a stop string: the C++ side still runs it
                        self.decoder.cancel(sid)
                    del self.active[sid]
                req.emit(("token", c.index, piece, c.finish))

    @staticmethod
    def _advance_text(c: Choice, token: int, finish) -> str:
        """New text of a choice (the same rules as generate(): whole characters, stop strings cut)."""
        piece = c.stream.push(token, finish is not None)
        if c.stream.stopped:
            c.finish = "stop"
        c.text += piece
        return piece


# ---- HTTP ----------------------------------------------------------------------------------------------

ALLOWED_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo",
                  "stream", "presence_penalty", "frequency_penalty", "logit_bias", "user", "best_of", "suffix",
                  "top_k", "min_p", "repetition_penalty", "stream_options"}


def _error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def build_requests(body: dict, model, max_tokens_cap: int, loop) -> Request:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - ALLOWED_FIELDS)
    if unknown:
        raise RequestError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    if "prompt" not in body:
        raise RequestError(400, "prompt is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    else:
        raise RequestError(400, "prompt must be a string, a list of strings, or a list of token ids", param="prompt")
    if body.get("best_of", 1) not in (1, None):
        raise RequestError(400, "best_of other than 1 is not supported", param="best_of")
    if body.get("suffix") is not None:
        raise RequestError(400, "suffix is not supported", param="suffix")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise RequestError(400, "n must be an integer from 1 to 16", param="n")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, "max_tokens must be a positive integer", param="max_tokens")
    if max_tokens > max_tokens_cap:
        raise RequestError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_cap}",
                           param="max_tokens")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5):
        raise RequestError(400, "logprobs must be an integer from 0 to 5", param="logprobs")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    opts = {"max_new_tokens": max_tokens, "top_k": body.get("top_k") or 0, "stop": body.get("stop"),
            "seed": body.get("seed"), "presence_penalty": body.get("presence_penalty") or 0.0,
            "frequency_penalty": body.get("frequency_penalty") or 0.0, "logit_bias": body.get("logit_bias")}
    if temperature == 0:
        opts["do_sample"] = False
    else:
        opts.update(do_sample=True, temperature=temperature, top_p=body.get("top_p") or 1.0)
    for k in ("min_p", "repetition_penalty"):
        if body.get(k) is not None:
            opts[k] = body[k]
    if isinstance(opts["logit_bias"], dict):
        opts["logit_bias"] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in opts["logit_bias"].items()}
    try:
        o = validate_options(opts, model.config.vocab_size, model.config.eos_token_ids)
    except ValueError as e:
        param = next((k for k in ("temperature", "top_p", "stop", "seed", "logit_bias", "presence_penalty",
                                  "frequency_penalty", "max_tokens") if k in str(e)), None)
        raise RequestError(400, str(e), param=param) from None
    choices = []
    for p in prompts:
        try:
            ids = model._prompt_ids(p)
        except ValueError as e:
            raise RequestError(400, str(e), param="prompt") from None
        for _ in range(n):
            choices.append(Choice(index=len(choices), prompt_ids=ids, options=dict(o), logprobs=logprobs,
                                  stream=TextStream(model.tokenizer, o["stop"])))
    req = Request(choices, loop, bool(body.get("stream")))
    req.echo = bool(body.get("echo"))
    req.prompts = prompts
    return req


def _logprobs_obj(c: Choice, start=0):
    if c.logprobs is None:
        return None
    offsets, pos = [], 0
    for t in c.lp_tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": c.lp_tokens[start:], "token_logprobs": c.lp_values[start:], "top_logprobs": c.lp_top[start:],
            "text_offset": offsets[start:]}


def create_app(model, model_name: str, max_batch=16, max_queue=64, max_tokens_cap=1024):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    state = {}

    async def lifespan(app):
        state["engine"] = Engine(model, max_batch=max_batch, max_queue=max_queue)
        yield
        await asyncio.get_running_loop().run_in_executor(None, state["engine"].drain)

    app = FastAPI(title="gptcpp", lifespan=lifespan)

    def err(status, message, kind="invalid_request_error", param=None):
        return JSONResponse(_error_body(message, kind, param), status_code=status)

    @app.get("/health")
    async def health():
        eng = state["engine"]
        return {"status": "draining" if eng.draining else "ok", "active_sequences": len(eng.active),
                "queue_depth": eng.queue_depth()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptcpp"}]}

    @app.get("/metrics")
    async def metrics():
        eng = state["engine"]
        m = eng.metrics
        lines = [
            "# HELP gptcpp_requests_total Completion requests accepted.", "# TYPE gptcpp_requests_total counter",
            f"gptcpp_requests_total {m['requests_total']}",
            "# HELP gptcpp_requests_failed_total Requests refused or failed.", "# TYPE gptcpp_requests_failed_total counter",
            f"gptcpp_requests_failed_total {m['requests_failed_total']}",
            "# HELP gptcpp_tokens_generated_total Tokens generated.", "# TYPE gptcpp_tokens_generated_total counter",
            f"gptcpp_tokens_generated_total {m['tokens_generated_total']}",
            "# HELP gptcpp_queue_depth Requests waiting for a batch slot.", "# TYPE gptcpp_queue_depth gauge",
            f"gptcpp_queue_depth {eng.queue_depth()}",
            "# HELP gptcpp_active_sequences Sequences in the running batch.", "# TYPE gptcpp_active_sequences gauge",
            f"gptcpp_active_sequences {len(eng.active)}",
            "# HELP gptcpp_time_to_first_token_seconds Time from arrival to the first token.",
            "# TYPE gptcpp_time_to_first_token_seconds summary",
            f"gptcpp_time_to_first_token_seconds_sum {m['ttft_sum']:.6f}",
            f"gptcpp_time_to_first_token_seconds_count {m['ttft_count']}",
            "# HELP gptcpp_tokens_per_second Tokens per second of the latest decoding step.",
            "# TYPE gptcpp_tokens_per_second gauge", f"gptcpp_tokens_per_second {m['tokens_per_second']:.3f}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        eng = state["engine"]
        try:
            raw = await http.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON: {e}") from None
            req = build_requests(body, model, max_tokens_cap, asyncio.get_running_loop())
            eng.submit(req)
        except RequestError as e:
            eng.metrics["requests_failed_total"] += 1
            return err(e.status, e.message, e.kind, e.param)
        if req.stream:
            return StreamingResponse(_stream(req, eng, http), media_type="text/event-stream")
        return await _complete(req, eng, http)

    async def _next_event(req, eng, http):
        """The request's next engine event, or None once its client has gone (its sequences are cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(req.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    eng.cancel(req)
                    return None

    async def _complete(req, eng, http):
        remaining = len(req.choices)
        while remaining:
            ev = await _next_event(req, eng, http)
            if ev is None:
                return err(499, "client disconnected")
            if ev[0] == "error":
                eng.cancel(req)
                eng.metrics["requests_failed_total"] += 1
                return err(500, ev[1], "server_error")
            if ev[3] is not None:
                remaining -= 1
        choices, completion_tokens = [], 0
        for c in req.choices:
            text = c.text if not req.echo else req.prompts[c.index // (len(req.choices) // len(req.prompts))] + c.text
            completion_tokens += len(c.tokens)
            choices.append({"text": text, "index": c.index, "logprobs": _logprobs_obj(c),
                            "finish_reason": FINISH.get(c.finish, "length")})
        prompt_tokens = sum(len(c.prompt_ids) for c in req.choices)
        return {"id": req.id, "object": "text_completion", "created": req.created, "model": model_name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    async def _stream(req, eng, http):
        def chunk(index, text, finish, lp=None):
            return "data: " + json.dumps({"id": req.id, "object": "text_completion", "created": req.created,
                                          "model": model_name, "choices": [{"text": text, "index": index,
                                                                            "logprobs": lp, "finish_reason": finish}]},
                                         ensure_ascii=False) + "\n\n"
        remaining = len(req.choices)
        sent_lp = [0] * len(req.choices)
        try:
            if req.echo:
                per = len(req.choices) // len(req.prompts)
                for c in req.choices:
                    yield chunk(c.index, req.prompts[c.index // per], None)
            while remaining:
                ev = await _next_event(req, eng, http)
                if ev is None:
                    return
                if ev[0] == "error":
                    yield "data: " + json.dumps(_error_body(ev[1], "server_error")) + "\n\n"
                    eng.cancel(req)
                    return
                _, index, piece, finish = ev
                c = req.choices[index]
                lp = None
                if c.logprobs is not None:
                    lp = _logprobs_obj(c, sent_lp[index])
                    sent_lp[index] = len(c.lp_tokens)
                if piece or finish is not None or lp:
                    yield chunk(index, piece, FINISH.get(finish) if finish else None, lp)
                if finish is not None:
                    remaining -= 1
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:  # the client went away mid-stream: free its slots
            eng.cancel(req)
            raise

    return app


def add_parser(sub):
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (pip install '.[server]')")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="KV cache storage (default: fp32 for fp32 weights, fp16 for the other formats)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--prefix-cache-tokens", type=int, default=0, help="KV cache budget for shared prompt prefixes")
    p.set_defaults(func=serve)


def serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("the server needs the optional extra: pip install 'gptcpp[server]'") from None
    from .model import GPT2
    model = GPT2.from_pretrained(args.model, threads=args.threads, dtype=args.dtype,
                                 prefix_cache_tokens=args.prefix_cache_tokens, kv_cache_dtype=args.kv_cache_dtype)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; the server needs text")
    app = create_app(model, os.path.basename(os.path.normpath(args.model)), args.max_batch, args.max_queue,
                     args.max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=300)
    return 0
