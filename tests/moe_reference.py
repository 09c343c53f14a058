"""Plain PyTorch references for the runtime's MoE block, and helpers to fill a runtime.

T = tokens, K = experts per token, E = experts, H = hidden, I = intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pregated

PARTS = {
    "gated_silu": ("gate", "up", "down"),
    "gated_gelu": ("gate", "up", "down"),
    "relu": ("in", "out"),
    "gelu": ("in", "out"),
}


def random_experts(layers: int, experts: int, hidden: int, inter: int, ffn: str, dtype, seed=0):
    """weights[layer][expert] = {part: tensor}; gate/up/in: [I, H], down/out: [H, I]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        layer = []
        for _ in range(experts):
            parts = {}
            for p in PARTS[ffn]:
                shape = (hidden, inter) if p in ("down", "out") else (inter, hidden)
                fan_in = shape[1]
                parts[p] = (torch.randn(shape, generator=g) / fan_in**0.5).to(dtype)
            layer.append(parts)
        out.append(layer)
    return out


def make_runtime(weights, ffn: str, dtype, *, slots=None, device="cpu", eviction="lru", **kw):
    layers, experts = len(weights), len(weights[0])
    first = weights[0][0][PARTS[ffn][0]]
    inter, hidden = first.shape
    dname = str(dtype).replace("torch.", "")
    one = pregated.expert_bytes(hidden, inter, ffn, dname)
    rt = pregated.Runtime(
        layers, experts, hidden, inter, ffn=ffn, dtype=dname, device=device,
        expert_memory=None if slots is None else slots * one, eviction=eviction, **kw,
    )
    for l, layer in enumerate(weights):
        for e, parts in enumerate(layer):
            for name, w in parts.items():
                rt.set_expert(l, e, name, w)
    return rt


def expert_ffn(parts: dict, x: torch.Tensor, ffn: str) -> torch.Tensor:
    """One expert on rows x: [n, H] -> [n, H], in float64."""
    x = x.double()
    if ffn.startswith("gated"):
        act = F.silu if ffn == "gated_silu" else F.gelu
        h = act(x @ parts["gate"].double().T) * (x @ parts["up"].double().T)
        return h @ parts["down"].double().T
    act = F.relu if ffn == "relu" else F.gelu
    return act(x @ parts["in"].double().T) @ parts["out"].double().T


def moe_reference(layer_weights, x, ids, w, ffn: str) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]): a loop over experts, float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    xc, ids, w = x.cpu(), ids.cpu(), w.cpu().double()
    for e, parts in enumerate(layer_weights):
        tok, k = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = expert_ffn(parts, xc[tok], ffn)
        out.index_add_(0, tok, y * w[tok, k].unsqueeze(1))
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.cpu().double(), ref.cpu().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# Relative error allowed per dtype: the output is rounded to the dtype, and the intermediate
# activations too (cuBLAS / OpenBLAS accumulate in float32).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_routing(T: int, K: int, E: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    w = torch.rand(T, K, generator=g) + 0.1
    return ids, w / w.sum(-1, keepdim=True)
