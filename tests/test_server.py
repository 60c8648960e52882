"""The OpenAI-compatible server, driven by the official openai client and raw HTTP, on 127.0.0.1 only."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import gptcpp  # noqa: E402
from conftest import copy_gpt2_vocab, random_gpt2, save  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("srv")
    save(random_gpt2(seed=6, vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=2, bos_token_id=50256,
                     eos_token_id=50256), d)
    copy_gpt2_vocab(d)
    return str(d)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *extra):
        self.port = free_port()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "gptcpp", "serve", "--model", model_dir, "--port",
                                      str(self.port), "--threads", "2", *extra], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, path, data: bytes):
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-tokens", "200")
    yield s
    s.stop()


def test_plain_and_streamed_completions_match_the_library(server, model_dir):
    lib = gptcpp.GPT2.from_pretrained(model_dir)
    want = lib.generate("Once upon a time", max_new_tokens=20).text
    client = server.client()
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20
    pieces = [c.choices[0].text for c in client.completions.create(model="m", prompt="Once upon a time", max_tokens=20,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == want
    models = client.models.list()
    assert len(models.data) == 1


def test_n_stop_logprobs_echo(server, model_dir):
    client = server.client()
    r = client.completions.create(model="m", prompt=["Hello", "Bye"], max_tokens=8, temperature=1.0, n=3, seed=4)
    assert len(r.choices) == 6 and sorted(c.index for c in r.choices) == list(range(6))
    base = client.completions.create(model="m", prompt="Hello there", max_tokens=30, temperature=0).choices[0].text
    stop = base[4:7]
    r = client.completions.create(model="m", prompt="Hello there", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == base[:base.find(stop)]
    r = client.completions.create(model="m", prompt="Hello", max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    assert r.choices[0].text.startswith("Hello")


def test_16_concurrent_streams_equal_single_results(server):
    client = server.client()
    prompts = [f"Request number {i} says" for i in range(16)]
    single = {}
    t0 = time.perf_counter()
    for p in prompts:
        single[p] = client.completions.create(model="m", prompt=p, max_tokens=40, temperature=0).choices[0].text
    serial = time.perf_counter() - t0
    got = {}

    def one(p):
        got[p] = "".join(c.choices[0].text for c in server.client().completions.create(
            model="m", prompt=p, max_tokens=40, temperature=0, stream=True))

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = time.perf_counter() - t0
    assert got == single
    print(f"16 streams: serial {serial:.2f}s, concurrent {concurrent:.2f}s, throughput ratio {serial / concurrent:.2f}x")


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"prompt": "hi", "bogus_field": 1}).encode(), 400, "bogus_field"),
    (json.dumps({"prompt": "hi", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi " * 300, "max_tokens": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "temperature": -2}).encode(), 400, "temperature"),
    (json.dumps({"max_tokens": 5}).encode(), 400, "prompt"),
])
def test_bad_requests(server, body, status, param):
    code, out = server.post("/v1/completions", body)
    assert code == status and out["error"]["type"] == "invalid_request_error" and out["error"]["message"]
    if param:
        assert out["error"]["param"] == param
    assert server.get("/health")[0] == 200


def test_metrics(server):
    code, text = server.get("/metrics")
    assert code == 200
    for name in ("gptcpp_requests_total", "gptcpp_tokens_generated_total", "gptcpp_queue_depth",
                 "gptcpp_time_to_first_token_seconds_count", "gptcpp_tokens_per_second"):
        assert f"\n{name} " in "\n" + text


def test_full_queue_answers_429_and_disconnects_free_slots(model_dir):
    s = Server(model_dir, "--max-batch", "1", "--max-queue", "1", "--max-tokens", "200")
    try:
        results = []

        def long_request():
            results.append(s.post("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 200,
                                                                 "temperature": 0}).encode()))

        # The first request running before the others arrive: otherwise it may still sit in the queue when the
        # second comes, and every later one is refused (a race the test lost once).
        threads = [threading.Thread(target=long_request) for _ in range(5)]
        threads[0].start()
        deadline = time.monotonic() + 30
        def first_running():
            return json.loads(s.get("/health")[1])["active_sequences"] >= 1

        while not first_running() and threads[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(c for c, _ in results)
        assert codes.count(200) >= 2 and 429 in codes, codes
        body = next(b for c, b in results if c == 429)
        assert body["error"]["type"] == "rate_limit_exceeded"
        assert all(len(b["choices"][0]["text"]) > 0 for c, b in results if c == 200)
        # a streaming client that goes away: its slot is freed and the next request runs
        stream = s.client().completions.create(model="m", prompt="y", max_tokens=200, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.time() + 20
        while time.time() < deadline and '"active_sequences":0' not in s.get("/health")[1].replace(" ", ""):
            time.sleep(0.1)
        assert '"active_sequences":0' in s.get("/health")[1].replace(" ", "")
        assert s.post("/v1/completions", json.dumps({"prompt": "z", "max_tokens": 3}).encode())[0] == 200
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests(model_dir):
    s = Server(model_dir, "--max-tokens", "200")
    out = []
    t = threading.Thread(target=lambda: out.append(s.post("/v1/completions", json.dumps(
        {"prompt": "drain me", "max_tokens": 200, "temperature": 0}).encode())))
    t.start()
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    # uvicorn re-raises the signal once it has shut down gracefully: exit by SIGTERM, after the drain
    assert s.proc.wait(timeout=120) in (0, -signal.SIGTERM)
    code, body = out[0]
    assert code == 200 and body["usage"]["completion_tokens"] == 200


def test_weight_format_and_kv_cache_options(model_dir):
    """--dtype and --kv-cache-dtype reach the model: greedy text equals the library's with the same options."""
    s = Server(model_dir, "--dtype", "int8", "--kv-cache-dtype", "fp32")
    try:
        lib = gptcpp.GPT2.from_pretrained(model_dir, dtype="int8", kv_cache_dtype="fp32")
        want = lib.generate("Once upon a time", max_new_tokens=12).text
        code, body = s.post("/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 12,
                                                            "temperature": 0}).encode())
        assert code == 200 and body["choices"][0]["text"] == want
    finally:
        s.stop()
