"""The decode step of a decoder-only model on the CPU backend as one Python function: the
embedding, then per decoder layer its two norms, the lean attention (cpu_fused), the residual
adds and the MoE block (its router and the experts' executor called directly), then the final
norm and the LM head. transformers' model and layer forwards around the same calls (module
dispatch, decorators, mask and output bookkeeping, the experts interface) cost up to 0.8 ms of
an 11 ms mixtral-cpu fp32 step on two cores (one process alternating the two: float32 1.02-1.08x,
bfloat16 1.11-1.14x).

Installed only where the model's own forward gives the same logits and cache: the check runs
two decode steps both ways after a short prefill, with every experts module's executor replaced
by a stub (a pure function of its inputs), so it sees the model's wiring and touches no expert
store. Calls it does not take return None and the caller runs the model: several new tokens, a
padded batch (the caller says so), a sliding window the cache has reached, hooks other than the
block taps' on a module it would call directly, an attention call the lean path would refuse.
"""

from __future__ import annotations

import os

import torch

from .cpu_dense import few_rows, siblings_of
from .cpu_fused import CHECK_SEED, _attention_forward, _lean_attention, _router_forward, _tolerance, global_hooks
from .experts import stubbed_experts

LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
FEEDING_NORM = "post_attention_layernorm"  # the norm whose output is the MoE block's input


def _swapped(module: torch.nn.Module, forward) -> bool:
    bound = module.__dict__.get("forward")
    return getattr(bound, "__func__", None) is forward


class _Layer:
    """One decoder layer's parts; `block` (m, experts module) where its MoE block is called
    inline: a router swapped by cpu_fused and an experts module, nothing else."""

    def __init__(self, layer: torch.nn.Module, block: tuple[int, torch.nn.Module] | None):
        attn = self.attn = layer.self_attn
        self.norm1, self.norm2, self.mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
        self.q_proj = attn.q_proj
        self.m, self.experts = block if block is not None else (None, None)
        self.gate = layer.mlp.gate if block is not None else None
        # called directly (their hooks do not run): what the step checks for hooks
        self.direct = [layer, attn, attn.q_proj, attn.k_proj, attn.v_proj, self.norm1] + (
            [self.norm2, self.mlp, self.gate, self.experts] if block is not None else [])


class LeanStep:
    """step(tokens [B, 1], positions [B, 1], cache) -> logits [B, 1, V], or None where the call
    is not one it takes (before anything is written to the cache)."""

    def __init__(self, model: torch.nn.Module, layers: list[_Layer], taps, cache_arg: str, window: int | None):
        inner = model.model
        self.model, self.embed, self.rotary, self.norm, self.head = model, inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers, self.taps, self.cache_arg, self.window = layers, taps, cache_arg, window
        direct = [model, inner] + [mod for lay in layers for mod in lay.direct]
        self.hook_dicts = [d for mod in direct for d in (mod._forward_pre_hooks, mod._forward_hooks)]

    def _hooks_allow(self) -> bool:
        """No hook would be skipped but the block taps' (whose records the step makes itself)."""
        if global_hooks():
            return False
        ours = self.taps.recording_hooks if self.taps is not None else frozenset()
        return all(ours.issuperset(d) for d in self.hook_dicts if d)

    def _feeds_taps(self) -> bool:
        """The taps know (from a forward of the model) that they record block m's residual stream
        as the input of FEEDING_NORM: what the step records for them."""
        return self.taps is None or (self.taps.found and self.taps.norm_name == FEEDING_NORM)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor | None:
        if (tokens.dim() != 2 or tokens.shape[1] != 1 or positions.shape != tokens.shape or cache is None
                or tokens.device.type != "cpu"):
            return None
        if self.window is not None and cache.get_seq_length() + 1 >= self.window:
            return None  # the sliding window's mask would hide keys
        if not (self._hooks_allow() and self._feeds_taps()):
            return None
        h = self.embed(tokens)
        if not few_rows(h, self.layers[0].q_proj.weight) or any(siblings_of(lay.q_proj) is None for lay in self.layers):
            return None
        pe = self.rotary(h, position_ids=positions)
        for lay in self.layers:
            out = _lean_attention(lay.attn, (), {"hidden_states": lay.norm1.forward(h), "position_embeddings": pe,
                                                 "attention_mask": None, "cache": cache})
            if out is None:  # the checks above are the lean attention's own: not reached
                if lay is self.layers[0]:
                    return None  # nothing written yet
                raise RuntimeError(f"the lean decode step's attention refused layer {lay.attn.layer_idx} after "
                                   "earlier layers had written the cache; set PREGATED_LEAN_STEP=0 and report this")
            h = h + out[0]
            if lay.m is None:
                h = h + lay.mlp(lay.norm2(h))
                continue
            if self.taps is not None:
                self.taps.residual[lay.m] = h
            x = lay.norm2.forward(h)
            flat = x.view(-1, x.shape[-1])
            _, weights, ids = lay.gate.forward(flat)
            binding = lay.experts._pregated
            h = h + binding.executor(binding.block, flat, ids, weights).view_as(h)
        return self.head(self.norm(h))


def lean_step_wanted() -> bool:
    """PREGATED_LEAN_STEP: 1 (default) installs the lean step where it agrees, 0 never."""
    value = os.environ.get("PREGATED_LEAN_STEP", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PREGATED_LEAN_STEP={value!r}: give 1 (the lean decode step where it agrees) or 0 (never)")
    return value == "1"


def _sliding_window(config) -> int | None:
    """The window of the model's sliding-window attention, None where every layer attends to all."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    return window if types is None or "sliding_attention" in types else None


def _agrees(step: LeanStep, blocks) -> bool:
    """Two decode steps of two sequences after a prefill of three tokens, the model's own forward
    against the step (experts stubbed): logits and every cached key and value."""
    from transformers.cache_utils import DynamicCache

    model, cfg = step.model, step.model.config
    w = step.layers[0].q_proj.weight
    gen = torch.Generator().manual_seed(CHECK_SEED)
    vocab = step.embed.weight.shape[0]
    tol = _tolerance(w.dtype)
    try:
        with stubbed_experts(blocks), torch.inference_mode():
            caches = [DynamicCache(config=cfg), DynamicCache(config=cfg)]
            prefix = torch.randint(vocab, (2, 3), generator=gen)
            for cache in caches:
                model(input_ids=prefix, use_cache=True, **{step.cache_arg: cache})
            for n in range(2):
                tokens = torch.randint(vocab, (2, 1), generator=gen)
                positions = torch.full((2, 1), 3 + n, dtype=torch.long)
                want = model(input_ids=tokens, position_ids=positions, use_cache=True, logits_to_keep=1,
                             **{step.cache_arg: caches[0]}).logits
                got = step(tokens, positions, caches[1])
                if got is None or got.shape != want.shape or not torch.allclose(
                        got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item()):
                    return False
    except Exception:  # a model whose step is more than the lean one's
        return False
    finally:
        if step.taps is not None:  # what the check's forwards recorded for the pre-gate
            step.taps.residual[:] = [None] * len(step.taps.residual)
    pairs = [(a.keys, b.keys) for a, b in zip(caches[0].layers, caches[1].layers)]
    pairs += [(a.values, b.values) for a, b in zip(caches[0].layers, caches[1].layers)]
    return all(x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=tol, atol=tol) for x, y in pairs)


def lean_step_for(model: torch.nn.Module, blocks, taps, cache_arg: str) -> LeanStep | None:
    """The lean decode step of `model` (after cpu_fused.use_fused_modules and the experts'
    bindings), or None where the model is not a decoder-only stack of pre-norm layers whose
    attention takes the lean path, or where the step does not give what its forward gives."""
    if not lean_step_wanted():
        return None
    inner = getattr(model, "model", None)
    if inner is None or getattr(model, "lm_head", None) is None or model.config.is_encoder_decoder:
        return None
    if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return None
    if len(inner.layers) != getattr(model.config, "num_hidden_layers", len(inner.layers)):
        return None
    by_decoder = {id(b.decoder): m for m, b in enumerate(blocks)}
    layers = []
    for layer in inner.layers:
        if ({name for name, _ in layer.named_children()} != LAYER_CHILDREN or "forward" in vars(layer)
                or not _swapped(layer.self_attn, _attention_forward) or siblings_of(layer.self_attn.q_proj) is None):
            return None
        block = None
        m = by_decoder.get(id(layer))
        if m is not None and blocks[m].block is layer.mlp:
            mlp = layer.mlp
            if ({name for name, _ in mlp.named_children()} == {"gate", "experts"} and blocks[m].router is mlp.gate
                    and blocks[m].experts is mlp.experts and _swapped(mlp.gate, _router_forward)):
                block = (m, mlp.experts)
        layers.append(_Layer(layer, block))
    if not layers:
        return None
    step = LeanStep(model, layers, taps, cache_arg, _sliding_window(model.config))
    return step if _agrees(step, blocks) else None
