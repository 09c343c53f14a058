"""Per-step decode latency of the first generations after loading (warm-up effects)."""
import time

import torch

from pregated.engine import Engine
from pregated.synthetic import SyntheticModel

eng = Engine(SyntheticModel("mixtral-8x7b", layers=4), progress=False)
cfg = eng.cfg
prompt = torch.randint(3, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
orig = eng._forward


def timed_forward(*a, **k):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = orig(*a, **k)
    torch.cuda.synchronize()
    steps.append(round((time.perf_counter() - t) * 1e3, 1))
    return out


eng._forward = timed_forward
for run in range(4):
    steps = []
    eng.generate(prompt, max_new_tokens=16)
    print(f"run {run}: forward ms {steps}", flush=True)
