"""CUDA backend only: copies on the copy stream overlap GEMMs on the compute stream."""

import json
import os

import pytest
import torch

from moe_reference import TOLERANCE, make_runtime, moe_reference, random_experts, random_routing, relative_error

pytestmark = pytest.mark.gpu


def overlap_seconds(copies, computes):
    total = 0.0
    for c in copies:
        for g in computes:
            total += max(0.0, min(c["end_s"], g["end_s"]) - max(c["start_s"], g["start_s"]))
    return total


def test_prefetch_copies_overlap_compute():
    layers, E, H, I = 2, 8, 2048, 5632  # bf16: 66 MiB per expert, like a small Mixtral expert
    weights = random_experts(layers, E, H, I, "gated_silu", torch.bfloat16, seed=0)
    rt = make_runtime(weights, "gated_silu", torch.bfloat16, slots=None, device="cuda")
    T, K = 8192, 2
    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids, w = random_routing(T, K, E, seed=1)
    xd = x.cuda()
    rt.forward(0, xd, ids, w)  # layer 0 resident, kernels warmed up
    torch.cuda.synchronize()
    rt.set_tracing(True)
    rt.prefetch(1, list(range(E)))  # layer 1 streams in ...
    for _ in range(4):              # ... while layer 0 computes
        out = rt.forward(0, xd, ids, w)
    events = rt.trace()
    copies = [e for e in events if e["kind"] == "copy"]
    computes = [e for e in events if e["kind"] == "compute"]
    assert len(copies) == E and len(computes) == 4 * E
    overlap = overlap_seconds(copies, computes)
    copy_time = sum(c["end_s"] - c["start_s"] for c in copies)
    gbps = E * rt.expert_bytes / copy_time / 1e9
    print(f"copies {copy_time * 1e3:.2f} ms ({gbps:.1f} GB/s), overlapped with compute {overlap * 1e3:.2f} ms")
    results = os.environ.get("PREGATED_RESULTS_DIR")
    if results:
        with open(os.path.join(results, "runtime-overlap-timeline.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "expert_bytes": rt.expert_bytes,
                       "events": events, "overlap_s": overlap, "copy_s": copy_time}, f, indent=1)
    assert overlap > 0, "no copy ran while a GEMM ran: copies and compute are serialised"
    # The copies did not disturb the results.
    ref = moe_reference(weights[0], x[:64], ids[:64], w[:64], "gated_silu")
    assert relative_error(out[:64], ref) < TOLERANCE[torch.bfloat16]
    rt.check()
    rt.close()


def test_compute_on_a_side_stream_orders_with_torch():
    weights = random_experts(1, 4, 64, 32, "gated_silu", torch.float16, seed=2)
    rt = make_runtime(weights, "gated_silu", torch.float16, slots=1, device="cuda")
    x = torch.randn(100, 64, dtype=torch.float16)
    ids, w = random_routing(100, 2, 4, seed=3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        xd = x.cuda() * 1  # produced on the side stream; the runtime must run after it
        out = rt.forward(0, xd, ids, w)
        out2 = out * 1
    torch.cuda.synchronize()
    ref = moe_reference(weights[0], x, ids, w, "gated_silu")
    assert relative_error(out2, ref) < TOLERANCE[torch.float16]
    rt.close()
