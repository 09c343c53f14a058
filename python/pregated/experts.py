"""The experts backend: transformers' MoE layers run their routed experts through the runtime.

Importing pregated registers "pregated" in transformers' experts interface
(`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`). A model built with
`experts_implementation="pregated"` calls `experts_forward` for every MoE layer with
`hidden_states [T, H]`, `top_k_index [T, K]` and `top_k_weights [T, K]`; the layer's experts
module carries a binding (set when the engine loads the model) to the MoE executor and its
block index. The runtime's forward is a torch custom op with a fake implementation, so
torch.compile can trace around it.

Whatever layout a family's experts module declares (`is_concatenated`, `is_transposed`,
`has_bias`, `has_gate`, its activation) is read once here; the weights are converted into the
expert store's layout when the checkpoint is loaded, never per call.

T = tokens, K = experts per token, H = hidden, I = expert intermediate size, E = experts.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

from . import _core


class UnsupportedModel(ValueError):
    """The model's experts (or its MoE block) have a shape pregated cannot run."""


# --- the layout of one family's experts -----------------------------------------------------

# transformers' activation modules (or functions) -> the runtime's activation names
_ACTIVATIONS = {
    "SiLUActivation": "silu", "SiLU": "silu", "silu": "silu",
    "GELUActivation": "gelu", "gelu": "gelu",
    "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu", "relu": "relu",
    "ReLUSquaredActivation": "relu2",
}


def _activation_name(act) -> str | None:
    name = getattr(act, "__name__", None) if callable(act) and not isinstance(act, torch.nn.Module) else type(act).__name__
    if isinstance(act, torch.nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _ACTIVATIONS.get(name)


def gate_reference(ffn: str, gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702,
                   limit: float = 7.0) -> torch.Tensor:
    """act(gate) * up of a gated kind, in plain PyTorch (float32): the reference the runtime's
    kernels are tested against, and the candidates a family's own gate is matched with."""
    g, u = gate.float(), up.float()
    if ffn == "gated_swiglu_oai":
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        return (u + 1) * g * torch.sigmoid(alpha * g)
    if ffn == "gated_silu_clamped":
        return torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    act = {"gated_silu": torch.nn.functional.silu, "gated_relu": torch.relu,
           "gated_gelu": torch.nn.functional.gelu,
           "gated_gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[ffn]
    return act(g) * u


def _custom_gate(module, cls: str, act_kind: str | None) -> tuple[str, float, float]:
    """Which of the runtime's gated kinds a family's own `_apply_gate` computes, found by
    running it on probe values large enough to reach the clamps."""
    alpha = float(getattr(module, "swiglu_alpha", getattr(module, "alpha", 1.702)))
    limit = float(getattr(module, "swiglu_limit", getattr(module, "limit", 7.0)) or 7.0)
    I = 32
    probe = torch.linspace(-3 * limit, 3 * limit, 2 * I * 4).reshape(4, 2 * I)
    probe = probe[:, torch.randperm(2 * I, generator=torch.Generator().manual_seed(0))]
    got = module._apply_gate(probe).float()
    gate, up = (probe[:, :I], probe[:, I:]) if module.is_concatenated else (probe[:, 0::2], probe[:, 1::2])
    candidates = ["gated_swiglu_oai", "gated_silu_clamped"] + ([f"gated_{act_kind}"] if act_kind else [])
    for ffn in candidates:
        if got.shape == (4, I) and torch.allclose(got, gate_reference(ffn, gate, up, alpha, limit), rtol=1e-4, atol=1e-4):
            return ffn, alpha, limit
    raise UnsupportedModel(f"{cls} combines gate and up with its own function (_apply_gate), which is none "
                           f"of the runtime's: {', '.join(candidates)}")


@dataclass(frozen=True)
class ExpertLayout:
    """How one family stores its experts (transformers' layout flags) and what the runtime runs."""
    num_experts: int
    hidden: int          # H
    intermediate: int    # I
    ffn: str             # the runtime's ffn kind: gated_silu, gated_swiglu_oai, relu2, ...
    has_gate: bool
    has_bias: bool
    is_transposed: bool      # weights stored [in, out] instead of [out, in]
    is_concatenated: bool    # gate_up rows [gate; up] (True) or interleaved g0, u0, g1, u1 (False)
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def params(self) -> tuple[str, ...]:
        """The experts module's parameter names, in the model's own layout."""
        first = "gate_up_proj" if self.has_gate else "up_proj"
        names = (first, "down_proj")
        return names + tuple(f"{n}_bias" for n in names) if self.has_bias else names

    def param_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one expert's slice of a parameter, as the model stores it."""
        H, I = self.hidden, self.intermediate
        rows = 2 * I if self.has_gate else I
        if name.endswith("_bias"):
            return (H,) if name.startswith("down") else (rows,)
        if name.startswith("down"):
            return (I, H) if self.is_transposed else (H, I)
        return (H, rows) if self.is_transposed else (rows, H)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return _core.expert_bytes(self.hidden, self.intermediate, self.ffn, _dtype_name(dtype), self.has_bias)

    def store_parts(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """One expert's slice of parameter `name` -> the expert store's parts it fills."""
        I = self.intermediate
        if name.endswith("_bias"):
            if name.startswith("down"):
                return {"down_bias" if self.has_gate else "out_bias": t}
            if not self.has_gate:
                return {"in_bias": t}
            gate, up = (t[:I], t[I:]) if self.is_concatenated else (t[0::2], t[1::2])
            return {"gate_bias": gate, "up_bias": up}
        if self.is_transposed:
            t = t.t()
        if name.startswith("down"):
            return {"down" if self.has_gate else "out": t}
        if not self.has_gate:
            return {"in": t}
        gate, up = (t[:I], t[I:]) if self.is_concatenated else (t[0::2], t[1::2])
        return {"gate": gate, "up": up}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_experts_module(module: torch.nn.Module) -> bool:
    """An experts class decorated with transformers' `use_experts_implementation`."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated"))


def layout_of(module: torch.nn.Module) -> ExpertLayout:
    """Reads an experts module's layout; raises UnsupportedModel naming what is not supported."""
    from transformers.integrations import moe as hf_moe

    cls = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedModel(f"{cls} normalises each expert's output (post-expert norm); pregated's "
                               "runtime has no such step")
    first = "gate_up_proj" if module.has_gate else "up_proj"
    up, down = getattr(module, first, None), getattr(module, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3:
        raise UnsupportedModel(f"{cls} does not hold its experts as 3-D {first} / down_proj tensors")
    E = up.shape[0]
    out_dim, in_dim = (up.shape[2], up.shape[1]) if module.is_transposed else (up.shape[1], up.shape[2])
    I = out_dim // 2 if module.has_gate else out_dim
    H = in_dim
    alpha, limit = 1.702, 7.0
    act_kind = _activation_name(getattr(module, "act_fn", None))
    if module.has_gate and type(module)._apply_gate is not hf_moe._default_apply_gate:
        ffn, alpha, limit = _custom_gate(module, cls, act_kind if act_kind != "relu2" else None)
    else:
        if act_kind is None:
            act = getattr(module, "act_fn", None)
            raise UnsupportedModel(f"{cls} uses the activation {getattr(act, '__name__', type(act).__name__)}; "
                                   f"pregated's runtime has {', '.join(sorted(set(_ACTIVATIONS.values())))}")
        if module.has_gate and act_kind == "relu2":
            raise UnsupportedModel(f"{cls}: a gated relu2 expert is not supported")
        ffn = f"gated_{act_kind}" if module.has_gate else act_kind
    layout = ExpertLayout(num_experts=E, hidden=H, intermediate=I, ffn=ffn, has_gate=bool(module.has_gate),
                          has_bias=bool(module.has_bias), is_transposed=bool(module.is_transposed),
                          is_concatenated=bool(module.is_concatenated), alpha=alpha, limit=limit)
    want = (E,) + layout.param_shape("down_proj")
    if tuple(down.shape) != want:
        raise UnsupportedModel(f"{cls}: down_proj has shape {list(down.shape)}, expected {list(want)} "
                               f"for {E} experts of hidden {H}, intermediate {I}")
    return layout


# --- the forward: a custom op around the runtime ----------------------------------------------

_RUNTIMES: dict[int, object] = {}
_next_handle = itertools.count(1)


def register_runtime(runtime) -> int:
    """A handle the custom op can carry (ops take tensors and scalars, not Python objects)."""
    handle = next(_next_handle)
    _RUNTIMES[handle] = runtime
    return handle


def unregister_runtime(handle: int) -> None:
    _RUNTIMES.pop(handle, None)


def _runtime(handle: int):
    rt = _RUNTIMES.get(handle)
    if rt is None:
        raise RuntimeError("the pregated runtime of this model was closed; load the model again")
    return rt


def run_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, runtime: int, layer: int,
                next_layer: int, next_experts: torch.Tensor | None) -> torch.Tensor:
    """x [T, H] on the runtime's device; ids, weights [T, K] -> sum_k weights * expert_ids(x) [T, H].
    next_experts (int, 1-D): block `next_layer`'s experts to prefetch while this block computes.
    Through torch's dispatcher (the op pregated::moe_experts) only while torch.compile traces:
    in eager mode a Python custom op's dispatch cost about 100 us a call on our CPU machines, as
    much as a decode block's experts."""
    if torch.compiler.is_compiling():
        return torch.ops.pregated.moe_experts(x, ids, weights, runtime, layer, next_layer, next_experts)
    return _forward(x, ids, weights, runtime, layer, next_layer, next_experts)


def _forward(x, ids, weights, runtime, layer, next_layer, next_experts):
    nxt = None if next_experts is None else next_experts.tolist()
    return _runtime(runtime).forward(layer, x, ids, weights, next_layer=next_layer if nxt else -1, next_experts=nxt)


def run_experts_resident(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, runtime: int,
                         layer: int) -> torch.Tensor:
    """A block whose experts are all resident: x [T, H], ids [T, K] int32 and weights [T, K]
    float32 on the runtime's device; nothing goes to the host (capturable in a CUDA graph). The
    op pregated::moe_experts_resident while torch.compile traces, else the runtime directly."""
    if torch.compiler.is_compiling():
        return torch.ops.pregated.moe_experts_resident(x, ids, weights, runtime, layer)
    return _runtime(runtime).forward_resident(layer, x, ids, weights)


def run_experts_device(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, runtime: int, layer: int,
                       next_layer: int, next_ids: torch.Tensor | None) -> torch.Tensor:
    """A decode-sized block under any budget: x [T, H], ids [T, K] int32 and weights [T, K]
    float32 on the runtime's device; experts in no ready slot are read in place from the expert
    store, and the runtime learns the routing (and next_ids, int32 on the device: the experts
    predicted for block next_layer) one step behind. Nothing waits for the device here."""
    return _runtime(runtime).forward_device(layer, x, ids, weights, next_layer=next_layer, next_ids=next_ids)


@torch.library.custom_op("pregated::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, runtime: int, layer: int,
                next_layer: int, next_experts: torch.Tensor | None) -> torch.Tensor:
    """run_experts as an op of torch's (for torch.compile)."""
    return _forward(x, ids, weights, runtime, layer, next_layer, next_experts)


@moe_experts.register_fake
def _(x, ids, weights, runtime, layer, next_layer, next_experts):
    return torch.empty_like(x)


@torch.library.custom_op("pregated::moe_experts_resident", mutates_args=())
def moe_experts_resident(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, runtime: int,
                         layer: int) -> torch.Tensor:
    """run_experts_resident as an op of torch's (for torch.compile)."""
    return _runtime(runtime).forward_resident(layer, x, ids, weights)


@moe_experts_resident.register_fake
def _(x, ids, weights, runtime, layer):
    return torch.empty_like(x)


@dataclass
class Binding:
    """Set on an experts module when its model is loaded: which executor runs it, as block m."""
    executor: object
    block: int


def _stub_executor(block: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An experts stand-in: depends on the rows, their experts and their weights, on any device."""
    return x * weights.float().sum(-1, keepdim=True).to(x.dtype) + (ids.float().sum(-1, keepdim=True) * 1e-2).to(x.dtype)


@contextlib.contextmanager
def stubbed_experts(blocks):
    """Every experts module of `blocks` runs a stand-in (a pure function of its inputs) inside:
    what a check of a model's wiring runs, touching no expert store and no statistics."""
    saved = [b.experts.__dict__.get("_pregated") for b in blocks]
    try:
        for m, b in enumerate(blocks):
            b.experts._pregated = Binding(_stub_executor, m)
        yield
    finally:
        for b, binding in zip(blocks, saved):
            if binding is None:
                b.experts.__dict__.pop("_pregated", None)
            else:
                b.experts._pregated = binding


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts function: hidden_states [T, H], top_k_index / top_k_weights [T, K]."""
    binding = getattr(self, "_pregated", None)
    if binding is None:
        raise RuntimeError(
            f"{type(self).__name__} was built with experts_implementation='pregated' but has no "
            "expert store: load the model with pregated.from_pretrained(...), or hand a loaded model to "
            "pregated.offload(model, expert_memory=...)")
    return binding.executor(binding.block, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Adds "pregated" to transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get("pregated") is not experts_forward:
        ALL_EXPERTS_FUNCTIONS.register("pregated", experts_forward)
