"""Expert FFN decode on the CPU backend: bf16 experts against int8 / int4 / int3 / int2 experts on
the same shapes, in one run.

python benchmarks/tools/quantized_ffn.py [--shape olmoe-1b-7b] [--tokens 1,4] [--group 64]

One MoE block's routed experts (top-k of `--experts`, every token on the same k experts, so each
call reads k experts' weights) through Runtime.forward, all experts resident; best of --reps,
the formats interleaved.
Decode on a CPU is bound by the bytes of weight it reads, which is what quantized experts cut.
"""

import argparse
import time

import torch

import pregated
from pregated.quantize import BITS, QuantSpec, store_writer

SHAPES = {  # hidden, intermediate, top-k
    "olmoe-1b-7b": (2048, 1024, 8),
    "qwen3-30b-a3b": (2048, 768, 8),
    "mixtral-8x7b": (4096, 14336, 2),
}


def runtime(H, I, E, fmt, group):
    spec = None if fmt == "bfloat16" else QuantSpec(BITS[fmt], group)
    rt = pregated.Runtime(1, E, H, I, dtype="bfloat16", expert_format="dense" if spec is None else fmt,
                          group_size=group)
    write = store_writer(rt, spec)
    g = torch.Generator().manual_seed(0)
    for e in range(E):
        for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            write(0, e, name, (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(torch.bfloat16))
    return rt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=list(SHAPES))
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--formats", default="bfloat16,int8,int4,int3,int2")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    H, I, K = SHAPES[args.shape]
    E = K
    formats = args.formats.split(",")
    info = pregated.build_info()
    print(f"{args.shape}: hidden {H}, intermediate {I}, {K} experts per token; group {args.group}; "
          f"torch threads {torch.get_num_threads()}; {info['blas']}")
    runtimes = {fmt: runtime(H, I, E, fmt, args.group) for fmt in formats}
    sizes = {fmt: pregated.expert_bytes(H, I, "gated_silu", "bfloat16", False,
                                        "dense" if fmt == "bfloat16" else fmt, args.group) for fmt in formats}
    times = {}
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, H).to(torch.bfloat16)
        ids = torch.arange(K).repeat(T, 1)
        w = torch.full((T, K), 1.0 / K)
        calls = {fmt: (lambda rt=rt: rt.forward(0, x, ids, w)) for fmt, rt in runtimes.items()}
        for call in calls.values():
            call()  # warm-up
        for _ in range(args.reps):  # interleaved, so a noisy neighbour slows every format alike
            for fmt, call in calls.items():
                t = time.perf_counter()
                call()
                dt = time.perf_counter() - t
                times[fmt, T] = (min(dt, times.get((fmt, T), (dt,))[0]), sizes[fmt])
    for rt in runtimes.values():
        rt.close()
    print(f"{'format':>9} {'tokens':>6} {'KiB/expert':>10} {'ms':>8} {'GB/s':>6} {'vs bf16':>8}")
    for (fmt, T), (t, one) in times.items():
        base = times.get(("bfloat16", T), (None,))[0]
        speed = f"{base / t:>7.2f}x" if base else "-"
        print(f"{fmt:>9} {T:>6} {one / 1024:>10.0f} {t * 1e3:>8.3f} {K * one / t / 1e9:>6.1f} {speed:>8}")


if __name__ == "__main__":
    main()
