"""Time of one decode MoE block through the runtime's general (offloading) path on the CPU
backend: one token, random routing, experts so small that their GEMMs cost little, so what is
measured is mostly the runtime's own work per block (plan, slot lookups and choices, copies)
and the call itself.

python benchmarks/tools/block_host_time.py [--fractions 0.1,0.25,0.5] [--layers 48 --experts 128 --top-k 8]

The default shape is Qwen3-30B-A3B's routing (48 layers, 128 experts, 8 per token): thousands
of slots, so a cost that grows with the number of slots shows. Prints the median and the first
quartile of the per-block times after a warm-up.
"""

import argparse
import gc
import statistics
import time

import torch

from pregated import _core


def block_times(layers: int, experts: int, top_k: int, fraction: float, steps: int) -> tuple[int, list[float]]:
    H, I = 64, 32
    one = _core.expert_bytes(H, I, dtype="float32")
    rt = _core.Runtime(layers, experts, H, I, dtype="float32", device="cpu",
                       expert_memory=max(top_k, int(layers * experts * fraction)) * one, eviction="lru")
    gen = torch.Generator().manual_seed(0)
    for layer in range(layers):
        for e in range(experts):
            for part, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                rt.set_expert(layer, e, part, torch.randn(shape, generator=gen))
    x, weights = torch.randn(1, H, generator=gen), torch.full((1, top_k), 1.0 / top_k)
    routing = [torch.randperm(experts, generator=gen)[:top_k][None] for _ in range(layers * steps)]
    times = []
    gc.disable()
    try:
        for i, ids in enumerate(routing):
            t0 = time.perf_counter()
            rt.forward(i % layers, x, ids, weights)
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    slots = rt.num_slots
    rt.close()
    return slots, times[len(times) // 6:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    for fraction in (float(f) for f in args.fractions.split(",")):
        slots, times = block_times(args.layers, args.experts, args.top_k, fraction, args.steps)
        times.sort()
        print(f"{fraction:.0%} of the experts ({slots} slots): {statistics.median(times) * 1e6:.1f} us per block "
              f"(median; first quartile {times[len(times) // 4] * 1e6:.1f})", flush=True)


if __name__ == "__main__":
    main()
