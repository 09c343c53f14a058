"""transformers' own model for a checkpoint, built on the meta device, and what pregated needs to
know of it: which decoder layers hold routed experts, each MoE block's router, and the experts'
layout. Attention, norms, RoPE, shared experts and the KV cache are transformers' code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .config import ConfigError, ModelConfig
from .experts import ExpertLayout, UnsupportedModel, is_experts_module, layout_of, register


@dataclass
class MoEBlock:
    """One MoE layer of the model (block m)."""
    layer: int                  # decoder layer index
    path: str                   # module path of the experts module
    experts: torch.nn.Module    # transformers' experts module (its weights live in the expert store)
    block: torch.nn.Module      # the MoE block that routes and calls the experts
    decoder: torch.nn.Module    # the decoder layer
    router: torch.nn.Module     # block.gate / block.router: hidden -> (logits, weights, ids)
    router_args: tuple[str, ...]  # further arguments the block passes its router, read off the block
    stack: str = ""             # "encoder" / "decoder" in an encoder-decoder model
    read_router: object = None  # router output -> (logits, ids, weights); None: (logits, weights, ids)


def build_model(hf_config, dtype: torch.dtype):
    """transformers' model of `hf_config` (a causal LM, or a seq2seq LM for an encoder-decoder) on
    the meta device, its experts through pregated."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from . import switch

    register()
    try:
        with torch.device("meta"):
            if hf_config.model_type in switch.MODEL_TYPES:
                model = AutoModelForSeq2SeqLM.from_config(hf_config, dtype=dtype)
                switch.adapt(model)
            elif getattr(hf_config, "is_encoder_decoder", False):
                model = AutoModelForSeq2SeqLM.from_config(hf_config, experts_implementation="pregated", dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_config(hf_config, experts_implementation="pregated", dtype=dtype)
    except ValueError as e:
        raise ConfigError(f"config.json: transformers cannot build a language model for model_type "
                          f"'{hf_config.model_type}' ({e})") from e
    return model.eval()


def extra_conversions(model) -> list:
    """Checkpoint conversions pregated adds to transformers' own (its adapters' layouts)."""
    from . import switch

    return switch.conversions() if model.config.model_type in switch.MODEL_TYPES else []


def _router_of(block: torch.nn.Module, experts: torch.nn.Module) -> tuple[torch.nn.Module, tuple[str, ...]]:
    for name in ("gate", "router"):
        router = getattr(block, name, None)
        if isinstance(router, torch.nn.Module) and router is not experts:
            params = [p for p in list(inspect.signature(router.forward).parameters.values())[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            # The block passes its router tensors it owns (correction biases): those, by name.
            extra = []
            for p in params:
                if p.default is inspect.Parameter.empty or getattr(block, p.name, None) is not None:
                    extra.append(p.name)
                else:
                    break
            extra = tuple(extra)
            missing = [a for a in extra if not hasattr(block, a)]
            if missing:
                raise UnsupportedModel(f"{type(block).__name__} passes its router {', '.join(missing)}, "
                                       "which the pre-gate cannot supply")
            return router, extra
    raise UnsupportedModel(f"{type(block).__name__} has no router named gate or router")


def moe_blocks(model) -> list[MoEBlock]:
    """Every MoE block of the model, in the order its forward runs them (encoder, then decoder)."""
    from . import switch

    blocks = []
    for path, experts in model.named_modules():
        if not is_experts_module(experts):
            continue
        block_path, _, _ = path.rpartition(".")
        decoder_path, _, _ = block_path.rpartition(".")
        block, decoder = model.get_submodule(block_path), model.get_submodule(decoder_path)
        router, extra = _router_of(block, experts)
        stack = next((s for s in ("encoder", "decoder") if f".{s}." in f".{path}."), "")
        read = switch.read_router_output if isinstance(experts, switch.SwitchExperts) else None
        blocks.append(MoEBlock(layer=len(blocks), path=path, experts=experts, block=block, decoder=decoder,
                               router=router, router_args=extra, stack=stack, read_router=read))
    for b in blocks:  # decoder-only models: the decoder layer's own index
        parts = b.path.split(".")
        if parts[:2] == ["model", "layers"] and parts[2].isdigit():
            b.layer = int(parts[2])
    return blocks


def num_layers(model) -> int:
    """Decoder layers (encoder and decoder blocks of an encoder-decoder)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return len(inner.layers)
    return sum(len(getattr(getattr(model, s, None), "block", [])) for s in ("encoder", "decoder"))


def expert_layout(blocks: list[MoEBlock]) -> ExpertLayout:
    layouts = {layout_of(b.experts) for b in blocks}
    if len(layouts) != 1:
        raise UnsupportedModel("the MoE layers' experts differ in shape or layout across layers; "
                               "pregated runs one expert shape per model")
    return layouts.pop()


def _top_k(hf_config, blocks: list[MoEBlock]) -> int:
    from .switch import SwitchExperts

    if isinstance(blocks[0].experts, SwitchExperts):
        return 1  # Switch routing: the top expert only
    for src in (blocks[0].router, blocks[0].block, hf_config):
        for name in ("top_k", "num_experts_per_tok", "moe_k", "num_experts_per_token", "top_k_experts"):
            value = getattr(src, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise UnsupportedModel("cannot tell how many experts each token uses (no top_k / num_experts_per_tok)")


def describe(hf_config, model, dtype: torch.dtype) -> tuple[list[MoEBlock], ExpertLayout, ModelConfig]:
    """The MoE blocks, the experts' layout and pregated's summary of the model."""
    from .config import model_config

    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError(
            f"config.json: model_type '{hf_config.model_type}' has no routed experts that pregated can "
            "offload (its MoE layers must use transformers' experts interface, as Mixtral, Qwen-MoE, "
            "DeepSeek, GPT-OSS and about sixty other families do)")
    layout = expert_layout(blocks)
    expert_params = {id(getattr(b.experts, p)) for b in blocks for p in layout.params if hasattr(b.experts, p)}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in expert_params)
    cfg = model_config(hf_config, layout, [b.layer for b in blocks], _top_k(hf_config, blocks), dtype,
                       num_layers(model), dense)
    return blocks, layout, cfg


def drop_expert_parameters(blocks: list[MoEBlock], layout: ExpertLayout) -> None:
    """The experts' weights live in the expert store: the modules keep none (not even on meta),
    so moving or saving the model never touches them."""
    for b in blocks:
        for name in layout.params:
            b.experts._parameters.pop(name, None)


def dense_bytes(model) -> int:
    """Bytes of the parameters left in the model (everything but the routed experts)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def summarize(folder: str, dtype=None):
    """(transformers config, pregated's ModelConfig) of a model folder, from config.json alone
    (the model is built on the meta device; no weight is read)."""
    from .config import checkpoint_dtype, dtype_from_name, read_hf_config

    hf_config = read_hf_config(folder)
    dtype = dtype_from_name(dtype) if dtype is not None else checkpoint_dtype(hf_config)
    return hf_config, describe(hf_config, build_model(hf_config, dtype), dtype)[2]
