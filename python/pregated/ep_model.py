"""An analytical model of expert parallelism: a decode step and a prefill step against the number
of ranks (`pregated bench --model-only --ranks 1,2,4,8`).

Per MoE block and rank, with N ranks, B tokens in the step, K experts per token, E experts per
layer, H hidden, an expert of X bytes:
  experts touched   U = E (1 - (1 - 1/E)^(B K)), a rank holds U / N of them (routing uniform)
  expert time       decode: U / N * X / HBM bandwidth (reading the weights bounds it);
                    prefill: 2 * 3 * B K H I / N / device FLOP rate (compute bounds it)
  host copies       a share (1 - hit rate) of the touched experts is copied over the host link
  all-to-all        every rank holds the step's B tokens (dense layers replicated or tensor-
                    parallel). Dropping the duplicates (DeepSpeed-TED, the default): each rank
                    sends its B / N tokens' K rows out and gets them back, the share (N - 1) / N
                    to other ranks: 2 (N - 1) / N * B / N * K * H * 2 bytes (bf16), then gathers
                    the other ranks' outputs, (N - 1) / N * B * H * 2 bytes. Without dropping:
                    every rank sends all B tokens' rows, 2 (N - 1) / N * B * K * H * 2 bytes, and
                    gathers nothing. At the interconnect's bandwidth, plus a latency per
                    collective: counts, rows (with their expert ids), outputs and the gather
                    (3 without).
  dense layers      replicated: their bytes / HBM bandwidth in decode (2 * B * params FLOPs in
                    prefill). Tensor-parallel: a 1 / N share of them, plus one all-reduce of the
                    attention's output per layer (ring: 2 (N - 1) / N * B * H * 2 bytes and 2
                    latencies).
The measured counterpart on the CPU (gloo) is tests/test_expert_parallel.py, which counts the
bytes each rank sends with and without dropping (every routed row crosses once out and once
back, as this model counts), and benchmarks/tools/ep_gloo.py, which also times them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    moe_layers: int
    dense_bytes: float  # attention, shared experts, embeddings (bf16)


@dataclass(frozen=True)
class Machine:
    name: str
    hbm_bytes_per_s: float
    flops: float              # dense bf16 FLOP/s one device reaches on large GEMMs
    link_bytes_per_s: float   # interconnect between ranks, per rank, each way
    link_latency_s: float
    h2d_bytes_per_s: float    # host -> device per rank


SHAPES = {
    "mixtral-8x7b": Shape(4096, 14336, 8, 2, 32, 1.6e9 * 2),
    "deepseek-v3": Shape(7168, 2048, 256, 8, 58, 14e9 * 2),
    "qwen3-30b-a3b": Shape(2048, 768, 128, 8, 48, 1.5e9 * 2),
}

MACHINES = {
    "8xH100-nvlink": Machine("8 GPUs on NVLink (H100, 450 GB/s per GPU)", 3.35e12, 600e12, 450e9, 5e-6, 55e9),
    "2-hosts-100gbe": Machine("2 hosts on 100 Gb/s Ethernet, one H100 each", 3.35e12, 600e12, 12.5e9, 30e-6, 55e9),
}


def all_to_all_bytes(tokens: int, ranks: int, top_k: int, hidden: int, elem: int = 2, drop: bool = True) -> float:
    """Bytes one rank sends in one MoE block's all-to-alls (rows out, outputs back) and gather."""
    N = ranks
    if N <= 1:
        return 0.0
    if not drop:
        return 2 * (N - 1) / N * tokens * top_k * hidden * elem
    return 2 * (N - 1) / N * (tokens / N) * top_k * hidden * elem + (N - 1) / N * tokens * hidden * elem


def collectives(drop: bool = True) -> int:
    """Collectives per MoE block: the counts', rows' (with their expert ids) and outputs'
    all-to-alls, and the gather of the slices when duplicates are dropped."""
    return 4 if drop else 3


def step_seconds(shape: Shape, machine: Machine, ranks: int, tokens: int, prefill: bool,
                 hit_rate: float = 1.0, tp: bool = False, drop: bool = True) -> dict:
    """Seconds of one step (all MoE blocks and the dense layers) and its parts."""
    E, K, H, I, N = shape.experts, shape.top_k, shape.hidden, shape.intermediate, ranks
    expert_bytes = 3 * H * I * 2
    touched = E * (1 - (1 - 1 / E) ** (tokens * K))
    if prefill:
        expert = 2 * 3 * tokens * K * H * I / N / machine.flops
    else:
        expert = touched / N * expert_bytes / machine.hbm_bytes_per_s
    copies = (1 - hit_rate) * touched / N * expert_bytes / machine.h2d_bytes_per_s
    a2a_bytes = all_to_all_bytes(tokens, N, K, H, drop=drop)
    a2a = a2a_bytes / machine.link_bytes_per_s + (collectives(drop) * machine.link_latency_s if N > 1 else 0.0)
    share = 1 / N if tp else 1.0
    dense = (shape.dense_bytes * share / machine.hbm_bytes_per_s if not prefill
             else 2 * tokens * shape.dense_bytes / 2 * share / machine.flops)
    reduce_bytes = 2 * (N - 1) / N * tokens * H * 2 if tp and N > 1 else 0.0
    reduce = reduce_bytes / machine.link_bytes_per_s + (2 * machine.link_latency_s if tp and N > 1 else 0.0)
    per_block = expert + copies + a2a + reduce
    total = shape.moe_layers * per_block + dense
    return {"step_s": total, "expert_s": shape.moe_layers * expert, "copy_s": shape.moe_layers * copies,
            "all_to_all_s": shape.moe_layers * a2a, "dense_s": dense, "all_reduce_s": shape.moe_layers * reduce,
            "all_to_all_bytes_per_rank": shape.moe_layers * a2a_bytes,
            "all_reduce_bytes_per_rank": shape.moe_layers * reduce_bytes,
            "tokens_per_s": tokens / total}


def table(model: str, ranks: list[int], batch: int = 1, prompt: int = 2048, hit_rate: float = 1.0) -> str:
    if model not in SHAPES:
        raise ValueError(f"--model-only knows the shapes {', '.join(SHAPES)}; got {model!r}")
    shape = SHAPES[model]
    rows = [f"{model}: decode at batch {batch}, prefill of {prompt} tokens, expert hit rate {hit_rate:.2f} "
            "(analytical, see pregated/ep_model.py)",
            f"{'machine':<16} {'ranks':>5} {'tp':>3} {'decode tok/s':>12} {'expert ms':>9} {'a2a ms':>7} "
            f"{'reduce ms':>9} {'dense ms':>8} {'a2a MiB/rank':>12} {'no-drop MiB':>11} {'prefill tok/s':>13}"]
    for key, m in MACHINES.items():
        for n in ranks:
            if key == "2-hosts-100gbe" and n > 2:
                continue
            for tp in ((False, True) if n > 1 else (False,)):
                d = step_seconds(shape, m, n, batch, False, hit_rate, tp=tp)
                p = step_seconds(shape, m, n, prompt, True, hit_rate, tp=tp)
                keep = step_seconds(shape, m, n, batch, False, hit_rate, tp=tp, drop=False)
                rows.append(f"{key:<16} {n:>5} {'on' if tp else 'off':>3} {d['tokens_per_s']:>12.1f} "
                            f"{d['expert_s'] * 1e3:>9.2f} {d['all_to_all_s'] * 1e3:>7.2f} "
                            f"{d['all_reduce_s'] * 1e3:>9.2f} {d['dense_s'] * 1e3:>8.2f} "
                            f"{d['all_to_all_bytes_per_rank'] / 2**20:>12.3f} "
                            f"{keep['all_to_all_bytes_per_rank'] / 2**20:>11.3f} {p['tokens_per_s']:>13.0f}")
    return "\n".join(rows)
