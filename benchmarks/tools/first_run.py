"""Per-step decode latency of the first generations after loading (warm-up effects)."""
import collections
import time

import torch

from pregated.engine import Engine
from pregated.synthetic import SyntheticModel

eng = Engine(SyntheticModel("mixtral-8x7b", layers=4), quiet=True)
cfg = eng.cfg
prompt = torch.randint(3, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
orig, moe_call = eng._forward, eng.moe.__class__.__call__
acc = collections.defaultdict(float)


def timed_forward(*a, **k):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = orig(*a, **k)
    torch.cuda.synchronize()
    steps.append(round((time.perf_counter() - t) * 1e3, 1))
    return out


class Timed:
    def __init__(self, rt):
        self.rt = rt

    def forward(self, *a, **k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.rt.forward(*a, **k)
        torch.cuda.synchronize()
        acc["runtime.forward"] += time.perf_counter() - t
        return out

    def __getattr__(self, name):
        return getattr(self.rt, name)


eng._forward = timed_forward
rt = eng.moe.runtime
eng.moe.runtime = Timed(rt)
for run in range(3):
    steps, acc = [], collections.defaultdict(float)
    eng.generate(prompt, max_new_tokens=12)
    states = collections.Counter(s["state"] for s in rt.slots())
    print(f"run {run}: forward ms {steps}; in runtime.forward {acc['runtime.forward'] * 1e3:.0f} ms; "
          f"slots {dict(states)}; stall {rt.stats()['stall_seconds'] * 1e3:.0f} ms", flush=True)
