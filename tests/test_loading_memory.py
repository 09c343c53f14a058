"""Loading holds one copy of the experts: peak host memory while an Engine loads stays within
1.15x the checkpoint's bytes (plus a small constant), for per-expert and fused tensor names.
Measured in a fresh process, after the imports loading itself does not need."""

import os
import subprocess
import sys

import pytest
import torch

CODE = """
import sys, torch
import transformers.models.mixtral.modeling_mixtral, transformers.conversion_mapping, transformers.core_model_loading
from pregated.engine import Engine
torch.ones(1)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size: imports' peaks do not count
before = status("VmRSS")
eng = Engine(sys.argv[1], device="cpu", policy="pregated", expert_memory=int(sys.argv[2]), quiet=True)
print(status("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["per-expert-names", "fused-names"])
def test_loading_holds_one_copy_of_the_experts(fused, tmp_path):
    from tiny_models import make_checkpoint

    folder = make_checkpoint(str(tmp_path / "m"), "mixtral", dtype=torch.bfloat16, fused=fused, hidden_size=512,
                             intermediate_size=512, num_local_experts=16, num_hidden_layers=4)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    slab = 4 * 3 * 512 * 512 * 2  # the pregated minimum: 2 * top_k experts (host memory on the CPU backend)
    run = subprocess.run([sys.executable, "-c", CODE, folder, str(slab)], capture_output=True, text=True,
                         check=True)
    grew = int(run.stdout.strip().splitlines()[-1])
    assert grew < 1.15 * size + 32 * 2**20, \
        f"peak RSS grew by {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint ({grew / size:.2f}x)"
