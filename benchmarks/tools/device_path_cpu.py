"""The device path against the planned path on the CPU Engine: decode tok/s of one generation
(32-token prompt, 32 new tokens) under on-demand and pregated at half the expert bytes, each
path twice, alternated, with the cache figures of each run.

python benchmarks/tools/device_path_cpu.py [--synthetic qwen1.5-moe-a2.7b] [--layers 4]

On the CPU the "device" is the host, so reading an expert in place costs what reading its slot
does; what the comparison shows is the cost of the path's own work (the route reader's thread,
the notes) against the planned path's (the plan, the host copies of the routing).
"""

import argparse

import torch

from pregated.engine import Engine
from pregated.synthetic import SyntheticModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="qwen1.5-moe-a2.7b")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    model = SyntheticModel(args.synthetic, layers=args.layers)
    with Engine(model, device="cpu", policy="gpu-only", dtype=torch.bfloat16, quiet=True) as eng:
        eng.eos_ids = set()
        total = eng.cfg.expert_bytes() * eng.cfg.num_experts * eng.cfg.num_moe_layers
        prompt = list(range(5, 37))
        for policy in ("on-demand", "pregated"):
            eng.reconfigure(policy=policy, expert_memory=total // 2)
            for rnd in range(2):
                for on_device in (False, True):
                    eng.moe.device_path = on_device
                    eng.generate(prompt, max_new_tokens=4)
                    eng.reset_stats()
                    eng.generate(prompt, max_new_tokens=32)
                    s = eng.stats()
                    print(f"{policy:10s} round {rnd} device_path={on_device!s:5s} decode "
                          f"{s['tokens'] / s['decode_seconds']:.1f} tok/s  hits {s['expert_hits']} misses "
                          f"{s['expert_misses']} store_reads {s['store_reads']} h2d MiB {s['bytes_h2d'] / 2**20:.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
