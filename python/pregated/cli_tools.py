"""`pregated calibrate` and `pregated eval`: fit trained pre-gates and measure the quality cost
of routing by pre-gate. (`pregated bench` lives in bench.py.)"""

from __future__ import annotations

import json
import os
import sys

from . import _core


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist (a UTF-8 text file)")
    if os.path.isdir(path):
        raise ValueError(f"data file {path} is a folder: give a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"data file {path} holds no text: give a UTF-8 text file with some text in it")
    return text


def add_quantization_args(p, many: bool, method: bool = True, help: str | None = None) -> None:
    """--expert-dtype (one, or several with `many`), --group-size, and --quantize with `method`."""
    if many:
        p.add_argument("--expert-dtype", nargs="+", default=None, choices=["model", "int8", "int4", "int3", "int2"],
                       metavar="DTYPE", help=help)
    else:
        p.add_argument("--expert-dtype", default=None, choices=["int8", "int4", "int3", "int2"],
                       help="quantize the experts when loading: int8, int4, int3 or int2, group-wise "
                            "(default: keep the model's dtype; dense layers always keep it)")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                   help="quantized experts: weights per scale and zero along the input dimension (default 64; "
                        "a checkpoint that ships packed experts keeps its own)")
    if method:
        p.add_argument("--quantize", default="rtn", choices=["rtn", "hqq"],
                       help="quantized experts: round-to-nearest (default) or HQQ's refined zeros")


def add_tool_commands(sub) -> None:
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
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward pass (default: 256, or the model's context when shorter)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per block (default 300)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--expert-memory", default=None, metavar="BYTES", help="device memory for expert slots")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="quality cost of routing by pre-gate, or of quantized experts",
                       description="Perplexity of the text under routing 'exact' and routing 'pregate' "
                                   "(with the speculative pre-gate, and the trained one when --pregate is "
                                   "given), so the quality cost of routing by pre-gate is measured. With "
                                   "--expert-dtype: perplexity, top-1 agreement with the unquantized model's "
                                   "next token and mean KL divergence of the next-token distributions for "
                                   "each quantized format instead (exact routing; the unquantized "
                                   "distributions are held in host memory: tokens x vocabulary x 4 bytes).")
    p.add_argument("--model", required=True, help="model folder in Hugging Face layout")
    p.add_argument("--data", required=True, help="evaluation text file (UTF-8)")
    p.add_argument("--pregate", default=None, metavar="DIR", help="trained pre-gate folder to evaluate too")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: 512, or the model's context when shorter)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--expert-memory", default=None, metavar="BYTES", help="device memory for expert slots")
    add_quantization_args(p, many=True, help="compare experts quantized to these formats (int8 int4 int3 int2) "
                          "with the model's own experts: perplexity, top-1 agreement, mean KL divergence")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    p.set_defaults(func=cmd_eval)

    from .bench import add_bench_command
    add_bench_command(sub, add_quantization_args)
    from .bench_serve import add_bench_serve_command
    add_bench_serve_command(sub)


def cmd_calibrate(args) -> int:
    from .pregate import calibrate

    text = _read_text(args.data)
    calibrate(args.model, text, args.out, device=args.device, dtype=args.dtype, expert_memory=args.expert_memory,
              window=args.window, held_out=args.held_out, steps=args.steps, quiet=args.quiet)
    return 0


def evaluate(model: str, text: str, *, pregate=None, window=None, max_tokens=None, device=None, dtype=None,
             expert_memory=None, quiet=True) -> dict:
    """Perplexity under exact routing and under routing by (speculative / trained) pre-gate."""
    from .engine import Engine
    from .pregate import fit_window, perplexity

    with Engine(model, device=device, dtype=dtype, expert_memory=expert_memory, quiet=quiet) as eng:
        window = fit_window(window, 512, eng.cfg.max_position_embeddings)
        ids = eng.tokenizer.encode(text)[:max_tokens]
        rows = []
        configs = [("exact", "speculative"), ("pregate", "speculative")]
        if pregate:
            configs.append(("pregate", pregate))
        eng.moe.score_pregate = True
        for routing, pg in configs:
            eng.set_routing(routing, pregate=pg)
            eng.reset_stats()
            ppl = perplexity(eng, ids, window)
            s = eng.stats()
            rows.append({"routing": routing, "pregate": eng.pregate.kind, "perplexity": ppl,
                         **{k: s[k] for k in ("pregate_precision", "pregate_recall",
                                              "prefetch_precision", "prefetch_recall")}})
        return {"model": model, "tokens": len(ids), "window": window, "results": rows}


def evaluate_expert_dtypes(model: str, text: str, expert_dtypes, *, group_size=64, quantize="rtn",
                           window=None, max_tokens=None, device=None, dtype=None, expert_memory=None,
                           quiet=True) -> dict:
    """The quality cost of each quantized expert format against the unquantized experts."""
    from .modeling import summarize
    from .pregate import fit_window
    from .quality import expert_dtype_quality
    from .tokenizer import Tokenizer

    cfg = summarize(model, dtype)[1]
    window = fit_window(window, 512, cfg.max_position_embeddings)
    ids = Tokenizer(model).encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens")

    def progress(name):
        if not quiet:
            print(f"evaluating {name} experts", file=sys.stderr)

    rows = expert_dtype_quality(model, ids, expert_dtypes, window=window, group_size=group_size,
                                quantize=quantize, progress=progress, device=device, dtype=dtype,
                                expert_memory=expert_memory, quiet=quiet)
    return {"model": model, "tokens": len(ids), "window": window, "group_size": group_size,
            "quantize": quantize, "results": rows}


def format_quality(res: dict) -> str:
    lines = [f"{res['tokens']} tokens, windows of {res['window']}; group size {res['group_size']}, "
             f"{res['quantize']}; exact routing",
             f"{'experts':<8} {'bytes/expert':>12} {'perplexity':>10} {'vs model':>9} {'top-1 agree':>11} {'mean KL':>9}"]
    base = res["results"][0]["perplexity"]
    for r in res["results"]:
        lines.append(f"{r['expert_dtype']:<8} {_core.format_bytes(r['expert_bytes']):>12} {r['perplexity']:>10.3f} "
                     f"{r['perplexity'] / base - 1:>+9.2%} {r['top1_agreement']:>11.3f} {r['mean_kl']:>9.4f}")
    return "\n".join(lines)


def _write_json(path, res) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


def cmd_eval(args) -> int:
    if args.expert_dtype:
        if args.pregate:
            raise ValueError("--pregate and --expert-dtype measure different things: give one of them")
        res = evaluate_expert_dtypes(args.model, _read_text(args.data),
                                     [d for d in args.expert_dtype if d != "model"],
                                     group_size=args.group_size or _core.DEFAULT_GROUP_SIZE, quantize=args.quantize, window=args.window,
                                     max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                                     expert_memory=args.expert_memory, quiet=args.quiet)
        print(format_quality(res))
        _write_json(args.json, res)
        return 0
    res = evaluate(args.model, _read_text(args.data), pregate=args.pregate, window=args.window,
                   max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                   expert_memory=args.expert_memory, quiet=args.quiet)
    exact = res["results"][0]["perplexity"]
    print(f"{res['tokens']} tokens, windows of {res['window']}")
    print("per token: each token's predicted experts against its own routed experts (as `pregated "
          "calibrate` reports);\nper block: the experts predicted for a whole forward pass against those "
          "it routed (what a prefetch gets right)")
    print(f"{'routing':<8} {'pre-gate':<12} {'perplexity':>10} {'vs exact':>9} | {'per token':^17} | "
          f"{'per block':^17}\n{'':<42}| {'precision':>8} {'recall':>7} | {'precision':>8} {'recall':>7}")

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for r in res["results"]:
        print(f"{r['routing']:<8} {r['pregate']:<12} {r['perplexity']:>10.3f} {r['perplexity'] / exact - 1:>+9.2%} | "
              f"{f(r['pregate_precision']):>9} {f(r['pregate_recall']):>7} | "
              f"{f(r['prefetch_precision']):>9} {f(r['prefetch_recall']):>7}")
    _write_json(args.json, res)
    return 0
