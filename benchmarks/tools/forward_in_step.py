"""The runtime's MoE forward inside a decode step against the same forward in isolation, on the
CPU backend (issue 13: within 1.2x).

python benchmarks/tools/forward_in_step.py [--synthetic mixtral-cpu] [--dtype float32] [--tokens 32]

Generates with a gpu-only Engine (every expert resident) and times each one-token call of the
runtime's resident forward inside the steps; then calls the same forward, on the same runtime
with the same inputs, back to back with nothing between (isolated). Reports the medians and
their ratio. Run it on an otherwise idle machine.
"""

import argparse
import statistics
import time

import torch

import pregated.experts as experts
from pregated import Engine, SyntheticModel


class Timed:
    """Wraps a runtime: records (layer, x, ids, weights) and the seconds of each one-token call."""

    def __init__(self, rt):
        self.rt, self.calls, self.threads = rt, [], set()

    def forward_resident(self, layer, x, ids, weights):
        t = time.perf_counter()
        out = self.rt.forward_resident(layer, x, ids, weights)
        if x.shape[0] == 1:
            self.threads.add(torch.get_num_threads())
            self.calls.append((time.perf_counter() - t, layer, x.clone(), ids.clone(), weights.clone()))
        return out

    def __getattr__(self, name):
        return getattr(self.rt, name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="mixtral-cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with Engine(SyntheticModel(args.synthetic), device="cpu", dtype=args.dtype, quiet=True) as eng:
        eng.eos_ids = set()
        timed = None
        for handle, rt in list(experts._RUNTIMES.items()):
            if rt is eng.runtime:
                timed = experts._RUNTIMES[handle] = Timed(rt)
        if timed is None:
            raise SystemExit("the engine's runtime was not found among the registered runtimes")
        eng.generate(list(range(5, 37)), max_new_tokens=8)  # warm up
        timed.calls.clear()
        eng.generate(list(range(5, 37)), max_new_tokens=args.tokens)
        in_step = [c[0] for c in timed.calls]
        isolated = []
        for _ in range(3):
            for _, layer, x, ids, w in timed.calls:
                t = time.perf_counter()
                eng.runtime.forward_resident(layer, x, ids, w)
                isolated.append(time.perf_counter() - t)
    a, b = statistics.median(in_step), statistics.median(isolated)
    print(f"{args.synthetic}, {args.dtype}, {len(in_step)} one-token MoE blocks: in a decode step median "
          f"{a * 1e3:.3f} ms, isolated median {b * 1e3:.3f} ms, ratio {a / b:.2f} (PyTorch's threads in the "
          f"steps: {sorted(timed.threads)}, isolated: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
