"""Profile decode on a synthetic model: tokens/s per policy in sequence, then cProfile of one.

python benchmarks/tools/profile_decode.py [--model mixtral-8x7b --layers 4]
"""
import argparse
import cProfile
import pstats
import time

import torch

from pregated.engine import Engine
from pregated.synthetic import SyntheticModel

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="mixtral-8x7b")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--tokens", type=int, default=24)
args = ap.parse_args()

eng = Engine(SyntheticModel(args.model, layers=args.layers), quiet=True)
cfg = eng.cfg
total = cfg.all_expert_bytes()
prompt = torch.randint(3, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()


def rate(policy, frac):
    eng.reconfigure(policy=policy, expert_memory=int(total * frac))
    eng.generate(prompt, max_new_tokens=4)
    eng.reset_stats()
    eng.generate(prompt, max_new_tokens=args.tokens)
    s = eng.stats()
    return (args.tokens - 1) / s["decode_seconds"], s["bytes_h2d"] / 2**20


for policy, frac in [("gpu-only", 1.0), ("on-demand", 0.5), ("gpu-only", 1.0), ("pregated", 0.5), ("gpu-only", 1.0)]:
    tps, mib = rate(policy, frac)
    print(f"{policy:<10} {frac:>4.0%}: {tps:6.1f} tok/s, {mib:8.1f} MiB moved", flush=True)

eng.reconfigure(policy="gpu-only", expert_memory=total)
eng.generate(prompt, max_new_tokens=4)
prof = cProfile.Profile()
prof.enable()
t = time.perf_counter()
eng.generate(prompt, max_new_tokens=args.tokens)
prof.disable()
print(f"profiled gpu-only generate: {time.perf_counter() - t:.3f} s")
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
