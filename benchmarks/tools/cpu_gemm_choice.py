"""Measure the CPU backend's expert FFN against PyTorch's CPU matmul on the same shapes.

python benchmarks/tools/cpu_gemm_choice.py [--hidden 1024 --inter 2816] [--tokens 1,8,128,512]
                                          [--dtypes float32,bfloat16]

Times one gated expert (gate/up GEMM, SiLU, down GEMM) for a few token counts, in float32 and
bfloat16: through pregated's CPU backend (OpenBLAS sgemm; bf16 widened per tile) and through
torch (x @ W.T in the same dtype; torch's CPU matmul uses oneDNN/mkldnn where it applies).
"""

import argparse
import time

import torch

import pregated


def best_of(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--tokens", default="1,8,128,512", help="token counts, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    H, I = args.hidden, args.inter
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {pregated.build_info()['blas']}")
    print(f"{'dtype':>9} {'tokens':>6} {'pregated ms':>12} {'torch ms':>9} {'ratio':>6}")
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        dname = str(dtype).replace("torch.", "")
        gate, up = torch.randn(I, H).to(dtype) / H**0.5, torch.randn(I, H).to(dtype) / H**0.5
        down = torch.randn(H, I).to(dtype) / I**0.5
        rt = pregated.Runtime(1, 1, H, I, dtype=dname)
        for name, w in (("gate", gate), ("up", up), ("down", down)):
            rt.set_expert(0, 0, name, w)
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, H).to(dtype)
            ids, w = torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1)
            ours = best_of(lambda: rt.forward(0, x, ids, w))
            ref = best_of(lambda: (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T)
            print(f"{dname:>9} {T:>6} {ours * 1e3:>12.2f} {ref * 1e3:>9.2f} {ours / ref:>6.2f}")
        rt.close()


if __name__ == "__main__":
    main()
