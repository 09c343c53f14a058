"""transformers' small modules of a CPU step as one call of the CPU backend each: RMSNorm
(eight tensor ops in Python), softmax-top-k routers (a linear, a softmax, a top-k, a division
and casts) and the decode step of Llama-style attention (rotate_half and its multiplies, the
transposes, the SDPA wrapper). Inside a decode step every tensor op costs tens of microseconds
more than in isolation: the experts' and dense weights' streams evict the code and data of
PyTorch's dispatch from the caches. A module is swapped only where its own forward gives the
same result as the fused calls on test inputs (a norm's eps and weight form, a router's
normalisation and output dtype, three decode steps of an attention); any other module, and any
call the fused one cannot take (another device, mixed dtypes, autograd, a mask, several new
tokens), keeps transformers' forward.

mixtral-cpu fp32 decode on two cores, one process alternating engines: 16.7 ms a token with
none of them and no sibling projections (cpu_dense), 14.1 with those and the norms; the fused
attention then 11.2 against 11.9 ms.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch.nn.modules import module as _module

from . import _core
from .cpu_dense import DTYPES, few_rows, host_call, siblings_of


CHECK_SEED = 20251205  # test inputs of the checks (not 0: a model's own seed could align them with its weights)


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """A call the fused kernels take: a host call (cpu_dense.host_call) with something in it."""
    return x.numel() > 0 and host_call(x, w)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the checks: float32 differs in the order of sums, 16-bit types by a
    rounding now and then."""
    return 1e-5 if dtype == torch.float32 else 1.6e-2


def _takes_one_tensor(module: torch.nn.Module) -> bool:
    """Its class's own forward (not one set on the instance, as tensor parallelism sets on a norm
    split over ranks, whose test rows, alike on every rank, would not show the difference), with
    exactly one parameter (a norm with a gate, a router with more inputs: no)."""
    if "forward" in vars(module):
        return False
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def global_hooks() -> bool:
    """Whether a forward hook is registered for every module (torch.nn.modules.module's)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def hooked(module: torch.nn.Module) -> bool:
    """Whether calling past `module`'s __call__ would skip a forward hook (its own or a global one)."""
    return global_hooks() or bool(module._forward_pre_hooks or module._forward_hooks)


def _swap(module: torch.nn.Module, forward) -> None:
    module._pregated_forward = module.forward
    module.forward = types.MethodType(forward, module)


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if _plain(x, w) and x.shape[-1] == w.shape[0]:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty_like(rows)
        _core.cpu_rms_norm(rows, w, self._pregated_eps, out)
        return out.view(x.shape)
    return self._pregated_forward(x)


def _norm_eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _computes_rms_norm(module: torch.nn.Module, eps: float) -> bool:
    """Whether the module's own forward gives what cpu_rms_norm gives, on rows whose mean
    square is far above eps, near it and below it (so a different eps, a `1 + weight` or a
    missing weight shows)."""
    w = module.weight
    gen = torch.Generator().manual_seed(CHECK_SEED)
    scales = torch.tensor([4.0, eps ** 0.5, 0.1 * eps ** 0.5])
    x = (torch.randn(3, w.shape[0], generator=gen) * scales[:, None]).to(w.dtype)
    with torch.no_grad():
        try:
            want = module.forward(x)
        except Exception:  # a forward that needs more than one tensor is not this norm
            return False
        got = torch.empty_like(x)
        _core.cpu_rms_norm(x, w.detach(), eps, got)
    tol = _tolerance(w.dtype)
    return (isinstance(want, torch.Tensor) and want.dtype == got.dtype and want.shape == got.shape
            and torch.allclose(want, got, rtol=tol, atol=tol * 1e-3))


def use_fused_norms(model: torch.nn.Module) -> int:
    """Runs every RMSNorm of `model` that computes transformers' Llama-style RMS norm (checked
    against its own forward on test rows) as one call of the CPU backend (cpu_rms_norm) instead
    of eight tensor ops; others, and calls it cannot take (mixed dtypes, autograd), keep their
    forward. Returns how many."""
    n = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        eps = _norm_eps(module)
        if ("RMSNorm" in type(module).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1
                and _takes_one_tensor(module)
                and w.device.type == "cpu" and w.dtype in DTYPES and w.is_contiguous() and eps is not None
                and _computes_rms_norm(module, eps)):
            module._pregated_eps = eps
            _swap(module, _norm_forward)
            n += 1
    return n


def _router_forward(self, hidden_states: torch.Tensor):
    w = self.weight
    if _plain(hidden_states, w) and hidden_states.shape[-1] == w.shape[1]:
        x = hidden_states.reshape(-1, w.shape[1]).contiguous()
        k = self.top_k
        logits = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        weights = torch.empty(x.shape[0], k)
        ids = torch.empty(x.shape[0], k, dtype=torch.int64)
        _core.cpu_route(x, w, k, self._pregated_normalize, logits, weights, ids)
        return logits, weights.to(x.dtype) if self._pregated_cast else weights, ids
    return self._pregated_forward(hidden_states)


def _router_form(module: torch.nn.Module) -> tuple[bool, bool] | None:
    """(normalize, cast the weights to the logits' dtype) that make cpu_route give what the
    router's own forward gives on test rows; None when none does."""
    w = module.weight
    gen = torch.Generator().manual_seed(CHECK_SEED)
    # logits of standard deviation about 1: the top k hold clearly less than all the probability,
    # so normalising or not shows
    x = (torch.randn(5, w.shape[1], generator=gen) / w.float().norm(dim=1).mean().clamp_min(1e-6)).to(w.dtype)
    try:
        with torch.no_grad():
            want = module.forward(x)
    except Exception:  # a router that needs more than the hidden states is not this router
        return None
    if not (isinstance(want, tuple) and len(want) == 3 and all(isinstance(t, torch.Tensor) for t in want)):
        return None
    k = module.top_k
    logits, weights, ids = torch.empty(5, w.shape[0], dtype=w.dtype), torch.empty(5, k), torch.empty(5, k, dtype=torch.int64)
    _core.cpu_route(x, w.detach(), k, True, logits, weights, ids)
    tol = _tolerance(w.dtype)
    if not (want[0].dtype == logits.dtype and want[0].shape == logits.shape
            and torch.allclose(want[0].float(), logits.float(), rtol=tol, atol=tol * want[0].abs().max().item())
            and want[2].shape == ids.shape):
        return None
    # the same experts, or others of equal probability (bf16 logits tie often; torch's top-k
    # breaks ties in no fixed order, cpu_route takes the lower id)
    probs = torch.softmax(want[0].float(), dim=-1)
    if not torch.equal(probs.gather(1, want[2].long()), probs.gather(1, ids)):
        return None
    if want[1].dtype not in (torch.float32, w.dtype):
        return None
    cast, forms = want[1].dtype != torch.float32, []
    for normalize in (True, False):
        _core.cpu_route(x, w.detach(), k, normalize, logits, weights, ids)
        if torch.allclose(want[1].float(), weights.to(want[1].dtype).float(), rtol=tol, atol=1e-6):
            forms.append((normalize, cast))
    # both: the test rows could not tell (k = experts, or nearly all probability in the top k)
    return forms[0] if len(forms) == 1 or k == w.shape[0] and forms else None


def use_fused_routers(model: torch.nn.Module) -> int:
    """Runs every softmax-top-k router of `model` (a module with `weight` [experts, hidden] and
    `top_k` whose forward gives (logits, weights, ids) as cpu_route does, checked on test rows)
    as one call of the CPU backend; returns how many."""
    n = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        k = getattr(module, "top_k", None)
        if not (type(module).__name__.endswith("Router") and isinstance(w, torch.Tensor) and w.dim() == 2
                and isinstance(k, int) and 0 < k <= w.shape[0] and w.device.type == "cpu" and w.dtype in DTYPES
                and w.is_contiguous() and getattr(module, "bias", None) is None and _takes_one_tensor(module)):
            continue
        form = _router_form(module)
        if form is not None:
            module._pregated_normalize, module._pregated_cast = form
            _swap(module, _router_forward)
            n += 1
    return n


ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_ATTENTION_ARGS = {"hidden_states", "position_embeddings", "attention_mask", "cache", "past_key_values"}


def _attention_forward(self, *args, **kwargs):
    out = _lean_attention(self, args, kwargs)
    return out if out is not None else self._pregated_forward(*args, **kwargs)


def _norm_heads(norm, x: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """A q_norm / k_norm over the whole projection (OLMoE) or over each head (Qwen3)."""
    rows = x.shape[0]
    return norm(x) if norm.weight.numel() == x.shape[1] else norm(x.reshape(rows, heads, d)).reshape(rows, heads * d)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last two dimensions are compact (a growing cache's view of its buffer:
    cpu_attention reads it in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 and (t.shape[-2] == 1 or t.stride(-2) == t.shape[-1]) else t.contiguous()


def _lean_attention(self, args, kwargs):
    """One decode step of transformers' Llama-style attention in four calls (q/k/v in one pass,
    rotary embedding, attention, o_proj) around the cache's own update; None where the call is not
    one it takes (a mask, several new tokens, autograd, another device)."""
    if len(args) > 1 or kwargs.get("output_attentions"):
        return None
    h = args[0] if args else kwargs.get("hidden_states")
    pe, cache = kwargs.get("position_embeddings"), kwargs.get("cache", kwargs.get("past_key_values"))
    if kwargs.get("attention_mask") is not None or not isinstance(pe, tuple) or h is None or h.dim() != 3 or h.shape[1] != 1:
        return None
    group = siblings_of(self.q_proj)
    rows = few_rows(h, self.q_proj.weight)
    if group is None or not rows:  # few_rows: a host call
        return None
    if hooked(self.q_proj) or hooked(self.k_proj) or hooked(self.v_proj):  # one pass computes all three
        return None
    cos, sin = pe
    d = self.head_dim
    if cos.shape[-1] != d or cos.dtype != h.dtype or cos.numel() != rows * d:
        return None
    nq, nk = group.spans[0][1], group.spans[1][1] - group.spans[1][0]
    qh, kvh = nq // d, nk // d
    qkv = group.forward(h, rows).view(rows, -1)
    q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
    q_norm, k_norm, clip = self._pregated_lean
    normed = q_norm is not None or k_norm is not None
    if normed:
        q = _norm_heads(q_norm, q, qh, d) if q_norm is not None else q.contiguous()
        k = _norm_heads(k_norm, k, kvh, d) if k_norm is not None else k.contiguous()
    if clip is not None:
        for t in (q, k, v):
            t.clamp_(min=-clip, max=clip)
    cos, sin = cos.reshape(rows, d), sin.reshape(rows, d)
    if normed:
        _core.cpu_rope(q, cos, sin, qh)
        _core.cpu_rope(k, cos, sin, kvh)
    else:  # q and k heads lead every row of the projections' output
        _core.cpu_rope(qkv, cos, sin, qh + kvh)
        q = qkv
    batch = h.shape[0]
    keys, values = k.view(batch, 1, kvh, d).transpose(1, 2), v.view(batch, 1, kvh, d).transpose(1, 2)
    if cache is not None:
        rest = {name: value for name, value in kwargs.items() if name not in _ATTENTION_ARGS}
        keys, values = cache.update(keys, values, self.layer_idx, kwargs=rest)
    out = torch.empty(rows, qh * d, dtype=h.dtype)
    _core.cpu_attention(q, _rows(keys), _rows(values), qh, self.scaling, out)
    o_proj = self.o_proj
    return (o_proj if hooked(o_proj) else o_proj.forward)(out.view(batch, 1, qh * d)), None


def _lean_attention_agrees(module: torch.nn.Module) -> bool:
    """Whether the lean decode step gives what the module's own forward gives: three steps of one
    new token for two sequences from an empty cache, outputs and cached keys and values."""
    from transformers.cache_utils import DynamicCache

    w = module.q_proj.weight
    params = inspect.signature(module._pregated_forward).parameters
    cache_arg = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
    gen = torch.Generator().manual_seed(CHECK_SEED)
    caches = [DynamicCache(), DynamicCache()]
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    try:
        with torch.no_grad():
            for _ in range(3):
                h = torch.randn(2, 1, w.shape[1], generator=gen).to(w.dtype)
                angles = torch.rand(2, 1, module.head_dim // 2, generator=gen) * 6.3
                emb = torch.cat([angles, angles], dim=-1)
                pe = (emb.cos().to(w.dtype), emb.sin().to(w.dtype))
                want = module._pregated_forward(hidden_states=h, position_embeddings=pe, attention_mask=None,
                                                **{cache_arg: caches[0]})
                got = _lean_attention(module, (), {"hidden_states": h, "position_embeddings": pe,
                                                   "attention_mask": None, "cache": caches[1]})
                if got is None or not torch.allclose(got[0].float(), want[0].float(), rtol=tol,
                                                     atol=tol * want[0].abs().max().item()):
                    return False
    except Exception:  # a forward that needs more than a Llama-style attention gets
        return False
    a, b = caches[0].layers[module.layer_idx], caches[1].layers[module.layer_idx]
    return all(torch.allclose(x.float(), y.float(), rtol=tol, atol=tol) for x, y in ((a.keys, b.keys), (a.values, b.values)))


def use_lean_attention(model: torch.nn.Module) -> int:
    """Runs the decode steps of every Llama-style attention of `model` (q/k/v grouped as siblings
    by use_cpu_pool_for_dense, an o_proj, optional q_norm / k_norm, no other parameters, a
    rotary embedding given as cos / sin) with the CPU backend's rotary embedding and attention,
    where three decode steps agree with the module's own forward; returns how many."""
    n = 0
    for module in model.modules():
        children = {name for name, _ in module.named_children()}
        q_proj = getattr(module, "q_proj", None)
        if not ({"q_proj", "k_proj", "v_proj", "o_proj"} <= children <= ATTENTION_CHILDREN
                and not list(module.parameters(recurse=False)) and isinstance(getattr(module, "head_dim", None), int)
                and isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "scaling")
                and getattr(getattr(module, "config", None), "attn_logit_softcapping", None) is None
                and "forward" not in vars(module) and siblings_of(q_proj) is not None
                and siblings_of(q_proj) is siblings_of(module.k_proj) is siblings_of(module.v_proj)
                and [q_proj._pregated_index, module.k_proj._pregated_index, module.v_proj._pregated_index] == [0, 1, 2]):
            continue
        # read once: a module attribute that is missing costs a raised AttributeError per lookup
        module._pregated_lean = (getattr(module, "q_norm", None), getattr(module, "k_norm", None),
                                 getattr(module.config, "clip_qkv", None))
        _swap(module, _attention_forward)
        if _lean_attention_agrees(module):
            n += 1
        else:  # back to the class's forward
            del module.forward, module._pregated_forward, module._pregated_lean
    return n


def use_fused_modules(model: torch.nn.Module) -> dict[str, int]:
    """Every swap of this module on `model` (after cpu_dense.use_cpu_pool_for_dense, whose
    sibling projections the attention needs); how many of each."""
    return {"norms": use_fused_norms(model), "routers": use_fused_routers(model),
            "attention": use_lean_attention(model)}
