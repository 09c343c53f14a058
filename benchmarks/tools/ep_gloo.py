"""Expert parallelism with gloo on this host, measured beside the analytical model (issue 17).

python benchmarks/tools/ep_gloo.py [--ranks 2,4] [--synthetic mixtral-cpu --layers 4] [--batch 4]
                                   [--new-tokens 16] [--out ep_gloo.json]

For each rank count, with tensor parallelism off and on and with duplicate dropping on and off,
runs a decode under torchrun (gloo, fp32) and records per decode step: the all-to-all bytes each
rank sent, the gathered and all-reduced bytes, the seconds spent inside collectives and the
decode rate. The same run measures gloo's link on this host (an all-to-all of 1 MiB per rank
and of 4 bytes: bandwidth and latency) and feeds it to pregated/ep_model.py, so the model's
bytes and seconds per step stand beside the measured ones. Ranks share this host's cores:
the decode rates say what the collectives cost, not what more machines would give.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def link(dist, group=None) -> tuple[float, float]:
    """gloo all-to-all on this host: (bytes/s per rank, seconds of latency)."""
    n = dist.get_world_size()

    def timed(nbytes, reps):
        src = torch.zeros(max(nbytes // 4, n), dtype=torch.float32)
        src = src[: src.numel() // n * n]
        out = torch.empty_like(src)
        dist.all_to_all_single(out, src, group=group)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            dist.all_to_all_single(out, src, group=group)
        return (time.perf_counter() - t) / reps, src.numel() * 4

    latency, _ = timed(4 * n, 50)
    seconds, nbytes = timed(1 << 20, 10)
    return (n - 1) / n * nbytes / max(seconds - latency, 1e-9), latency


def worker(args) -> None:
    import torch.distributed as dist

    from pregated import Engine, SyntheticModel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bandwidth, latency = link(dist)
    g = torch.Generator().manual_seed(1)
    results = []
    kv_heads = SyntheticModel(args.synthetic, layers=args.layers).hf_config.num_key_value_heads
    for tp in (False, True) if kv_heads % dist.get_world_size() == 0 else (False,):
        for drop in (True, False):
            with Engine(SyntheticModel(args.synthetic, layers=args.layers), device="cpu", dtype="float32",
                        policy="gpu-only", expert_parallel=True, tensor_parallel=tp, quiet=True) as eng:
                eng.eos_ids = set()
                eng.ep.drop_duplicates = drop
                prompts = torch.randint(3, eng.cfg.vocab_size, (args.batch, 16), generator=g).tolist()
                eng.generate(prompts, max_new_tokens=2)  # warm-up
                spent = [0.0]
                inner = eng.ep._collective

                def timed(fn, what):
                    t = time.perf_counter()
                    try:
                        return inner(fn, what)
                    finally:
                        spent[0] += time.perf_counter() - t

                eng.ep._collective = timed

                def counted(new_tokens):
                    """(a2a, gathered, reduced bytes, seconds in collectives, decode seconds) of one generate."""
                    before = (eng.ep.bytes_remote, eng.ep.bytes_gathered, eng.tp.bytes_reduced if eng.tp else 0)
                    spent[0] = 0.0
                    eng.reset_stats()
                    eng.generate(prompts, max_new_tokens=new_tokens)
                    after = (eng.ep.bytes_remote, eng.ep.bytes_gathered, eng.tp.bytes_reduced if eng.tp else 0)
                    return [b - a for a, b in zip(before, after)] + [spent[0], eng.stats()["decode_seconds"]]

                steps = args.new_tokens
                full, prefill = counted(steps + 1), counted(1)  # the first token is the prefill's
                decode = [f - p for f, p in zip(full, prefill)]
                results.append({
                    "tp": tp, "drop_duplicates": drop, "rank": rank,
                    "decode_tokens_per_s": args.batch * steps / full[4],
                    "a2a_bytes_per_step": decode[0] / steps, "gathered_bytes_per_step": decode[1] / steps,
                    "reduced_bytes_per_step": decode[2] / steps, "collective_s_per_step": decode[3] / steps,
                    "dense_bytes": eng.dense_bytes, "moe_layers": eng.cfg.num_moe_layers,
                    "hidden": eng.cfg.hidden_size, "top_k": eng.cfg.top_k,
                })
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": dist.get_world_size(), "link_bytes_per_s": bandwidth, "link_latency_s": latency,
                       "runs": [r for rr in every for r in rr]}, f, indent=1)
    dist.destroy_process_group()


def report(path: str, args) -> list[dict]:
    from pregated.ep_model import all_to_all_bytes, collectives

    got = json.load(open(path))
    n = got["ranks"]
    print(f"{n} ranks: gloo all-to-all on this host {got['link_bytes_per_s'] / 1e9:.2f} GB/s per rank, "
          f"latency {got['link_latency_s'] * 1e6:.0f} us")
    rows = []
    for tp in (False, True):
        for drop in (True, False):
            mine = [r for r in got["runs"] if r["tp"] == tp and r["drop_duplicates"] == drop]
            if not mine:
                print(f"  tp on: the model's key/value heads do not split over {n} ranks")
                break
            r0 = mine[0]
            L, H, K = r0["moe_layers"], r0["hidden"], r0["top_k"]
            sent = sum(r["a2a_bytes_per_step"] for r in mine) / n  # mean over ranks
            gathered = sum(r["gathered_bytes_per_step"] for r in mine) / n
            model = L * all_to_all_bytes(args.batch, n, K, H, elem=4, drop=drop)
            # what left the rank: rows to and outputs from other ranks, and its slice sent to the
            # N - 1 others in the gather (the model: under uniform routing)
            measured = sent + gathered * (n - 1)
            model_s = model / got["link_bytes_per_s"] + L * collectives(drop) * got["link_latency_s"]
            coll = max(r["collective_s_per_step"] for r in mine)
            rate = min(r["decode_tokens_per_s"] for r in mine)
            row = {"ranks": n, "tp": tp, "drop_duplicates": drop, "measured_bytes_per_rank_step": measured,
                   "model_bytes_per_rank_step": model, "measured_collective_s_per_step": coll,
                   "model_a2a_s_per_step": model_s, "decode_tokens_per_s": rate,
                   "reduced_bytes_per_step": r0["reduced_bytes_per_step"], "dense_bytes": r0["dense_bytes"],
                   "link_bytes_per_s": got["link_bytes_per_s"], "link_latency_s": got["link_latency_s"]}
            rows.append(row)
            print(f"  tp {'on ' if tp else 'off'} drop {'on ' if drop else 'off'}: a2a bytes/rank/step measured "
                  f"{measured / 1024:8.1f} KiB, model {model / 1024:8.1f} KiB; collectives {coll * 1e3:6.2f} ms/step "
                  f"(model's all-to-all {model_s * 1e3:5.2f} ms); all-reduce {r0['reduced_bytes_per_step'] / 1024:6.1f} "
                  f"KiB/step; dense {r0['dense_bytes'] / 2**20:5.1f} MiB/rank; decode {rate:6.1f} tok/s")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--synthetic", default="mixtral-cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.out = args.worker
        worker(args)
        return
    from pregated.bench_serve import free_port

    every = []
    for n in [int(x) for x in args.ranks.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ep.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), os.path.abspath(__file__), "--worker", path,
                   "--synthetic", args.synthetic, "--layers", str(args.layers), "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                sys.exit(f"torchrun with {n} ranks failed:\n{done.stderr[-3000:]}")
            every += report(path, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(every, f, indent=1)


if __name__ == "__main__":
    main()
