"""`pregated serve` with the official openai client against a real server process on
127.0.0.1, and the scheduler's faults through an in-process server (same app, same HTTP)."""

import asyncio
import json
import os
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai package (pip install openai)")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="pregated serve needs fastapi and uvicorn")
uvicorn = pytest.importorskip("uvicorn")

from pregated.bench_serve import free_port, start_server, wait_healthy  # noqa: E402
from pregated.engine import Engine  # noqa: E402
from pregated.server import create_app  # noqa: E402

PROMPTS = ["Experts live in", "The cache", "Mixture of experts models route each token", "A", "offloading",
           "Pre-gated MoE predicts", "host memory", "one two three"]


@pytest.fixture(scope="module")
def served(mixtral_folder):
    """(base URL, model name, process) of `pregated serve` on the tiny Mixtral."""
    proc, url = start_server(mixtral_folder, "--device cpu --max-batch 4 --max-queue 64 --policy pregated "
                                             "--expert-memory 200KB")
    try:
        yield url, os.path.basename(mixtral_folder), proc
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def reference(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        yield eng


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_models_completions_and_chat_equal_engine_generate(served, reference):
    url, name, _ = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == [name]
    for prompt in PROMPTS[:3]:
        want = reference.generate(prompt, max_new_tokens=10)
        got = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == want.prompt_tokens
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    messages = [{"role": "user", "content": "Where do experts live?"}]
    want = reference.generate(messages, max_new_tokens=8)
    got = c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == len(want.token_ids)


def test_streaming_chat_and_completions_with_usage(served, reference):
    url, name, _ = served
    c = client(url)
    messages = [{"role": "user", "content": "stream this"}]
    want = reference.generate(messages, max_new_tokens=9)
    chunks = list(c.chat.completions.create(model=name, messages=messages, max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices
    pieces = list(c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == reference.generate(PROMPTS[0], max_new_tokens=6).text
    # raw SSE: every event is JSON, the last one [DONE]
    with httpx.stream("POST", url + "/v1/completions", json={"model": name, "prompt": "raw", "max_tokens": 4,
                                                              "temperature": 0, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    for ln in lines[:-1]:
        json.loads(ln[len("data: "):])


def test_stop_strings_seeds_and_logprobs(served, reference):
    url, name, _ = served
    c = client(url)
    full = reference.generate(PROMPTS[2], max_new_tokens=12).text
    stop = full[3:5]
    got = c.completions.create(model=name, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop, "@@"])
    assert got.choices[0].text == full[:full.find(stop)] and got.choices[0].finish_reason == "stop"
    a, b, other = (c.completions.create(model=name, prompt="seeded", max_tokens=10, temperature=1.0, seed=s,
                                        extra_body={"top_k": 20})  # top_k: our extension
                   for s in (7, 7, 8))
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != other.choices[0].text
    lp = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                   temperature=0, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the top token


def test_async_clients_at_once_equal_one_at_a_time(served, reference):
    """16 concurrent clients x 8 requests each, streaming and not, of mixed lengths: no errors,
    every stream complete and well-formed, outputs equal to the same requests served one at a
    time; the batch grew above 1."""
    url, name, _ = served
    want = {}

    async def one(c, i):
        prompt, n = PROMPTS[i % len(PROMPTS)], 3 + 4 * (i % 5)
        if i % 2:
            out, finish = [], []
            async for ch in await c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                                       stream=True):
                out.append(ch.choices[0].text)
                finish.append(ch.choices[0].finish_reason)
            assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
            return prompt, n, "".join(out)
        r = await c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        return prompt, n, r.choices[0].text

    async def client_loop(c, k):
        return [await one(c, 8 * k + j) for j in range(8)]

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.gather(*(client_loop(c, k) for k in range(16)))

    results = [r for per_client in asyncio.run(main()) for r in per_client]
    assert len(results) == 128
    for prompt, n, text in results:
        if (prompt, n) not in want:
            want[prompt, n] = reference.generate(prompt, max_new_tokens=n).text
        assert text == want[prompt, n], (prompt, n)
    metrics = httpx.get(url + "/metrics").text
    assert metric(metrics, "pregated_batch_size_max") > 1
    assert 'reason="error"' not in metrics


def test_bad_requests_get_openai_errors(served):
    url, name, _ = served
    c = client(url)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        c.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=name, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="n"):
        c.completions.create(model=name, prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=name, prompt=list(range(5, 10)) * 20000)
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x", "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": name, "messages": "hello"})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert httpx.get(url + "/openapi.json").json()["paths"]["/v1/chat/completions"]


# --- in-process: faults, queue, keys -----------------------------------------------------------

class Server:
    """The app on a uvicorn server in a thread (real HTTP), with the Engine at hand."""

    def __init__(self, engine, **kw):
        self.app = create_app(engine, "m", **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture
def engine(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True, policy="pregated", expert_memory="200KB") as eng:
        yield eng


def test_clients_that_disconnect_leave_nothing_behind(engine):
    """50 streams cut at random points: afterwards no request, row or slot reference remains
    and the runtime's invariant check passes."""
    import random

    srv = Server(engine, max_batch=4)
    try:
        rng = random.Random(0)
        for i in range(50):
            with httpx.stream("POST", srv.url + "/v1/completions",
                              json={"model": "m", "prompt": PROMPTS[i % 8], "max_tokens": 40, "temperature": 0,
                                    "stream": True}) as r:
                for k, _ in enumerate(r.iter_lines()):
                    if k >= rng.randrange(0, 6):
                        break
        sched = srv.app.state.scheduler
        t = time.time()
        while (sched.running() or sched.queue_depth()) and time.time() - t < 30:
            time.sleep(0.05)
        assert sched.running() == 0 and sched.queue_depth() == 0
        metrics = httpx.get(srv.url + "/metrics").text
        assert metric(metrics, "pregated_batch_size") == 0 and metric(metrics, "pregated_queue_depth") == 0
        assert 'reason="cancelled"' in metrics
        engine.runtime.check()
        assert all(s["refs"] == 0 for s in engine.runtime.slots())
        # and the server still answers
        r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "still", "max_tokens": 3})
        assert r.status_code == 200
    finally:
        srv.close()


def test_full_queue_answers_429_and_keys_401(engine):
    srv = Server(engine, max_batch=1, max_queue=1, api_key="sekrit")
    try:
        assert httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 401
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.models.list().data[0].id == "m"
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key

        async def flood():
            async with httpx.AsyncClient(headers={"Authorization": "Bearer sekrit"}, timeout=120) as c:
                body = {"model": "m", "prompt": "long", "max_tokens": 60, "temperature": 0}
                return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json=body) for _ in range(8)))

        codes = [r.status_code for r in asyncio.run(flood())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        busy = [r for r in asyncio.run(flood()) if r.status_code == 429][0]
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "queue_full"
    finally:
        srv.close()


def test_sigterm_drains_what_runs(mixtral_folder):
    proc, url = start_server(mixtral_folder, "--device cpu")
    try:
        result = {}

        def long_request():
            r = httpx.post(url + "/v1/completions", json={"model": os.path.basename(mixtral_folder), "prompt": "drain",
                                                           "max_tokens": 200, "temperature": 0}, timeout=120)
            result["r"] = r

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)
        proc.terminate()
        t.join(120)
        assert result["r"].status_code == 200
        assert result["r"].json()["usage"]["completion_tokens"] >= 1
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chunked_prefill_lets_running_streams_go_on(engine, reference):
    """A long prompt prefilled 4 tokens at a time while another request decodes: the running
    stream gets a token between every two chunks, and both outputs equal Engine.generate."""
    from pregated.generation import SamplingParams
    from pregated.serving import Request, Scheduler

    sched = Scheduler(engine, max_batch=4, prefill_chunk=4)
    log, done = [], threading.Event()
    lock = threading.Lock()

    def emit(name):
        def f(ev):
            with lock:
                log.append((name, ev))
            if "finish_reason" in ev and name == "long":
                done.set()
        return f

    short = engine.tokenizer.encode("running")
    long = engine.tokenizer.encode(" ".join(PROMPTS * 3))
    assert len(long) > 40
    try:
        sched.submit(Request(short, SamplingParams(max_new_tokens=60), emit("short")))
        while not any(n == "short" for n, _ in log):
            time.sleep(0.01)
        sched.submit(Request(long, SamplingParams(max_new_tokens=5), emit("long")))
        assert done.wait(120)
    finally:
        sched.shutdown(drain=True, timeout=120)
    first_long = next(i for i, (n, _) in enumerate(log) if n == "long")
    chunks = -(-len(long) // 4)
    between = sum(1 for n, _ in log[:first_long] if n == "short")
    assert between >= chunks - 1  # one step of the running stream per chunk of the new prompt
    for name, ids, n in (("short", short, 60), ("long", long, 5)):
        text = "".join(ev.get("text", "") for nm, ev in log if nm == name)
        assert text == reference.generate(ids, max_new_tokens=n).text, name


def test_bench_serve_against_a_server_it_starts(mixtral_folder, tmp_path):
    from pregated.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench-serve", "--model", mixtral_folder, "--clients", "3", "--requests", "2", "--max-tokens", "5",
                 "--serve-args", "--device cpu --max-batch 3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["requests"] == 6 and s["errors"] == 0 and s["output_tokens_per_s"] > 0
    assert s["ttft_s"]["p50"] > 0 and s["latency_s"]["p99"] >= s["latency_s"]["p50"]
    assert all(r["error"] is None and 1 <= r["completion_tokens"] <= 5 for r in res["runs"])
    assert "pregated_generated_tokens_total" in res["server_metrics"]


def test_a_server_that_stops_accepting_answers_503(engine):
    srv = Server(engine, max_batch=2)
    try:
        assert httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}).status_code == 200
        srv.app.state.scheduler.shutdown(drain=True, timeout=60)  # what SIGTERM does after uvicorn stops listening
        r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(srv.url + "/health").json()["status"] == "shutting down"
    finally:
        srv.close()


def test_a_broken_group_fails_requests_instead_of_hanging(engine):
    """The scheduler's state fails for good on its third operation (as rank 0's does when a rank
    of the expert-parallel group dies): the running request ends with the error, the queued ones
    too, new ones are refused, and the scheduler's thread ends."""
    from pregated.expert_parallel import ExpertParallelError
    from pregated.generation import SamplingParams
    from pregated.serving import BatchState, Request, Scheduler, ShuttingDown

    class Breaking(BatchState):
        calls = 0

        def apply(self, op, *args):
            Breaking.calls += 1
            if self.broken is None and Breaking.calls >= 3:
                self.broken = ExpertParallelError("expert parallelism: a collective (block 0 rows) of rank 0 failed")
            if self.broken is not None:
                raise self.broken
            return super().apply(op, *args)

    ends, lock = [], threading.Lock()

    def emit(ev):
        if "finish_reason" in ev:
            with lock:
                ends.append(ev)

    sched = Scheduler(engine, max_batch=1, state=Breaking(engine))
    for p in ("one", "two", "three"):
        sched.submit(Request(engine.tokenizer.encode(p), SamplingParams(max_new_tokens=20), emit))
    sched._thread.join(60)
    assert not sched._thread.is_alive()
    assert len(ends) == 3 and all(e["finish_reason"] == "error" and "a collective" in e["error"] for e in ends)
    with pytest.raises(ShuttingDown, match="can no longer serve: ExpertParallelError"):
        sched.submit(Request([5, 6], SamplingParams(max_new_tokens=2), emit))
