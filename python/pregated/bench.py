"""`pregated bench`: every policy and budget side by side, against GPU-only, HF accelerate
offloading and the physical limit of the host-to-device link, in one run on one machine.

Efficiency against the physical limit: achieved decode tokens/s divided by
min(GPU-only tokens/s of the same run, bandwidth / missed expert bytes per decode token), where
the missed bytes are those copied plus (policy hybrid) those the host lane read in place, and the
bandwidth is the link's plus (hybrid) the host memory's: both lanes stream experts at once.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from . import _core
from .config import dtype_name
from .expert_parallel import add_parallel_args

FIELDS = ("model", "layers", "policy", "baseline", "expert_dtype", "expert_memory_bytes", "expert_bytes_total",
          "experts_resident", "batch",
          "prompt_len", "new_tokens", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s",
          "peak_device_bytes", "bytes_h2d_per_token", "hit_rate", "prefetch_precision", "prefetch_recall",
          "stall_s_per_token", "host_bytes_per_token", "efficiency")
POLICY_ORDER = ("gpu-only", "on-demand", "prefetch-all", "pregated", "hybrid")


def add_bench_command(sub, add_quantization_args) -> None:
    p = sub.add_parser("bench", help="benchmark policies and budgets (and HF baselines) on one machine",
                       description="Runs every --policy under every --expert-memory on a model folder or a "
                                   "synthetic model, plus GPU-only when it fits and the HF baselines asked "
                                   "for; prints a table, writes JSON (every figure and the machine) and a "
                                   "PNG plot.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder in Hugging Face layout")
    src.add_argument("--synthetic", help="shapes of a real model with random weights: "
                                         "mixtral-8x7b, qwen3-30b-a3b, olmoe-1b-7b, qwen1.5-moe-a2.7b, tiny")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (synthetic)")
    p.add_argument("--policy", default="on-demand,prefetch-all,pregated",
                   help="comma-separated policies (gpu-only is added when the model fits)")
    p.add_argument("--expert-memory", default="10%,25%,50%",
                   help="comma-separated budgets: N%% of all expert bytes, or bytes like 8GiB")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--baseline", action="append", default=[], choices=["hf", "hf-accelerate", "hf-gpu"],
                   help="also run transformers on the same checkpoint and prompts: the whole model on the "
                        "bench's device (hf; hf-gpu is the same on a GPU), or device_map='auto' with the "
                        "same device budget (hf-accelerate); repeatable")
    p.add_argument("--baseline-tokens", type=int, default=None,
                   help="tokens per prompt for the HF baselines (default: --new-tokens; offloaded HF runs are slow)")
    p.add_argument("--no-gpu-only", action="store_true", help="skip the gpu-only run")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole plan N times in rounds (every row, baselines included, once per round) and "
                        "report each row's median decode round, with every round's figure in the JSON: on a shared, "
                        "noisy machine the rows of one round see the same conditions")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu", "none"])
    add_quantization_args(p, many=True, help="expert dtypes to run, one after the other: model (the checkpoint's "
                          "or --dtype), int8, int4, int3, int2 (default: model); --expert-memory percentages "
                          "are of the model's own expert bytes, so every dtype gets the same device memory")
    p.add_argument("--save", default=None, metavar="DIR", help="write the synthetic model as a HF checkpoint")
    p.add_argument("--out", default="bench.json", help="JSON results file (default bench.json)")
    p.add_argument("--plot", default=None, help="PNG plot file (default: --out with .png)")
    p.add_argument("--timeline", action="store_true",
                   help="also record a timeline of one pregated decode step at the smallest budget")
    p.add_argument("--model-only", action="store_true",
                   help="print the analytical model of expert parallelism for --synthetic's shape (mixtral-8x7b, "
                        "qwen3-30b-a3b, deepseek-v3) over --ranks on NVLink and Ethernet machines; runs nothing")
    p.add_argument("--ranks", default="1,2,4,8", help="with --model-only: comma-separated rank counts")
    add_parallel_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    p.set_defaults(func=cmd_bench)


# --- machine ------------------------------------------------------------------------------

def measure_h2d_gbps(device: str, nbytes: int = 256 << 20) -> float:
    """Pinned host -> device copy bandwidth (best of 5); on the CPU, a host memcpy."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        return nbytes / best / 1e9
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def measure_host_read_gbps(nbytes: int = 1 << 30) -> float:
    """Host memory read bandwidth: the best of 5 reads of a buffer larger than the caches (1 GiB),
    on every core of the CPU backend's pool, as our kernels read weights. torch.sum, used before,
    read 22-24 GB/s on a machine where our bf16 kernel streamed experts at 28."""
    gbps = _core.cpu_read_gbps(nbytes)
    if gbps > 0:
        return gbps
    buf = torch.ones(nbytes // 4, dtype=torch.float32)  # the probe could not allocate: torch's sum
    buf.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"gpu": None, "driver": None, "cuda": torch.version.cuda, "torch": torch.__version__,
            "cpu": f"{cpu} ({os.cpu_count()} cores)",
            "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "h2d_gbps": measure_h2d_gbps(device), "host_read_gbps": measure_host_read_gbps(), "device": device, "pregated": _core.build_info()["version"]}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return info


# --- one configuration --------------------------------------------------------------------

def parse_budgets(text: str, total: int) -> list[int]:
    from .moe import parse_expert_memory

    out = []
    for item in text.split(","):
        item = item.strip()
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                pct = -1.0
            if not 0 < pct <= 100:
                raise ValueError(f"--expert-memory: {item!r} is not a percentage in (0, 100]")
            out.append(int(total * pct / 100))
        elif item:
            out.append(parse_expert_memory(item))
    return out


def _prompts(cfg, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (batch, length), generator=g).tolist()


def _peak(engine) -> int:
    if engine.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(engine.device) + engine.expert_memory
    return engine.dense_bytes + engine.expert_memory  # the CPU backend's "device" is host memory: an estimate


def run_engine(engine, prompts, new_tokens: int) -> dict:
    """One timed generation after a warm-up; decode figures exclude the prefill."""
    batch_or_one = prompts if len(prompts) > 1 else prompts[0]
    # Warm-up with the timed run's shapes: kernels, allocator blocks, cuBLAS heuristics, loads.
    engine.generate(batch_or_one, max_new_tokens=2)
    engine.reset_stats()
    if engine.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(engine.device)
    engine.generate(batch_or_one, max_new_tokens=new_tokens)
    s = engine.stats()
    pre = engine.last_prefill_stats
    batch = len(prompts)
    decode_tokens = batch * (new_tokens - 1)  # forward passes after the prefill's token
    dec = {k: s[k] - pre[k] for k in ("bytes_h2d", "expert_hits", "expert_misses", "stall_seconds",
                                      "host_experts", "host_bytes", "host_seconds", "store_reads", "store_read_bytes")}
    used = dec["expert_hits"] + dec["expert_misses"]
    peak = _peak(engine)
    # The same decode without the graph step, and on the planned path, for the record.
    eager = (_rerun_decode(engine, engine, "graph_mode", None, batch_or_one, new_tokens, decode_tokens)
             if s["graph_steps"] > 0 else None)
    planned = (_rerun_decode(engine, engine.moe, "device_path", False, batch_or_one, new_tokens, decode_tokens)
               if s["device_forwards"] > 0 and engine.device.startswith("cuda") else None)
    return {
        "decode_tokens_per_s": decode_tokens / s["decode_seconds"] if s["decode_seconds"] > 0 else None,
        "prefill_tokens_per_s": s["prefill_tokens"] / s["prefill_seconds"] if s["prefill_seconds"] > 0 else None,
        "ttft_s": s["prefill_seconds"],
        "peak_device_bytes": peak,
        "bytes_h2d_per_token": dec["bytes_h2d"] / decode_tokens,
        "bytes_h2d_decode": dec["bytes_h2d"],
        "bytes_h2d_prefill": pre["bytes_h2d"],
        "decode_tokens": decode_tokens,
        # decode steps replayed from a CUDA graph (graph_step.py: gpu-only on a GPU), of decode_tokens / batch
        "graph_steps": s["graph_steps"],
        # host time to hand a graph step to the device (the replay's launch), per step and per MoE block
        "graph_host_s_per_step": s["graph_host_seconds"] / s["graph_steps"] if s["graph_steps"] else None,
        "graph_host_s_per_block": (s["graph_host_seconds"] / s["graph_steps"] / engine.cfg.num_moe_layers
                                   if s["graph_steps"] else None),
        "decode_tokens_per_s_without_graphs": eager,
        # the device path (offloading policies' decode blocks on a GPU: routing kept on the device,
        # experts in no slot read in place, the routing learnt one step behind): its blocks, the
        # expert bytes it read in place over the link, and the same decode on the planned path
        "device_forwards": s["device_forwards"],
        "store_reads_per_token": dec["store_reads"] / decode_tokens,
        "store_read_bytes_per_token": dec["store_read_bytes"] / decode_tokens,
        "decode_tokens_per_s_without_device_path": planned,
        # the resident path (gpu-only) counts no lookups: every expert is in a slot by construction
        "hit_rate": dec["expert_hits"] / used if used else (1.0 if s.get("resident_forwards") else None),
        "prefetch_precision": s["prefetch_precision"],
        "prefetch_recall": s["prefetch_recall"],
        "stall_s_per_token": dec["stall_seconds"] / decode_tokens,
        "prefetch_issued": s["prefetch_issued"],
        "prefetch_used": s["prefetch_used"],
        # the host lane (policy hybrid): experts computed where they live instead of copied
        "host_bytes_per_token": dec["host_bytes"] / decode_tokens,
        "host_experts_per_token": dec["host_experts"] / decode_tokens,
        "host_s_per_token": dec["host_seconds"] / decode_tokens,
    }


def _rerun_decode(engine, owner, switch: str, value, batch_or_one, new_tokens: int, decode_tokens: int):
    """Decode tokens/s of the same generation with owner.switch set to `value` (then restored)."""
    saved = getattr(owner, switch)
    setattr(owner, switch, value)
    try:
        engine.reset_stats()
        engine.generate(batch_or_one, max_new_tokens=new_tokens)
        e = engine.stats()
        return decode_tokens / e["decode_seconds"] if e["decode_seconds"] > 0 else None
    finally:
        setattr(owner, switch, saved)


def run_hf(folder: str, baseline: str, device: str, dtype, budget_bytes, prompts, new_tokens: int) -> dict:
    """transformers on the same checkpoint and prompts: device_map='auto' with max_memory set to
    the device budget (hf-accelerate), or everything on the device (hf-gpu)."""
    from transformers import AutoModelForCausalLM

    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        if baseline in ("hf", "hf-gpu"):
            kw = {"device_map": {"": idx}}
        else:
            kw = {"device_map": "auto", "max_memory": {idx: int(budget_bytes), "cpu": 10**13}}
        torch.cuda.reset_peak_memory_stats(device)
    else:
        kw = {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()
    ids = torch.tensor(prompts, device=device)  # accelerate moves offloaded weights, not inputs

    def timed(n):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    timed(2)  # warm-up
    ttft = timed(1)
    total = timed(new_tokens)
    batch = len(prompts)
    out = {
        "decode_tokens_per_s": batch * (new_tokens - 1) / max(total - ttft, 1e-9),
        "prefill_tokens_per_s": batch * len(prompts[0]) / ttft,
        "ttft_s": ttft,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
        "bytes_h2d_per_token": None, "hit_rate": None, "prefetch_precision": None, "prefetch_recall": None,
        "stall_s_per_token": None, "host_bytes_per_token": None,
    }
    model = None  # free the weights before the next run (the closure above holds the name)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def efficiency(run: dict, gpu_only_tps: float | None, h2d_gbps: float,
               host_gbps: float = 0.0) -> tuple[float | None, float | None]:
    """(achieved / limit, limit tokens/s); limit = min(GPU-only rate, bandwidth / missed expert
    bytes per token): the link alone, or under hybrid the link plus the host lane reading host
    memory, for the bytes copied plus the bytes read in place."""
    tps, per_token = run.get("decode_tokens_per_s"), run.get("bytes_h2d_per_token")
    if tps is None or per_token is None:
        return None, None
    per_token += run.get("store_read_bytes_per_token") or 0.0  # read in place: over the link too
    bandwidth = h2d_gbps
    if run.get("policy") == "hybrid":
        per_token += run.get("host_bytes_per_token") or 0.0
        bandwidth += host_gbps
    limits = []
    if gpu_only_tps:
        limits.append(gpu_only_tps)
    if per_token > 0:
        limits.append(bandwidth * 1e9 / per_token)
    if not limits:
        return None, None
    limit = min(limits)
    return min(1.0, tps / limit), limit  # above 1 only through timing noise


# --- the whole run ------------------------------------------------------------------------

def _check_baseline_packages(baselines: list[str], device: str) -> None:
    """The HF baselines run transformers (and accelerate, for device_map='auto' on a GPU)."""
    need = ["transformers"] if baselines else []
    if "hf-accelerate" in baselines and device.startswith("cuda"):
        need.append("accelerate")
    missing = []
    for module in need:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(f"--baseline {' and '.join(sorted(set(baselines)))} needs {' and '.join(missing)}, "
                           f"which is not installed: pip install {' '.join(missing)}")


def _check_footprint(args, cfg, device: str) -> None:
    """Refuses, before anything is allocated, a run whose memory the machine does not have.
    gpu-only is left out: it runs only when it fits once the rest is loaded (_fits_on_device)."""
    from .footprint import bench_footprint, check_fits
    from .synthetic import SHAPES, SyntheticModel

    def footprint(c):  # percentages of each candidate's own expert bytes
        slab = min(max(parse_budgets(args.expert_memory, c.all_expert_bytes()), default=0), c.all_expert_bytes())
        return bench_footprint(c, device, slab, args.baseline)

    fp = footprint(cfg)
    if _fits(fp, device):
        return
    advice = "use a smaller model, fewer baselines or smaller --expert-memory budgets"
    if args.synthetic:
        names = ", ".join(n for n in SHAPES if n != args.synthetic)
        fitting = next((n for n in range(cfg.num_layers - 1, 0, -1)
                        if _fits(footprint(SyntheticModel(args.synthetic, layers=n, dtype=dtype_name(cfg.dtype)).config),
                                 device)), None)
        advice = (f"pass --layers {fitting} or fewer" if fitting else "no number of layers fits") + \
            f", or a smaller model ({names})"
    check_fits(fp, device, advice)


def _fits(fp, device: str) -> bool:
    from .footprint import check_fits

    try:
        check_fits(fp, device, "")
        return True
    except MemoryError:
        return False


def _fits_on_device(engine, total: int) -> bool:
    if not engine.device.startswith("cuda"):
        from .footprint import SLACK, available_host_bytes

        return total * SLACK < available_host_bytes()  # the expert store is already allocated
    free, _ = torch.cuda.mem_get_info(engine.device)
    return total + engine.expert_memory < 0.85 * free  # the current slab is given back first


def run_bench(args, log=print) -> dict:
    from tqdm.auto import tqdm

    from .engine import Engine, _resolve_device
    from .moe import POLICIES, min_expert_memory
    from .quantize import expert_quantization
    from .synthetic import SyntheticModel

    device = _resolve_device(args.device)
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: give at least one round")
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy '{p}' in --policy: choose from {', '.join(POLICIES)}")
    if args.batch < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        raise ValueError("--batch and --prompt-len must be >= 1 and --new-tokens >= 2")
    _check_baseline_packages(args.baseline, device)
    t0 = time.perf_counter()
    source = SyntheticModel(args.synthetic, layers=args.layers, dtype=args.dtype or "bfloat16") if args.synthetic else args.model
    name = args.synthetic or os.path.basename(os.path.normpath(args.model))
    if args.synthetic:
        cfg0 = source.config
    else:
        from .modeling import summarize
        cfg0 = summarize(args.model, args.dtype)[1]
    formats = list(dict.fromkeys(args.expert_dtype or ["model"]))
    for fmt in formats:
        if fmt != "model":
            expert_quantization(fmt, args.group_size, args.quantize)  # a bad group size fails here, not later
    # Budgets in % are of the model's own (unquantized) expert bytes, so rows of different expert
    # dtypes at the same % have the same device memory.
    model_total = cfg0.all_expert_bytes()
    budgets = parse_budgets(args.expert_memory, model_total)
    _check_footprint(args, cfg0, device)
    machine = machine_info(device)
    log(f"machine: {machine['gpu'] or machine['cpu']}, h2d {machine['h2d_gbps']:.1f} GB/s, "
        f"host memory {machine['host_read_gbps']:.1f} GB/s")

    def bench_format(fmt: str, baselines: list[str], saved: list):
        """Every planned run with the experts in `fmt` ("model": the model's dtype)."""
        # Open with the smallest slab; it is resized for each configuration.
        engine = Engine(source, device=device, dtype=args.dtype, policy="on-demand",
                        expert_memory=min_expert_memory("on-demand", cfg0), eviction=args.eviction,
                        expert_dtype=None if fmt == "model" else fmt, group_size=args.group_size,
                        quantize=args.quantize, expert_parallel=args.expert_parallel,
                        tensor_parallel=args.tensor_parallel, quiet=args.quiet)
        cfg, mine = engine.cfg, engine.rank_cfg  # the whole model; this rank's share of the experts
        one, total = cfg.expert_bytes(), mine.all_expert_bytes()
        share = total / cfg.all_expert_bytes()  # budgets in % are of this rank's share
        log(f"model: {name}, {cfg.num_layers} layers, {cfg.num_experts} experts x {_core.format_bytes(one)} = "
            f"{_core.format_bytes(cfg.all_expert_bytes())} of experts (ready in {time.perf_counter() - t0:.1f} s)"
            + (f"; expert parallel over {engine.ep.world} ranks, this one holds {mine.num_experts} per layer"
               if engine.ep else ""))
        prompts = _prompts(cfg, args.batch, args.prompt_len)
        plan = []
        if not args.no_gpu_only:
            plan.append(("gpu-only", total))
        plan += [(p, min(int(b * share), total)) for b in budgets for p in policies if p != "gpu-only"]
        plan += [(bl, b) for bl in baselines for b in (budgets if bl == "hf-accelerate" else [total])]
        rounds, gpu_only_tps, timeline = [[] for _ in plan], None, None
        steps = [(r, i) for r in range(args.repeat) for i in range(len(plan))]
        try:
            for rnd, idx in tqdm(steps, desc="bench", disable=args.quiet or not sys.stderr.isatty(), leave=False):
                policy, budget = plan[idx]
                base = {"model": name, "layers": cfg.num_layers, "policy": None, "baseline": None,
                        "expert_dtype": cfg.expert_format if cfg.expert_format != "dense" else dtype_name(cfg.dtype),
                        "expert_memory_bytes": budget, "experts_resident": None, "expert_bytes_total": total,
                        "expert_memory_fraction": budget / (model_total * share), "batch": args.batch,
                        "prompt_len": args.prompt_len, "ranks": engine.ep.world if engine.ep else 1,
                        "tensor_parallel": bool(engine.tp),
                        "new_tokens": args.new_tokens, "eviction": args.eviction, "efficiency": None}
                try:
                    if policy in ("hf", "hf-gpu", "hf-accelerate"):
                        base["baseline"] = policy
                        base["expert_dtype"] = dtype_name(cfg.dtype)  # transformers runs the checkpoint's experts
                        if saved[0] is None:
                            saved[0] = args.save or args.model or tempfile.mkdtemp(prefix="pregated-bench-")
                            if args.synthetic and not os.path.isfile(os.path.join(saved[0], "config.json")):
                                log(f"writing the synthetic checkpoint to {saved[0]} for the HF baselines")
                                source.save(saved[0], dtype=engine.dtype)
                        if policy in ("hf", "hf-gpu") and not _fits_on_device(engine, total):
                            raise RuntimeError("the model does not fit on the device")
                        n = args.baseline_tokens or args.new_tokens
                        base["new_tokens"] = n
                        base.update(run_hf(saved[0], policy, device, engine.dtype, engine.dense_bytes + budget, prompts, n))
                    else:
                        base["policy"] = policy
                        if policy == "gpu-only" and not _fits_on_device(engine, total):
                            raise RuntimeError("the experts do not fit on the device")
                        ev = "lru" if policy == "gpu-only" and args.eviction == "none" else args.eviction
                        minimum = min_expert_memory(policy, mine)
                        if policy != "gpu-only" and budget < minimum:  # the table marks the row
                            base["expert_memory_requested"] = budget
                            budget = base["expert_memory_bytes"] = minimum
                            base["expert_memory_fraction"] = budget / (model_total * share)
                        engine.reconfigure(policy=policy, expert_memory=budget, eviction=ev)
                        base["experts_resident"] = min(engine.runtime.num_slots, mine.num_routed_experts)
                        base.update(run_engine(engine, prompts, args.new_tokens))
                        if args.timeline and policy == "pregated" and timeline is None:
                            timeline = {"model": name, "policy": policy, "expert_memory_bytes": budget,
                                        "events": engine.trace_decode_step(prompts[0], warmup_tokens=3)}
                            timeline["summary"] = timeline_summary(timeline["events"], cfg.num_moe_layers)
                            timeline.update(host_times(timeline["events"]))
                            log(f"timeline: host {timeline['block_host_s_median'] * 1e6:.0f} us per MoE block (median), "
                                f"{timeline['step_host_s'] * 1e3:.2f} ms per decode step"
                                + (" (the CPU backend computes in the host thread)" if device == "cpu" else ""))
                except (RuntimeError, ValueError, MemoryError) as e:
                    base["error"] = str(e)
                    log(f"{policy} at {_core.format_bytes(budget)}: skipped: {e}")
                rounds[idx].append(base)
        finally:  # also on Ctrl-C and unexpected errors: no device memory held
            engine.close()
        runs = [median_round(got) for got in rounds]
        gpu_only_tps = next((r["decode_tokens_per_s"] for r in runs if r["policy"] == "gpu-only" and not r.get("error")),
                            None)
        for r in runs:
            if r.get("policy") and not r.get("error"):
                r["efficiency"], r["limit_tokens_per_s"] = efficiency(r, gpu_only_tps, machine["h2d_gbps"],
                                                                      machine["host_read_gbps"])
        return runs, timeline

    runs, timeline, saved = [], None, [None]
    try:
        for i, fmt in enumerate(formats):
            got, tl = bench_format(fmt, args.baseline if i == 0 else [], saved)
            runs += got
            timeline = timeline or tl
    finally:  # no checkpoint left behind, also on Ctrl-C
        if saved[0] and not args.save and not args.model:
            shutil.rmtree(saved[0], ignore_errors=True)
    result = {"machine": machine, "command": shlex.join(["pregated"] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "runs": runs}
    if timeline is not None:
        result["timeline"] = timeline
    return result


def median_round(got: list[dict]) -> dict:
    """One row's rounds: the round with the median decode rate (the lower of the middle two),
    carrying every round's decode and prefill rates; an error in any round is the row's."""
    failed = [r for r in got if r.get("error")]
    if failed or len(got) == 1:
        return failed[0] if failed else got[0]
    ranked = sorted(got, key=lambda r: r["decode_tokens_per_s"] or 0.0)
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["rounds"] = len(got)
    row["decode_tokens_per_s_rounds"] = [r["decode_tokens_per_s"] for r in got]
    row["prefill_tokens_per_s_rounds"] = [r["prefill_tokens_per_s"] for r in got]
    return row


def timeline_summary(events: list[dict], num_blocks: int) -> list[dict]:
    """Per block m: when its GEMMs ran, how much of block m+1's copying ran meanwhile, the
    device time of its GEMMs and the host thread's time in its experts call."""
    out = []
    for m in range(num_blocks):
        comp = [e for e in events if e["kind"] == "compute" and e["layer"] == m]
        if not comp:
            continue
        a, b = min(e["start_s"] for e in comp), max(e["end_s"] for e in comp)
        nxt = [e for e in events if e["kind"] == "copy" and e["layer"] == m + 1]
        during = sum(max(0.0, min(b, e["end_s"]) - max(a, e["start_s"])) for e in nxt)
        host = [e["end_s"] - e["start_s"] for e in events if e["kind"] == "host" and e["layer"] == m]
        out.append({"block": m, "compute_start_s": a, "compute_end_s": b,
                    "compute_s": sum(e["end_s"] - e["start_s"] for e in comp),
                    "host_s": host[0] if host else None,
                    "next_block_copies": len(nxt),
                    "next_block_copy_s": sum(e["end_s"] - e["start_s"] for e in nxt),
                    "next_block_copy_during_compute_s": during})
    return out


def host_times(events: list[dict]) -> dict:
    """Host time of the traced step and per MoE block (median), in seconds."""
    import statistics

    blocks = [e["end_s"] - e["start_s"] for e in events if e["kind"] == "host" and e["layer"] >= 0]
    step = [e["end_s"] - e["start_s"] for e in events if e["kind"] == "host" and e["layer"] == -1]
    return {"step_host_s": step[0] if step else None,
            "block_host_s_median": statistics.median(blocks) if blocks else None}


def _fmt(v, spec, scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def format_table(result: dict) -> str:
    rows = [f"{'model':<16} {'policy':<14} {'experts':<8} {'budget':>10} {'%':>5} {'fit':>5} {'decode t/s':>10} {'prefill t/s':>11} "
            f"{'TTFT ms':>8} {'MiB/tok':>8} {'host MiB/t':>10} {'hit':>5} {'prec':>5} {'recall':>6} {'stall ms/t':>10} "
            f"{'eff':>5} {'peak GiB':>8}"]
    for r in result["runs"]:
        label = r["baseline"] or r["policy"]
        raised = "expert_memory_requested" in r
        head = (f"{r['model'][:16]:<16} {label:<14} {r.get('expert_dtype') or '-':<8} "
                f"{_core.format_bytes(r['expert_memory_bytes']):>10} "
                f"{100 * r['expert_memory_fraction']:>4.0f}{'*' if raised else ' '} {_fmt(r.get('experts_resident'), '.0f'):>5} ")
        if r.get("error"):
            rows.append(head + f"skipped: {r['error']}")
            continue
        rows.append(head + f"{_fmt(r['decode_tokens_per_s'], '.1f'):>10} {_fmt(r['prefill_tokens_per_s'], '.0f'):>11} "
                    f"{_fmt(r['ttft_s'], '.1f', 1e3):>8} {_fmt(r['bytes_h2d_per_token'], '.1f', 2**-20):>8} "
                    f"{_fmt(r.get('host_bytes_per_token') if r.get('policy') == 'hybrid' else None, '.1f', 2**-20):>10} "
                    f"{_fmt(r['hit_rate'], '.2f'):>5} {_fmt(r['prefetch_precision'], '.2f'):>5} "
                    f"{_fmt(r['prefetch_recall'], '.2f'):>6} {_fmt(r['stall_s_per_token'], '.2f', 1e3):>10} "
                    f"{_fmt(r['efficiency'], '.2f'):>5} {_fmt(r['peak_device_bytes'], '.2f', 2**-30):>8}")
    raised = [r for r in result["runs"] if "expert_memory_requested" in r]
    if raised:
        asked = sorted({f"{100 * r['expert_memory_requested'] * r['expert_memory_fraction'] / r['expert_memory_bytes']:.0f}%"
                        for r in raised})
        rows.append(f"* budget raised to the policy's minimum (asked: {', '.join(asked)} of the expert bytes); "
                    "budget and % are what the run used")
    m = result["machine"]
    rows.append(f"machine: {m['gpu'] or m['cpu']}; torch {m['torch']}, CUDA {m['cuda']}, driver {m['driver']}; "
                f"pinned h2d {m['h2d_gbps']:.1f} GB/s"
                + (f", host memory {m['host_read_gbps']:.1f} GB/s" if m.get("host_read_gbps") else ""))
    return "\n".join(rows)


def plot(results: list[dict], path: str) -> None:
    """Decode tokens/s and peak device memory per policy against the expert budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for res in results for r in res["runs"] if not r.get("error")]
    models = list(dict.fromkeys((r["model"], r["layers"]) for r in runs))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for j, (model, layers) in enumerate(models):
        mine = [r for r in runs if (r["model"], r["layers"]) == (model, layers)]
        for label in list(POLICY_ORDER) + ["hf", "hf-accelerate", "hf-gpu"]:
            pts = sorted((100 * r["expert_memory_fraction"], r["decode_tokens_per_s"], r["peak_device_bytes"])
                         for r in mine if (r["baseline"] or r["policy"]) == label and r["decode_tokens_per_s"])
            if not pts:
                continue
            x, tps, mem = zip(*pts)
            style = "o--" if label.startswith("hf") else "o-"
            axes[0][j].plot(x, tps, style, label=label)
            axes[1][j].plot(x, [v / 2**30 if v else float("nan") for v in mem], style, label=label)
        axes[0][j].set_title(f"{model} ({layers} layers)")
        axes[0][j].set_ylabel("decode tokens/s")
        axes[1][j].set_ylabel("peak device memory (GiB)")
        axes[1][j].set_xlabel("expert memory (% of all expert bytes)")
        axes[0][j].set_yscale("log")
        axes[0][j].legend(fontsize=7)
    m = results[0]["machine"]
    fig.suptitle(f"pregated bench on {m['gpu'] or m['cpu']} (h2d {m['h2d_gbps']:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_bench(args) -> int:
    if args.model_only:
        from .ep_model import table

        if not args.synthetic:
            raise ValueError("--model-only takes a shape: --synthetic mixtral-8x7b | qwen3-30b-a3b | deepseek-v3")
        try:
            ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
        if not ranks or min(ranks) < 1:
            raise ValueError(f"--ranks must be integers >= 1, got {args.ranks!r}")
        print(table(args.synthetic, ranks, batch=args.batch))
        return 0
    if args.expert_parallel and args.baseline:
        raise ValueError("--baseline runs transformers in one process: leave it out under --expert-parallel "
                         "(run the baselines without torchrun)")
    if args.tensor_parallel and not args.expert_parallel:
        raise ValueError("--tensor-parallel splits attention over the expert-parallel ranks: add --expert-parallel "
                         "(under torchrun)")
    if args.expert_parallel:
        from .expert_parallel import init_from_environment

        if init_from_environment(args.device) != 0:  # every rank runs the plan; rank 0 reports
            run_bench(args, log=lambda msg: None)
            return 0
    result = run_bench(args, log=lambda msg: print(msg, file=sys.stderr))
    print(format_table(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    png = args.plot or os.path.splitext(args.out)[0] + ".png"
    try:
        plot([result], png)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        png = None
    print(f"wrote {args.out}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0
