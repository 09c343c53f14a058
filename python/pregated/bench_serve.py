"""`pregated bench-serve`: N concurrent clients against an OpenAI-compatible server (ours, or a
peer's), streaming completions, in the style of `pregated bench`: throughput, time to first
token, inter-token latency and request latency percentiles, JSON and a plot.

With --model instead of --url, it starts `pregated serve` on a free local port for the run.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import time


def add_bench_serve_command(sub) -> None:
    p = sub.add_parser("bench-serve", help="benchmark an OpenAI-compatible server with concurrent clients",
                       description="Runs --clients concurrent clients, each sending --requests streaming "
                                   "completions one after the other, against --url (any OpenAI-compatible "
                                   "server) or a `pregated serve` it starts for --model. Prints throughput and "
                                   "latency percentiles; writes JSON and a PNG plot.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="model folder: start `pregated serve` on it for the run")
    p.add_argument("--served-model", default=None, help="model id to ask for (default: the server's first)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    p.add_argument("--prompt-words", type=int, default=32, help="words per prompt (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default 32)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--serve-args", default="", help="with --model: extra `pregated serve` arguments, quoted")
    p.add_argument("--out", default="bench-serve.json", help="JSON results (default bench-serve.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default: --out with .png)")
    p.set_defaults(func=cmd_bench_serve)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def q(p):
        return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(v) / len(v)}


async def _one(client, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> dict:
    t0 = time.perf_counter()
    arrivals, error, usage = [], None, None
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        arrivals.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - counted, reported
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return {"start": t0, "end": end, "ttft": arrivals[0] - t0 if arrivals else None,
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "error": error,
            "completion_tokens": usage["completion_tokens"] if usage else len(arrivals)}


async def run_clients(url: str, model: str, clients: int, requests: int, prompt_words: int, max_tokens: int,
                      api_key: str | None = None) -> list[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    words = ("experts live in host memory and the ones the next block needs are copied while the current "
             "block computes").split()

    async def client_loop(k):
        out = []
        async with httpx.AsyncClient(timeout=600) as client:
            for j in range(requests):
                n = prompt_words + (k * 7 + j * 3) % max(prompt_words // 2, 1)  # mixed lengths
                prompt = " ".join(words[(k + j + i) % len(words)] for i in range(n))
                out.append(await _one(client, url, model, prompt, max_tokens, headers))
        return out

    per_client = await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return [r for c in per_client for r in c]


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["error"] is None]
    span = (max(r["end"] for r in runs) - min(r["start"] for r in runs)) if runs else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    return {"requests": len(runs), "errors": len(runs) - len(ok), "seconds": span,
            "output_tokens_per_s": tokens / span if span > 0 else None,
            "requests_per_s": len(ok) / span if span > 0 else None,
            "ttft_s": _percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
            "itl_s": _percentiles([x for r in ok for x in r["itl"]]),
            "latency_s": _percentiles([r["end"] - r["start"] for r in ok]),
            "first_errors": [r["error"] for r in runs if r["error"]][:5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 600) -> None:
    """Polls URL/health until it answers 200; fails early if `proc` (the server) exits."""
    import httpx

    t = time.time()
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"`pregated serve` exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} did not answer /health within {timeout:.0f} s")


def start_server(folder: str, extra: str):
    """`pregated serve` on a free local port -> (process, base URL), once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "pregated", "serve", "--model", folder, "--port", str(port), "--quiet"]
    proc = subprocess.Popen(cmd + shlex.split(extra), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def cmd_bench_serve(args) -> int:
    import httpx

    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.prompt_words < 1:
        raise ValueError("--clients, --requests, --max-tokens and --prompt-words must be >= 1")
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.model, args.serve_args)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.served_model or httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        runs = asyncio.run(run_clients(url, model, args.clients, args.requests, args.prompt_words, args.max_tokens,
                                       args.api_key))
        metrics = None
        try:
            metrics = httpx.get(url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            pass
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    summary = summarize(runs)
    result = {"command": shlex.join(["pregated"] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "url": url, "model": model, "clients": args.clients, "requests_per_client": args.requests,
              "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "summary": summary,
              "runs": runs, "server_metrics": metrics}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    s = summary
    ms = lambda d, k: "-" if d[k] is None else f"{d[k] * 1e3:.0f}"  # noqa: E731
    print(f"{s['requests']} requests from {args.clients} clients in {s['seconds']:.1f} s, {s['errors']} errors; "
          f"{s['output_tokens_per_s'] or 0:.1f} output tokens/s, {s['requests_per_s'] or 0:.2f} requests/s")
    for name, key in (("time to first token", "ttft_s"), ("inter-token latency", "itl_s"), ("request latency", "latency_s")):
        d = s[key]
        print(f"  {name:<20} ms: p50 {ms(d, 'p50')}, p90 {ms(d, 'p90')}, p99 {ms(d, 'p99')}, mean {ms(d, 'mean')}")
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    try:
        plot(runs, plot_path, f"{model}: {args.clients} clients x {args.requests} requests")
        print(f"wrote {args.out} and {plot_path}")
    except ImportError:
        print(f"wrote {args.out} (no plot: matplotlib is not installed)")
    return 1 if s["errors"] else 0


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r["error"] is None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t0 = min(r["start"] for r in runs)
    first = [(r["start"] - t0, r["ttft"] * 1e3) for r in ok if r["ttft"] is not None]
    axes[0].scatter([x for x, _ in first], [y for _, y in first], s=8)
    axes[0].set_xlabel("request start (s)")
    axes[0].set_ylabel("time to first token (ms)")
    axes[1].hist([x * 1e3 for r in ok for x in r["itl"]], bins=40)
    axes[1].set_xlabel("inter-token latency (ms)")
    axes[2].hist([(r["end"] - r["start"]) for r in ok], bins=30)
    axes[2].set_xlabel("request latency (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
