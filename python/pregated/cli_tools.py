"""`pregated calibrate` and `pregated eval`: fit trained pre-gates and measure the quality cost
of routing by pre-gate. (`pregated bench` lives in bench.py.)"""

from __future__ import annotations

import json
import os
import sys


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist (a UTF-8 text file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def add_tool_commands(sub, add_engine_args) -> None:
    p = sub.add_parser("calibrate", help="fit a trained pre-gate on calibration text",
                       description="Runs the model over the text, fits for every MoE block a predictor of "
                                   "the next block's experts (starting from the speculative pre-gate) on "
                                   "the first part, and reports precision and recall of the speculative and "
                                   "trained pre-gates on the held-out rest. Writes DIR/pregate.safetensors "
                                   "and DIR/pregate.json.")
    p.add_argument("--model", required=True, help="model folder in Hugging Face layout")
    p.add_argument("--data", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--out", required=True, help="folder to write the pre-gate into")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of tokens held out (default 0.2)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per block (default 300)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--expert-memory", default=None, metavar="BYTES", help="device memory for expert slots")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity with exact routing and with routing by pre-gate",
                       description="Perplexity of the text under routing 'exact' and routing 'pregate' "
                                   "(with the speculative pre-gate, and the trained one when --pregate is "
                                   "given), so the quality cost of routing by pre-gate is measured.")
    p.add_argument("--model", required=True, help="model folder in Hugging Face layout")
    p.add_argument("--data", required=True, help="evaluation text file (UTF-8)")
    p.add_argument("--pregate", default=None, metavar="DIR", help="trained pre-gate folder to evaluate too")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--expert-memory", default=None, metavar="BYTES", help="device memory for expert slots")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_eval)

    from .bench import add_bench_command
    add_bench_command(sub)


def cmd_calibrate(args) -> int:
    from .pregate import calibrate

    text = _read_text(args.data)
    calibrate(args.model, text, args.out, device=args.device, dtype=args.dtype, expert_memory=args.expert_memory,
              window=args.window, held_out=args.held_out, steps=args.steps, progress=sys.stderr.isatty())
    return 0


def evaluate(model: str, text: str, *, pregate=None, window=512, max_tokens=None, device=None, dtype=None,
             expert_memory=None, progress=False) -> dict:
    """Perplexity under exact routing and under routing by (speculative / trained) pre-gate."""
    from .engine import Engine
    from .pregate import perplexity

    with Engine(model, device=device, dtype=dtype, expert_memory=expert_memory, progress=progress) as eng:
        ids = eng.tokenizer.encode(text)[:max_tokens]
        rows = []
        configs = [("exact", "speculative"), ("pregate", "speculative")]
        if pregate:
            configs.append(("pregate", pregate))
        for routing, pg in configs:
            eng.set_routing(routing, pregate=pg)
            eng.reset_stats()
            ppl = perplexity(eng, ids, window)
            s = eng.stats()
            rows.append({"routing": routing, "pregate": eng.pregate.kind, "perplexity": ppl,
                         "prefetch_precision": s["prefetch_precision"], "prefetch_recall": s["prefetch_recall"]})
        return {"model": model, "tokens": len(ids), "window": window, "results": rows}


def cmd_eval(args) -> int:
    res = evaluate(args.model, _read_text(args.data), pregate=args.pregate, window=args.window,
                   max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                   expert_memory=args.expert_memory, progress=sys.stderr.isatty())
    exact = res["results"][0]["perplexity"]
    print(f"{res['tokens']} tokens, windows of {res['window']}")
    print(f"{'routing':<8} {'pre-gate':<12} {'perplexity':>10} {'vs exact':>9} {'precision':>9} {'recall':>7}")
    for r in res["results"]:
        p, rc = r["prefetch_precision"], r["prefetch_recall"]
        print(f"{r['routing']:<8} {r['pregate']:<12} {r['perplexity']:>10.3f} {r['perplexity'] / exact - 1:>+9.2%} "
              f"{'-' if p is None else f'{p:.3f}':>9} {'-' if rc is None else f'{rc:.3f}':>7}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0
