"""A checkpoint's config.json read through transformers, and pregated's summary of the model:
the MoE layers, the experts' shape and bytes, the context and the special tokens."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def dtype_from_name(name) -> torch.dtype | None:
    """'bfloat16', 'torch.bfloat16', 'bf16', torch.bfloat16 ... -> the torch dtype; None when not supported."""
    if isinstance(name, torch.dtype):
        return name if name in DTYPES.values() else None
    return DTYPES.get(str(name).replace("torch.", ""))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes something we cannot run."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    moe_layers: list[int]          # decoder layers whose MLP is a MoE block
    ffn: str                       # the runtime's expert kind (gated_silu, gated_swiglu_oai, ...)
    has_bias: bool
    dtype: torch.dtype             # dtype of the dense weights and the experts
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    is_encoder_decoder: bool = False
    dense_parameters: int = 0      # every parameter but the routed experts'
    expert_format: str = "dense"   # or int8 / int4 / int3 / int2: the expert store's packed codes
    group_size: int = 64           # quantized formats: weights per scale and zero

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_experts", "top_k",
                     "moe_intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"config.json: {self.top_k} experts per token is more than the "
                              f"{self.num_experts} experts of a layer")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_routed_experts(self) -> int:
        """Routed experts of the whole model (every MoE block's)."""
        return self.num_experts * self.num_moe_layers

    def expert_bytes(self) -> int:
        """Bytes of one expert in the expert store and in a slot (the runtime's padded block)."""
        from . import _core

        return _core.expert_bytes(self.hidden_size, self.moe_intermediate_size, self.ffn,
                                  dtype_name(self.dtype), self.has_bias, self.expert_format, self.group_size)

    def all_expert_bytes(self) -> int:
        return self.expert_bytes() * self.num_routed_experts


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def checkpoint_dtype(hf_config) -> torch.dtype:
    name = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
    dtype = dtype_from_name(name)
    if dtype is None:
        raise ConfigError(f"config.json: dtype '{name}' is not supported (float32, float16, bfloat16)")
    return dtype


def model_config(hf_config, layout, moe_layers: list[int], top_k: int, dtype: torch.dtype,
                 num_layers: int, dense_parameters: int) -> ModelConfig:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 4096
    return ModelConfig(
        model_type=hf_config.model_type, vocab_size=int(text.vocab_size), hidden_size=layout.hidden,
        num_layers=num_layers, num_experts=layout.num_experts, top_k=top_k,
        moe_intermediate_size=layout.intermediate, moe_layers=list(moe_layers), ffn=layout.ffn,
        has_bias=layout.has_bias, dtype=dtype, max_position_embeddings=int(context),
        bos_token_id=getattr(text, "bos_token_id", None), eos_token_ids=_token_ids(getattr(text, "eos_token_id", None)),
        pad_token_id=getattr(text, "pad_token_id", None),
        is_encoder_decoder=bool(getattr(hf_config, "is_encoder_decoder", False)),
        dense_parameters=dense_parameters)


def read_hf_config(folder: str):
    """config.json (and generation_config.json's eos ids) through transformers' AutoConfig."""
    from transformers import AutoConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: a model folder needs config.json (Hugging Face layout)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise ConfigError(f"{path} has no model_type: it is not a transformers model config")
    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as e:
        import transformers

        raise ConfigError(f"config.json: model_type '{model_type}' is not a model this transformers "
                          f"({transformers.__version__}) knows: {e}") from e
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"config.json could not be read by transformers ({e}); check its fields") from e
    gen = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen):
        try:
            with open(gen, encoding="utf-8") as f:
                extra = _token_ids(json.load(f).get("eos_token_id"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{gen} is not valid JSON: {e}") from e
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        merged = list(dict.fromkeys(_token_ids(getattr(text, "eos_token_id", None)) + extra))
        if merged:
            text.eos_token_id = merged if len(merged) > 1 else merged[0]
    return hf_config
