"""What a miss costs on the device path against the planned path: one decode MoE block (one token,
top-k experts) through the runtime, its experts

  in_place: in no slot, read in place from the pinned expert store (runtime.forward_device,
            eviction none, so nothing is ever loaded: every block reads all k over the link);
  slots:    in ready slots (pinned), read from device memory (forward_device);
  planned:  in no slot, copied on demand and waited for (runtime.forward, eviction none: every
            block copies all k, and the host learns the routing first).

python benchmarks/tools/read_in_place.py [--device cuda] [--hidden 2048 --intermediate 1024
    --experts 64 --top-k 8 --dtype bfloat16] [--blocks 40] [--out FILE.json]

The defaults are OLMoE-1B-7B's expert shape (12 MiB per expert in bf16). Prints and writes the
median seconds per block of each mode, the expert bytes per block and the rate they were moved
at, next to the pinned host-to-device copy rate measured here (torch, 1 GiB). On the CPU the
figures only show that the modes run (the "device" is the host).
"""

import argparse
import json
import statistics
import time

import torch

from pregated import _core


def pinned_h2d_gbps(device: str, nbytes: int = 1 << 30) -> float | None:
    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = None
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return nbytes / best / 1e9


def make_runtime(args, slots: int, device: str):
    dt = getattr(torch, args.dtype)
    H, I, E = args.hidden, args.intermediate, args.experts
    one = _core.expert_bytes(H, I, dtype=args.dtype)
    rt = _core.Runtime(1, E, H, I, dtype=args.dtype, device=device, expert_memory=slots * one, eviction="none")
    gen = torch.Generator().manual_seed(0)
    for e in range(E):
        for part, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            rt.set_expert(0, e, part, (torch.randn(shape, generator=gen) * 0.02).to(dt))
    return rt, one


def timed(device: str, run, blocks: int) -> list[float]:
    times = []
    for i in range(blocks):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(i)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[2:]  # the first blocks grow workspaces and warm kernels


def measure(args) -> dict:
    device, K, E = args.device, args.top_k, args.experts
    dt = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.hidden, generator=gen).to(dt).to(device)
    w = torch.full((1, K), 1.0 / K, device=device)
    routing = [torch.randperm(E, generator=gen)[:K][None].to(torch.int32) for _ in range(args.blocks)]
    on_device = [r.to(device) for r in routing]
    out = {}

    rt, one = make_runtime(args, K + 1, device)  # one slot beyond the pinned ones stays free
    out["in_place"] = timed(device, lambda i: rt.forward_device(0, x, on_device[i], w), args.blocks)
    s = rt.stats()
    assert s["store_reads"] == K * args.blocks, s  # every block read all its experts in place
    out["planned"] = timed(device, lambda i: rt.forward(0, x, routing[i], w.cpu()), args.blocks)
    fixed = on_device[0]
    for e in routing[0][0].tolist():
        rt.pin(0, e)
    rt.wait_idle()
    out["slots"] = timed(device, lambda i: rt.forward_device(0, x, fixed, w), args.blocks)
    rt.close()

    block_bytes = K * one
    result = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "experts": E, "top_k": K,
                        "dtype": args.dtype}, "expert_bytes": one, "block_bytes": block_bytes,
              "pinned_h2d_gbps": pinned_h2d_gbps(device), "modes": {}}
    for mode, times in out.items():
        med = statistics.median(times)
        result["modes"][mode] = {"block_s_median": med, "block_s_all": times,
                                 "expert_gbps": block_bytes / med / 1e9 if mode != "slots" else None}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    r = measure(args)
    print(f"{r['device']}: {args.top_k} experts of {r['expert_bytes'] / 2**20:.1f} MiB per block; pinned h2d "
          f"{r['pinned_h2d_gbps'] or 0:.1f} GB/s")
    for mode, m in r["modes"].items():
        rate = f", experts at {m['expert_gbps']:.1f} GB/s" if m["expert_gbps"] else ""
        print(f"  {mode:9s} {m['block_s_median'] * 1e3:8.3f} ms per block{rate}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
