"""Plain PyTorch references for the runtime's MoE block, and helpers to fill a runtime.

T = tokens, K = experts per token, E = experts, H = hidden, I = intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pregated

GATED = ("gated_silu", "gated_gelu", "gated_gelu_tanh", "gated_relu", "gated_swiglu_oai", "gated_silu_clamped")
PLAIN = ("relu", "gelu", "gelu_tanh", "silu", "relu2")
KINDS = GATED + PLAIN


def parts_of(ffn: str, has_bias: bool = False) -> tuple[str, ...]:
    names = ("gate", "up", "down") if ffn in GATED else ("in", "out")
    if has_bias:
        names += tuple(f"{n}_bias" for n in names)
    return names


def _shape(part: str, hidden: int, inter: int) -> tuple[int, ...]:
    if part.endswith("_bias"):
        return (hidden,) if part.startswith(("down", "out")) else (inter,)
    return (hidden, inter) if part in ("down", "out") else (inter, hidden)


def random_experts(layers: int, experts: int, hidden: int, inter: int, ffn: str, dtype, seed=0,
                   has_bias: bool = False):
    """weights[layer][expert] = {part: tensor}; gate/up/in: [I, H], down/out: [H, I], biases [I] / [H]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        layer = []
        for _ in range(experts):
            parts = {}
            for p in parts_of(ffn, has_bias):
                shape = _shape(p, hidden, inter)
                scale = 0.5 if p.endswith("_bias") else shape[1] ** -0.5
                parts[p] = (torch.randn(shape, generator=g) * scale).to(dtype)
            layer.append(parts)
        out.append(layer)
    return out


def make_runtime(weights, ffn: str, dtype, *, slots=None, device="cpu", eviction="lru", **kw):
    layers, experts = len(weights), len(weights[0])
    first = weights[0][0][parts_of(ffn)[0]]
    inter, hidden = first.shape
    dname = str(dtype).replace("torch.", "")
    has_bias = any(p.endswith("_bias") for p in weights[0][0])
    one = pregated.expert_bytes(hidden, inter, ffn, dname, has_bias)
    rt = pregated.Runtime(
        layers, experts, hidden, inter, ffn=ffn, dtype=dname, device=device,
        expert_memory=None if slots is None else slots * one, eviction=eviction, has_bias=has_bias, **kw,
    )
    for l, layer in enumerate(weights):
        for e, parts in enumerate(layer):
            for name, w in parts.items():
                rt.set_expert(l, e, name, w)
    return rt


def activation(ffn: str, g: torch.Tensor, u: torch.Tensor | None, alpha=1.702, limit=7.0) -> torch.Tensor:
    """act(g) * u (gated kinds) or act(g), each written out in PyTorch."""
    if ffn == "gated_swiglu_oai":
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        return (u + 1) * g * torch.sigmoid(alpha * g)
    if ffn == "gated_silu_clamped":
        return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    base = ffn.removeprefix("gated_")
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
           "relu": F.relu, "relu2": lambda x: F.relu(x) ** 2}[base]
    return act(g) * u if u is not None else act(g)


def expert_ffn(parts: dict, x: torch.Tensor, ffn: str, **act) -> torch.Tensor:
    """One expert on rows x: [n, H] -> [n, H], in float64."""
    x = x.double()
    p = {k: v.double() for k, v in parts.items()}
    zero = torch.zeros((), dtype=torch.float64)
    if ffn in GATED:
        g = x @ p["gate"].T + p.get("gate_bias", zero)
        u = x @ p["up"].T + p.get("up_bias", zero)
        return activation(ffn, g, u, **act) @ p["down"].T + p.get("down_bias", zero)
    h = activation(ffn, x @ p["in"].T + p.get("in_bias", zero), None)
    return h @ p["out"].T + p.get("out_bias", zero)


def moe_reference(layer_weights, x, ids, w, ffn: str, **act) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]): a loop over experts, float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    xc, ids, w = x.cpu(), ids.cpu(), w.cpu().double()
    for e, parts in enumerate(layer_weights):
        tok, k = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = expert_ffn(parts, xc[tok], ffn, **act)
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
