"""The host lane's expert FFN against the machine's host memory bandwidth (issue 15: at least
0.7x for bf16 and int4 experts at T = 1..8).

python benchmarks/tools/host_lane.py [--hidden 4096 --intermediate 14336] [--formats bfloat16,int4]
                                     [--rows 1,2,4,8] [--group-size 64]
                                     [--out host_lane.json]

A one-layer runtime with one slot and the host lane forced (plan host): every expert runs on the
host lane, read where it lives in the expert store. Experts rotate so none is in the caches. The
lane's busy time per block gives expert bytes per second, set against the host memory read
bandwidth measured the way `pregated bench` measures it, and (bf16: the kernels widen to fp32
and use fp32 FMAs) against the compute roof of T rows: the machine's fp32 matmul rate / T
weights per second, 2 bytes each. Run it on an otherwise idle machine.
"""

import argparse
import json
import statistics
import time

import torch

from pregated import _core
from pregated.bench import machine_info
from pregated.quantize import expert_quantization, store_writer


def lane_runtime(fmt: str, hidden: int, inter: int, experts: int, threads: int, group: int):
    one = _core.expert_bytes(hidden, inter, dtype="bfloat16", expert_format="dense" if fmt == "bfloat16" else fmt,
                             group_size=group)
    rt = _core.Runtime(1, experts, hidden, inter, dtype="bfloat16", device="cpu", expert_memory=one,
                       expert_format="dense" if fmt == "bfloat16" else fmt, group_size=group)
    write = store_writer(rt, None if fmt == "bfloat16" else expert_quantization(fmt, group))
    g = torch.Generator().manual_seed(0)
    for e in range(experts):
        for part, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            write(0, e, part, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    rt.set_host_lane(True, plan="host", threads=threads)
    return rt, one


def measure(rt, one: int, hidden: int, experts: int, rows: int, reps: int, warm_seconds: float = 1.0) -> float:
    """Expert bytes per second of the host lane at `rows` tokens (median over reps), after passes
    over the experts for at least `warm_seconds`: one pass was not enough, the first int4
    measurement after the experts were written ran at 0.55x where the next ones ran at 0.86x."""
    x = torch.randn(rows, hidden).to(torch.bfloat16)
    w = torch.ones(rows, 1)

    def step(i: int) -> float:
        ids = torch.full((rows, 1), i % experts, dtype=torch.int64)
        before = rt.stats()["host_seconds"]
        rt.forward(0, x, ids, w)
        return one / (rt.stats()["host_seconds"] - before)

    start, i = time.perf_counter(), 0
    while i < experts or time.perf_counter() - start < warm_seconds:
        step(i)
        i += 1
    return statistics.median(step(i + r) for r in range(reps))


def fp32_gflops(n: int = 2048) -> float:
    """The machine's fp32 matmul rate on every core (best of 5), as the compute roof."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=3, help="experts to rotate through (default 3)")
    ap.add_argument("--formats", default="bfloat16,int4")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--group-size", type=int, default=_core.DEFAULT_GROUP_SIZE,
                    help=f"quantized formats: weights per scale and zero (default {_core.DEFAULT_GROUP_SIZE})")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="the host lane's pool (default: one per core)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    machine = machine_info("cpu")
    bw, flops = machine["host_read_gbps"], fp32_gflops()
    print(f"{machine['cpu']}: host memory read {bw:.1f} GB/s, fp32 matmul {flops:.0f} GFLOP/s; "
          f"kernels: {_core.cpu_kernel_isa()}")
    out = {"machine": machine, "fp32_gflops": flops, "shape": [args.hidden, args.intermediate],
           "group_size": args.group_size, "runs": []}
    for fmt in args.formats.split(","):
        rt, one = lane_runtime(fmt, args.hidden, args.intermediate, args.experts, args.threads, args.group_size)
        for rows in (int(r) for r in args.rows.split(",")):
            gbps = measure(rt, one, args.hidden, args.experts, rows, args.reps) / 1e9
            roof = min(bw, flops / rows) if fmt == "bfloat16" else None  # 2 FLOPs per weight and row, 2 bytes
            out["runs"].append({"format": fmt, "rows": rows, "expert_bytes": one, "gbps": gbps,
                                "of_host_bandwidth": gbps / bw, "of_roof": gbps / roof if roof else None})
            print(f"{fmt:>9} T={rows}: {gbps:6.1f} GB/s of expert bytes = {gbps / bw:.2f}x host memory bandwidth"
                  + (f", {gbps / roof:.2f}x the roof (min of bandwidth and compute, {roof:.1f} GB/s)" if roof else ""))
        rt.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
