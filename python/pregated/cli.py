"""The `pregated` command line: demo, generate, info (and the benchmark and pre-gate tools)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from . import _core
from .cli_tools import add_quantization_args, add_tool_commands
from .expert_parallel import add_parallel_args

POLICY_HELP = ("how experts reach the device: gpu-only (all resident), on-demand (load after routing), "
               "prefetch-all (load all of block i+1 during block i), pregated (load the predicted experts "
               "of block i+1 during block i), hybrid (pregated, and an expert that is not on the device is "
               "copied or computed on the CPU where it lives, whichever is sooner; the most routed experts "
               "stay on the device); default: gpu-only when all experts fit in --expert-memory, else pregated")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when usable, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--policy", default=None, help=POLICY_HELP)
    p.add_argument("--expert-memory", default=None, metavar="BYTES",
                   help="device memory for expert slots, e.g. 8GiB or 512MB (default: every expert)")
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu", "none"],
                   help="expert cache eviction: lru, lfu, or none (a block's experts leave when it is done)")
    p.add_argument("--pregate", default=None, metavar="DIR",
                   help="trained pre-gate folder from `pregated calibrate` (default: speculative)")
    p.add_argument("--routing", default="exact", choices=["exact", "pregate"],
                   help="exact: each block routes with its own router (default); pregate: block i+1 "
                        "uses the experts the pre-gate chose at block i (the paper's algorithm)")
    add_quantization_args(p, many=False)
    p.add_argument("--hot-fraction", type=float, default=None, metavar="F",
                   help="policy hybrid: share of the expert slots kept for hot experts (default: all but "
                        "2 x experts-per-token slots)")
    p.add_argument("--lane-plan", default="auto", choices=["auto", "host", "copy", "alternate"],
                   help="policy hybrid: auto (the cost model chooses copy or CPU per expert; default), or "
                        "force every expert that is not on the device to the CPU (host), the link (copy), "
                        "or alternately (tests)")
    add_parallel_args(p)
    p.add_argument("--per-block", action="store_true", help="print statistics per MoE block")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"tokens to generate (default {max_new})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pregated",
        description="Run Mixture-of-Experts LLMs on one GPU smaller than the model: experts stay in host "
                    "memory and the ones the next block needs are copied to the GPU while the current "
                    "block computes.")
    parser.add_argument("--version", action="version", version=f"pregated {_core.build_info()['version']}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="build a small random Mixtral-style model once and generate from it",
                       description="Builds (once, in ~/.cache/pregated or $PREGATED_CACHE) a small "
                                   "Mixtral-style checkpoint with random weights and a locally trained "
                                   "tokenizer, then generates from it through the offloading path with "
                                   "a tight expert budget and prints what moved. The text is gibberish: "
                                   "the weights are random.")
    p.add_argument("--prompt", default="The pre-gate of block i guesses the experts of block i+1",
                   help="prompt text")
    _add_sampling_args(p, 48)
    _add_engine_args(p)
    p.add_argument("--rebuild", action="store_true", help="build the demo checkpoint again")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text from a model folder, streaming it",
                       description="Streams the answer to a prompt, then prints tokens/s and offload statistics.")
    p.add_argument("--model", required=True, help="model folder in Hugging Face layout")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _add_sampling_args(p, 128)
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)",
                       description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics with continuous batching: requests join the running decode batch "
                                   "at step boundaries and leave when done. Binds to 127.0.0.1 unless told "
                                   "otherwise.")
    p.add_argument("--model", required=True, help="model folder in Hugging Face layout")
    p.add_argument("--served-model-name", default=None, help="the model id clients ask for (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; more get 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens prefilled between two decode steps of the running batch (default 256)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="seconds a request may run before it is cut off (finish_reason length)")
    _add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="summarise a model folder: layers, experts, bytes, what fits",
                       description="Reads config.json and the checkpoint index (no weights are loaded).")
    p.add_argument("--model", required=True, help="model folder in Hugging Face layout")
    p.add_argument("--expert-memory", default=None, metavar="BYTES",
                   help="also say how many experts fit in this much device memory, e.g. 8GiB")
    p.add_argument("--hot-fraction", type=float, default=None, metavar="F",
                   help="with --expert-memory: the hybrid policy's share of slots for hot experts")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    add_quantization_args(p, many=False, method=False)
    p.set_defaults(func=cmd_info)

    add_tool_commands(sub)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """argparse takes '-5GiB' after an option for another option and stops with "expected one
    argument"; '--expert-memory=-5GiB' reaches the option's own check and its clear message."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-\.?\d", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError, TypeError) as e:
        print(f"pregated {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Tears down the torch.distributed group a command joined under torchrun (--expert-parallel)
    before the interpreter exits, instead of leaving it to the interpreter's teardown."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- commands ---------------------------------------------------------------------------

def _open_engine(args, folder: str):
    from .engine import Engine

    if getattr(args, "expert_parallel", False):
        from .expert_parallel import init_from_environment

        if init_from_environment(args.device) != 0:  # other ranks compute and stay quiet
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(os.devnull, "w")
    return Engine(folder, device=args.device, dtype=args.dtype, policy=args.policy,
                  expert_memory=args.expert_memory, eviction=args.eviction, pregate=args.pregate,
                  routing=args.routing, expert_dtype=args.expert_dtype, group_size=args.group_size,
                  quantize=args.quantize, hot_fraction=args.hot_fraction, lane_plan=args.lane_plan,
                  expert_parallel=getattr(args, "expert_parallel", False),
                  tensor_parallel=getattr(args, "tensor_parallel", False), quiet=args.quiet)


def _stream(engine, prompt, args) -> tuple[object, float]:
    t = time.perf_counter()
    stream = engine.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, stream=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    return stream.result, time.perf_counter() - t


def format_stats(stats: dict, expert_bytes: int) -> str:
    fb = _core.format_bytes
    tokens = max(stats["tokens"], 1)
    lines = [
        f"policy {stats['policy']}, expert memory {fb(stats['expert_memory'])} "
        f"({stats['expert_memory'] // expert_bytes} experts of {fb(expert_bytes)})",
        f"moved {fb(stats['bytes_h2d'])} host->device ({stats['bytes_h2d'] // expert_bytes} expert copies, "
        f"{fb(stats['bytes_h2d'] // tokens)} per generated token)",
        f"experts: {stats['expert_hits']} hits, {stats['expert_misses']} misses (demand loads), "
        f"{stats['evictions']} evictions",
    ]
    if stats["prefetch_issued"] or stats.get("prefetch_precision") is not None:
        line = f"prefetch: {stats['prefetch_issued']} issued, {stats['prefetch_used']} used, {stats['prefetch_dropped']} dropped"
        if stats.get("prefetch_precision") is not None:
            line += f"; pre-gate precision {stats['prefetch_precision']:.2f}, recall {stats['prefetch_recall']:.2f}"
        lines.append(line)
    lines.append(f"stalled {stats['stall_seconds'] * 1e3:.1f} ms waiting for copies")
    if stats["policy"] == "hybrid":
        lines.append(f"host lane: {stats['host_experts']} experts computed on the host ({fb(stats['host_bytes'])} "
                     f"not copied) in {stats['host_seconds'] * 1e3:.1f} ms, waited {stats['host_wait_seconds'] * 1e3:.1f} ms "
                     f"for it; {stats['hot_experts']} hot experts pinned")
    return "\n".join(lines)


def format_block_table(stats: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [f"{'block':>5} {'layer':>5} {'hits':>6} {'misses':>6} {'MiB in':>8} {'prefetch':>8} "
            f"{'used':>6} {'prec':>5} {'recall':>6} {'stall ms':>8} {'host':>5} {'host ms':>8}"]
    for m, b in enumerate(stats["layers"]):
        rows.append(f"{m:>5} {b['layer']:>5} {b['expert_hits']:>6} {b['expert_misses']:>6} "
                    f"{b['bytes_h2d'] / 2**20:>8.1f} {b['prefetch_issued']:>8} {b['prefetch_used']:>6} "
                    f"{f(b['prefetch_precision'], '.2f'):>5} {f(b['prefetch_recall'], '.2f'):>6} "
                    f"{b['stall_seconds'] * 1e3:>8.1f} {b['host_experts']:>5} {b['host_seconds'] * 1e3:>8.1f}")
    return "\n".join(rows)


def _report(engine, result, seconds: float, args) -> None:
    s = engine.stats()
    decode = s["decode_seconds"]
    n = len(result.token_ids)
    rate = f"{(n - 1) / decode:.1f} tokens/s decode" if decode > 0 and n > 1 else "n/a"
    print(f"\n{n} tokens in {seconds:.2f} s ({rate}; prefill {s['prefill_tokens']} tokens in "
          f"{s['prefill_seconds'] * 1e3:.0f} ms), finish: {result.finish_reason}", file=sys.stderr)
    print(format_stats(s, engine.cfg.expert_bytes()), file=sys.stderr)
    if engine.ep is not None:
        ep = engine.ep
        print(f"expert parallel: rank {ep.rank} of {ep.world} holds {ep.num_local} of {engine.cfg.num_experts} "
              f"experts per layer (the figures above are its own); it sent {_core.format_bytes(ep.bytes_sent)} of "
              "rows in the blocks' all-to-alls", file=sys.stderr)
    if args.per_block:
        print(format_block_table(s), file=sys.stderr)


def cmd_generate(args) -> int:
    with _open_engine(args, args.model) as engine:
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        result, seconds = _stream(engine, prompt, args)
        _report(engine, result, seconds, args)
    return 0


def cmd_demo(args) -> int:
    from .modeling import summarize
    from .demo import build_demo, demo_folder

    folder = demo_folder()
    t = time.perf_counter()
    build_demo(folder, force=args.rebuild)
    cfg = summarize(folder)[1]
    if args.expert_dtype:
        cfg.expert_format, cfg.group_size = args.expert_dtype, args.group_size or _core.DEFAULT_GROUP_SIZE
    one = cfg.expert_bytes()
    if args.expert_memory is None:  # a tight budget: 6 of the 32 experts
        args.expert_memory = 6 * one
    print(f"demo model: {folder} (ready in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    print(f"  Mixtral-style, random weights: {cfg.num_layers} layers x {cfg.num_experts} experts "
          f"(top-{cfg.top_k}), {_core.format_bytes(one)} per expert, "
          f"{_core.format_bytes(cfg.all_expert_bytes())} of experts in host memory", file=sys.stderr)
    with _open_engine(args, folder) as engine:
        print(f"  device {engine.device}, {engine.dtype}, policy {engine.policy}, expert memory "
              f"{_core.format_bytes(engine.expert_memory)} ({engine.expert_memory // one} of "
              f"{cfg.num_routed_experts} experts fit)\n", file=sys.stderr)
        print(args.prompt, end="", flush=True)
        result, seconds = _stream(engine, args.prompt, args)
        _report(engine, result, seconds, args)
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        raise RuntimeError(f"`pregated serve` needs FastAPI and uvicorn ({e}); install them with "
                           "pip install 'pregated[serve]' or pip install fastapi uvicorn") from None
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    with _open_engine(args, args.model) as engine:
        state = None
        if engine.ep is not None:  # rank 0 serves and sends each model operation to the other ranks
            import datetime

            import torch.distributed as dist

            from .serving import ReplicatedState, follow

            # the ranks wait on rank 0 for as long as the server is idle: a long timeout (a rank
            # that dies still fails the others at once: its connections close)
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))
            if engine.ep.rank != 0:
                follow(engine, group)
                return 0
            state = ReplicatedState(engine, group)
        app = create_app(engine, name, max_batch=args.max_batch, max_queue=args.max_queue,
                         prefill_chunk=args.prefill_chunk, api_key=args.api_key,
                         request_timeout=args.request_timeout, state=state)
        print(f"serving {name} on http://{args.host}:{args.port}/v1 (policy {engine.policy}, device {engine.device})",
              file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import Checkpoint
    from .config import checkpoint_dtype, dtype_from_name, read_hf_config
    from .loading import Loader
    from .modeling import build_model, describe
    from .moe import min_expert_memory, parse_expert_memory
    from .moe import hybrid_split
    from .quantize import BITS, resolve_expert_quantization

    hf_config = read_hf_config(args.model)
    dtype = dtype_from_name(args.dtype) if args.dtype else checkpoint_dtype(hf_config)
    model = build_model(hf_config, dtype)
    blocks, layout, cfg = describe(hf_config, model, dtype)
    ckpt = Checkpoint(args.model)
    Loader(model, ckpt, blocks, layout, dict(model.state_dict()))  # every expert is there
    shipped = ckpt.packed_experts()
    spec = resolve_expert_quantization(shipped, args.expert_dtype, args.group_size)
    group = args.group_size or _core.DEFAULT_GROUP_SIZE
    text = hf_config.get_text_config()
    packed = {}
    for name in BITS:
        cfg.expert_format, cfg.group_size = name, group
        packed[name] = cfg.expert_bytes()
    cfg.expert_format, cfg.group_size = (spec.name, spec.group_size) if spec else ("dense", _core.DEFAULT_GROUP_SIZE)
    one = cfg.expert_bytes()
    n_experts = cfg.num_routed_experts
    dense = cfg.dense_parameters * cfg.dtype.itemsize
    heads = getattr(text, "num_attention_heads", "?")
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if isinstance(heads, int) else "?")
    shared = getattr(text, "shared_expert_intermediate_size", None) or getattr(text, "n_shared_experts", None)
    fb = _core.format_bytes
    print(f"model        {args.model} ({cfg.model_type}, {cfg.dtype}; transformers' {type(model).__name__})")
    print(f"layers       {cfg.num_layers} decoder layers, {cfg.num_moe_layers} with MoE")
    print(f"attention    {heads} heads, {kv} key/value heads, head dim {head_dim}")
    print(f"experts      {cfg.num_experts} per MoE layer, {cfg.top_k} per token, hidden {cfg.hidden_size}, "
          f"intermediate {cfg.moe_intermediate_size}, {cfg.ffn}{' with biases' if cfg.has_bias else ''}"
          + (f", shared expert {shared}" if shared else ""))
    kind = f"{cfg.expert_format}, group {cfg.group_size}" if spec else str(cfg.dtype)
    if shipped:
        kind += f", packed in the checkpoint ({shipped.method})"
    print(f"bytes        {fb(one)} per expert ({kind}), {fb(cfg.all_expert_bytes())} all experts, "
          f"{fb(dense)} dense (on the device)")
    print(f"quantized    per expert with --expert-dtype, group {group}: "
          + ", ".join(f"{name} {fb(b)}" for name, b in packed.items()))
    minimum = {p: fb(min_expert_memory(p, cfg)) for p in ("hybrid", "on-demand", "pregated", "gpu-only")}
    print(f"minimum      hybrid {minimum['hybrid']}, on-demand {minimum['on-demand']}, pregated / prefetch-all "
          f"{minimum['pregated']}, gpu-only {minimum['gpu-only']} of expert memory")
    if args.expert_memory:
        budget = parse_expert_memory(args.expert_memory)
        fit = min(budget // one, n_experts)
        print(f"fits         {fit} of {n_experts} experts ({100 * fit / n_experts:.0f}%) in {fb(budget)}")
        if fit >= 1:
            hot, working = hybrid_split(cfg, budget, args.hot_fraction)
            print(f"hybrid       {hot} slots for hot experts (pinned while routed often), {working} for copies "
                  f"and prefetches; experts without a slot are copied or computed on the host lane")
    return 0


if __name__ == "__main__":
    sys.exit(main())
